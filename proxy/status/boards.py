"""Where the clients leaderboard lives: Redis sorted sets, or the embedded SQLite file.

Redis: one sorted set per (board, minute), ``sl:{sl-status}:rej:<board>:<minute>``,
member ``rule<TAB>client``; every key carries the ``{sl-status}`` hash tag so a
window's buckets share one Cluster slot (one connection, one pipelined round
trip). Buckets expire after ``BUCKET_TTL`` and keep their ``BUCKET_CAP``
largest members; a window is the sum, per member, of each minute's
``PER_MINUTE`` largest (a heavy-hitters estimate: a client that never makes a
minute's top ``PER_MINUTE`` is left out of that minute). Plain pipelined
commands, no script: ``EVALSHA`` on the server stays the rate limiter's alone,
so counting it counts decisions.

SQLite (``memory://``): ``<data_dir>/status.sqlite3``, one row per (board,
minute, rule, client), upserted; a minute keeps its ``BUCKET_CAP`` largest
rows, and rows older than the longest window are deleted as new minutes are
written. As with the link store, one dedicated
thread owns the connection, so the event loop never waits on the file, and
WAL plus ``BEGIN IMMEDIATE`` let every worker share it.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar

from proxy.config import StorageConfig
from proxy.errors import StorageError
from proxy.status.clients import (
    BUCKET_CAP,
    BUCKET_TTL,
    WINDOWS,
    TopClient,
    member,
    ranked,
    split_member,
)
from proxy.storage.redis_client import RedisBackend, open_redis
from proxy.storage.sqlite import connect

T = TypeVar("T")
FILENAME = "status.sqlite3"
PER_MINUTE = 100  # members read from each minute bucket for a window's leaderboard
Counts = Mapping[tuple[str, str], int]


class ClientBoard(Protocol):
    location: str

    async def add(self, board: str, minute: int, counts: Counts) -> None:
        """Add ``counts`` ((rule, client) → rejections) to one minute bucket."""
        ...

    async def top(self, board: str, minutes: Sequence[int], limit: int) -> list[TopClient]:
        """The ``limit`` largest (rule, client) totals over ``minutes``, largest first."""
        ...

    async def close(self) -> None: ...


async def _all(calls: Sequence[Awaitable[Any]]) -> None:
    """Send every call at once (pipelined), wait for all, raise the first error."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


class RedisClientBoard:
    def __init__(
        self, backend: RedisBackend, location: str, prefix: str = "sl:{sl-status}"
    ) -> None:
        self.backend = backend
        self.location = location
        self.prefix = prefix

    def bucket(self, board: str, minute: int) -> str:
        return f"{self.prefix}:rej:{board}:{minute}"

    async def add(self, board: str, minute: int, counts: Counts) -> None:
        if not counts:
            return
        bucket = self.bucket(board, minute)
        run = self.backend.execute
        calls = [
            run("ZINCRBY", bucket, n, member(rule, client), key=bucket)
            for (rule, client), n in counts.items()
        ]
        calls.append(run("EXPIRE", bucket, BUCKET_TTL, key=bucket))
        calls.append(run("ZREMRANGEBYRANK", bucket, 0, -(BUCKET_CAP + 1), key=bucket))
        await _all(calls)

    async def top(self, board: str, minutes: Sequence[int], limit: int) -> list[TopClient]:
        """The largest ``PER_MINUTE`` members of each minute, merged here: one pipelined
        round trip of cheap ``ZREVRANGE`` calls (a server-side union of 60 full buckets
        would hold Redis, and every rate-limit check behind it, for many ms)."""
        run = self.backend.execute
        replies = await asyncio.gather(
            *(
                run("ZREVRANGE", key, 0, PER_MINUTE - 1, "WITHSCORES", key=key)
                for key in (self.bucket(board, m) for m in minutes)
            )
        )
        counts: dict[tuple[str, str], float] = {}
        for reply in replies:
            for i in range(0, len(reply), 2):
                entry = split_member(reply[i].decode())
                counts[entry] = counts.get(entry, 0.0) + float(reply[i + 1])
        return ranked(counts, limit)

    async def close(self) -> None:
        await self.backend.close()


_SCHEMA = """
CREATE TABLE IF NOT EXISTS rejections (
    board TEXT NOT NULL,
    minute INTEGER NOT NULL,
    rule TEXT NOT NULL,
    client TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (board, minute, rule, client)
) WITHOUT ROWID
"""
_UPSERT = (
    "INSERT INTO rejections (board, minute, rule, client, count) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (board, minute, rule, client) DO UPDATE SET count = count + excluded.count"
)
_TOP = (
    "SELECT rule, client, SUM(count) AS n FROM rejections "
    "WHERE board = ? AND minute >= ? AND minute <= ? "
    "GROUP BY rule, client ORDER BY n DESC, rule, client LIMIT ?"
)
_KEEP_MINUTES = max(WINDOWS.values()) + 1
_TRIM = (
    "DELETE FROM rejections WHERE board = ? AND minute = ? AND (rule, client) IN ("
    "SELECT rule, client FROM rejections WHERE board = ? AND minute = ? "
    "ORDER BY count ASC LIMIT max(0, "
    "(SELECT count(*) FROM rejections WHERE board = ? AND minute = ?) - ?))"
)


class SQLiteClientBoard:
    def __init__(self, path: str | Path, *, busy_timeout: float = 10.0) -> None:
        self.path = Path(path)
        self.location = f"sqlite:{self.path}"
        self._busy_timeout = busy_timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sluice-status-db")
        self._conn: sqlite3.Connection | None = None  # used on the worker thread only
        self._pruned = 0

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            if self._conn is None:
                conn = connect(self.path, busy_timeout=self._busy_timeout)
                conn.execute(_SCHEMA)
                self._conn = conn
            return fn(self._conn)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"{self.location}: {exc}") from exc

    async def add(self, board: str, minute: int, counts: Counts) -> None:
        if not counts:
            return
        rows = [(board, minute, rule, client, n) for (rule, client), n in counts.items()]
        prune = minute - _KEEP_MINUTES if minute > self._pruned else None

        def write(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(_UPSERT, rows)
                conn.execute(_TRIM, (board, minute) * 3 + (BUCKET_CAP,))
                if prune is not None:
                    conn.execute("DELETE FROM rejections WHERE minute < ?", (prune,))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

        await self._run(write)
        if prune is not None:
            self._pruned = minute

    async def top(self, board: str, minutes: Sequence[int], limit: int) -> list[TopClient]:
        if not minutes:
            return []
        low, high = min(minutes), max(minutes)

        def read(conn: sqlite3.Connection) -> list[Any]:
            return conn.execute(_TOP, (board, low, high, limit)).fetchall()

        rows = await self._run(read)
        return [TopClient(rule, client, int(n)) for rule, client, n in rows if n > 0]

    async def close(self) -> None:
        def shut(conn: sqlite3.Connection) -> None:
            conn.close()

        if self._conn is not None:
            try:
                await self._run(shut)
            except StorageError:
                pass
            self._conn = None
        self._executor.shutdown(wait=True)


def open_client_board(storage: StorageConfig) -> ClientBoard:
    """The leaderboard store for ``storage``; nothing connects until the first call."""
    if storage.scheme == "memory":
        return SQLiteClientBoard(Path(storage.data_dir) / FILENAME)
    backend = open_redis(
        storage.url, timeout=1.0, connect_timeout=storage.connect_timeout, pool_size=1
    )
    return RedisClientBoard(backend, storage.safe_url)
