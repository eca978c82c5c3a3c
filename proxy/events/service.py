"""``Notifier``: the emitter, the outbox and the delivery worker as one object.

Wiring (in the server's ``cleanup_ctx``)::

    outbox = open_outbox(config.storage.url, config.storage.data_dir)
    notifier = Notifier(config.notifications, outbox, metrics=EventMetrics(registry))
    await notifier.start()
    ...                       # request path: notifier.emit(...), notifier.rejected(...)
    await notifier.close()    # flushes memory to the outbox, stops, closes the outbox
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp

from proxy.events.clock import SYSTEM_CLOCK, Clock
from proxy.events.delivery import DeliveryWorker, SubscriptionStatus
from proxy.events.emitter import Emitter
from proxy.events.metrics import EventMetrics
from proxy.events.model import Event
from proxy.events.outbox import DeadLetter, Outbox
from proxy.events.outbox_redis import RedisOutbox
from proxy.events.outbox_sqlite import SqliteOutbox
from proxy.events.settings import NotificationsSettings
from proxy.storage.redis_client import open_redis


def open_outbox(
    storage_url: str,
    data_dir: str,
    *,
    timeout: float = 2.0,
    connect_timeout: float = 1.0,
    pool_size: int = 2,
    prefix: str = "sluice:events",
) -> Outbox:
    """The outbox for a storage URL: SQLite in ``data_dir`` for ``memory://``,
    else Redis (its own connections, with a deadline suited to the outbox rather
    than the hot path's)."""
    if storage_url.split("://", 1)[0] == "memory":
        return SqliteOutbox.in_dir(data_dir)
    backend = open_redis(
        storage_url, timeout=timeout, connect_timeout=connect_timeout, pool_size=pool_size
    )
    return RedisOutbox(backend, prefix=prefix)


class Notifier:
    def __init__(
        self,
        settings: NotificationsSettings,
        outbox: Outbox,
        *,
        clock: Clock = SYSTEM_CLOCK,
        metrics: EventMetrics | None = None,
        consumer: str | None = None,
        session: aiohttp.ClientSession | None = None,
        rng: random.Random | None = None,
        flush_interval: float = 0.5,
        lease: float = 60.0,
        poll: float = 1.0,
        max_pause: float = 60.0,
    ) -> None:
        self.outbox = outbox
        self.clock = clock
        self.worker = DeliveryWorker(
            settings,
            outbox,
            consumer=consumer,
            clock=clock,
            rng=rng,
            metrics=metrics,
            session=session,
            lease=lease,
            poll=poll,
            max_pause=max_pause,
        )
        self.emitter = Emitter(
            settings,
            outbox,
            clock=clock,
            metrics=metrics,
            on_flushed=self.worker.wake,
            flush_interval=flush_interval,
        )

    def emit(self, type: str, data: Mapping[str, Any]) -> bool:
        return self.emitter.emit(type, data)

    def rejected(self, rule: str, client: str, route: str | None = None) -> None:
        self.emitter.rejected(rule, client, route)

    def apply(self, settings: NotificationsSettings) -> None:
        self.emitter.apply(settings)
        self.worker.apply(settings)

    async def start(self) -> None:
        await self.worker.start()
        await self.emitter.start()

    async def close(self) -> None:
        try:
            await self.emitter.close()
            await self.worker.close()
        finally:
            await self.outbox.close()

    # -- what the admin API exposes ----------------------------------------------

    async def status(self, name: str | None = None) -> list[SubscriptionStatus]:
        return await self.worker.status(name)

    async def dead_letters(
        self, name: str, after: str | None = None, limit: int = 100
    ) -> list[DeadLetter]:
        return await self.worker.dead_letters(name, after, limit)

    async def replay(self, name: str, ids: Sequence[str] | None = None) -> int:
        return await self.worker.replay(name, ids)

    async def set_disabled(self, name: str, disabled: bool, reason: str | None = None) -> None:
        await self.worker.set_disabled(name, disabled, reason)

    async def test(self, name: str, message: str = "test from Sluice") -> dict[str, Any]:
        """Send a ``ping`` to one subscription now, outside the outbox (nothing queued,
        nothing retried, its failure counters untouched); the receiver's answer."""
        hook = self.worker.hook(name)  # KeyError for an unknown name
        event = Event.create("ping", {"message": message}, self.clock.time())
        return await self.worker.test(hook, event)

    async def ping(self, name: str, message: str = "test from Sluice") -> str:
        """Queue a ``ping`` for one subscription only (whatever its filters); its id."""
        self.worker.hook(name)  # KeyError for an unknown name
        event = Event.create("ping", {"message": message}, self.clock.time())
        await self.outbox.append(name, [event])
        self.worker.wake()
        return event.id
