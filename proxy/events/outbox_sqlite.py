"""The SQLite outbox: ``<data_dir>/events.sqlite3`` for the embedded (no-Redis) setup.

Fresh events are stored in *segments*: one row per group of up to ``batch``
events of one subscription (``append``'s hint: the subscription's
``batch.max_events``), their JSON one per line, so a flood costs one row per
batch, not one per event. A claim leases whole segments; one bigger than
the claim asks for is split first (the claimed head moves to a new row, the
rest keeps its place). Settling a segment deletes it; settling part of one
(only when deliveries of one claim are settled separately) rewrites it
without the settled events, matched by event id, so a late settle from a
consumer whose lease expired removes only events it did deliver.

Events that failed once (retry units), dead letters, replayed dead letters
and fresh events of older files are rows of ``outbox``, one per
(subscription, event). Fresh rows are claimed before segments.

Every call runs on one dedicated thread
that owns the connection, so the event loop never blocks on disk. WAL mode
with ``synchronous=FULL``: a committed append survives a crash of the process
or the machine. Several processes may share the file: claims run in
``BEGIN IMMEDIATE`` transactions and lease rows (``leased_until``), so a lease
left by a crashed process simply expires.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

from proxy.errors import StorageError
from proxy.events.model import Event
from proxy.events.outbox import DeadLetter, Delivery, QueueStats, SubscriptionState
from proxy.storage.sqlite import connect

T = TypeVar("T")
FILENAME = "events.sqlite3"
RECENT_EVENTS = 20_000  # appended events kept in memory until claimed (see _remember)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    sub TEXT NOT NULL,
    event_id TEXT NOT NULL,
    body BLOB NOT NULL,
    created_at REAL NOT NULL,
    unit TEXT,                          -- retry unit once a delivery failed
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    leased_until REAL NOT NULL DEFAULT 0,
    lease_owner TEXT,
    last_error TEXT,
    dead_at REAL,                       -- set: a dead letter
    dead_reason TEXT
);
CREATE INDEX IF NOT EXISTS outbox_fresh ON outbox (sub, seq)
    WHERE unit IS NULL AND dead_at IS NULL;
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (sub, next_attempt_at, unit)
    WHERE unit IS NOT NULL AND dead_at IS NULL;
CREATE INDEX IF NOT EXISTS outbox_dead ON outbox (sub, event_id) WHERE dead_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS segments (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    sub TEXT NOT NULL,
    events INTEGER NOT NULL,            -- how many lines the body holds
    created_at REAL NOT NULL,           -- the oldest event's time
    leased_until REAL NOT NULL DEFAULT 0,
    lease_owner TEXT
);
CREATE INDEX IF NOT EXISTS segments_sub ON segments (sub, seq);
-- Apart from the lease, which changes often (an update rewrites the whole row).
CREATE TABLE IF NOT EXISTS segment_bodies (
    seq INTEGER PRIMARY KEY,            -- segments.seq
    body BLOB NOT NULL                  -- event JSON, one per line
);
CREATE TABLE IF NOT EXISTS subscriptions (
    sub TEXT PRIMARY KEY,
    disabled INTEGER NOT NULL DEFAULT 0,
    disabled_reason TEXT,
    last_success REAL,
    last_error TEXT,
    last_error_at REAL,
    failures INTEGER NOT NULL DEFAULT 0
);
"""


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _first_time(lines: list[bytes], default: float) -> float:
    """When the first event of ``lines`` was created (a segment's events are in
    the order they were emitted, so about its oldest), but not before ``default``
    (the time of the segment they come from)."""
    try:
        return max(Event.from_json(lines[0]).timestamp, default)
    except ValueError:
        return default


