"""``sluice links …`` against a running ``sluice serve`` (both real processes)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.linkkit import READER, WRITER, Storage, rules_file
from tests.proc import SluiceProcess, run_sluice
from tests.servers import free_port


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SluiceProcess]:
    workdir = tmp_path_factory.mktemp("links-cli")
    main, admin = free_port(), free_port()
    storage = Storage("sqlite", "memory://", workdir / "data")
    rules = rules_file(workdir, storage, listen=f"127.0.0.1:{main}", admin=f"127.0.0.1:{admin}")
    proc = SluiceProcess(rules, main, admin, workdir).start()
    yield proc
    proc.stop()


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    return {**env, **extra}


def links(
    served: SluiceProcess, *args: str, token: str | None = WRITER, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``sluice links ARGS`` pointed at ``served`` through the environment."""
    env = clean_env(SLUICE_ADMIN_URL=served.admin_url(""))
    if token:
        env["SLUICE_ADMIN_TOKEN"] = token
    return run_sluice(["links", *args], cwd or served.workdir, env=env)


def test_round_trip(served: SluiceProcess, tmp_path: Path) -> None:
    made = links(served, "create", "https://example.com/cli", "--tag", "cli", "--max-clicks", "5")
    assert made.returncode == 0, made.stderr
    link = json.loads(made.stdout)
    assert link["url"] == "https://example.com/cli" and link["created_by"] == "writer"
    custom = links(served, "create", "https://example.com/two", "--code", "cli-two", "-q")
    assert (custom.returncode, custom.stdout) == (0, "cli-two\n")
    ab = links(
        served,
        "create",
        "https://a.example/",
        "--variant",
        "https://a.example/=1",
        "--variant",
        "https://b.example/=2",
        "--status",
        "307",
        "--expires-in",
        "7d",
        "-q",
    )
    assert ab.returncode == 0, ab.stderr

    listed = links(served, "list", "--tag", "cli")
    assert listed.returncode == 0
    assert listed.stdout == f"{link['code']}\thttps://example.com/cli\tcli\n"
    every = links(served, "list", "--all", "--limit", "1", "--json")
    assert [json.loads(x)["code"] for x in every.stdout.splitlines()][:3] == [
        ab.stdout.strip(),
        "cli-two",
        link["code"],
    ]
    shown = links(served, "show", "cli-two", "--stats", token=READER)
    assert shown.returncode == 0, shown.stderr
    body = json.loads(shown.stdout)
    assert body["clicks"] == 0 and body["stats"]["total"] == 0

    exported = tmp_path / "links.jsonl"
    out = links(served, "export", "-o", str(exported), token=READER)
    assert out.returncode == 0, out.stderr
    lines = exported.read_text().splitlines()
    assert {json.loads(x)["code"] for x in lines} >= {"cli-two", link["code"]}
    to_stdout = links(served, "export")
    assert to_stdout.stdout.splitlines() == lines

    for line in lines:
        code = json.loads(line)["code"]
        deleted = links(served, "delete", code)
        assert (deleted.returncode, deleted.stdout) == (0, f"deleted {code}\n")
    gone = links(served, "show", "cli-two")
    assert gone.returncode == 1
    assert gone.stderr == "sluice links: there is no short link 'cli-two' (HTTP 404 not_found)\n"
    assert links(served, "list").stdout == ""

    imported = links(served, "import", str(exported))
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout == f"imported {len(lines)}, skipped 0 existing\n"
    again = links(served, "import", str(exported))
    assert again.stdout.startswith(f"imported 0, skipped {len(lines)} existing\n")
    assert links(served, "export").stdout.splitlines() == lines


def test_failures_exit_1_with_the_api_message(served: SluiceProcess, tmp_path: Path) -> None:
    bad = links(served, "create", "ftp://example.com/")
    assert bad.returncode == 1
    assert "only absolute http:// and https:// URLs can be shortened" in bad.stderr
    assert "(HTTP 400 invalid)" in bad.stderr
    assert links(served, "create", "https://example.com/x", "--code", "taken-1").returncode == 0
    taken = links(served, "create", "https://example.com/y", "--code", "taken-1")
    assert taken.returncode == 1
    assert "the code 'taken-1' is already taken (HTTP 409 code_taken)" in taken.stderr
    readonly = links(served, "delete", "taken-1", token=READER)
    assert readonly.returncode == 1 and "read-only (HTTP 403 forbidden)" in readonly.stderr
    anonymous = links(served, "list", token=None, cwd=tmp_path)
    assert anonymous.returncode == 1 and "(HTTP 401 unauthorized)" in anonymous.stderr
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"code": "ok-code", "url": "https://e.com/", "created_at": 1}\nnot json\n')
    refused = links(served, "import", str(broken))
    assert refused.returncode == 1
    assert "nothing imported: line 2: not valid JSON" in refused.stderr
    missing_file = links(served, "import", str(tmp_path / "absent.jsonl"))
    assert missing_file.returncode == 1 and "No such file" in missing_file.stderr
    down = run_sluice(
        ["links", "list", "--admin", f"http://127.0.0.1:{free_port()}", "--token", WRITER],
        tmp_path,
        env=clean_env(),
    )
    assert down.returncode == 1 and "cannot reach the admin API" in down.stderr
    usage = run_sluice(["links", "create"], tmp_path, env=clean_env())
    assert usage.returncode == 2


def test_admin_url_and_token_default_from_the_rules_file(served: SluiceProcess) -> None:
    """No flags, no environment: ``rules.yaml`` in the working directory says where and how."""
    made = run_sluice(
        ["links", "create", "https://example.com/from-rules", "-q"],
        served.workdir,
        env=clean_env(),
    )
    assert made.returncode == 0, made.stderr
    code = made.stdout.strip()
    shown = run_sluice(["links", "show", code, "-c", str(served.rules)], Path("/"), env=clean_env())
    assert json.loads(shown.stdout)["created_by"] == "writer"  # the file's write token
