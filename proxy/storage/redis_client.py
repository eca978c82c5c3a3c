"""Redis backends for the rate-limit hot path: standalone, Sentinel and Cluster.

All three implement ``RedisBackend`` on top of the pipelined connection in
``proxy.storage.resp``; ``open_redis(url)`` picks one from the URL (forms in
``proxy.storage.redis_url``).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Sequence
from typing import Any, NamedTuple, Protocol

from proxy.storage.errors import ReadOnlyError, StorageError, StorageUnavailable
from proxy.storage.redis_cluster import ClusterRedis
from proxy.storage.redis_pool import ConnectionPool
from proxy.storage.redis_url import RedisURL, connect_options, parse_redis_url
from proxy.storage.resp import (
    Command,
    CommandArg,
    ConnectOptions,
    RedisConnection,
    open_connection,
)

ScriptArg = str | int | float


class ScriptCall(NamedTuple):
    """One EVALSHA: the script body (for NOSCRIPT), its SHA1, KEYS and ARGV."""

    script: bytes
    sha: str
    keys: Sequence[str]
    args: Sequence[ScriptArg]


def script_sha(script: bytes) -> str:
    """The SHA1 Redis uses to name ``script`` in EVALSHA."""
    return hashlib.sha1(script).hexdigest()


class RedisBackend(Protocol):
    """What the rate-limit engine needs from Redis, whatever the topology.

    Replies are raw RESP values (bytes, int, list, None). Every failure is a
    ``StorageError``: ``StorageTimeout`` past the deadline, ``StorageUnavailable``
    without a usable connection, ``ResponseError`` (typed by prefix) for an
    error reply. Timed-out calls may still have run on the server.
    """

    async def execute(self, *args: CommandArg, key: str | bytes | None = None) -> Any:
        """Run one command. ``key`` routes it in a cluster (ignored elsewhere)."""
        ...

    async def evalsha(
        self, script: bytes, sha: str, keys: Sequence[str], args: Sequence[ScriptArg]
    ) -> Any:
        """EVALSHA; on NOSCRIPT load ``script`` and retry once. In a cluster all
        ``keys`` must share a slot (Redis answers CROSSSLOT otherwise)."""
        ...

    def evalsha_packed(self, script: bytes, key: str, packed: bytes) -> Awaitable[Any]:
        """``evalsha`` of a command already packed (``evalsha_command`` then
        ``hiredis.pack_command``), for a caller that sends it many times; ``key``
        (one of its keys) routes it in a cluster. (An awaitable, not necessarily a
        coroutine of its own: on the hot path a backend may hand over its pool's.)"""
        ...

    async def evalsha_many(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """Run several scripts concurrently (one per slot group in a cluster);
        results in order. Not atomic across calls: if one fails, the others
        may have run; the first error is raised after all have finished."""
        ...

    async def close(self) -> None: ...


async def _gather_scripts(backend: RedisBackend, calls: Sequence[ScriptCall]) -> list[Any]:
    results = await asyncio.gather(*(backend.evalsha(*c) for c in calls), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def evalsha_command(
    sha: str, keys: Sequence[str], args: Sequence[ScriptArg]
) -> tuple[CommandArg, ...]:
    return ("EVALSHA", sha, len(keys), *keys, *args)


class StandaloneRedis:
    """One Redis server (``redis://`` or ``rediss://``) through a small connection pool."""

    def __init__(
        self,
        url: str | RedisURL,
        *,
        timeout: float = 1.0,
        connect_timeout: float = 1.0,
        pool_size: int = 2,
    ) -> None:
        parsed = parse_redis_url(url) if isinstance(url, str) else url
        if parsed.kind != "standalone":
            raise ValueError(
                f"StandaloneRedis needs a redis:// or rediss:// URL, got a {parsed.kind} URL"
            )
        host, port = parsed.hosts[0]
        options = connect_options(parsed, timeout, connect_timeout)

        async def connect() -> RedisConnection:
            return await open_connection(host, port, options)

        self._pool = ConnectionPool(connect, name=f"{host}:{port}", size=pool_size)

    async def execute(self, *args: CommandArg, key: str | bytes | None = None) -> Any:
        return await self._pool.call(*args)

    async def evalsha(
        self, script: bytes, sha: str, keys: Sequence[str], args: Sequence[ScriptArg]
    ) -> Any:
        return await self._pool.call_script(script, evalsha_command(sha, keys, args))

    def evalsha_packed(self, script: bytes, key: str, packed: bytes) -> Awaitable[Any]:
        return self._pool.call_script(script, packed)  # no coroutine of its own: hot path

    async def evalsha_many(self, calls: Sequence[ScriptCall]) -> list[Any]:
        return await _gather_scripts(self, calls)

    async def close(self) -> None:
        await self._pool.close()


class SentinelRedis:
    """The master of a Sentinel-monitored service (``redis+sentinel://``).

    Each new connection asks the sentinels for the master's address
    (``SENTINEL get-master-addr-by-name``) and checks ``ROLE`` on it. The
    address is re-checked at most every ``check_interval`` seconds while calls
    flow, because after a forced failover the old master stays a writable
    master for ~10 s before the sentinel demotes it; when the address changes,
    or a call meets ``READONLY``, the open connections are retired (closed once
    idle) and the call is retried once on a fresh connection to the new master.
    """

    def __init__(
        self,
        url: str | RedisURL,
        *,
        timeout: float = 1.0,
        connect_timeout: float = 1.0,
        pool_size: int = 2,
        check_interval: float = 1.0,
    ) -> None:
        parsed = parse_redis_url(url) if isinstance(url, str) else url
        if parsed.kind != "sentinel":
            raise ValueError(
                f"SentinelRedis needs a redis+sentinel:// URL, got a {parsed.kind} URL"
            )
        self._service = parsed.service
        self._sentinels = list(parsed.hosts)
        self._options = connect_options(parsed, timeout, connect_timeout)
        self._sentinel_options = ConnectOptions(
            timeout=timeout, connect_timeout=connect_timeout, password=parsed.sentinel_password
        )
        self._check_interval = check_interval
        self._next_check = time.monotonic() + check_interval
        self._check_task: asyncio.Task[None] | None = None
        self._master: tuple[str, int] | None = None
        self._sentinel_conn: RedisConnection | None = None
        self._lock = asyncio.Lock()
        self._pool = ConnectionPool(
            self._connect_master, name=f"master of {self._service!r}", size=pool_size
        )

    async def _ask(self, conn: RedisConnection) -> tuple[str, int] | None:
        reply = await conn.call("SENTINEL", "get-master-addr-by-name", self._service)
        return None if reply is None else (reply[0].decode(), int(reply[1]))

    async def resolve_master(self) -> tuple[str, int]:
        """The master's address according to the first sentinel that knows it."""
        async with self._lock:
            errors: list[str] = []
            conn = self._sentinel_conn
            if conn is not None and conn.is_usable:
                try:
                    if (address := await self._ask(conn)) is not None:
                        return address
                    errors.append(f"{conn.name} knows no master named {self._service!r}")
                except StorageError as exc:
                    errors.append(str(exc))
            if conn is not None:
                self._sentinel_conn = None
                await conn.close()
            for i, (host, port) in enumerate(self._sentinels):
                try:
                    conn = await open_connection(host, port, self._sentinel_options)
                except StorageError as exc:
                    errors.append(str(exc))
                    continue
                try:
                    address = await self._ask(conn)
                except StorageError as exc:
                    address = None
                    errors.append(str(exc))
                if address is None:
                    errors.append(f"{conn.name} knows no master named {self._service!r}")
                    await conn.close()
                    continue
                self._sentinel_conn = conn
                self._sentinels.insert(0, self._sentinels.pop(i))  # ask it first next time
                return address
            raise StorageUnavailable(
                f"no sentinel named the master of {self._service!r}: {'; '.join(errors)}"
            )

    async def _connect_master(self) -> RedisConnection:
        host, port = await self.resolve_master()
        conn = await open_connection(host, port, self._options)
        try:
            role = await conn.call("ROLE")
        except StorageError as exc:
            await conn.close()
            raise StorageUnavailable(f"ROLE failed on {conn.name}: {exc}") from exc
        if not role or role[0] != b"master":
            await conn.close()
            raise StorageUnavailable(
                f"{conn.name}, named master of {self._service!r} by the sentinel, is not a master "
                "(failover in progress?)"
            )
        self._master = (host, port)
        return conn

    def _maybe_check(self) -> None:
        if time.monotonic() >= self._next_check and self._check_task is None:
            self._check_task = asyncio.get_running_loop().create_task(self._check())

    async def _check(self) -> None:
        try:
            address = await self.resolve_master()
        except StorageError:
            return  # the calls themselves will report it
        finally:
            self._next_check = time.monotonic() + self._check_interval
            self._check_task = None
        if self._master is not None and address != self._master:
            self._master = None
            self._pool.retire()

    async def execute(self, *args: CommandArg, key: str | bytes | None = None) -> Any:
        self._maybe_check()
        try:
            return await self._pool.call(*args)
        except ReadOnlyError:
            self._pool.retire()
            return await self._pool.call(*args)

    async def evalsha(
        self, script: bytes, sha: str, keys: Sequence[str], args: Sequence[ScriptArg]
    ) -> Any:
        return await self._script(script, evalsha_command(sha, keys, args))

    async def evalsha_packed(self, script: bytes, key: str, packed: bytes) -> Any:
        return await self._script(script, packed)

    async def _script(self, script: bytes, command: Command) -> Any:
        self._maybe_check()
        try:
            return await self._pool.call_script(script, command)
        except ReadOnlyError:
            self._pool.retire()
            return await self._pool.call_script(script, command)

    async def evalsha_many(self, calls: Sequence[ScriptCall]) -> list[Any]:
        return await _gather_scripts(self, calls)

    async def close(self) -> None:
        if self._check_task is not None:
            self._check_task.cancel()
            await asyncio.wait([self._check_task])
        await self._pool.close()
        if self._sentinel_conn is not None:
            await self._sentinel_conn.close()
            self._sentinel_conn = None


def open_redis(
    url: str, *, timeout: float = 1.0, connect_timeout: float = 1.0, pool_size: int = 2
) -> RedisBackend:
    """The backend for ``url``; nothing connects until the first call.

    ``timeout`` is each call's deadline (seconds), ``connect_timeout`` bounds
    connecting (TCP, TLS, AUTH, SELECT), ``pool_size`` caps connections per server.
    """
    if timeout <= 0 or connect_timeout <= 0:
        raise ValueError("timeout and connect_timeout must be positive")
    parsed = parse_redis_url(url)
    if parsed.kind == "sentinel":
        return SentinelRedis(
            parsed, timeout=timeout, connect_timeout=connect_timeout, pool_size=pool_size
        )
    if parsed.kind == "cluster":
        options = connect_options(parsed, timeout, connect_timeout)
        return ClusterRedis(parsed.hosts, options, pool_size=pool_size)
    return StandaloneRedis(
        parsed, timeout=timeout, connect_timeout=connect_timeout, pool_size=pool_size
    )
