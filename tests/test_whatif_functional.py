"""What-if rollouts: a candidate rules file evaluated in shadow beside the live rules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from proxy.limits.identity import masked
from tests.inproc import Sluice, running, write_rules
from tests.proc import REPO
from tests.servers import RedisServer, redis_cli
from tests.topologies import RedisClusterSetup

TOKEN = "whatif-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIVE = """
listen: {listen}
admin: {{listen: "{admin}", token: {token}}}
storage: {{url: "{url}", data_dir: "{data}"}}
candidate: {candidate}
limits:
  - {{name: per_key, key: "header:X-Key", algorithm: fixed_window, limit: 3, window: 1h}}
routes:
  - {{name: api, kind: decide, match: {{path_prefix: /api/}}, limits: [per_key]}}
  - {{name: open, kind: decide, match: {{path_prefix: /}}}}
"""
CANDIDATE = """
limits:
  - {{name: per_key, key: "header:X-Key", algorithm: fixed_window, limit: {limit}, window: 1h}}
  - {{name: per_ip, key: ip, algorithm: gcra, limit: 100, window: 1m}}
routes:
  - {{name: api, kind: decide, match: {{path_prefix: /api/}}, limits: [per_key, per_ip]}}
  - {{name: open, kind: decide, match: {{path_prefix: /}}, limits: [per_ip]}}
