"""Redis Cluster backend: slot map from ``CLUSTER SLOTS``, calls routed by key slot."""

from __future__ import annotations

import asyncio
import binascii
import random
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from proxy.storage.errors import AskError, MovedError, StorageError, StorageUnavailable
from proxy.storage.redis_pool import ConnectionPool
from proxy.storage.resp import Command, CommandArg, ConnectOptions, RedisConnection, open_connection

if TYPE_CHECKING:
    from proxy.storage.redis_client import ScriptArg, ScriptCall

SLOTS = 16384
_MAX_REDIRECTS = 2  # a MOVED then an ASK is the longest legitimate chain
_REFRESH_INTERVAL = 1.0  # at most one background slot-map refresh per second


def key_slot(key: str | bytes) -> int:
    """The cluster slot of ``key``: CRC16 (XMODEM) mod 16384 of the key, or of the
    first non-empty ``{hash tag}`` in it, so ``{user1}.a`` and ``{user1}.b`` share a slot."""
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start != -1:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return binascii.crc_hqx(data, 0) % SLOTS


class ClusterRedis:
    """A Redis Cluster (``redis+cluster://``): one connection pool per master.

    The slot map is loaded from ``CLUSTER SLOTS`` (asking known nodes, then the
    seeds) before the first call. Calls go to the master owning their key's
    slot. ``MOVED`` updates that slot at once, retries there, and refreshes the
    whole map in the background; ``ASK`` retries once on the named node,
    preceded by ``ASKING`` on the same connection. A node that cannot be
    reached also triggers a (rate-limited) background refresh.
    """

    def __init__(
        self, seeds: Sequence[tuple[str, int]], options: ConnectOptions, *, pool_size: int = 2
    ) -> None:
        if not seeds:
            raise ValueError("a cluster needs at least one seed node")
        self._seeds = [f"{host}:{port}" for host, port in seeds]
        self._options = options
        self._pool_size = pool_size
        self._slots: list[str | None] = [None] * SLOTS
        self._nodes: list[str] = []
        self._pools: dict[str, ConnectionPool] = {}
        self._retired: list[ConnectionPool] = []
        self._refresh_task: asyncio.Task[None] | None = None
        self._next_refresh = 0.0
        self._refresh_error: BaseException | None = None
        self._closed = False

    # -- slot map -------------------------------------------------------------

    def _pool(self, address: str) -> ConnectionPool:
        pool = self._pools.get(address)
        if pool is None:
            if self._closed:
                raise StorageUnavailable("cluster client is closed")
            host, _, port = address.rpartition(":")
            options = self._options

            async def connect() -> RedisConnection:
                return await open_connection(host, int(port), options)

            pool = self._pools[address] = ConnectionPool(
                connect, name=address, size=self._pool_size
            )
        return pool

    async def refresh(self) -> None:
        """Reload the slot map now (concurrent callers share one reload)."""
        task = self._refresh_task
        if task is None:
            task = self._refresh_task = asyncio.get_running_loop().create_task(self._load_slots())
            task.add_done_callback(self._refresh_done)
        await asyncio.shield(task)

    def _refresh_done(self, task: asyncio.Task[None]) -> None:
        self._refresh_task = None
        self._next_refresh = time.monotonic() + _REFRESH_INTERVAL
        # Retrieved here so a background failure is not reported as "never retrieved".
        self._refresh_error = None if task.cancelled() else task.exception()

    def _refresh_soon(self) -> None:
        if (
            self._refresh_task is None
            and time.monotonic() >= self._next_refresh
            and not self._closed
        ):
            self._refresh_task = asyncio.get_running_loop().create_task(self._load_slots())
            self._refresh_task.add_done_callback(self._refresh_done)

    async def _load_slots(self) -> None:
        errors: list[str] = []
        for address in dict.fromkeys([*self._nodes, *self._seeds]):
            try:
                reply = await self._cluster_slots(address)
            except StorageError as exc:
                errors.append(f"{address}: {exc}")
                continue
            self._apply_slots(reply, address.rpartition(":")[0])
            return
        raise StorageUnavailable(f"no cluster node answered CLUSTER SLOTS: {'; '.join(errors)}")

    async def _cluster_slots(self, address: str) -> Any:
        pool = self._pools.get(address)
        if pool is not None:
            return await pool.call("CLUSTER", "SLOTS")
        host, _, port = address.rpartition(":")
        conn = await open_connection(host, int(port), self._options)
        try:
            return await conn.call("CLUSTER", "SLOTS")
        finally:
            await conn.close()

    def _apply_slots(self, reply: Any, asked_host: str) -> None:
        slots: list[str | None] = [None] * SLOTS
        for start, end, master, *_replicas in reply:
            host = master[0].decode() or asked_host  # an empty host means "the one you asked"
            address = f"{host}:{int(master[1])}"
            slots[int(start) : int(end) + 1] = [address] * (int(end) - int(start) + 1)
        self._slots = slots
        self._nodes = list(dict.fromkeys(a for a in slots if a is not None))
        for address in set(self._pools) - set(self._nodes):
            pool = self._pools.pop(address)
            pool.retire()
            self._retired.append(pool)

    async def _node_for(self, slot: int | None) -> str:
        if not self._nodes:
            if self._refresh_error is not None and time.monotonic() < self._next_refresh:
                raise StorageUnavailable(f"cluster slot map unavailable: {self._refresh_error}")
            await self.refresh()
        if slot is None:
            return random.choice(self._nodes)
        address = self._slots[slot]
        if address is None:
            await self.refresh()
            address = self._slots[slot]
            if address is None:
                raise StorageUnavailable(f"no cluster node serves slot {slot}")
        return address

    # -- calls ------------------------------------------------------------------

    async def _routed(self, slot: int | None, command: Command, script: bytes | None = None) -> Any:
        address = await self._node_for(slot)
        asking = False
        for _ in range(_MAX_REDIRECTS + 1):
            pool = self._pool(address)
            try:
                if script is not None:
                    return await pool.call_script(script, command, asking=asking)
                if isinstance(command, bytes):
                    raise TypeError("only scripts are sent packed")
                if asking:
                    return await pool.call_asking(*command)
                return await pool.call(*command)
            except MovedError as exc:
                address = f"{exc.host or address.rpartition(':')[0]}:{exc.port}"
                self._slots[exc.slot] = address
                self._refresh_soon()
                asking = False
            except AskError as exc:
                address = f"{exc.host or address.rpartition(':')[0]}:{exc.port}"
                asking = True
            except StorageUnavailable:
                self._refresh_soon()  # the node may have failed over
                raise
        raise StorageUnavailable(f"slot {slot}: more than {_MAX_REDIRECTS} redirects")

    def node_of(self, key: str) -> str | None:
        """The master serving ``key`` by the slot map known now (None before it is)."""
        return self._slots[key_slot(key)]

    def masters(self) -> list[str]:
        """The masters of the slot map known now (a new list whenever it is reloaded)."""
        return self._nodes

    async def execute(self, *args: CommandArg, key: str | bytes | None = None) -> Any:
        """Run a command on the master owning ``key`` (any master without a key)."""
        return await self._routed(None if key is None else key_slot(key), args)

    async def evalsha(
        self, script: bytes, sha: str, keys: Sequence[str], args: Sequence[ScriptArg]
    ) -> Any:
        """EVALSHA on the master owning ``keys[0]``'s slot (all keys must share it)."""
        slot = key_slot(keys[0]) if keys else None
        return await self._routed(slot, ("EVALSHA", sha, len(keys), *keys, *args), script)

    async def evalsha_packed(self, script: bytes, key: str, packed: bytes) -> Any:
        """A packed EVALSHA on the master owning ``key``'s slot."""
        return await self._routed(key_slot(key), packed, script)

    async def evalsha_many(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """One EVALSHA per slot group, all in flight at once (across nodes)."""
        results = await asyncio.gather(*(self.evalsha(*c) for c in calls), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    async def close(self) -> None:
        self._closed = True
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            await asyncio.wait([self._refresh_task])
        pools = [*self._pools.values(), *self._retired]
        self._pools.clear()
        self._retired.clear()
        await asyncio.gather(*(pool.close() for pool in pools))
