"""Degradation on real Redis failures: killed, hung, failed over, restarted.

Each test runs ``sluice serve`` as its own process in front of a real upstream
process; Redis is this module's private ``redis-server`` (killed and restarted
here, never the session's shared one), or the shared Sentinel / Cluster
topologies, which are emptied first. Every request carries a client timeout and
every wait is bounded.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.load import (
    Reply,
    burst,
    client_slot,
    command_calls,
    fetch,
    ietf_remaining,
    poll,
    statuses,
)
from tests.proc import Processes, SluiceProcess, UpstreamProcess, free_port, metric_sum
from tests.proc import write_rules as replace_file
from tests.servers import RedisServer, redis_cli
from tests.topologies import RedisClusterSetup, RedisSentinelSetup

LATENCY_BOUND = 0.5  # seconds: no request may wait on a dead or hung store longer
RECOVERY_TIMEOUT = 15.0

THREE_POLICIES = """\
limits:
  - {{name: open, key: "header:X-Client", algorithm: fixed_window, limit: 1000, window: 1h,
     on_storage_error: allow}}
  - {{name: closed, key: "header:X-Client", algorithm: fixed_window, limit: 1000, window: 1h,
     on_storage_error: deny}}
  - {{name: fallback, key: "header:X-Client", algorithm: fixed_window, limit: {local_limit},
     window: 1h, on_storage_error: local}}
routes:
  - {{name: allow, match: {{path_prefix: /allow/}}, upstream: up, limits: [open]}}
  - {{name: deny, match: {{path_prefix: /deny/}}, upstream: up, limits: [closed]}}
  - {{name: local, match: {{path_prefix: /local/}}, upstream: up, limits: [fallback]}}
"""
LOCAL_LIMIT = 10  # with expected_instances: 2 the local fallback admits 5

FLOW_AND_STRICT = """\
limits:
  - {{name: flow, key: "header:X-Client", algorithm: fixed_window, limit: 100000, window: 1h}}
  - {{name: strict, key: "header:X-Client", algorithm: fixed_window, limit: 5, window: 1h}}
routes:
  - {{name: flow, match: {{path_prefix: /flow/}}, upstream: up, limits: [flow]}}
  - {{name: strict, match: {{path_prefix: /strict/}}, upstream: up, limits: [strict]}}
"""


def _rules(main: int, admin: int, storage: str, upstream: str, body: str) -> str:
    head = (
        f"listen: 127.0.0.1:{main}\n"
        f"admin: {{listen: '127.0.0.1:{admin}'}}\n"
        f"storage: {{{storage}}}\n"
        f"upstreams: {{up: '{upstream}'}}\n"
    )
    return head + body.format(local_limit=LOCAL_LIMIT)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpstreamProcess]:
    up = UpstreamProcess(tmp_path_factory.mktemp("deg-upstream")).start()
    try:
        yield up
    finally:
        up.stop()


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """This module's redis-server, which its tests kill, hang and restart."""
    server = RedisServer(
        tmp_path_factory.mktemp("deg-redis"), ("--enable-debug-command", "local")
    ).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis(own_redis: RedisServer) -> RedisServer:
    """The private server, running (a failed test may have left it killed) and empty."""
    if own_redis.proc is None:
        own_redis.start()
    own_redis.flushall()
    return own_redis


@pytest.fixture
def procs() -> Iterator[Processes]:
    started = Processes()
    try:
        yield started
    finally:
        started.stop_all()


StartSluice = Callable[[str, str], SluiceProcess]


@pytest.fixture
def start_sluice(tmp_path: Path, upstream: UpstreamProcess, procs: Processes) -> StartSluice:
    """``start_sluice(storage_yaml, limits_and_routes)``: a one-worker ``sluice serve``."""

    def start(storage: str, body: str) -> SluiceProcess:
        main, admin = free_port(), free_port()
        rules = tmp_path / f"rules-{main}.yaml"
        replace_file(rules, _rules(main, admin, storage, upstream.url, body))
        return procs.add(SluiceProcess(rules, main, admin, tmp_path)).start()

    return start


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