"""


def live_rules(tmp_path: Path, url: str, candidate: str = "next.yaml") -> Path:
    return write_rules(
        tmp_path, LIVE, token=TOKEN, url=url, data=tmp_path / "data", candidate=candidate
    )


def write_candidate(tmp_path: Path, limit: int = 1, body: str = CANDIDATE) -> Path:
    path = tmp_path / "next.yaml"
    path.write_text(body.format(limit=limit))
    return path


async def send(s: Sluice, key: str, n: int, path: str = "/api/x") -> list[int]:
    statuses = []
    async with aiohttp.ClientSession() as http:
        for _ in range(n):
            async with http.get(s.url + path, headers={"X-Key": key}) as r:
                statuses.append(r.status)
    return statuses


def evalsha_calls(port: int) -> int:
    """EVALSHA calls that ran (a NOSCRIPT miss, answered by loading the script, fails)."""
    stats = redis_cli(port, "info", "commandstats")
    line = next((x for x in stats.splitlines() if x.startswith("cmdstat_evalsha:")), None)
    if line is None:
        return 0
    fields = dict(kv.split("=") for kv in line.partition(":")[2].split(","))
    return int(fields["calls"]) - int(fields["failed_calls"])


def whatif_requests(s: Sluice) -> dict[tuple[str, str], float]:
    out = {}
    for family in s.runtime.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "sluice_whatif_requests_total":
                out[(sample.labels["live"], sample.labels["candidate"])] = sample.value
    return out


async def status(s: Sluice) -> dict:
    assert s.runtime.status is not None
    await s.runtime.status.flush()
    s.runtime.status.sample()
    async with aiohttp.ClientSession() as http:
        async with http.get(s.admin_url + "/api/status", headers=AUTH) as r:
            assert r.status == 200
            return await r.json()


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_a_stricter_candidate_shows_what_it_would_reject(
    tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    server: RedisServer | None = request.getfixturevalue("redis") if kind == "redis" else None
    url = server.url if server else "memory://"
    write_candidate(tmp_path, limit=1)
    before = evalsha_calls(server.port) if server else 0
    async with running(live_rules(tmp_path, url)) as s:
        calls = s.runtime.limiter.storage_calls
        # live allows alice 3 (then the 4th is rejected); the candidate would allow 1
        assert await send(s, "alice", 4) == [200, 200, 200, 429]
        assert await send(s, "bob", 1) == [200]
        # one store call per request, candidate included (the 4th call found the denial)
        assert s.runtime.limiter.storage_calls - calls == 5
        if server is not None:
            assert evalsha_calls(server.port) - before == 5  # Redis saw one call per request
        assert whatif_requests(s) == {
            ("allowed", "allowed"): 2,  # alice's first, bob's
            ("allowed", "rejected"): 2,  # alice's 2nd and 3rd: the candidate's limit is 1
            ("rejected", "rejected"): 1,
        }
        body = await status(s)
    whatif = body["whatif"]
    assert whatif["enabled"] and whatif["ok"] and whatif["error"] is None
    assert whatif["path"] == str(tmp_path / "next.yaml")
    assert (whatif["compared"], whatif["more_rejected"], whatif["fewer_rejected_at_least"]) == (
        5,
        2,
        0,
    )
    assert whatif["live_rejected_pct"] == 20.0 and whatif["more_rejected_pct"] == 40.0
    assert whatif["summary"] == (
        "With the candidate, 40.0% more requests would be rejected (2 of 5 in the last 1 min,"
        " all admitted by the live rules, which reject 20.0%)."
    )
    counts = whatif["decisions"]["rules"]["per_key"]["counts"]
    assert counts["allowed"] == 2 and counts["rejected"] == 3
    assert whatif["decisions"]["rules"]["per_ip"]["counts"]["allowed"] == 5
    assert whatif["clients"]["5m"] == [
        {"rule": "per_key", "client": masked("header:X-Key=alice"), "rejections": 2}
    ]
    # the live decisions are the live rules' alone
    live = body["decisions"]["rules"]["per_key"]["counts"]
    assert (live["allowed"], live["rejected"]) == (4, 1)
    assert set(body["decisions"]["rules"]) == {"per_key"}


async def test_candidate_counters_are_its_own(tmp_path: Path) -> None:
    """A candidate rule equal to a live one has keys of its own: live counting unchanged."""
    write_candidate(tmp_path, limit=3)
    async with running(live_rules(tmp_path, "memory://")) as s:
        assert await send(s, "carol", 5) == [200, 200, 200, 429, 429]
        assert whatif_requests(s) == {
            ("allowed", "allowed"): 3,
            ("rejected", "rejected"): 1,
            # the last was answered from the live deny cache: no store call at all
            ("rejected", "not_evaluated"): 1,
        }
        whatif = (await status(s))["whatif"]
        assert (whatif["compared"], whatif["more_rejected"], whatif["live_rejected_pct"]) == (
            5,
            0,
            40.0,
        )


async def test_a_looser_candidate_counts_every_request(tmp_path: Path) -> None:
    """A candidate without limits on a route still compares its requests (all would
    pass); the denominator is every compared request, deny-cached ones included."""
    write_candidate(tmp_path, body="routes:\n  - {{name: all, kind: decide, match: {{}}}}\n")
    async with running(live_rules(tmp_path, "memory://")) as s:
        assert await send(s, "gina", 6) == [200] * 3 + [429] * 3
        assert whatif_requests(s) == {
            ("allowed", "allowed"): 3,
            ("rejected", "allowed"): 1,  # the store said no; the candidate has no rule here
            ("rejected", "not_evaluated"): 2,  # deny cache
        }
        whatif = (await status(s))["whatif"]
        assert whatif["compared"] == 6 and whatif["live_rejected_pct"] == 50.0
        assert whatif["more_rejected"] == 0 and whatif["fewer_rejected_at_least"] == 1
        assert whatif["summary"].endswith("which reject 50.0%); at least 1 they reject would pass.")


async def test_on_cluster_a_candidate_on_another_slot_is_decided_apart(
    tmp_path: Path, redis_cluster: RedisClusterSetup
) -> None:
    """Live per-key, candidate per-key (same slot) and per-IP (another slot): the live
    call carries only what shares its slot; the rest is a second, separate call."""
    redis_cluster.flushall()
    write_candidate(tmp_path, limit=1)
    async with running(live_rules(tmp_path, redis_cluster.url)) as s:
        assert await send(s, "hana", 4) == [200, 200, 200, 429]
        assert whatif_requests(s) == {
            ("allowed", "allowed"): 1,
            ("allowed", "rejected"): 2,
            # live-rejected: the candidate's per-IP check (another slot) is not asked
            ("rejected", "not_evaluated"): 1,
        }
        assert s.runtime.limiter.storage_calls == 4  # live calls only; the second ones apart
        body = await status(s)
        assert body["whatif"]["decisions"]["rules"]["per_ip"]["counts"]["allowed"] == 3


async def test_a_bad_candidate_is_reported_and_ignored(tmp_path: Path) -> None:
    bad = write_candidate(tmp_path, body="limits:\n  - {{name: x, algorithm: nope}}\n")
    async with running(live_rules(tmp_path, "memory://")) as s:
        assert await send(s, "dave", 4) == [200, 200, 200, 429]  # live rules serve on
        assert whatif_requests(s) == {}
        body = await status(s)
        whatif = body["whatif"]
        assert whatif["enabled"] and not whatif["ok"]
        assert whatif["error"].startswith(f"{bad}:2: ")
        assert "failed to load" in whatif["summary"]
        async with aiohttp.ClientSession() as http:
            async with http.get(s.admin_url + "/readyz") as r:
                ready = await r.json()
            assert r.status == 200 and ready["candidate"]["ok"] is False
            async with http.get(s.admin_url + "/metrics") as r:
                assert "sluice_whatif_candidate_ok 0.0" in await r.text()

        write_candidate(tmp_path, limit=1)  # fixed: the next reload (or file watch) loads it
        assert s.runtime.candidate_changed()
        assert s.runtime.reload()
        candidate = s.runtime.snapshot.candidate
        assert candidate is not None and candidate.usable
        assert await send(s, "erin", 2) == [200, 200]
        assert whatif_requests(s)[("allowed", "rejected")] == 1
        async with aiohttp.ClientSession() as http:
            async with http.get(s.admin_url + "/metrics") as r:
                assert "sluice_whatif_candidate_ok 1.0" in await r.text()


async def test_without_a_candidate_nothing_changes(tmp_path: Path) -> None:
    path = write_rules(
        tmp_path,
        LIVE.replace("candidate: {candidate}\n", ""),
        token=TOKEN,
        url="memory://",
        data=tmp_path / "data",
    )
    async with running(path) as s:
        assert await send(s, "frank", 1) == [200]
        assert whatif_requests(s) == {}
        assert (await status(s))["whatif"] == {"enabled": False}


def sluice_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )


def test_check_shows_the_candidate_and_fails_on_a_bad_one(tmp_path: Path) -> None:
    path = live_rules(tmp_path, "memory://")
    write_candidate(tmp_path, limit=1)
    out = sluice_check(path)
    assert out.returncode == 0, out.stderr
    assert f"candidate {tmp_path / 'next.yaml'} (its limits evaluated in shadow):" in out.stdout
    assert "  + limits.per_ip: gcra 100/1m by [ip]" in out.stdout
    assert "  ~ limits.per_key.quotas: 3/1h → 1/1h" in out.stdout

    write_candidate(tmp_path, body="limits: [{{name: x, algorithm: nope}}]\n")
    out = sluice_check(path)
    assert out.returncode == 1
    assert f"{tmp_path / 'next.yaml'}:1: " in out.stderr
    assert "invalid (serve reports and ignores it)" in out.stdout


def test_a_rules_file_cannot_be_its_own_candidate(tmp_path: Path) -> None:
    from proxy.config import load
    from proxy.errors import ConfigError

    path = live_rules(tmp_path, "memory://", candidate="rules.yaml")
    with pytest.raises(ConfigError, match=r"rules.yaml:5: candidate: must name another file"):
        load(path)


async def test_an_edited_candidate_is_taken_even_while_the_rules_are_broken(
    tmp_path: Path,
) -> None:
    write_candidate(tmp_path, limit=1)
    async with running(live_rules(tmp_path, "memory://")) as s:
        s.path.write_text(s.path.read_text() + "\nlimits: oops\n")
        write_candidate(tmp_path, limit=2)
        assert s.runtime.candidate_changed()
        assert not s.runtime.reload()  # the rules file is bad: the last good one serves
        assert not s.runtime.candidate_changed()  # ... and the watcher has nothing to retry
        candidate = s.runtime.snapshot.candidate
        assert candidate is not None and candidate.config is not None
        assert candidate.config.limits["per_key"].quotas[0].limit == 2
