"""The request path's side of events: append to memory, never wait.

``emit`` and ``rejected`` are plain (non-async) calls that cost a dict or
deque operation (``sluice_events_emitted`` is brought up to date at each
flush, not per call). A background flusher moves events to the outbox every
``flush_interval`` (at once for critical types): each is given its id and
JSON once, fanned out to each matching subscription, and appended in whole
batches of that subscription's ``batch.max_events``; then it calls
``on_flushed`` (the delivery worker's ``wake``).

The buffer is bounded by ``settings.buffer`` events, counting both events
not yet flushed and fanned-out copies the outbox has not yet taken (it may be
down: they are retried). Beyond it a new event is dropped, counted
(``dropped``, the ``sluice_events_dropped`` metric) and logged at most once per
``warn_interval``: the only way an accepted event can be lost before the outbox.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from proxy.errors import StorageError
from proxy.events.aggregate import RejectionAggregator
from proxy.events.clock import SYSTEM_CLOCK, Clock
from proxy.events.metrics import EventMetrics
from proxy.events.model import TYPE_FIELDS, Event, iso
from proxy.events.outbox import Outbox
from proxy.events.settings import NotificationsSettings

log = logging.getLogger("sluice.events")
REJECTED = "rate_limit.rejected"
APPEND_CHUNK = 500


class Emitter:
    def __init__(
        self,
        settings: NotificationsSettings,
        outbox: Outbox,
        *,
        clock: Clock = SYSTEM_CLOCK,
        metrics: EventMetrics | None = None,
        on_flushed: Callable[[], None] | None = None,
        flush_interval: float = 0.5,
        warn_interval: float = 60.0,
        retry_interval: float = 1.0,
    ) -> None:
        self.outbox = outbox
        self.clock = clock
        self.metrics = metrics
        self.on_flushed = on_flushed
        self.flush_interval = flush_interval
        self.warn_interval = warn_interval
        self.retry_interval = retry_interval
        self.emitted = 0
        self.dropped = 0
        self._buffer: deque[tuple[str, Mapping[str, Any], float]] = deque()
        self._pending: dict[str, list[Event]] = {}
        self._pending_count = 0
        self._unwarned = 0
        self._warned_at = float("-inf")
        # Emitted events per type not yet added to sluice_events_emitted: a plain
        # dict on the request path, moved to the metric at each flush.
        self._unreported: dict[str, int] = {}
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.settings = settings
        self._aggregator = RejectionAggregator(settings.aggregate, settings.buffer)
        self.apply(settings)

    def apply(self, settings: NotificationsSettings) -> None:
        """Adopt new settings (a reload); open aggregation windows keep counting."""
        self.settings = settings
        self._subscribed = settings.subscribed_types()
        self._critical = settings.critical
        self._capacity = settings.buffer
        self._aggregator.interval = settings.aggregate
        self._aggregator.max_keys = settings.buffer

    # -- the request path --------------------------------------------------------

    @property
    def buffered(self) -> int:
        return len(self._buffer) + self._pending_count

    def emit(self, type: str, data: Mapping[str, Any]) -> bool:
        """Queue an event; False if it was dropped (buffer full). Never blocks.

        Call it on the event loop's thread, with a ``data`` mapping that is not
        changed afterwards (it is serialised at the next flush). Types nobody
        subscribes to are ignored (and return True).
        """
        if type not in TYPE_FIELDS:
            raise ValueError(f"unknown event type {type!r}")
        if type not in self._subscribed:
            return True
        if self.buffered >= self._capacity:
            self._drop(type)
            return False
        self._buffer.append((type, data, self.clock.time()))  # JSON and id at flush time
        self.emitted += 1
        self._unreported[type] = self._unreported.get(type, 0) + 1
        if type in self._critical or len(self._buffer) * 2 >= self._capacity:
            self._kick.set()
        return True

    def _report(self) -> None:
        counts, self._unreported = self._unreported, {}
        if self.metrics:
            for type, count in counts.items():
                self.metrics.emitted.labels(type).inc(count)

    def rejected(self, rule: str, client: str, route: str | None = None) -> None:
        """One rate-limit rejection; aggregated per (rule, client) per interval."""
        if REJECTED not in self._subscribed:
            return
        now = self.clock.time()
        if REJECTED in self._critical or self.settings.aggregate <= 0:
            self.emit(REJECTED, _single(rule, client, route, now))
        elif not self._aggregator.add(rule, client, now, route):
            self._drop(REJECTED)

    def _drop(self, type: str) -> None:
        self.dropped += 1
        self._unwarned += 1
        if self.metrics:
            self.metrics.dropped.labels(type).inc()
        now = self.clock.time()
        if now - self._warned_at >= self.warn_interval:
            log.warning(
                "events buffer full (%d): dropped %d event(s) since the last warning; "
                "the outbox may be unavailable or too slow",
                self._capacity,
                self._unwarned,
            )
            self._warned_at, self._unwarned = now, 0

    # -- the flusher -------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="events-flush")

    async def _run(self) -> None:
        while True:
            now = self.clock.time()
            wait = min(self.flush_interval, max(0.0, self._aggregator.next_due() - now))
            await self._wait(wait)
            self._kick.clear()
            try:
                await self.flush()
            except StorageError as exc:
                log.warning(
                    "events outbox unavailable (%d event(s) waiting): %s", self.buffered, exc
                )
                if self.metrics:
                    self.metrics.outbox_errors.labels("append").inc()
                await self.clock.sleep(self.retry_interval)
            except Exception:  # keep flushing, whatever went wrong once
                log.exception("events: flush failed")
                await self.clock.sleep(self.retry_interval)

    async def _wait(self, seconds: float) -> None:
        if self._kick.is_set():
            return
        sleeper = asyncio.ensure_future(self.clock.sleep(seconds))
        kicker = asyncio.ensure_future(self._kick.wait())
        try:
            await asyncio.wait({sleeper, kicker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            kicker.cancel()
            await asyncio.gather(sleeper, kicker, return_exceptions=True)

    async def flush(self, *, everything: bool = False) -> int:
        """Move closed aggregation windows (all, with ``everything``) and buffered
        events to the outbox; how many copies were stored. ``StorageError`` if the
        outbox fails: what was not stored stays queued for the next flush."""
        now = self.clock.time()
        windows = self._aggregator.drain() if everything else self._aggregator.due(now)
        for window in windows:
            self._buffer.append((REJECTED, window.data(), now))
            self.emitted += 1  # an aggregated event enters the buffer here, not via emit()
            self._unreported[REJECTED] = self._unreported.get(REJECTED, 0) + 1
        self._report()
        hooks = self.settings.active
        while self._buffer:
            kind, data, at = self._buffer.popleft()
            try:
                event = Event.create(kind, data, at)
            except (TypeError, ValueError) as exc:  # data that is not a mapping
                log.error("events: cannot serialise a %s event: %s", kind, exc)
                self._drop(kind)
                continue
            for hook in hooks:
                if hook.wants(event):
                    self._pending.setdefault(hook.name, []).append(event)
                    self._pending_count += 1
        stored = 0
        try:
            for name, events in self._pending.items():
                target = self.settings.webhook(name)
                batch = target.batch.max_events if target is not None else 1
                size = max(1, APPEND_CHUNK // batch) * batch  # whole batches per call
                while events:
                    chunk = events[:size]
                    await self.outbox.append(name, chunk, batch=batch)
                    del events[: len(chunk)]
                    self._pending_count -= len(chunk)
                    stored += len(chunk)
                    if self.metrics:
                        self.metrics.appended.labels(name).inc(len(chunk))
        finally:
            if stored and self.on_flushed:
                self.on_flushed()
        return stored

    async def close(self) -> None:
        """Stop the flusher and store everything still in memory (best effort)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        try:
            await self.flush(everything=True)
        except StorageError as exc:
            log.error("events: %d event(s) not stored at shutdown: %s", self.buffered, exc)


def _single(rule: str, client: str, route: str | None, now: float) -> dict[str, Any]:
    stamp = iso(now)
    return {
        "rule": rule,
        "route": route,
        "client": client,
        "count": 1,
        "first_seen": stamp,
        "last_seen": stamp,
    }