class Observer:
    """Talks to one Sluice and keeps every reply, so latency can be checked at the end."""

    def __init__(self, session: aiohttp.ClientSession, sluice: SluiceProcess) -> None:
        self.session = session
        self.sluice = sluice
        self.replies: list[Reply] = []

    async def get(self, path: str, client: str) -> Reply:
        reply = await fetch(self.session, self.sluice.url(path), {"X-Client": client})
        self.replies.append(reply)
        return reply

    async def many(self, path: str, client: str, n: int) -> list[int]:
        return [(await self.get(path, client)).status for _ in range(n)]

    async def burst(self, paths: list[str], client: str, total: int) -> list[Reply]:
        urls = [self.sluice.url(p) for p in paths]
        replies = await burst(self.session, urls, total, total // 3, {"X-Client": client})
        self.replies.extend(replies)
        return replies

    async def metrics(self) -> str:
        async with self.session.get(self.sluice.admin_url("/metrics")) as r:
            assert r.status == 200
            return await r.text()

    async def breaker_open(self) -> float | None:
        return metric_sum(await self.metrics(), "sluice_storage_breaker_open")

    async def assert_ready(self) -> None:
        async with self.session.get(self.sluice.admin_url("/readyz")) as r:
            assert r.status == 200, await r.text()

    def slowest(self) -> float:
        return max(r.seconds for r in self.replies)


def _assert_503(reply: Reply) -> None:
    assert reply.status == 503, reply.body
    body = reply.json()
    assert body["error"] == "rate_limit_unavailable"
    assert body["rule"] == "closed"
    assert reply.headers["Retry-After"] == "1"


STORAGE_50MS = (
    "url: '{url}', timeout: 50ms, breaker_failures: 3, breaker_reset: 500ms, expected_instances: 2"
)


async def test_redis_killed_then_restarted(
    redis: RedisServer, start_sluice: StartSluice, session: aiohttp.ClientSession
) -> None:
    """SIGKILL Redis under three routes whose rules say allow, deny and local; then
    start it again on the same port. Nothing waits on the dead store, /readyz
    keeps answering, and the breaker closes by itself once Redis is back."""
    sluice = start_sluice(STORAGE_50MS.format(url=redis.url), THREE_POLICIES)
    obs = Observer(session, sluice)
    for path in ("/allow/x", "/deny/x", "/local/x"):
        assert await obs.many(path, "before", 3) == [200] * 3
    assert command_calls([redis.port]) >= 9
    assert await obs.breaker_open() == 0
    await obs.assert_ready()

    redis.kill()
    assert await obs.many("/allow/x", "outage", 6) == [200] * 6
    for _ in range(6):
        _assert_503(await obs.get("/deny/x", "outage"))
    local = [await obs.get("/local/x", "outage") for _ in range(8)]
    assert [r.status for r in local] == [200] * (LOCAL_LIMIT // 2) + [429] * 3
    assert local[-1].json()["rule"] == "fallback"
    assert local[-1].headers["Retry-After"] == str(local[-1].json()["retry_after"])
    # 45 more, 15 in flight at a time, with the breaker open: no pile-up, same policies.
    replies = await obs.burst(["/allow/x", "/deny/x", "/local/x"], "outage-burst", 45)
    by_route = {p: [r for r in replies if p in r.url] for p in ("/allow/", "/deny/", "/local/")}
    assert statuses(by_route["/allow/"]) == {200: 15}
    assert statuses(by_route["/deny/"]) == {503: 15}
    assert statuses(by_route["/local/"]) == {200: LOCAL_LIMIT // 2, 429: 15 - LOCAL_LIMIT // 2}
    for reply in by_route["/deny/"]:
        _assert_503(reply)
    text = await obs.metrics()
    assert metric_sum(text, "sluice_storage_breaker_open") == 1.0
    errors = metric_sum(text, "sluice_storage_errors_total")
    assert errors is not None and errors >= 3
    await obs.assert_ready()
    assert obs.slowest() < LATENCY_BOUND, obs.slowest()

    redis.start()  # same port, empty data, empty script cache

    async def closed() -> bool:
        assert (await obs.get("/allow/x", "probe")).status == 200
        return await obs.breaker_open() == 0

    await poll("the breaker to close", closed, RECOVERY_TIMEOUT)
    await obs.assert_ready()
    # Counting is in Redis again: the full limit, not the local half of it.
    statuses_after = await obs.many("/local/x", "after", LOCAL_LIMIT + 2)
    assert statuses_after == [200] * LOCAL_LIMIT + [429] * 2
    assert await obs.many("/deny/x", "after", 3) == [200] * 3
    assert command_calls([redis.port]) >= LOCAL_LIMIT + 2
    assert obs.slowest() < LATENCY_BOUND, obs.slowest()


@pytest.mark.parametrize("hang", ["debug-sleep", "client-pause"])
async def test_hung_redis_costs_at_most_the_timeout(
    redis: RedisServer, start_sluice: StartSluice, session: aiohttp.ClientSession, hang: str
) -> None:
    """Redis stops answering for 2 s (DEBUG SLEEP blocks the server, CLIENT PAUSE
    holds every client's commands); requests meanwhile are answered after about
    ``storage.timeout`` (50 ms), never after the 2 s, under each rule's policy."""
    sluice = start_sluice(STORAGE_50MS.format(url=redis.url), THREE_POLICIES)
    obs = Observer(session, sluice)
    for path in ("/allow/x", "/deny/x"):
        assert await obs.many(path, "before", 3) == [200] * 3
    obs.replies.clear()

    if hang == "debug-sleep":
        sleeper = threading.Thread(
            target=redis_cli, args=(redis.port, "DEBUG", "SLEEP", "2"), daemon=True
        )
        sleeper.start()
    else:
        assert redis_cli(redis.port, "CLIENT", "PAUSE", "2000", "ALL") == "OK"
        sleeper = None
    try:
        await asyncio.sleep(0.2)  # let the hang begin; then ~1.3 s of traffic inside it
        loop = asyncio.get_running_loop()
        until = loop.time() + 1.3
        while loop.time() < until:
            assert (await obs.get("/allow/x", "hang")).status == 200
            _assert_503(await obs.get("/deny/x", "hang"))
            replies = await obs.burst(["/allow/x", "/deny/x"], "hang-burst", 6)
            assert statuses(replies) == {200: 3, 503: 3}
        slow = [
            (i, r.url, round(r.seconds, 3)) for i, r in enumerate(obs.replies) if r.seconds > 0.2
        ]
        assert obs.slowest() < LATENCY_BOUND, f"requests waited on a hung Redis: {slow}"
    finally:
        if sleeper is not None:
            await asyncio.to_thread(sleeper.join, 10)

    async def recovered() -> bool:
        return (await obs.get("/deny/x", "after")).status == 200

    await poll("requests to reach Redis again", recovered, RECOVERY_TIMEOUT, interval=0.1)
    assert await obs.breaker_open() == 0
    assert obs.slowest() < LATENCY_BOUND


async def test_local_fallback_denials_do_not_outlive_the_outage(
    redis: RedisServer, start_sluice: StartSluice, session: aiohttp.ClientSession
) -> None:
    """A client denied by the ``local`` fallback during an outage was denied by an
    approximation (half the limit, this process only). Once Redis is back, Redis
    decides again: that client has used nothing there and must be admitted, not
    held by the deny cache for the rest of the local window (here an hour)."""
    sluice = start_sluice(STORAGE_50MS.format(url=redis.url), THREE_POLICIES)
    obs = Observer(session, sluice)
    assert await obs.many("/local/x", "warm", 1) == [200]
    redis.kill()
    expected = [200] * (LOCAL_LIMIT // 2) + [429]
    assert await obs.many("/local/x", "c", LOCAL_LIMIT // 2 + 1) == expected
    redis.start()

    async def closed() -> bool:
        assert (await obs.get("/allow/x", "probe")).status == 200
        return await obs.breaker_open() == 0

    await poll("the breaker to close", closed, RECOVERY_TIMEOUT)
    reply = await obs.get("/local/x", "c")
    assert reply.status == 200, (reply.status, reply.body)


async def test_a_cancelled_probe_does_not_wedge_the_breaker(
    redis: RedisServer, start_sluice: StartSluice, session: aiohttp.ClientSession
) -> None:
    """The half-open breaker lets one request probe the store. If that request's
    client goes away while the probe waits on Redis (aiohttp then cancels the
    handler), the breaker must still be able to probe again and close once Redis
    answers; otherwise the process stays degraded until it is restarted."""
    sluice = start_sluice(STORAGE_50MS.format(url=redis.url), THREE_POLICIES)
    obs = Observer(session, sluice)
    assert await obs.many("/deny/x", "warm", 2) == [200] * 2
    # Paused for 3 s, then Redis answers again by itself (no UNPAUSE: it would be paused too).
    assert redis_cli(redis.port, "CLIENT", "PAUSE", "3000", "ALL") == "OK"
    await poll("the breaker to open", lambda: _is_open(obs), 2.5, interval=0.0)
    await asyncio.sleep(0.6)  # past breaker_reset (500 ms): the next request is the probe
    impatient = aiohttp.ClientTimeout(total=0.02)
    with pytest.raises(asyncio.TimeoutError):
        async with session.get(sluice.url("/deny/x"), timeout=impatient) as r:
            await r.read()

    async def recovered() -> bool:
        return (await obs.get("/deny/x", "after")).status == 200

    await poll("the breaker to close after the cancelled probe", recovered, 6.0, interval=0.2)
    assert await obs.breaker_open() == 0


async def _is_open(obs: Observer) -> bool:
    assert (await obs.get("/deny/x", "warm")).status == 503
    return await obs.breaker_open() == 1


async def _flow(obs: Observer, clients: list[str], done: asyncio.Future[Any]) -> list[int]:
    """Requests on /flow/ (round robin over ``clients``, 3 at a time) until ``done``."""
    codes: list[int] = []
    i = 0
    while not done.done():
        batch = [obs.get("/flow/x", clients[(i + j) % len(clients)]) for j in range(3)]
        codes += [r.status for r in await asyncio.gather(*batch)]
        i += 3
        await asyncio.sleep(0.02)
    return codes


async def test_sentinel_failover_while_requests_flow(
    redis_sentinel: RedisSentinelSetup, start_sluice: StartSluice, session: aiohttp.ClientSession
) -> None:
    """SENTINEL FAILOVER under traffic: with ``on_storage_error: allow`` every request
    is a 200 throughout, and afterwards limits are enforced on the new master."""
    _, old_port = redis_sentinel.master_address()
    redis_cli(old_port, "flushall")
    storage = (
        f"url: '{redis_sentinel.url}', timeout: 200ms, breaker_failures: 3, breaker_reset: 500ms"
    )
    sluice = start_sluice(storage, FLOW_AND_STRICT)
    obs = Observer(session, sluice)
    assert await obs.many("/strict/x", "pre", 6) == [200] * 5 + [429]

    failover = asyncio.ensure_future(asyncio.to_thread(redis_sentinel.failover))
    codes = await _flow(obs, ["a", "b", "c"], failover)
    _, new_port = await failover
    assert new_port != old_port
    assert set(codes) == {200}, statuses(obs.replies)

    async def on_new_master() -> bool:
        before = command_calls([new_port])
        assert (await obs.get("/flow/x", "a")).status == 200
        return command_calls([new_port]) > before

    await poll("Sluice to use the new master", on_new_master, RECOVERY_TIMEOUT, interval=0.1)
    new_before, old_before = command_calls([new_port]), command_calls([old_port])
    assert await obs.many("/strict/x", "post", 7) == [200] * 5 + [429] * 2
    assert command_calls([new_port]) - new_before >= 6
    assert command_calls([old_port]) == old_before
    assert obs.slowest() < 1.0


def _clients_on_node(cluster: RedisClusterSetup, node: int, prefix: str, n: int) -> list[str]:
    owners: dict[int, int] = {}
    found: list[str] = []
    i = 0
    while len(found) < n:
        name = f"{prefix}{i}"
        slot = client_slot(f"header:X-Client={name}")
        if slot not in owners:
            owners[slot] = cluster.slot_owner(slot)
        if owners[slot] == node:
            found.append(name)
        i += 1
    return found


async def test_cluster_node_restart_while_requests_flow(
    redis_cluster: RedisClusterSetup, start_sluice: StartSluice, session: aiohttp.ClientSession
) -> None:
    """Restart one cluster master under traffic whose keys live on it: every request
    is answered under the ``allow`` policy (200), and within a few seconds the
    limits are enforced again (the restarted node lost its counters, so fresh
    clients are used to check)."""
    redis_cluster.flushall()
    node = 1
    flow_clients = _clients_on_node(redis_cluster, node, "flow-", 3)
    probes = _clients_on_node(redis_cluster, node, "probe-", 40)
    storage = (
        f"url: '{redis_cluster.url}', timeout: 200ms, breaker_failures: 3, breaker_reset: 500ms"
    )
    sluice = start_sluice(storage, FLOW_AND_STRICT)
    obs = Observer(session, sluice)
    assert await obs.many("/strict/x", probes.pop(), 6) == [200] * 5 + [429]
    node_port = redis_cluster.ports[node]
    assert command_calls([node_port]) >= 6

    restart = asyncio.ensure_future(asyncio.to_thread(redis_cluster.restart_node, node))
    codes = await _flow(obs, flow_clients, restart)
    await restart
    assert set(codes) == {200}, statuses(obs.replies)

    async def enforced() -> bool:
        return await obs.many("/strict/x", probes.pop(), 6) == [200] * 5 + [429]

    await poll("limits to be enforced again", enforced, RECOVERY_TIMEOUT, interval=0.2)
    assert command_calls([node_port]) >= 6  # counted on the restarted node
    assert obs.slowest() < 1.0


CROSS_SLOT = """\
limits:
  - {{name: per_ip, key: ip, algorithm: fixed_window, limit: 10, window: 1h}}
  - {{name: per_key, key: "header:X-API-Key", algorithm: fixed_window, limit: 100, window: 1h}}
routes:
  - {{name: api, match: {{path_prefix: /api/}}, upstream: up, limits: [per_ip, per_key]}}
  - {{name: probe, match: {{path_prefix: /probe/}}, upstream: up, limits: [per_key]}}
"""


async def test_cluster_group_failure_refunds_the_admitting_group(
    redis_cluster: RedisClusterSetup, start_sluice: StartSluice, session: aiohttp.ClientSession
) -> None:
    """Per-IP and per-API-key keys on different cluster nodes; the key's node is
    killed. Each request's IP group is admitted, its key group fails, so the IP
    group must be refunded (the request is then allowed by policy, uncounted):
    afterwards the per-IP rule shows only the requests Redis really admitted."""
    redis_cluster.flushall()
    ip_node = redis_cluster.slot_owner(client_slot("ip=127.0.0.1"))
    down = (ip_node + 1) % len(redis_cluster.nodes)
    key, probe = _api_keys_on_node(redis_cluster, down, 2)
    storage = (
        f"url: '{redis_cluster.url}', timeout: 200ms, breaker_failures: 3, breaker_reset: 500ms"
    )
    sluice = start_sluice(storage, CROSS_SLOT)
    api = {"X-API-Key": key}
    for _ in range(2):
        assert (await fetch(session, sluice.url("/api/x"), api)).status == 200
    redis_cluster.kill_node(down)
    try:
        for _ in range(3):  # each reaches the store: two slot groups, one fails
            assert (await fetch(session, sluice.url("/api/x"), api)).status == 200
    finally:
        await asyncio.to_thread(redis_cluster.restart_node, down)

    async def back() -> bool:
        reply = await fetch(session, sluice.url("/probe/x"), {"X-API-Key": probe})
        return reply.status == 200 and "RateLimit" in reply.headers

    await poll("the cluster to be counted again", back, RECOVERY_TIMEOUT, interval=0.2)
    reply = await fetch(session, sluice.url("/api/x"), api)
    assert reply.status == 200
    assert ietf_remaining(reply.headers["RateLimit"])["per_ip"] == 10 - 2 - 1


def _api_keys_on_node(cluster: RedisClusterSetup, node: int, n: int) -> list[str]:
    found: list[str] = []
    i = 0
    while len(found) < n:
        if cluster.slot_owner(client_slot(f"header:X-API-Key=key-{i}")) == node:
            found.append(f"key-{i}")
        i += 1
    return found
