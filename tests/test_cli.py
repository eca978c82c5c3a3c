"""``sluice check`` and the command line, run as real processes.

Each bad rules file is its own case and the test asserts the exact
``file:line: key.path: message`` lines ``sluice check`` prints on stderr.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy import __version__
from tests.proc import REPO, run_sluice

# The shipped examples: CI runs `sluice check` on exactly these (see the Makefile's lint).
SHIPPED = [
    "rules.yaml",
    "deploy/docker/rules.yaml",
    *sorted(str(p.relative_to(REPO)) for p in REPO.glob("config/*.yaml")),
]

GOOD = """\
listen: 127.0.0.1:18000
admin:
  listen: 127.0.0.1:18001
  token: an-admin-token-of-some-length
storage:
  url: memory://
upstreams:
  api:
    url: http://127.0.0.1:9000/
    read_timeout: 5s
limits:
  - name: per_minute
    key: header:X-API-Key | ip
    algorithm: fixed_window
    limit: 100
    window: 1m
  - name: bucket
    algorithm: token_bucket
    capacity: 10
    refill: 5/s
routes:
  - name: api
    match: {path_prefix: /api/, methods: [get, POST]}
    upstream: api
    limits: [per_minute, bucket]
"""


def clean_env() -> dict[str, str]:
    """The environment without SLUICE_* variables, so ${VAR:-default} take their defaults."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}


def check(tmp_path: Path, text: str, name: str = "rules.yaml") -> subprocess.CompletedProcess[str]:
    (tmp_path / name).write_text(text)
    return run_sluice(["check", name], cwd=tmp_path, env=clean_env())


