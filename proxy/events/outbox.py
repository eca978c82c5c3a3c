"""The durable outbox: one queue per subscription, at-least-once, behind one Protocol.

Implementations: ``RedisOutbox`` (``outbox_redis``: Redis Streams, a consumer
group per subscription, cluster-safe keys) and ``SqliteOutbox``
(``outbox_sqlite``: ``<data_dir>/events.sqlite3``, one thread).

Life of an event in a subscription's queue:

* ``append`` stores it (fan-out is the caller's: once per matching subscription).
* ``claim_new`` leases fresh events to one consumer; ``claim_due`` leases one
  *retry unit* (the events of a failed delivery, kept together so a retried
  batch is the same batch) whose next attempt is due. A lease that is neither
  settled nor renewed expires after ``lease`` seconds and the events are
  claimable again (a crashed instance loses nothing; under normal operation
  two consumers never hold the same event). Every consumer of a subscription
  must use the same ``lease``: in Redis the taker's value decides when an
  entry counts as abandoned.
* Each leased ``Delivery`` is settled once: ``ack`` (delivered: gone),
  ``retry`` (becomes/stays a retry unit due at ``at``), or ``bury`` (dead
  letter, kept until ``replay`` puts it back as a fresh event).

The store also keeps each subscription's shared state (disabled flag, last
success, last error, consecutive failures), so every instance sees the same.
Times are epoch seconds from the caller's clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from proxy.events.model import Event


@dataclass(frozen=True, slots=True)
class Delivery:
    """Events leased together. ``unit`` is the retry unit's key (None: fresh events);
    ``handles`` are the store's own references (stream ids, row ids)."""

    events: tuple[Event, ...]
    attempts: int = 0
    unit: str | None = None
    handles: tuple[str, ...] = ()

    @property
    def fresh(self) -> bool:
        return self.unit is None

    def merge(self, other: Delivery) -> Delivery:
        """Two fresh deliveries as one (a batch)."""
        if not (self.fresh and other.fresh):
            raise ValueError("only fresh deliveries can be merged")
        return Delivery(self.events + other.events, 0, None, self.handles + other.handles)

    def each(self) -> list[Delivery]:
        """A fresh delivery as one delivery per event (each settled on its own)."""
        if not self.fresh:
            raise ValueError("only fresh deliveries can be split")
        return [
            Delivery((e,), 0, None, (h,)) for e, h in zip(self.events, self.handles, strict=True)
        ]

    @staticmethod
    def join(parts: Sequence[Delivery]) -> Delivery:
        """Fresh deliveries as one batch, in order (``merge`` in one step)."""
        if not all(part.fresh for part in parts):
            raise ValueError("only fresh deliveries can be merged")
        if len(parts) == 1:
            return parts[0]
        events = tuple(event for part in parts for event in part.events)
        handles = tuple(handle for part in parts for handle in part.handles)
        return Delivery(events, 0, None, handles)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    event: Event
    attempts: int
    reason: str
    dead_at: float


@dataclass(frozen=True, slots=True)
class SubscriptionState:
    disabled: bool = False
    disabled_reason: str | None = None
    last_success: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    failures: int = 0  # consecutive


@dataclass(frozen=True, slots=True)
class QueueStats:
    depth: int  # events not yet delivered (fresh, leased or waiting to retry)
    oldest: float | None  # when the oldest of them was created (epoch seconds)
    dead: int


class Outbox(Protocol):
    async def append(self, subscription: str, events: Sequence[Event], *, batch: int = 1) -> None:
        """Store ``events`` durably for ``subscription``; raise ``StorageError`` if not.

        ``batch`` is the subscription's ``batch.max_events``: how many events its
        claims will ask for at a time (a store may group them by it)."""
        ...

    async def claim_new(
        self, subscription: str, consumer: str, now: float, lease: float, limit: int
    ) -> list[Delivery]:
        """Lease up to ``limit`` fresh events, including those whose earlier lease
        expired, in order: a ``Delivery`` per event, or per group of events
        stored together (SQLite: one per stored batch). ``Delivery.each`` splits
        them, should a caller settle them one by one."""
        ...

    async def claim_due(
        self, subscription: str, consumer: str, now: float, lease: float
    ) -> Delivery | None:
        """Lease the retry unit due soonest (``at <= now``), if any."""
        ...

    async def ack(self, subscription: str, delivery: Delivery, now: float) -> None:
        """Delivered: forget the events; record a success."""
        ...

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
        """Keep the events as retry unit ``unit`` due at ``at``; record a failure."""
        ...

    async def bury(
        self, subscription: str, delivery: Delivery, *, attempts: int, reason: str, now: float
    ) -> None:
        """Move the events to the dead-letter list; record a failure."""
        ...

    async def dead_letters(
        self, subscription: str, after: str | None = None, limit: int = 100
    ) -> list[DeadLetter]:
        """Dead letters in event-id order (creation time), after the id ``after``."""
        ...

    async def replay(self, subscription: str, ids: Sequence[str] | None, now: float) -> int:
        """Put dead letters (these ids, or all) back as fresh events; how many moved."""
        ...

    async def state(self, subscription: str) -> SubscriptionState: ...

    async def set_disabled(
        self, subscription: str, disabled: bool, reason: str | None, now: float
    ) -> None: ...

    async def stats(self, subscription: str) -> QueueStats: ...

    async def maintain(self, subscription: str) -> None:
        """Housekeeping (Redis: trim the stream below what the group still needs)."""
        ...

    async def close(self) -> None: ...
