"""Click analytics off the redirect's critical path: a bounded queue and one task per worker.

The redirect handler only ``offer``s a ``Click`` (no await, no I/O) and
answers. The task records each click in the link store: ``record_click``
(per-day totals, referrer host, UA family, variant, unique visitors, the
hourly leaderboard) and, for a link WITHOUT a click cap, the lifetime click
counter too (``take_click(code, None)``), which the redirect skipped so that
such a link costs no store call at all. A capped link's click was already
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
from dataclasses import dataclass
from typing import Any, TypeVar

from proxy.errors import StorageError
from proxy.links.store import LinkStore

log = logging.getLogger("sluice.links")
T = TypeVar("T")
Timed = Callable[[str, Awaitable[Any]], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Click:
    code: str
    at: float  # Unix time
    referrer_host: str
    ua_family: str
    variant: int | None
    visitor: str  # keyed hash of the client identity, never the address itself
    count: bool  # also add it to the lifetime counter (uncapped links only)


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

    def _drop(self, why: str) -> None:
        self.dropped += 1
        self._dropped.inc()
        now = time.monotonic()
        if now - self._last_log > 5:
            self._last_log = now
            log.warning("click analytics dropped: %s", why)

    async def _run(self) -> None:
        while True:
            click = await self.queue.get()
            try:
                await self._record(click)
            except StorageError as exc:
                self._drop(f"link store: {exc}")
            except Exception:  # never let one click stop the recorder
                self._drop("unexpected error")
                log.exception("recording a click failed")
            finally:
                self.queue.task_done()

    async def _record(self, click: Click) -> None:
        store = self._store_of()
        if store is None:
            raise StorageError("the link store is not open")
        if click.count:
            await self._timed("count_click", store.take_click(click.code, None))
        await self._timed(
            "record_click",
            store.record_click(
                click.code,
                at=click.at,
                referrer_host=click.referrer_host,
                ua_family=click.ua_family,
                variant=click.variant,
                visitor=click.visitor,
            ),
        )
        self.recorded += 1

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
