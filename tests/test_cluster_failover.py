"""A Redis Cluster master dies and its replica takes over, under Sluice's per-master
breakers: the dead master's clients are degraded meanwhile, then served by the new
master, and the worker does not stay "degraded" for an address that no longer serves."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.inproc import Sluice, running, write_rules
from tests.load import client_slot
from tests.servers import RedisServer, binary, free_port, redis_cli
from tests.topologies import RedisClusterSetup, _wait

LIMIT = 5
RULES = """
listen: {listen}
admin: {{listen: "{admin}"}}
storage: {{url: "{url}", timeout: 200ms, breaker_failures: 2, breaker_reset: 200ms}}
limits:
  - {{name: per_client, key: "header:X-Client", algorithm: fixed_window, limit: {limit},
     window: 1h, on_storage_error: allow}}
routes:
  - {{name: api, kind: decide, match: {{path_prefix: /}}, limits: [per_client]}}
"""


class ClusterWithReplica(RedisClusterSetup):
    """Three masters, and a replica of master 1."""

    replica: RedisServer

    def start(self) -> ClusterWithReplica:
        super().start()
        port = free_port()
        extra = (
            "--cluster-enabled", "yes",
            "--cluster-port", str(free_port()),
            "--cluster-config-file", f"nodes-{port}.conf",
            "--cluster-node-timeout", str(self.node_timeout_ms),
        )  # fmt: skip
        self.replica = RedisServer(self.workdir / "replica", extra, port=port).start()
        master = self.node_id(1)
        add = [binary("redis-cli"), "--cluster", "add-node", f"127.0.0.1:{port}"]
        add += [f"127.0.0.1:{self.ports[0]}", "--cluster-slave", "--cluster-master-id", master]
        subprocess.run(add, capture_output=True, text=True, timeout=30, check=True)
        _wait(
            "the replica in sync",
            lambda: "master_link_status:up" in redis_cli(port, "info", "replication"),
            30,
            [*self._logs(), self.replica.workdir / "redis.log"],
        )
        return self

    def stop(self) -> None:
        replica = getattr(self, "replica", None)
        if replica is not None:
            replica.stop()
        super().stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterWithReplica]:
    setup = ClusterWithReplica(tmp_path_factory.mktemp("cluster-failover"))
    setup.start()
    try:
        yield setup
    finally:
        setup.stop()


@pytest.fixture
async def sluice(tmp_path: Path, cluster: ClusterWithReplica) -> AsyncIterator[Sluice]:
    async with running(write_rules(tmp_path, RULES, url=cluster.url, limit=LIMIT)) as s:
        yield s


def on_master(cluster: ClusterWithReplica, node: int, prefix: str) -> str:
    i = 0
    while cluster.slot_owner(client_slot(f"header:X-Client={prefix}{i}")) != node:
        i += 1
    return f"{prefix}{i}"


async def statuses(s: Sluice, client: str, n: int) -> list[int]:
    out = []
    async with aiohttp.ClientSession() as http:
        for _ in range(n):
            async with http.get(s.url + "/x", headers={"X-Client": client}) as r:
                out.append(r.status)
    return out


async def storage(s: Sluice) -> dict:
    async with aiohttp.ClientSession() as http:
        async with http.get(s.admin_url + "/readyz") as r:
            return (await r.json())["storage"]


async def test_a_failed_over_master_is_followed(
    sluice: Sluice, cluster: ClusterWithReplica
) -> None:
    client = on_master(cluster, 1, "fo-")
    fresh = on_master(cluster, 1, "after-")  # a client of those slots, counted afterwards
    assert await statuses(sluice, client, 2) == [200, 200]
    dead = f"127.0.0.1:{cluster.ports[1]}"
    cluster.kill_node(1)
    assert await statuses(sluice, client, 4) == [200] * 4  # on_storage_error: allow
    degraded = await storage(sluice)
    assert degraded["state"] == "degraded" and degraded["open_nodes"] == [dead]

    redis_cli(cluster.replica.port, "cluster", "failover", "takeover")

    async def recovered() -> bool:
        await statuses(sluice, client, 1)  # its calls probe the breaker, then the new map
        state = await storage(sluice)
        return state["state"] == "ok" and state["open_nodes"] == []

    deadline = asyncio.get_running_loop().time() + 20
    while not await recovered():
        assert asyncio.get_running_loop().time() < deadline, await storage(sluice)
        await asyncio.sleep(0.2)
    assert not sluice.runtime.limiter.degraded
    assert await statuses(sluice, fresh, LIMIT + 2) == [200] * LIMIT + [429] * 2
