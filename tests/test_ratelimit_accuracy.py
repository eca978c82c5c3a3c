"""Rate-limit accuracy on real Redis: several Sluice processes, concurrent clients.

Every Redis here is a real ``redis-server`` (standalone, Sentinel or Cluster),
every Sluice answers real HTTP on loopback, and every upstream is a real
process. The concurrency test runs ``sluice serve --workers 2`` and a second
single-worker ``sluice serve`` on another port, all sharing one Redis.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.inproc import Sluice, running, write_rules
from tests.load import (
    Reply,
    burst,
    client_slot,
    command_calls,
    commandstats,
    dbsize,
    fetch,
    ietf_remaining,
    sockets_to,
    statuses,
)
from tests.proc import SluiceProcess, UpstreamProcess, free_port, metric_sum
from tests.proc import write_rules as replace_file
from tests.servers import RedisServer, redis_cli
from tests.topologies import RedisClusterSetup, RedisSentinelSetup

LIMIT = 50
REQUESTS = 200
CONCURRENCY = 40
EXACT = ("fixed_window", "sliding_window_log", "token_bucket", "gcra")


def _accuracy_rule(algorithm: str) -> str:
    if algorithm == "token_bucket":  # 50 tokens, one more per hour: none refills in the burst
        quota = f"capacity: {LIMIT}, refill: 1/h"
    else:
        quota = f"limit: {LIMIT}, window: 1h"
    return (
        f'  - {{name: {algorithm}, key: "header:X-Client", algorithm: {algorithm}, {quota},'
        " on_storage_error: deny}"
    )


def _fleet_rules(main: int, admin: int, redis_url: str, upstream_url: str) -> str:
    """One route per algorithm; a storage failure answers 503, so it cannot pass unseen."""
    lines = [
        f"listen: 127.0.0.1:{main}",
        f"admin: {{listen: '127.0.0.1:{admin}'}}",
        f"storage: {{url: '{redis_url}', timeout: 2s, connect_timeout: 2s}}",
        f"upstreams: {{up: '{upstream_url}'}}",
        "limits:",
        *(_accuracy_rule(a) for a in (*EXACT, "sliding_window_counter")),
        "routes:",
        *(
            f"  - {{name: {a}, match: {{path_prefix: /{a}/}}, upstream: up, limits: [{a}]}}"
            for a in (*EXACT, "sliding_window_counter")
        ),
    ]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def acc_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """This module's own redis-server (nothing else sends it EVALSHA)."""
    server = RedisServer(tmp_path_factory.mktemp("acc-redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpstreamProcess]:
    up = UpstreamProcess(tmp_path_factory.mktemp("acc-upstream")).start()
    try:
        yield up
    finally:
        up.stop()


@dataclass
class Fleet:
    """``sluice serve --workers 2`` (``multi``) and ``sluice serve`` (``single``), one Redis."""

    multi: SluiceProcess
    single: SluiceProcess

    def urls(self, path: str) -> list[str]:
        return [self.multi.url(path), self.single.url(path)]

    def worker_pids(self) -> list[int]:
        return [*self.multi.children(), self.single.pid]


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, acc_redis: RedisServer, upstream: UpstreamProcess
) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("acc-fleet")
    started: list[SluiceProcess] = []
    try:
        for workers in (2, 1):
            main, admin = free_port(), free_port()
            rules = workdir / f"rules-{main}.yaml"
            replace_file(rules, _fleet_rules(main, admin, acc_redis.url, upstream.url))
            proc = SluiceProcess(rules, main, admin, workdir, workers=workers)
            started.append(proc)
            proc.start()
        yield Fleet(*started)
    finally:
        for proc in reversed(started):
            proc.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as s:
        yield s


async def _metrics(session: aiohttp.ClientSession, proc: SluiceProcess) -> str:
    async with session.get(proc.admin_url("/metrics")) as r:
        assert r.status == 200
        return await r.text()


def _assert_denials_well_formed(replies: list[Reply], rule: str) -> None:
    for reply in replies:
        if reply.status != 429:
            continue
        body = reply.json()
        assert body == {"error": "rate_limited", "rule": rule, "retry_after": body["retry_after"]}
        assert isinstance(body["retry_after"], int) and body["retry_after"] >= 1
        assert reply.headers["Retry-After"] == str(body["retry_after"])
        assert reply.headers["Content-Type"].startswith("application/json")
        assert reply.headers["X-RateLimit-Remaining"] == "0"


# ---------------------------------------------------------------- 1. accuracy


@pytest.mark.parametrize("algorithm", EXACT)
async def test_exact_algorithms_admit_exactly_the_limit_across_processes(
    fleet: Fleet, acc_redis: RedisServer, session: aiohttp.ClientSession, algorithm: str
) -> None:
    """200 concurrent requests of one client, spread over three worker processes
    (two behind one SO_REUSEPORT port, one on another port), all sharing one
    Redis: exactly ``limit`` get 200, every other one 429."""
    calls_before = command_calls([acc_redis.port])
    replies = await burst(
        session, fleet.urls(f"/{algorithm}/x"), REQUESTS, CONCURRENCY, {"X-Client": "burst"}
    )
    counts = statuses(replies)
    assert counts == {200: LIMIT, 429: REQUESTS - LIMIT}, counts
    _assert_denials_well_formed(replies, algorithm)
    # Both processes took part and decided in Redis (not in process memory).
    for proc in (fleet.multi, fleet.single):
        text = await _metrics(session, proc)
        decided = metric_sum(text, "sluice_ratelimit_decisions_total", rule=algorithm)
        assert decided, f"{proc.main_port} decided nothing for {algorithm}"
    assert command_calls([acc_redis.port]) - calls_before >= LIMIT
    for pid in fleet.worker_pids():
        assert sockets_to(pid, acc_redis.port) >= 1, f"worker {pid} never talked to Redis"


async def test_sliding_window_counter_stays_within_its_bound(
    fleet: Fleet, session: aiohttp.ClientSession
) -> None:
    """The sliding window counter is approximate. Its documented bound
    (``proxy/limits/algorithms.py``): every clock-aligned window admits at most
    ``limit`` (the estimate is never below the current window's count); any
    interval of one window may hold up to ``2 * limit - 1`` when traffic bunches
    at the end of the previous window. With no traffic in the previous window
    the estimate is exactly the current count, so a burst inside one aligned
    window admits exactly ``limit``."""
    started = time.time()
    replies = await burst(
        session,
        fleet.urls("/sliding_window_counter/x"),
        REQUESTS,
        CONCURRENCY,
        {"X-Client": "burst"},
    )
    ended = time.time()
    admitted = statuses(replies)[200]
    assert set(statuses(replies)) <= {200, 429}, statuses(replies)
    if int(started // 3600) == int(ended // 3600):
        assert admitted <= LIMIT
        assert admitted == LIMIT  # exact here: the previous window was empty
    else:  # the burst crossed an aligned boundary (rare): the sliding bound holds
        assert admitted <= 2 * LIMIT - 1
    _assert_denials_well_formed(replies, "sliding_window_counter")


# ---------------------------------------------------------------- in-process Sluice


async def _get(session: aiohttp.ClientSession, sluice: Sluice, path: str, **headers: str) -> Reply:
    return await fetch(session, sluice.url + path, headers)


FIVE_RULES = """
listen: {listen}
admin: {{listen: "{admin}"}}
storage: {{url: "{redis}", timeout: 1s}}
upstreams: {{up: "{upstream}"}}
limits:
  - {{name: a, key: "header:X-Client", algorithm: fixed_window, limit: 100, window: 1h}}
  - {{name: b, key: "header:X-Client", algorithm: sliding_window_log, limit: 100, window: 1h}}
  - {{name: c, key: "header:X-Client", algorithm: sliding_window_counter, limit: 100, window: 1h}}
  - {{name: d, key: "header:X-Client", algorithm: token_bucket, capacity: 100, refill: 1/h}}
  - {{name: e, key: "header:X-Client", algorithm: gcra, limit: 10, window: 1h}}
routes:
  - {{name: five, match: {{path_prefix: /five/}}, upstream: up, limits: [a, b, c, d, e]}}
"""


async def test_one_round_trip_per_request_and_none_once_denied(
    tmp_path: Path,
    acc_redis: RedisServer,
    upstream: UpstreamProcess,
    session: aiohttp.ClientSession,
) -> None:
    """Five Redis-backed rules, one identity: each request is one EVALSHA; a client
    known to be over a limit costs no Redis call at all (deny cache)."""
    rules = write_rules(tmp_path, FIVE_RULES, redis=acc_redis.url, upstream=upstream.url)
    async with running(rules) as sluice:
        warm = await _get(session, sluice, "/five/x", **{"X-Client": "warm-up"})
        assert warm.status == 200  # loads the script (NOSCRIPT, SCRIPT LOAD) before counting
        before = commandstats(acc_redis.port)["evalsha"]
        for i in range(10):
            reply = await _get(session, sluice, "/five/x", **{"X-Client": "five"})
            assert reply.status == 200, reply.body
            assert ietf_remaining(reply.headers["RateLimit"])["e"] == 9 - i
        after = commandstats(acc_redis.port)["evalsha"]
        assert after["calls"] - before["calls"] == 10
        assert after.get("failed_calls", 0) == before.get("failed_calls", 0)
        denied = await _get(session, sluice, "/five/x", **{"X-Client": "five"})
        assert denied.status == 429 and denied.json()["rule"] == "e"
        assert command_calls([acc_redis.port]) == after["calls"] + 1  # the store said no
        for _ in range(20):
            again = await _get(session, sluice, "/five/x", **{"X-Client": "five"})
            assert again.status == 429
            assert int(again.headers["Retry-After"]) >= 1
        assert command_calls([acc_redis.port]) == after["calls"] + 1  # deny cache: 0 calls
        assert sluice.runtime.limiter.storage_calls == 1 + 10 + 1


TWO_IDENTITIES = """
listen: {listen}
admin: {{listen: "{admin}"}}
storage: {{url: "{url}", timeout: 1s}}
upstreams: {{up: "{upstream}"}}
limits:
  - {{name: per_ip, key: ip, algorithm: {algorithm}, {ip_quota}}}
  - {{name: per_key, key: "header:X-API-Key", algorithm: fixed_window, limit: 3, window: 1h}}
routes:
  - {{name: api, match: {{path_prefix: /api/}}, upstream: up, limits: [per_ip, per_key]}}
"""


def _key_in_another_slot(prefix: str, avoid: set[int]) -> str:
    for i in range(1000):
        value = f"{prefix}{i}"
        if client_slot(f"header:X-API-Key={value}") not in avoid:
            return value
    raise AssertionError("no key found outside the given slots")


@pytest.mark.parametrize("topology", ["cluster", "standalone"])
@pytest.mark.parametrize(
    "algorithm",
    ["fixed_window", "sliding_window_log", "sliding_window_counter", "token_bucket", "gcra"],
)
async def test_denied_requests_charge_no_other_rule(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    acc_redis: RedisServer,
    upstream: UpstreamProcess,
    session: aiohttp.ClientSession,
    topology: str,
    algorithm: str,
) -> None:
    """A per-IP and a per-API-key rule on one route. The key's rule runs out; the
    requests it denies must not be charged to the IP's rule. On a cluster the two
    identities hash to different slots, so each request is two script calls and
    the admitting one is refunded; on standalone Redis it is one atomic call.
    The deny cache is cleared before each request so every denial reaches Redis."""
    if topology == "cluster":
        cluster: RedisClusterSetup = request.getfixturevalue("redis_cluster")
        cluster.flushall()
        url = cluster.url
    else:
        acc_redis.flushall()
        url = acc_redis.url
    ip_slot = client_slot("ip=127.0.0.1")
    spent = _key_in_another_slot("spent-", {ip_slot})
    fresh = _key_in_another_slot("fresh-", {ip_slot, client_slot(f"header:X-API-Key={spent}")})
    ip_quota = (
        "capacity: 10, refill: 1/h" if algorithm == "token_bucket" else "limit: 10, window: 1h"
    )
    rules = write_rules(
        tmp_path,
        TWO_IDENTITIES,
        url=url,
        upstream=upstream.url,
        algorithm=algorithm,
        ip_quota=ip_quota,
    )
    async with running(rules) as sluice:
        limiter = sluice.runtime.limiter
        codes = []
        for _ in range(3 + 6):
            limiter.deny_cache.clear()
            reply = await _get(session, sluice, "/api/x", **{"X-API-Key": spent})
            codes.append(reply.status)
            if reply.status == 429:
                assert reply.json()["rule"] == "per_key"
        assert codes == [200] * 3 + [429] * 6
        reply = await _get(session, sluice, "/api/x", **{"X-API-Key": fresh})
        assert reply.status == 200, reply.body
        remaining = ietf_remaining(reply.headers["RateLimit"])
        assert remaining == {"per_ip": 10 - 3 - 1, "per_key": 2}


async def test_a_denied_request_reports_the_other_rules_unconsumed(
    tmp_path: Path,
    acc_redis: RedisServer,
    upstream: UpstreamProcess,
    session: aiohttp.ClientSession,
) -> None:
    """A 429 consumes nothing from the rules that did not deny, so their
    ``RateLimit`` members must show their real standing, not the standing they
    would have had if this request had been admitted."""
    acc_redis.flushall()
    rules = write_rules(
        tmp_path,
        TWO_IDENTITIES,
        url=acc_redis.url,
        upstream=upstream.url,
        algorithm="fixed_window",
        ip_quota="limit: 10, window: 1h",
    )
    async with running(rules) as sluice:
        for _ in range(3):
            assert (await _get(session, sluice, "/api/x", **{"X-API-Key": "k"})).status == 200
        denied = await _get(session, sluice, "/api/x", **{"X-API-Key": "k"})
        assert denied.status == 429
        # per_ip: 3 of 10 used, and the denied request used nothing.
        assert ietf_remaining(denied.headers["RateLimit"]) == {"per_ip": 7, "per_key": 0}


XFF_RULES = """
listen: {listen}
admin: {{listen: "{admin}"}}
storage: {{url: "{redis}", timeout: 1s}}
clients: {{trusted_proxies: [{trusted}]}}
upstreams: {{up: "{upstream}"}}
limits:
  - {{name: per_ip, key: ip, algorithm: fixed_window, limit: 3, window: 1h}}
routes:
  - {{name: api, match: {{path_prefix: /api/}}, upstream: up, limits: [per_ip]}}
"""


async def test_forwarded_headers_from_an_untrusted_peer_are_ignored(
    tmp_path: Path,
    acc_redis: RedisServer,
    upstream: UpstreamProcess,
    session: aiohttp.ClientSession,
) -> None:
    """127.0.0.1 is not a trusted proxy: a new X-Forwarded-For (or Forwarded) per
    request does not make a new client; the peer address is the key."""
    acc_redis.flushall()
    rules = write_rules(
        tmp_path, XFF_RULES, redis=acc_redis.url, upstream=upstream.url, trusted="10.0.0.0/8"
    )
    async with running(rules) as sluice:
        codes = []
        for i in range(6):
            spoof = (
                {"X-Forwarded-For": f"203.0.113.{i}"}
                if i % 2
                else {"Forwarded": f"for=198.51.100.{i}"}
            )
            codes.append((await _get(session, sluice, "/api/x", **spoof)).status)
        assert codes == [200, 200, 200, 429, 429, 429]


async def test_forwarded_headers_from_a_trusted_proxy_name_the_client(
    tmp_path: Path,
    acc_redis: RedisServer,
    upstream: UpstreamProcess,
    session: aiohttp.ClientSession,
) -> None:
    """127.0.0.1/32 is trusted: each X-Forwarded-For address is its own client, and
    only the rightmost untrusted hop counts (what is left of it can be forged)."""
    acc_redis.flushall()
    rules = write_rules(
        tmp_path, XFF_RULES, redis=acc_redis.url, upstream=upstream.url, trusted="127.0.0.1/32"
    )
    async with running(rules) as sluice:
        for i in range(6):  # six clients, one request each
            reply = await _get(session, sluice, "/api/x", **{"X-Forwarded-For": f"203.0.113.{i}"})
            assert reply.status == 200
        codes = []
        for i in range(5):  # one client behind a forged left part
            xff = f"192.0.2.{i}, 203.0.113.88"
            codes.append((await _get(session, sluice, "/api/x", **{"X-Forwarded-For": xff})).status)
        assert codes == [200, 200, 200, 429, 429]
        assert dbsize([acc_redis.port]) == 7  # 6 + 1 clients, one key each, all in Redis


TOPOLOGY_RULES = """
listen: {listen}
admin: {{listen: "{admin}"}}
storage: {{url: "{url}", timeout: 1s, connect_timeout: 2s}}
upstreams: {{up: "{upstream}"}}
limits:
  - {{name: fw, key: "header:X-Client", algorithm: fixed_window, limit: 4, window: 1h}}
  - {{name: swl, key: "header:X-Client", algorithm: sliding_window_log, limit: 4, window: 1h}}
  - {{name: swc, key: "header:X-Client", algorithm: sliding_window_counter, limit: 4, window: 1h}}
  - {{name: tb, key: "header:X-Client", algorithm: token_bucket, capacity: 4, refill: 1/h}}
  - {{name: gcra, key: "header:X-Client", algorithm: gcra, limit: 4, window: 1h}}
routes:
  - {{name: fw, match: {{path_prefix: /fw/}}, upstream: up, limits: [fw]}}
  - {{name: swl, match: {{path_prefix: /swl/}}, upstream: up, limits: [swl]}}
  - {{name: swc, match: {{path_prefix: /swc/}}, upstream: up, limits: [swc]}}
  - {{name: tb, match: {{path_prefix: /tb/}}, upstream: up, limits: [tb]}}
  - {{name: gcra, match: {{path_prefix: /gcra/}}, upstream: up, limits: [gcra]}}
"""


@pytest.mark.parametrize("topology", ["standalone", "sentinel", "cluster"])
async def test_limits_are_exact_on_every_redis_topology(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    acc_redis: RedisServer,
    upstream: UpstreamProcess,
    session: aiohttp.ClientSession,
    topology: str,
) -> None:
    """Sequential requests through Sluice on standalone, Sentinel and Cluster
    Redis: every algorithm admits exactly its limit, and the state is in Redis."""
    if topology == "sentinel":
        sentinel: RedisSentinelSetup = request.getfixturevalue("redis_sentinel")
        ports = [sentinel.master_address()[1]]
        url = sentinel.url
    elif topology == "cluster":
        cluster: RedisClusterSetup = request.getfixturevalue("redis_cluster")
        ports = cluster.ports
        url = cluster.url
    else:
        ports = [acc_redis.port]
        url = acc_redis.url
    for port in ports:
        redis_cli(port, "flushall")
    rules = write_rules(tmp_path, TOPOLOGY_RULES, url=url, upstream=upstream.url)
    calls_before = command_calls(ports)
    async with running(rules) as sluice:
        for name in ("fw", "swl", "swc", "tb", "gcra"):
            codes = [
                (await _get(session, sluice, f"/{name}/x", **{"X-Client": "seq"})).status
                for _ in range(6)
            ]
            assert codes == [200] * 4 + [429] * 2, (name, codes)
        assert not sluice.runtime.limiter.degraded
    assert dbsize(ports) == 5  # one key per rule, in Redis
    assert command_calls(ports) - calls_before >= 5 * 5
