"""Three Sluice processes sharing one real Redis Cluster (three masters), end to end.

Every piece is real: the ``redis_cluster`` fixture's three ``redis-server``
masters, three ``sluice serve`` processes on their own ports whose rules name
the cluster (``storage.url: redis+cluster://…``), and an upstream process.
Concurrent clients are spread over all three Sluices, and the clients are
chosen so that each master owns one of them (a client's keys share one slot:
``sl:{<hash of the identity>}:…``). Then the master that owns some clients is
restarted under traffic. Every wait is bounded; every process is stopped by PID.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass

import aiohttp
import pytest

from tests.load import client_slot, command_calls, dbsize
from tests.proc import SluiceProcess, UpstreamProcess, free_port, metric_sum
from tests.proc import write_rules as replace_file
from tests.servers import redis_cli
from tests.topologies import RedisClusterSetup

LIMIT = 30
PER_CLIENT = 90  # requests per client in a burst: 3 * LIMIT
CONCURRENCY = 30
EXACT = ("fixed_window", "sliding_window_log", "gcra", "token_bucket")
RECOVERY_TIMEOUT = 15.0
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=5)


def _rule(algorithm: str) -> str:
    quota = (
        f"capacity: {LIMIT}, refill: 1/h"  # nothing refills during a test
        if algorithm == "token_bucket"
        else f"limit: {LIMIT}, window: 1h"
    )
    return (
        f'  - {{name: {algorithm}, key: "header:X-Client", algorithm: {algorithm}, {quota},'
        " on_storage_error: allow}"
    )


def _rules(main: int, admin: int, cluster_url: str, upstream_url: str) -> str:
    """One route per exact algorithm plus /flow/ (a limit nobody reaches)."""
    names = (*EXACT, "flow")
    lines = [
        f"listen: 127.0.0.1:{main}",
        f"admin: {{listen: '127.0.0.1:{admin}'}}",
        f"storage: {{url: '{cluster_url}', timeout: 500ms, connect_timeout: 1s,"
        " breaker_failures: 3, breaker_reset: 200ms}",
        f"upstreams: {{up: '{upstream_url}'}}",
        "limits:",
        *(_rule(a) for a in EXACT),
        '  - {name: flow, key: "header:X-Client", algorithm: fixed_window, limit: 1000000,'
        " window: 1h, on_storage_error: allow}",
        "routes:",
        *(
            f"  - {{name: {n}, match: {{path_prefix: /{n}/}}, upstream: up, limits: [{n}]}}"
            for n in names
        ),
    ]
    return "\n".join(lines) + "\n"


@dataclass
class Fleet:
    sluices: list[SluiceProcess]

    def urls(self, path: str) -> list[str]:
        return [s.url(path) for s in self.sluices]


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, redis_cluster: RedisClusterSetup
) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("cluster-e2e")
    upstream = UpstreamProcess(workdir / "upstream")
    sluices: list[SluiceProcess] = []
    try:
        upstream.start()
        for _ in range(3):
            main, admin = free_port(), free_port()
            rules = workdir / f"rules-{main}.yaml"
            replace_file(rules, _rules(main, admin, redis_cluster.url, upstream.url))
            sluices.append(SluiceProcess(rules, main, admin, workdir))
        for sluice in sluices:  # start all three, then wait: they boot in parallel
            sluice.start(wait=False)
        for sluice in sluices:
            sluice.wait_healthy()
        yield Fleet(sluices)
    finally:
        for sluice in reversed(sluices):
            sluice.stop()
        upstream.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=CONCURRENCY * 2)
    async with aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT) as s:
        yield s


def clients_on(cluster: RedisClusterSetup, node: int, prefix: str, n: int) -> list[str]:
    """``n`` X-Client values whose keys live on master ``node``."""
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


async def _get(session: aiohttp.ClientSession, url: str, client: str) -> int:
    async with session.get(url, headers={"X-Client": client}) as r:
        await r.read()
        return r.status


async def burst(
    session: aiohttp.ClientSession, urls: Sequence[str], clients: Sequence[str], per_client: int
) -> dict[str, Counter[int]]:
    """``per_client`` GETs for each client, interleaved over clients and over ``urls``,
    ``CONCURRENCY`` in flight; the status counts per client."""
    jobs = [
        (urls[(i * len(clients) + c) % len(urls)], client)
        for i in range(per_client)
        for c, client in enumerate(clients)
    ]
    counts: dict[str, Counter[int]] = {client: Counter() for client in clients}
    queue = iter(jobs)

    async def worker() -> None:
        for url, client in queue:
            counts[client][await _get(session, url, client)] += 1

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return counts


async def _decided(
    session: aiohttp.ClientSession, sluice: SluiceProcess, rule: str, **labels: str
) -> float:
    async with session.get(sluice.admin_url("/metrics")) as r:
        text = await r.text()
    return metric_sum(text, "sluice_ratelimit_decisions_total", rule=rule, **labels) or 0.0


@pytest.mark.parametrize("algorithm", EXACT)
async def test_one_limit_holds_across_three_sluices_and_three_masters(
    fleet: Fleet,
    redis_cluster: RedisClusterSetup,
    session: aiohttp.ClientSession,
    algorithm: str,
) -> None:
    """Three clients, one per master, each sending 3 * limit requests spread over
    the three Sluice processes, all at once: each client gets exactly ``limit``."""
    redis_cluster.flushall()
    clients = [clients_on(redis_cluster, node, f"{algorithm}-n{node}-", 1)[0] for node in range(3)]
    calls_before = [command_calls([port]) for port in redis_cluster.ports]
    decided_before = [await _decided(session, s, algorithm) for s in fleet.sluices]

    counts = await burst(session, fleet.urls(f"/{algorithm}/x"), clients, PER_CLIENT)

    for client in clients:
        assert counts[client] == {200: LIMIT, 429: PER_CLIENT - LIMIT}, (client, counts)
    # Each master holds exactly its client's one key, and each was asked.
    assert dbsize(redis_cluster.ports) == 3
    for port, before in zip(redis_cluster.ports, calls_before, strict=True):
        assert command_calls([port]) - before >= LIMIT, port
    # Each Sluice took part and decided in Redis.
    for sluice, before in zip(fleet.sluices, decided_before, strict=True):
        assert await _decided(session, sluice, algorithm) > before, sluice.main_port


async def _flow(
    session: aiohttp.ClientSession,
    urls: Sequence[str],
    clients: Sequence[str],
    done: asyncio.Future[None],
) -> list[int]:
    """GET /flow/ over every Sluice and client, a few at a time, until ``done``."""
    codes: list[int] = []
    i = 0
    while not done.done():
        batch = [
            _get(session, urls[(i + j) % len(urls)], clients[(i + j) % len(clients)])
            for j in range(6)
        ]
        codes += await asyncio.gather(*batch)
        i += 6
        await asyncio.sleep(0.01)
    return codes


async def test_a_master_restart_under_traffic_keeps_serving_then_limits_converge(
    fleet: Fleet, redis_cluster: RedisClusterSetup, session: aiohttp.ClientSession
) -> None:
    """Restart the master that owns the traffic's clients while requests flow
    through all three Sluices: under ``on_storage_error: allow`` every request is
    answered 200 (no 5xx), and within a few seconds limits are enforced exactly
    again on the restarted master (it lost its counters: fresh clients check
    that), while a client on another master kept its count throughout."""
    redis_cluster.flushall()
    node = 1
    other = 2
    urls_flow = fleet.urls("/flow/x")
    urls_gcra = fleet.urls("/gcra/x")
    flow_clients = clients_on(redis_cluster, node, "flow-", 6)
    probes = iter(clients_on(redis_cluster, node, "probe-", 40))
    (survivor,) = clients_on(redis_cluster, other, "survivor-", 1)

    # Before: enforced on the node, and a client elsewhere with one request left.
    first = await burst(session, urls_gcra, [next(probes)], LIMIT + 5)
    assert list(first.values()) == [{200: LIMIT, 429: 5}]
    kept = await burst(session, urls_gcra, [survivor], LIMIT - 1)
    assert kept[survivor] == {200: LIMIT - 1}

    degraded_before = [await _decided(session, s, "flow", result="degraded") for s in fleet.sluices]
    started = time.monotonic()
    restart: asyncio.Future[None] = asyncio.ensure_future(
        asyncio.to_thread(redis_cluster.restart_node, node)
    )
    codes = await _flow(session, urls_flow, flow_clients, restart)
    await restart
    restarted = time.monotonic()
    assert len(codes) >= 30, "too little traffic during the restart to tell"
    assert Counter(codes) == {200: len(codes)}, Counter(codes)
    # The outage was real: Sluices answered some of them under the degradation policy.
    degraded = [await _decided(session, s, "flow", result="degraded") for s in fleet.sluices]
    assert sum(degraded) > sum(degraded_before), "no request met the outage"

    async def enforced() -> bool:
        counts = await burst(session, urls_gcra, [next(probes)], LIMIT + 5)
        return list(counts.values()) == [{200: LIMIT, 429: 5}]

    deadline = restarted + RECOVERY_TIMEOUT
    while not await enforced():
        assert time.monotonic() < deadline, "limits not enforced again in time"
        await asyncio.sleep(0.2)
    converged = time.monotonic() - restarted
    assert converged < RECOVERY_TIMEOUT
    # The other master never lost the survivor's count: one request left, then 429.
    after = await burst(session, urls_gcra, [survivor], 3)
    assert after[survivor] == {200: 1, 429: 2}
    print(
        f"restart took {restarted - started:.2f}s with {len(codes)} requests answered 200;"
        f" limits exact again {converged:.2f}s after it"
    )


async def test_one_master_down_leaves_clients_on_the_other_masters_limited(
    fleet: Fleet, redis_cluster: RedisClusterSetup, session: aiohttp.ClientSession
) -> None:
    """Master 1 is killed; the cluster keeps serving the other slots (full coverage
    is not required for this test, so the healthy masters answer throughout). A
    client on master 1 is answered under ``allow`` (200); a client on master 2
    still gets exactly its limit: each master has its own breaker."""
    redis_cluster.flushall()
    ports = redis_cluster.ports
    for port in ports:
        redis_cli(port, "config", "set", "cluster-require-full-coverage", "no")
    (down_client,) = clients_on(redis_cluster, 1, "down-", 1)
    (healthy_client,) = clients_on(redis_cluster, 2, "healthy-", 1)
    urls = fleet.urls("/gcra/x")
    try:
        redis_cluster.kill_node(1)
        down = await burst(session, urls, [down_client], 12)  # fails, fails... opens breakers
        assert down[down_client] == {200: 12}
        healthy = await burst(session, urls, [healthy_client], LIMIT + 5)
        assert healthy[healthy_client] == {200: LIMIT, 429: 5}
        dead = f"127.0.0.1:{ports[1]}"
        opened = 0
        for sluice in fleet.sluices:  # per-master breakers: only the dead master's is open
            async with session.get(sluice.admin_url("/readyz")) as r:
                storage = (await r.json())["storage"]
            if storage["open_nodes"]:  # a worker that never called that master has none
                assert storage["open_nodes"] == [dead] and storage["state"] == "degraded"
                opened += 1
        assert opened >= 1
    finally:
        await asyncio.to_thread(redis_cluster.restart_node, 1)
        for port in ports:
            redis_cli(port, "config", "set", "cluster-require-full-coverage", "yes")