class SqliteOutbox:
    def __init__(self, path: str | Path, *, busy_timeout: float = 5.0) -> None:
        self.path = Path(path)
        self._busy_ms = int(busy_timeout * 1000)
        self._conn: sqlite3.Connection | None = None
        self._durable = True  # the connection's synchronous setting: FULL, or NORMAL
        self._recent: dict[tuple[str, bytes], Event] = {}  # see _remember
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sluice-outbox")
        self._closed = False

    @classmethod
    def in_dir(cls, data_dir: str | Path) -> SqliteOutbox:
        return cls(Path(data_dir) / FILENAME)

    # -- the thread ------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = connect(self.path, busy_timeout=self._busy_ms / 1000, synchronous="FULL")
            conn.executescript(_SCHEMA)
            self._conn, self._durable = conn, True
        return self._conn

    def _tx(self, fn: Callable[[sqlite3.Connection], T], durable: bool = True) -> T:
        db = self._db()
        if durable != self._durable:
            db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._durable = durable
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    async def _run(self, fn: Callable[[sqlite3.Connection], T], durable: bool = True) -> T:
        """``fn`` in a transaction on the outbox thread. ``durable=False``: the commit
        is not synced to disk (WAL, ``synchronous=NORMAL``): for claims and
        settlements, which a power cut may undo (the events are then sent
        again), never for appends."""
        if self._closed:
            raise StorageError("the events outbox is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._tx, fn, durable)
        except sqlite3.Error as exc:
            raise StorageError(f"events outbox {self.path}: {exc}") from exc

    @staticmethod
    def _record(db: sqlite3.Connection, sub: str, success: bool, error: str, now: float) -> None:
        db.execute("INSERT OR IGNORE INTO subscriptions (sub) VALUES (?)", (sub,))
        if success:
            db.execute(
                "UPDATE subscriptions SET last_success=?, failures=0 WHERE sub=?", (now, sub)
            )
        else:
            db.execute(
                "UPDATE subscriptions SET last_error=?, last_error_at=?, failures=failures+1 "
                "WHERE sub=?",
                (error, now, sub),
            )

    # -- the Outbox protocol ---------------------------------------------------

    async def append(self, subscription: str, events: Sequence[Event], *, batch: int = 1) -> None:
        size = max(1, batch)
        rows = [
            (
                subscription,
                len(group),
                b"\n".join(e.raw for e in group),
                min(e.timestamp for e in group),
            )
            for group in (events[i : i + size] for i in range(0, len(events), size))
        ]

        def run(db: sqlite3.Connection) -> None:
            for sub, count, body, created in rows:
                seq = db.execute(
                    "INSERT INTO segments (sub, events, created_at) VALUES (?, ?, ?)",
                    (sub, count, created),
                ).lastrowid
                db.execute("INSERT INTO segment_bodies (seq, body) VALUES (?, ?)", (seq, body))

        if rows:
            await self._run(run)
            self._remember(subscription, events)

    def _remember(self, subscription: str, events: Sequence[Event]) -> None:
        """Keep the events just stored, so this process's claims of them skip parsing
        (a line read back is looked up by its exact bytes)."""
        recent = self._recent
        for event in events:
            recent[subscription, event.raw] = event
        if len(recent) > RECENT_EVENTS:  # claimed elsewhere (or never): keep the newer half
            self._recent = dict(islice(recent.items(), len(recent) // 2, None))

    def _event(self, subscription: str, line: bytes) -> Event:
        event = self._recent.pop((subscription, line), None)
        return event if event is not None else Event.from_json(line)

    def _lease(self, db: sqlite3.Connection, seqs: list[int], consumer: str, until: float) -> None:
        db.execute(
            f"UPDATE outbox SET leased_until=?, lease_owner=? WHERE seq IN ({_marks(len(seqs))})",
            (until, consumer, *seqs),
        )

    async def claim_new(
        self, subscription: str, consumer: str, now: float, lease: float, limit: int
    ) -> list[Delivery]:
        until = now + lease

        def run(db: sqlite3.Connection) -> tuple[list[tuple[int, bytes]], list[tuple[int, bytes]]]:
            rows = db.execute(
                "SELECT seq, body FROM outbox WHERE sub=? AND unit IS NULL AND dead_at IS NULL "
                "AND leased_until<=? ORDER BY seq LIMIT ?",
                (subscription, now, limit),
            ).fetchall()
            if rows:
                self._lease(db, [r[0] for r in rows], consumer, until)
            want = limit - len(rows)
            segments: list[tuple[int, bytes]] = []
            cursor = db.execute(
                "SELECT s.seq, s.events, s.created_at, b.body FROM segments s "
                "JOIN segment_bodies b ON b.seq = s.seq WHERE s.sub=? AND s.leased_until<=? "
                "ORDER BY s.seq",
                (subscription, now),
            )
            while want > 0 and (found := cursor.fetchone()) is not None:
                seq, count, created, body = found
                if count > want:  # split: the head is claimed, the rest keeps its place
                    lines = body.split(b"\n")
                    head, rest = lines[:want], lines[want:]
                    db.execute(
                        "UPDATE segments SET events=?, created_at=? WHERE seq=?",
                        (len(rest), _first_time(rest, created), seq),
                    )
                    db.execute(
                        "UPDATE segment_bodies SET body=? WHERE seq=?", (b"\n".join(rest), seq)
                    )
                    body = b"\n".join(head)
                    seq = db.execute(
                        "INSERT INTO segments (sub, events, created_at) VALUES (?, ?, ?)",
                        (subscription, want, created),
                    ).lastrowid
                    db.execute("INSERT INTO segment_bodies (seq, body) VALUES (?, ?)", (seq, body))
                    count = want
                segments.append((seq, body))
                want -= count
            cursor.close()
            if segments:
                db.execute(
                    "UPDATE segments SET leased_until=?, lease_owner=? "
                    f"WHERE seq IN ({_marks(len(segments))})",
                    (until, consumer, *(seq for seq, _ in segments)),
                )
            return rows, segments

        rows, segments = await self._run(run, durable=False)
        out = []
        for seq, body in rows:
            try:
                out.append(Delivery((Event.from_json(body),), 0, None, (str(seq),)))
            except ValueError as exc:
                await self._bury_unreadable(subscription, seq, str(exc), now)
        for seq, body in segments:  # one Delivery per segment
            events = []
            unreadable = []
            for line in body.split(b"\n"):
                try:
                    events.append(self._event(subscription, line))
                except ValueError as exc:
                    unreadable.append((line, str(exc)))
            if events:
                out.append(Delivery(tuple(events), 0, None, (f"s{seq}",) * len(events)))
            if unreadable:
                await self._bury_unreadable_lines(subscription, seq, unreadable, now)
        return out

    async def _bury_unreadable(self, subscription: str, seq: int, error: str, now: float) -> None:
        def run(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE outbox SET dead_at=?, dead_reason=? WHERE seq=?",
                (now, f"unreadable: {error}", seq),
            )

        await self._run(run)

    async def _bury_unreadable_lines(
        self, subscription: str, seq: int, lines: list[tuple[bytes, str]], now: float
    ) -> None:
        """Lines of segment ``seq`` that are not events: dead letters, out of the segment."""

        def run(db: sqlite3.Connection) -> None:
            db.executemany(
                "INSERT INTO outbox (sub, event_id, body, created_at, dead_at, dead_reason) "
                "VALUES (?, '', ?, ?, ?, ?)",
                [(subscription, line, now, now, f"unreadable: {error}") for line, error in lines],
            )
            self._remove_lines(db, seq, {line for line, _ in lines})

        await self._run(run)

    @staticmethod
    def _remove_lines(db: sqlite3.Connection, seq: int, gone: set[bytes]) -> None:
        found = db.execute("SELECT body FROM segment_bodies WHERE seq=?", (seq,)).fetchone()
        if found is None:
            return
        rest = [line for line in found[0].split(b"\n") if line not in gone]
        if rest:
            db.execute("UPDATE segments SET events=? WHERE seq=?", (len(rest), seq))
            db.execute("UPDATE segment_bodies SET body=? WHERE seq=?", (b"\n".join(rest), seq))
        else:
            db.execute("DELETE FROM segments WHERE seq=?", (seq,))
            db.execute("DELETE FROM segment_bodies WHERE seq=?", (seq,))

    @staticmethod
    def _settle_fresh(db: sqlite3.Connection, delivery: Delivery) -> list[int]:
        """Take the delivery's events out of their segments; the outbox rows among
        its handles are returned (the caller settles those)."""
        rows: list[int] = []
        by_segment: dict[int, list[Event]] = {}
        for handle, event in zip(delivery.handles, delivery.events, strict=False):
            if handle.startswith("s"):
                by_segment.setdefault(int(handle[1:]), []).append(event)
            else:
                rows.append(int(handle))
        for seq, events in by_segment.items():
            # The usual case: the delivery holds the whole segment, byte for byte.
            body = b"\n".join(e.raw for e in events)
            if db.execute(
                "DELETE FROM segment_bodies WHERE seq=? AND body=?", (seq, body)
            ).rowcount:
                db.execute("DELETE FROM segments WHERE seq=?", (seq,))
                continue
            ids = {e.id for e in events}
            found = db.execute("SELECT body FROM segment_bodies WHERE seq=?", (seq,)).fetchone()
            if found is None:
                continue  # settled already (a lease that expired, taken over)
            gone = set()
            for line in found[0].split(b"\n"):
                try:
                    if Event.from_json(line).id in ids:
                        gone.add(line)
                except ValueError:
                    continue
            SqliteOutbox._remove_lines(db, seq, gone)
        return rows

    async def claim_due(
        self, subscription: str, consumer: str, now: float, lease: float
    ) -> Delivery | None:
        def run(db: sqlite3.Connection) -> tuple[str, list[tuple[int, bytes, int]]] | None:
            found = db.execute(
                "SELECT unit FROM outbox WHERE sub=? AND unit IS NOT NULL AND dead_at IS NULL "
                "AND next_attempt_at<=? AND leased_until<=? ORDER BY next_attempt_at LIMIT 1",
                (subscription, now, now),
            ).fetchone()
            if found is None:
                return None
            rows = db.execute(
                "SELECT seq, body, attempts FROM outbox WHERE sub=? AND unit=? "
                "AND dead_at IS NULL ORDER BY seq",
                (subscription, found[0]),
            ).fetchall()
            self._lease(db, [r[0] for r in rows], consumer, now + lease)
            return found[0], rows

        claimed = await self._run(run, durable=False)
        if claimed is None:
            return None
        unit, rows = claimed
        events = tuple(Event.from_json(body) for _, body, _ in rows)
        attempts = max(r[2] for r in rows)
        return Delivery(events, attempts, unit, tuple(str(r[0]) for r in rows))

    async def ack(self, subscription: str, delivery: Delivery, now: float) -> None:
        def run(db: sqlite3.Connection) -> None:
            seqs = self._settle_fresh(db, delivery)
            if seqs:
                db.execute(f"DELETE FROM outbox WHERE seq IN ({_marks(len(seqs))})", seqs)
            self._record(db, subscription, True, "", now)

        await self._run(run, durable=False)

    async def retry(
        self,
        subscription: str,
        delivery: Delivery,
        *,
        unit: str,
        attempts: int,
        at: float,
        error: str,
        now: float,
    ) -> None:
        def run(db: sqlite3.Connection) -> None:
            seqs = self._settle_fresh(db, delivery)
            if seqs:
                db.execute(
                    "UPDATE outbox SET unit=?, attempts=?, next_attempt_at=?, leased_until=0, "
                    f"lease_owner=NULL, last_error=? WHERE seq IN ({_marks(len(seqs))}) "
                    "AND dead_at IS NULL",
                    (unit, attempts, at, error, *seqs),
                )
            db.executemany(
                "INSERT INTO outbox (sub, event_id, body, created_at, unit, attempts, "
                "next_attempt_at, last_error) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (subscription, e.id, e.raw, e.timestamp, unit, attempts, at, error)
                    for h, e in zip(delivery.handles, delivery.events, strict=False)
                    if h.startswith("s")
                ],
            )
            self._record(db, subscription, False, error, now)

        await self._run(run, durable=False)

    async def bury(
        self, subscription: str, delivery: Delivery, *, attempts: int, reason: str, now: float
    ) -> None:
        def run(db: sqlite3.Connection) -> None:
            seqs = self._settle_fresh(db, delivery)
            if seqs:
                db.execute(
                    "UPDATE outbox SET dead_at=?, dead_reason=?, attempts=?, unit=NULL, "
                    f"leased_until=0, lease_owner=NULL WHERE seq IN ({_marks(len(seqs))})",
                    (now, reason, attempts, *seqs),
                )
            db.executemany(
                "INSERT INTO outbox (sub, event_id, body, created_at, attempts, dead_at, "
                "dead_reason) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (subscription, e.id, e.raw, e.timestamp, attempts, now, reason)
                    for h, e in zip(delivery.handles, delivery.events, strict=False)
                    if h.startswith("s")
                ],
            )
            self._record(db, subscription, False, reason, now)

        await self._run(run, durable=False)

    async def dead_letters(
        self, subscription: str, after: str | None = None, limit: int = 100
    ) -> list[DeadLetter]:
        def run(db: sqlite3.Connection) -> list[tuple[bytes, int, str, float]]:
            return db.execute(
                "SELECT body, attempts, dead_reason, dead_at FROM outbox WHERE sub=? "
                "AND dead_at IS NOT NULL AND event_id>? ORDER BY event_id LIMIT ?",
                (subscription, after or "", limit),
            ).fetchall()

        rows = await self._run(run, durable=False)
        return [DeadLetter(Event.from_json(b), a, r or "", d) for b, a, r, d in rows]

    async def replay(self, subscription: str, ids: Sequence[str] | None, now: float) -> int:
        chosen = list(ids) if ids is not None else None

        def run(db: sqlite3.Connection) -> int:
            sql = (
                "UPDATE outbox SET dead_at=NULL, dead_reason=NULL, unit=NULL, attempts=0, "
                "next_attempt_at=?, leased_until=0, lease_owner=NULL "
                "WHERE sub=? AND dead_at IS NOT NULL"
            )
            args: list[Any] = [now, subscription]
            if chosen is not None:
                if not chosen:
                    return 0
                sql += f" AND event_id IN ({_marks(len(chosen))})"
                args += chosen
            return db.execute(sql, args).rowcount

        return await self._run(run)

    async def state(self, subscription: str) -> SubscriptionState:
        def run(db: sqlite3.Connection) -> tuple[Any, ...] | None:
            row: tuple[Any, ...] | None = db.execute(
                "SELECT disabled, disabled_reason, last_success, last_error, last_error_at, "
                "failures FROM subscriptions WHERE sub=?",
                (subscription,),
            ).fetchone()
            return row

        row = await self._run(run, durable=False)
        if row is None:
            return SubscriptionState()
        return SubscriptionState(bool(row[0]), row[1], row[2], row[3], row[4], int(row[5]))

    async def set_disabled(
        self, subscription: str, disabled: bool, reason: str | None, now: float
    ) -> None:
        def run(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR IGNORE INTO subscriptions (sub) VALUES (?)", (subscription,))
            db.execute(
                "UPDATE subscriptions SET disabled=?, disabled_reason=? WHERE sub=?",
                (int(disabled), reason if disabled else None, subscription),
            )
            if not disabled:
                db.execute("UPDATE subscriptions SET failures=0 WHERE sub=?", (subscription,))

        await self._run(run)

    async def stats(self, subscription: str) -> QueueStats:
        def run(db: sqlite3.Connection) -> QueueStats:
            depth, oldest = db.execute(
                "SELECT COUNT(*), MIN(created_at) FROM outbox WHERE sub=? AND dead_at IS NULL",
                (subscription,),
            ).fetchone()
            queued, first = db.execute(
                "SELECT COALESCE(SUM(events), 0), MIN(created_at) FROM segments WHERE sub=?",
                (subscription,),
            ).fetchone()
            depth += queued
            oldest = min((t for t in (oldest, first) if t is not None), default=None)
            (dead,) = db.execute(
                "SELECT COUNT(*) FROM outbox WHERE sub=? AND dead_at IS NOT NULL", (subscription,)
            ).fetchone()
            return QueueStats(int(depth), oldest, int(dead))

        return await self._run(run, durable=False)

    async def maintain(self, subscription: str) -> None:
        return None  # rows leave the table when delivered

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(self._executor, shut)
        self._executor.shutdown(wait=True)
