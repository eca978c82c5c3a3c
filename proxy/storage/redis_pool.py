"""A small pool of pipelined connections to one Redis server, with reconnect backoff."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any

from proxy.storage.errors import NoScriptError, StorageError, StorageUnavailable
from proxy.storage.resp import Command, CommandArg, RedisConnection

Connector = Callable[[], Awaitable[RedisConnection]]


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Done-callback: mark a background failure as seen (it was reported elsewhere)."""
    if not task.cancelled():
        task.exception()


class ConnectionPool:
    """Up to ``size`` connections to one server, opened lazily.

    Calls go to the first healthy connection (no overdue call, fewer than
    ``max_pipeline`` pending): one socket carries everything while it keeps
    up, which batches the most commands per write and per read (bench: a
    least-pending spread over two sockets halved throughput). When no
    connection is healthy the call goes to the usable one with the fewest
    pending replies and, if the pool is not full, one more connection is
    opened in the background; that is how a stuck or slow socket is bypassed.
    Only one connect runs at a time; callers with no open connection wait for it.

    After a failed connect the pool backs off (exponential with jitter, from
    ``backoff_base`` up to ``backoff_max`` seconds): meanwhile calls fail at
    once with ``StorageUnavailable`` instead of hammering a dead server. There
    is no background reconnect loop: the next call after the backoff connects.
    """

    def __init__(
        self,
        connector: Connector,
        *,
        name: str,
        size: int = 2,
        backoff_base: float = 0.05,
        backoff_max: float = 2.0,
        max_pipeline: int = 256,
    ) -> None:
        if size < 1:
            raise ValueError(f"pool size must be >= 1, got {size}")
        self.name = name
        self._connector = connector
        self._size = size
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._max_pipeline = max_pipeline
        self._live: list[RedisConnection] = []
        self._retired: set[RedisConnection] = set()
        self._connecting: asyncio.Task[RedisConnection] | None = None
        self._failures = 0
        self._retry_at = 0.0
        self._last_error: StorageError | None = None
        self._closed = False

    @property
    def connections(self) -> int:
        return len(self._live)

    def _pick(self) -> RedisConnection | None:
        best = None
        for conn in self._live:
            if conn.healthy and conn.pending < self._max_pipeline:
                return conn  # the first healthy one: keeps pipelines deep (see class doc)
            if conn.is_usable and (best is None or conn.pending < best.pending):
                best = conn
        if len(self._live) < self._size and self._connecting is None and not self._closed:
            if asyncio.get_running_loop().time() >= self._retry_at:
                self._start_connect()
        return best

    async def acquire(self) -> RedisConnection:
        """A usable connection, connecting (or failing fast while backing off) if none is open."""
        conn = self._pick()
        if conn is not None:
            return conn
        if self._closed:
            raise StorageUnavailable(f"{self.name}: client is closed")
        task = self._connecting
        if task is None:
            delay = self._retry_at - asyncio.get_running_loop().time()
            if delay > 0:
                raise StorageUnavailable(
                    f"{self.name} unavailable, next reconnect in {delay:.2f} s "
                    f"(last error: {self._last_error})"
                )
            task = self._start_connect()
        return await asyncio.shield(task)

    def _start_connect(self) -> asyncio.Task[RedisConnection]:
        task = asyncio.get_running_loop().create_task(self._connect())
        task.add_done_callback(_retrieve)
        self._connecting = task
        return task

    async def _connect(self) -> RedisConnection:
        try:
            conn = await self._connector()
        except StorageError as exc:
            self._failures += 1
            delay = min(self._backoff_max, self._backoff_base * 2 ** (self._failures - 1))
            self._retry_at = asyncio.get_running_loop().time() + delay * random.uniform(0.5, 1.0)
            self._last_error = exc
            raise
        finally:
            self._connecting = None
        if self._closed:
            await conn.close()
            raise StorageUnavailable(f"{self.name}: client is closed")
        self._failures = 0
        conn.on_lost = self._on_lost
        self._live.append(conn)
        return conn

    def _on_lost(self, conn: RedisConnection) -> None:
        if conn in self._live:
            self._live.remove(conn)
        self._retired.discard(conn)

    async def call(self, *args: CommandArg) -> Any:
        """Run one command (on the connection ``_pick`` chooses, see the class doc)."""
        conn = self._pick() or await self.acquire()
        return await conn.send(args)

    async def call_asking(self, *args: CommandArg) -> Any:
        """``ASKING`` then the command, back to back on one connection (cluster ASK)."""
        conn = self._pick() or await self.acquire()
        asking = conn.send(("ASKING",))
        asking.add_done_callback(_retrieve)
        return await conn.send(args)

    async def call_script(self, script: bytes, command: Command, *, asking: bool = False) -> Any:
        """Run an EVALSHA ``command`` (arguments or packed RESP); on NOSCRIPT load
        ``script`` here and retry once."""
        conn = self._pick() or await self.acquire()  # inlines ``call``: the hot path
        try:
            if asking:
                conn.send(("ASKING",)).add_done_callback(_retrieve)
            return await conn.send(command)
        except NoScriptError:
            await self.call("SCRIPT", "LOAD", script)
            conn = self._pick() or await self.acquire()
            if asking:
                conn.send(("ASKING",)).add_done_callback(_retrieve)
            return await conn.send(command)

    def retire(self) -> None:
        """Send no new calls to the open connections; close each once it is idle."""
        for conn in self._live:
            self._retired.add(conn)
            conn.close_when_idle()
        self._live.clear()

    async def close(self) -> None:
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
            await asyncio.wait([self._connecting])
        conns = [*self._live, *self._retired]
        self._live.clear()
        self._retired.clear()
        await asyncio.gather(*(conn.close() for conn in conns))
