"""The embedded link store: one SQLite file, ``<data_dir>/links.sqlite3``.

The event loop never touches SQLite: every call runs on one dedicated worker
thread that owns the only connection (opened there, ``check_same_thread`` left
on), so calls are serialised in submission order and the loop only awaits a
future. WAL mode lets readers in other processes run beside the writer;
``synchronous=NORMAL`` means a commit survives a crash of Sluice but the last
few may be lost on power failure. Writes use ``BEGIN IMMEDIATE`` with a busy
timeout, so several processes may share the file: a custom code inserted by
two of them at once is decided by the ``UNIQUE`` constraint, exactly one wins.

Generated codes use the ``links`` table's AUTOINCREMENT sequence as counter.
Unique visitors are exact (a per-day visitors table of 64-bit digests).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from proxy.errors import StorageError
from proxy.links.analytics import MAX_STATS_DAYS, day_of, hour_of, visitor_digest, window_buckets
from proxy.links.codes import Codec, is_code
from proxy.links.errors import CodeTaken
from proxy.links.model import Link, apply_patch
from proxy.links.sqlite_schema import (
    COLUMNS,
    find_row,
    insert_link,
    link_params,
    migrate,
    raise_sequence,
    row_link,
)
from proxy.links.store import (
    GENERATED_ATTEMPTS,
    HOURLY_KEEP,
    TOP_LIMIT,
    ClickRecord,
    ImportResult,
    LinkStats,
    Page,
    TopEntry,
    build_stats,
    check_limit,
    click_fields,
    counter_floor,
    dedupe_key,
    import_batches,
    parse_cursor,
    reusable,
    stats_days,
)
from proxy.storage.sqlite import connect

T = TypeVar("T")
# ``list`` is a method of the store class, so its bodies name list types through these:
Rows = list[tuple[Any, ...]]
Links = list[Link]
Strings = list[str]
Buckets = list[tuple[int, float]]
FILENAME = "links.sqlite3"
_EXPORT_BATCH = 500


class SQLiteLinkStore:
    """``LinkStore`` on one SQLite file; create with ``await SQLiteLinkStore.open(path)``."""

    def __init__(self, path: str | Path, *, busy_timeout: float = 10.0) -> None:
        self.path = Path(path)
        self._busy_timeout = busy_timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sluice-links-db")
        self._executor_open = True
        self._conn: sqlite3.Connection | None = None  # used on the worker thread only
        self._pruned_hour = 0
        self.codec = Codec(b"placeholder-until-open")  # replaced by open()

    @classmethod
    async def open(
        cls, path: str | Path, *, secret: str | None = None, min_length: int = 7
    ) -> SQLiteLinkStore:
        """Open (creating and migrating) the database at ``path``; see ``settings``
        for ``secret`` (None: the one generated and kept in the file)."""
        store = cls(path)
        try:
            stored_secret = await store._call(store._setup, secret)
        except BaseException:
            await store.close()
            raise
        store.codec = Codec(stored_secret, min_length)
        return store

    # -- the worker thread -----------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as exc:
            raise StorageError(f"links database {self.path}: {exc}") from exc

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StorageError(f"links database {self.path} is closed")
        return self._conn

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in one ``BEGIN IMMEDIATE`` transaction (worker thread)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    def _setup(self, secret: str | None) -> str:
        db = connect(self.path, busy_timeout=self._busy_timeout)
        self._conn = db
        return self._write(lambda db: migrate(db, secret, str(self.path)))

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def close(self) -> None:
        if self._executor_open:
            self._executor_open = False
            try:
                await asyncio.get_running_loop().run_in_executor(self._executor, self._close)
            finally:
                self._executor.shutdown(wait=False)

    # -- links -------------------------------------------------------------------

    def _create(self, link: Link, owner: str | None) -> tuple[Link, bool]:
        dedupe = dedupe_key(owner, link.url) if owner else None

        def run(db: sqlite3.Connection) -> tuple[Link, bool]:
            if link.code:
                try:
                    insert_link(db, None, link, dedupe)
                except sqlite3.IntegrityError:
                    row = db.execute(
                        f"SELECT {COLUMNS}, dedupe FROM links WHERE code = ?", (link.code,)
                    ).fetchone()
                    if dedupe and row and row[-1] == dedupe:  # the same request again
                        return row_link(row[:-1]), False
                    raise CodeTaken(link.code) from None
                return link, True
            if dedupe:
                row = db.execute(
                    f"SELECT {COLUMNS}, clicks FROM links WHERE dedupe = ?"
                    " ORDER BY id DESC LIMIT 1",
                    (dedupe,),
                ).fetchone()
                if row is not None:
                    found = row_link(row[:-1])
                    if found.url == link.url and reusable(found, row[-1], link.created_at):
                        return found, False
            seq_row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'links'").fetchone()
            seq = seq_row[0] if seq_row else 0
            for _ in range(GENERATED_ATTEMPTS):
                seq += 1
                stored = replace(link, code=self.codec.encode(seq))
                try:
                    insert_link(db, seq, stored, dedupe)
                except sqlite3.IntegrityError:  # a code imported from another secret
                    raise_sequence(db, seq)
                    continue
                return stored, True
            raise StorageError("generated codes keep colliding with imported ones")

        return self._write(run)

    async def create(self, link: Link, *, dedupe_owner: str | None = None) -> tuple[Link, bool]:
        return await self._call(self._create, link, dedupe_owner)

    def _get(self, code: str) -> Link | None:
        row = find_row(self._db, code)
        return None if row is None else row_link(row)

    async def get(self, code: str) -> Link | None:
        if not is_code(code):
            return None
        return await self._call(self._get, code)

    def _list(self, before: int | None, limit: int, tag: str | None) -> Page:
        bound = before if before is not None else 2**63 - 1
        if tag is None:
            sql = f"SELECT {COLUMNS} FROM links WHERE id < ? ORDER BY id DESC LIMIT ?"
            rows = self._db.execute(sql, (bound, limit + 1)).fetchall()
        else:
            sql = (
                f"SELECT {COLUMNS} FROM links JOIN link_tags ON link_id = id"
                " WHERE tag = ? AND id < ? ORDER BY id DESC LIMIT ?"
            )
            rows = self._db.execute(sql, (tag, bound, limit + 1)).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        return Page(tuple(row_link(r) for r in rows), str(rows[-1][0]) if more else None)

    async def list(
        self, cursor: str | None = None, limit: int = 50, tag: str | None = None
    ) -> Page:
        return await self._call(self._list, parse_cursor(cursor), check_limit(limit), tag)

    def _patch(self, code: str, changes: Mapping[str, Any]) -> Link | None:
        def run(db: sqlite3.Connection) -> Link | None:
            row = find_row(db, code)
            if row is None:
                return None
            link = apply_patch(row_link(row), changes)
            db.execute(
                "UPDATE links SET url = ?, created_at = ?, created_by = ?, expires_at = ?,"
                " max_clicks = ?, status = ?, tags = ?, variants = ? WHERE id = ?",
                (*link_params(link), row[0]),
            )
            if "tags" in changes:
                db.execute("DELETE FROM link_tags WHERE link_id = ?", (row[0],))
                db.executemany(
                    "INSERT INTO link_tags VALUES (?, ?)", [(t, row[0]) for t in link.tags]
                )
            return link

        return self._write(run)

    async def patch(self, code: str, changes: Mapping[str, Any]) -> Link | None:
        return await self._call(self._patch, code, dict(changes))

    def _delete(self, code: str) -> bool:
        def run(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT id FROM links WHERE code = ?", (code,)).fetchone()
            if row is None:
                return False
            db.execute("DELETE FROM links WHERE id = ?", row)
            db.execute("DELETE FROM link_tags WHERE link_id = ?", row)
            for table in ("daily", "visitors", "hourly"):
                db.execute(f"DELETE FROM {table} WHERE code = ?", (code,))
            return True

        return self._write(run)

    async def delete(self, code: str) -> bool:
        return await self._call(self._delete, code)

    # -- clicks ------------------------------------------------------------------

    def _take_click(self, code: str, max_clicks: int | None) -> bool:
        cur = self._db.execute(
            "UPDATE links SET clicks = clicks + 1 WHERE code = ? AND (? IS NULL OR clicks < ?)",
            (code, max_clicks, max_clicks),
        )
        return cur.rowcount == 1

    async def take_click(self, code: str, max_clicks: int | None) -> bool:
        return await self._call(self._take_click, code, max_clicks)

    def _click_count(self, code: str) -> int:
        row = self._db.execute("SELECT clicks FROM links WHERE code = ?", (code,)).fetchone()
        return int(row[0]) if row else 0

    async def click_count(self, code: str) -> int:
        return await self._call(self._click_count, code)

    def _record(self, code: str, at: float, fields: Strings, visitor: str | None) -> None:
        self._write(lambda db: self._record_in(db, code, at, fields, visitor))

    def _record_many(self, clicks: Sequence[ClickRecord]) -> None:
        def run(db: sqlite3.Connection) -> None:
            for c in clicks:
                if c.count:
                    db.execute("UPDATE links SET clicks = clicks + 1 WHERE code = ?", (c.code,))
                fields = click_fields(c.ua_family, c.variant, c.referrer_host)
                self._record_in(db, c.code, c.at, fields, c.visitor)

        self._write(run)

    async def record_clicks(self, clicks: Sequence[ClickRecord]) -> None:
        if clicks:
            await self._call(self._record_many, list(clicks))

    def _record_in(
        self, db: sqlite3.Connection, code: str, at: float, fields: Strings, visitor: str | None
    ) -> None:
        """One click's analytics, inside the caller's transaction."""
        day, hour = day_of(at), hour_of(at)
        if db.execute("SELECT 1 FROM links WHERE code = ?", (code,)).fetchone() is None:
            return
        db.executemany(
            "INSERT INTO daily VALUES (?, ?, ?, 1)"
            " ON CONFLICT (code, day, field) DO UPDATE SET n = n + 1",
            [(code, day, f) for f in ["n", *fields]],
        )
        if visitor is not None:
            db.execute(
                "INSERT OR IGNORE INTO visitors VALUES (?, ?, ?)",
                (code, day, visitor_digest(visitor)),
            )
        db.execute(
            "INSERT INTO hourly VALUES (?, ?, 1) ON CONFLICT (hour, code) DO UPDATE SET n = n + 1",
            (hour, code),
        )
        db.execute(
            "UPDATE links SET last_click_at = MAX(COALESCE(last_click_at, 0), ?) WHERE code = ?",
            (at, code),
        )
        if hour != self._pruned_hour:  # once an hour: forget what the stats no longer show
            self._pruned_hour = hour
            db.execute("DELETE FROM hourly WHERE hour < ?", (hour - HOURLY_KEEP // 3600,))
            oldest = day_of(at - 86400 * MAX_STATS_DAYS)
            db.execute("DELETE FROM daily WHERE day < ?", (oldest,))
            db.execute("DELETE FROM visitors WHERE day < ?", (oldest,))

    async def record_click(
        self,
        code: str,
        *,
        at: float,
        referrer_host: str,
        ua_family: str,
        variant: int | None = None,
        visitor: str | None = None,
    ) -> None:
        fields = click_fields(ua_family, variant, referrer_host)
        await self._call(self._record, code, at, fields, visitor)

    def _stats(self, code: str, days: Strings) -> LinkStats | None:
        db = self._db
        db.execute("BEGIN")  # one snapshot for all the reads
        try:
            row = db.execute(
                "SELECT clicks, last_click_at FROM links WHERE code = ?", (code,)
            ).fetchone()
            if row is None:
                return None
            buckets: dict[str, dict[str, int]] = {}
            for day, field, n in db.execute(
                "SELECT day, field, n FROM daily WHERE code = ? AND day BETWEEN ? AND ?",
                (code, days[0], days[-1]),
            ):
                buckets.setdefault(day, {})[field] = n
            (unique,) = db.execute(
                "SELECT COUNT(DISTINCT visitor) FROM visitors"
                " WHERE code = ? AND day BETWEEN ? AND ?",
                (code, days[0], days[-1]),
            ).fetchone()
        finally:
            db.execute("COMMIT")
        return build_stats(
            code, days, buckets, clicks=row[0], last_click_at=row[1], unique_visitors=unique
        )

    async def stats(self, code: str, since_day: str, until_day: str) -> LinkStats | None:
        return await self._call(self._stats, code, stats_days(since_day, until_day))

    def _top(self, buckets: Buckets, limit: int) -> tuple[TopEntry, ...]:
        oldest, weight = min(buckets)
        newest = max(buckets)[0]
        rows = self._db.execute(
            "SELECT code, SUM(n * CASE WHEN hour = ? THEN ? ELSE 1.0 END) AS score FROM hourly"
            " WHERE hour BETWEEN ? AND ? GROUP BY code ORDER BY score DESC, code LIMIT ?",
            (oldest, weight, oldest, newest, limit),
        ).fetchall()
        return tuple(TopEntry(code, round(score)) for code, score in rows if round(score) > 0)

    async def top(self, window: str, *, now: float, limit: int = 10) -> tuple[TopEntry, ...]:
        buckets = window_buckets(window, now)
        return await self._call(self._top, buckets, check_limit(limit, TOP_LIMIT))

    # -- export / import -----------------------------------------------------------

    def _export_batch(self, after: int) -> Rows:
        return self._db.execute(
            f"SELECT {COLUMNS} FROM links WHERE id > ? ORDER BY id LIMIT ?",
            (after, _EXPORT_BATCH),
        ).fetchall()

    async def export(self) -> AsyncIterator[Link]:
        after = 0
        while rows := await self._call(self._export_batch, after):
            for row in rows:
                yield row_link(row)
            after = rows[-1][0]

    def _import_batch(self, links: Links) -> Strings:
        def run(db: sqlite3.Connection) -> Strings:
            skipped = []
            for link in links:
                try:
                    insert_link(db, None, link, None)
                except sqlite3.IntegrityError:
                    skipped.append(link.code)
            raise_sequence(db, counter_floor(self.codec, (link.code for link in links)))
            return skipped

        return self._write(run)

    async def import_links(self, links: Iterable[Link] | AsyncIterable[Link]) -> ImportResult:
        imported, skipped = 0, Strings()
        async for batch in import_batches(links, _EXPORT_BATCH):
            missed = await self._call(self._import_batch, batch)
            imported += len(batch) - len(missed)
            skipped.extend(missed)
        return ImportResult(imported, tuple(skipped))
