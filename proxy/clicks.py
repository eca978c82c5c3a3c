"""Click analytics off the redirect's critical path: a bounded queue and one task per worker.

The redirect handler only ``offer``s a ``Click`` (no await, no I/O) and
answers. The task records the queued clicks in batches (one store call each:
one transaction on SQLite, pipelined on Redis): for each click its analytics
(per-day totals, referrer host, UA family, variant, unique visitors, the
hourly leaderboard) and, for a link WITHOUT a click cap, the lifetime click
counter too, which the redirect skipped so that such a link costs no store
call at all. A capped link's click was already
counted, atomically, before the redirect was answered.

A full queue drops the click (``sluice_link_analytics_dropped_total``); so
does a store error while recording. Analytics are best effort by design; the
click cap never is.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from proxy.errors import StorageError
from proxy.links.store import ClickRecord, LinkStore

log = logging.getLogger("sluice.links")
T = TypeVar("T")
Timed = Callable[[str, Awaitable[Any]], Awaitable[Any]]


Click = ClickRecord  # what the redirect handler offers: see proxy.links.store
BATCH = 256  # clicks recorded per store call


class ClickRecorder:
    """One per worker. ``store_of`` returns the open store (None while it is not)."""

    def __init__(
        self,
        store_of: Callable[[], LinkStore | None],
        size: int,
        timed: Timed,
        dropped: Any,
    ) -> None:
        self._store_of = store_of
        self.queue: asyncio.Queue[Click] = asyncio.Queue(maxsize=size)
        self._timed = timed
        self._dropped = dropped
        self._task: asyncio.Task[None] | None = None
        self._last_log = 0.0
        self.recorded = 0
        self.dropped = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sluice-clicks")

    def offer(self, click: Click) -> bool:
        """Queue ``click`` for recording; False (and counted as dropped) when full."""
        try:
            self.queue.put_nowait(click)
        except asyncio.QueueFull:
            self._drop("the analytics queue is full")
            return False
        return True

    def _drop(self, why: str, n: int = 1) -> None:
        self.dropped += n
        self._dropped.inc(n)
        now = time.monotonic()
        if now - self._last_log > 5:
            self._last_log = now
            log.warning("click analytics dropped: %s", why)

    async def _run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            while len(batch) < BATCH and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            try:
                await self._record(batch)
            except StorageError as exc:
                self._drop(f"link store: {exc}", len(batch))
            except Exception:  # never let one batch stop the recorder
                self._drop("unexpected error", len(batch))
                log.exception("recording clicks failed")
            finally:
                for _ in batch:
                    self.queue.task_done()

    async def _record(self, batch: list[Click]) -> None:
        """All queued clicks (up to ``BATCH``) in one store call: one transaction on
        SQLite, pipelined calls on Redis."""
        store = self._store_of()
        if store is None:
            raise StorageError("the link store is not open")
        await self._timed("record_clicks", store.record_clicks(batch))
        self.recorded += len(batch)

    async def drain(self, within: float) -> bool:
        """Wait until every queued click is recorded; False if ``within`` seconds passed first."""
        try:
            await asyncio.wait_for(self.queue.join(), within)
        except TimeoutError:
            return False
        return True

    async def close(self, within: float = 2.0) -> None:
        """Record what is queued (for up to ``within`` seconds), then stop."""
        if self._task is None:
            return
        if not await self.drain(within):
            log.warning("%d queued clicks not recorded at shutdown", self.queue.qsize())
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