@pytest.mark.parametrize("path", SHIPPED)
def test_shipped_example_passes_check(path: str) -> None:
    # Examples read their secrets from the environment, as a deployment would.
    env = {**clean_env(), "SLUICE_ADMIN_TOKEN": "placeholder-token-for-check"}
    result = run_sluice(["check", path], cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    digest = hashlib.sha256((REPO / path).read_bytes()).hexdigest()
    assert result.stdout.splitlines()[0] == f"{path}: OK (sha256 {digest[:12]})"


def test_check_prints_summary(tmp_path: Path) -> None:
    result = check(tmp_path, GOOD)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    digest = hashlib.sha256(GOOD.encode()).hexdigest()
    assert result.stdout == (
        f"rules.yaml: OK (sha256 {digest[:12]})\n"
        "  listen 127.0.0.1:18000, admin 127.0.0.1:18001 (1 token(s)), storage memory://\n"
        "  upstreams (1):\n"
        "    api: http://127.0.0.1:9000\n"
        "  limits (2):\n"
        "    per_minute: fixed_window 100/1m by [header:X-API-Key | ip], storage down → allow\n"
        "    bucket: token_bucket capacity 10, refill 5/s by [ip], storage down → allow\n"
        "  routes (1, first match wins):\n"
        "    api: GET,POST prefix=/api/ → api [per_minute, bucket]\n"
        "  webhooks (0):\n"
    )


# (case id, rules text, exact stderr lines)
BROKEN = [
    (
        "unknown_upstream",
        """\
upstreams:
  api: http://127.0.0.1:9000
  web: http://127.0.0.1:9001
routes:
  - match: {path_prefix: /}
    upstream: ap
""",
        [
            "rules.yaml:6: routes[0].upstream: unknown upstream 'ap' (known: api, web)"
            " (did you mean 'api'?)"
        ],
    ),
    (
        "unknown_limit_in_route",
        """\
upstreams: {api: http://127.0.0.1:9000}
limits:
  - {name: per_minute, limit: 10, window: 1m}
routes:
  - upstream: api
    limits: [per_minut]
""",
        [
            "rules.yaml:6: routes[0].limits: unknown limit 'per_minut' (known: per_minute)"
            " (did you mean 'per_minute'?)"
        ],
    ),
    (
        "unknown_top_level_key",
        """\
listen: 127.0.0.1:18000
limts:
  - {name: a, limit: 1, window: 1s}
""",
        ["rules.yaml:2: limts: unknown key (did you mean 'limits'?)"],
    ),
    (
        "unknown_nested_key",
        """\
upstreams:
  api:
    url: http://127.0.0.1:9000
    conect_timeout: 2s
""",
        [
            "rules.yaml:4: upstreams.api.conect_timeout: unknown key"
            " (did you mean 'connect_timeout'?)"
        ],
    ),
    (
        # An optional section that is absent is still a known key.
        "misspelled_optional_section",
        """\
listen: 127.0.0.1:18000
redirect: {prefix: /s/}
""",
        ["rules.yaml:2: redirect: unknown key (did you mean 'redirects'?)"],
    ),
    (
        "misspelled_route_match",
        """\
upstreams: {api: http://127.0.0.1:9000}
routes:
  - mach: {path_prefix: /api/}
    upstream: api
""",
        ["rules.yaml:3: routes[0].mach: unknown key (did you mean 'match'?)"],
    ),
    (
        "bad_duration",
        """\
upstreams:
  api:
    url: http://127.0.0.1:9000
    read_timeout: 5x
""",
        [
            "rules.yaml:4: upstreams.api.read_timeout: bad duration '5x'"
            " (use 500ms, 10s, 1m, 1h or 1d)"
        ],
    ),
    (
        "zero_duration",
        """\
limits:
  - name: a
    limit: 5
    window: 0s
""",
        ["rules.yaml:4: limits[0].window: must be longer than zero, got '0s'"],
    ),
    (
        "unknown_algorithm",
        """\
limits:
  - name: a
    algorithm: leaky_bucket
    limit: 5
    window: 1m
""",
        [
            "rules.yaml:3: limits[0].algorithm: unknown value 'leaky_bucket' (expected one of:"
            " fixed_window, sliding_window_log, sliding_window_counter, token_bucket, gcra)"
            " (did you mean 'token_bucket'?)"
        ],
    ),
    (
        "token_bucket_with_window",
        """\
limits:
  - name: a
    algorithm: token_bucket
    capacity: 5
    refill: 1/s
    window: 1m
""",
        ["rules.yaml:6: limits[0].window: token_bucket takes capacity and refill, not window"],
    ),
    (
        "malformed_yaml_flow",
        """\
listen: [127.0.0.1, 8000
upstreams: {}
""",
        [
            "rules.yaml:2: invalid YAML: expected ',' or ']', but got ':'"
            " (while parsing a flow sequence from line 1)"
        ],
    ),
    (
        "malformed_yaml_indent",
        """\
upstreams:
  api: http://127.0.0.1:9000
    read_timeout: 2s
""",
        ["rules.yaml:3: invalid YAML: mapping values are not allowed here"],
    ),
    (
        "upstream_url_without_scheme",
        """\
upstreams:
  api:
    url: 127.0.0.1:9000
""",
        [
            "rules.yaml:3: upstreams.api.url: expected an absolute URL with scheme http or https,"
            " got '127.0.0.1:9000'"
        ],
    ),
    (
        "upstream_shorthand_without_scheme",
        """\
upstreams:
  api: localhost:9000
""",
        [
            "rules.yaml:2: upstreams.api: expected an absolute URL with scheme http or https,"
            " got 'localhost:9000'"
        ],
    ),
    (
        "storage_scheme_typo",
        """\
storage:
  url: redis+sentinal://127.0.0.1:26379/main
""",
        [
            "rules.yaml:2: storage.url: unsupported storage URL"
            " 'redis+sentinal://127.0.0.1:26379/main'"
            " (schemes: memory, redis, rediss, redis+sentinel, redis+cluster)"
            " (did you mean 'redis+sentinel'?)"
        ],
    ),
    (
        "duplicate_key",
        """\
listen: 127.0.0.1:18000
listen: 127.0.0.1:18002
""",
        ["rules.yaml:2: listen: duplicate key"],
    ),
    (
        "unset_environment_variable",
        """\
admin:
  token: ${SLUICE_TEST_SURELY_UNSET}
""",
        ["rules.yaml:2: admin.token: environment variable SLUICE_TEST_SURELY_UNSET is not set"],
    ),
    (
        "admin_on_main_port",
        """\
listen: 127.0.0.1:18000
admin: {listen: 127.0.0.1:18000}
""",
        ["rules.yaml:2: admin.listen: must differ from listen"],
    ),
    (
        "not_a_mapping",
        """\
- listen
- admin
""",
        ["rules.yaml:1: (top level): expected a mapping, got a list"],
    ),
]


@pytest.fixture(scope="module")
def broken_checked(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    """One ``sluice check`` over every broken file (CASE.yaml each): one process, not one each."""
    workdir = tmp_path_factory.mktemp("broken")
    for case, text, _ in BROKEN:
        (workdir / f"{case}.yaml").write_text(text)
    return run_sluice(
        ["check", *(f"{case}.yaml" for case, _, _ in BROKEN)], cwd=workdir, env=clean_env()
    )


@pytest.mark.parametrize(
    ("case", "expected"), [(b[0], b[2]) for b in BROKEN], ids=[b[0] for b in BROKEN]
)
def test_check_reports_exact_error(
    broken_checked: subprocess.CompletedProcess[str], case: str, expected: list[str]
) -> None:
    assert broken_checked.returncode == 1
    assert f"{case}.yaml: OK" not in broken_checked.stdout
    mine = [line for line in broken_checked.stderr.splitlines() if line.startswith(f"{case}.yaml")]
    assert mine == [line.replace("rules.yaml", f"{case}.yaml", 1) for line in expected]


def test_check_one_broken_file_exits_1_with_nothing_on_stdout(tmp_path: Path) -> None:
    result = check(tmp_path, BROKEN[0][1])
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == BROKEN[0][2]


def test_check_collects_every_problem_sorted_by_line(tmp_path: Path) -> None:
    text = """\
listen: 127.0.0.1:18000
upstreams:
  api: {url: 127.0.0.1:9000}
  web: {url: http://127.0.0.1:9001, conect_timeout: 2s, read_timeout: 5x}
limits:
  - name: a
    algorithm: leaky_bucket
    limit: 10
    window: 1m
routes:
  - match: {path_prefix: /}
    upstream: ap
    limitz: [a]
"""
    result = check(tmp_path, text)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "rules.yaml:3: upstreams.api.url: expected an absolute URL with scheme http or https,"
        " got '127.0.0.1:9000'",
        "rules.yaml:4: upstreams.web.read_timeout: bad duration '5x'"
        " (use 500ms, 10s, 1m, 1h or 1d)",
        "rules.yaml:4: upstreams.web.conect_timeout: unknown key (did you mean 'connect_timeout'?)",
        "rules.yaml:7: limits[0].algorithm: unknown value 'leaky_bucket' (expected one of:"
        " fixed_window, sliding_window_log, sliding_window_counter, token_bucket, gcra)"
        " (did you mean 'token_bucket'?)",
        "rules.yaml:12: routes[0].upstream: unknown upstream 'ap' (known: api, web)"
        " (did you mean 'api'?)",
        "rules.yaml:13: routes[0].limitz: unknown key (did you mean 'limits'?)",
    ]


def test_check_several_files_reports_each(tmp_path: Path) -> None:
    (tmp_path / "good.yaml").write_text(GOOD)
    (tmp_path / "bad.yaml").write_text("listen: 127.0.0.1:18000\nlisten_: x\n")
    result = run_sluice(["check", "good.yaml", "bad.yaml"], cwd=tmp_path, env=clean_env())
    assert result.returncode == 1
    assert result.stdout.startswith("good.yaml: OK (sha256 ")
    assert result.stderr.splitlines() == [
        "bad.yaml:2: listen_: unknown key (did you mean 'listen'?)"
    ]


def test_check_missing_file(tmp_path: Path) -> None:
    result = run_sluice(["check", "nowhere.yaml"], cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == "nowhere.yaml: cannot read: No such file or directory\n"


def test_check_reads_environment(tmp_path: Path) -> None:
    text = "upstreams:\n  api: ${SLUICE_TEST_UPSTREAM}\n"
    (tmp_path / "rules.yaml").write_text(text)
    env = {**clean_env(), "SLUICE_TEST_UPSTREAM": "http://127.0.0.1:9999"}
    result = run_sluice(["check", "rules.yaml"], cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "    api: http://127.0.0.1:9999\n" in result.stdout


def test_serve_with_missing_file_exits_1(tmp_path: Path) -> None:
    result = run_sluice(["serve", "-c", "nowhere.yaml"], cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == "nowhere.yaml: cannot read: No such file or directory\n"


def test_console_script_and_version() -> None:
    script = Path(sys.executable).with_name("sluice")
    out = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    assert out.returncode == 0
    assert out.stdout == f"sluice {__version__}\n"


def test_no_command_is_a_usage_error(tmp_path: Path) -> None:
    result = run_sluice([], cwd=tmp_path)
    assert result.returncode == 2
    assert "usage: sluice" in result.stderr
