"""The delivery worker: one per process, one task per enabled subscription.

Each pass of a subscription's task: skip while paused or disabled; lease the
retry unit due soonest, else up to ``batch.max_events`` fresh events (holding
an unfilled batch for up to ``batch.max_wait`` unless it carries a critical
event); wait for the rate limit; sign and POST; settle the outcome:

* delivered → ack;
* retryable → a retry unit due after ``backoff`` (full jitter on the
  schedule; ``Retry-After`` as a floor); the subscription pauses for that long
  (at most ``max_pause``, except for ``Retry-After``) so a failing receiver is
  not hammered; past the schedule → dead letter;
* permanent 4xx → dead letter; 410 → the subscription is disabled in the
  outbox's shared state (events stay queued until an operator re-enables it).

Instances cooperate through the outbox's leases, so under normal operation
each event is sent by one of them. Nothing here runs on the request path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp

from proxy.errors import StorageError
from proxy.events.clock import SYSTEM_CLOCK, Clock
from proxy.events.metrics import EventMetrics
from proxy.events.model import Event, iso
from proxy.events.outbox import DeadLetter, Delivery, Outbox
from proxy.events.policy import Outcome, TokenBucket, Verdict, backoff
from proxy.events.sender import BODY_LIMIT, Sender, new_session
from proxy.events.settings import NotificationsSettings, WebhookSettings
from proxy.events.signing import delivery_body, delivery_id

log = logging.getLogger("sluice.events")
GAUGES_EVERY = 5.0  # seconds between refreshes of the queue gauges (and at once after a change)


@dataclass(frozen=True, slots=True)
class SubscriptionStatus:
    name: str
    url: str
    enabled: bool  # in the config
    disabled: bool  # by a 410 or an operator (shared state)
    disabled_reason: str | None
    depth: int
    oldest_pending_age: float | None
    last_success: float | None
    last_error: str | None
    last_error_at: float | None
    consecutive_failures: int
    dead_letters: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class _Sub:
    hook: WebhookSettings
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    paused_until: float = 0.0
    held: Delivery | None = None
    hold_until: float = 0.0
    bucket: TokenBucket | None = None
    disabled: bool = False
    checked_at: float = float("-inf")
    # Retry units cannot be due before this (none were at the last look, and this
    # worker made none due sooner); units of other instances are seen within a poll.
    no_due_until: float = float("-inf")
    maintain_at: float = 0.0
    gauges_at: float = 0.0
    failing: bool = False
    acking: asyncio.Future[None] | None = None  # the last ack, not awaited by the loop


def consumer_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


class DeliveryWorker:
    def __init__(
        self,
        settings: NotificationsSettings,
        outbox: Outbox,
        *,
        consumer: str | None = None,
        clock: Clock = SYSTEM_CLOCK,
        rng: random.Random | None = None,
        metrics: EventMetrics | None = None,
        session: aiohttp.ClientSession | None = None,
        lease: float = 60.0,
        poll: float = 1.0,
        max_pause: float = 60.0,
        maintain_every: float = 30.0,
        body_limit: int = BODY_LIMIT,
    ) -> None:
        self.outbox = outbox
        self.consumer = consumer or consumer_name()
        self.clock = clock
        self.rng = rng or random.Random()
        self.metrics = metrics
        self.lease = lease
        self.poll = poll
        self.max_pause = max_pause
        self.maintain_every = maintain_every
        self._session = session
        self._own_session = session is None
        self._body_limit = body_limit
        self._sender: Sender | None = None
        self._subs: dict[str, _Sub] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self._started = False
        self.settings = settings
        self.apply(settings)

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        if self._session is None:
            self._session = new_session()
        self._sender = Sender(self._session, body_limit=self._body_limit)
        self._started = True
        for sub in self._subs.values():
            self._launch(sub)

    def _launch(self, sub: _Sub) -> None:
        if self._started and sub.task is None and sub.hook.enabled:
            sub.task = asyncio.get_running_loop().create_task(
                self._loop(sub), name=f"webhook:{sub.hook.name}"
            )

    def _stop(self, sub: _Sub) -> None:
        if sub.task is not None:
            sub.task.cancel()
            self._stopping.add(sub.task)
            sub.task.add_done_callback(self._stopping.discard)
            sub.task = None

    def apply(self, settings: NotificationsSettings) -> None:
        """Adopt new settings (a reload): start, stop or update subscriptions."""
        self.settings = settings
        wanted = {hook.name: hook for hook in settings.webhooks}
        for name in list(self._subs):
            if name not in wanted:
                self._stop(self._subs.pop(name))
        for name, hook in wanted.items():
            sub = self._subs.get(name)
            if sub is None:
                sub = self._subs[name] = _Sub(hook)
            elif sub.hook.rate != hook.rate:
                sub.bucket = None
            sub.hook = hook
            if hook.rate and sub.bucket is None:
                sub.bucket = TokenBucket(hook.rate, self.clock.time())
            if hook.enabled:
                self._launch(sub)
                sub.wake.set()
            else:
                self._stop(sub)

    def wake(self) -> None:
        """New events are in the outbox: look now rather than at the next poll."""
        for sub in self._subs.values():
            sub.wake.set()

    async def close(self) -> None:
        self._started = False
        for sub in self._subs.values():
            self._stop(sub)
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)
        for sub in self._subs.values():
            try:
                await self._acked(sub)
            except StorageError as exc:
                log.warning("webhook %s: delivered events not acknowledged: %s", sub.hook.name, exc)
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    # -- the loop ----------------------------------------------------------------

    async def _loop(self, sub: _Sub) -> None:
        while True:
            sub.wake.clear()
            try:
                worked = await self.run_pass(sub.hook.name)
            except StorageError as exc:
                log.warning("webhook %s: outbox unavailable: %s", sub.hook.name, exc)
                if self.metrics:
                    self.metrics.outbox_errors.labels("deliver").inc()
                worked = False
                sub.paused_until = self.clock.time() + self.poll
            except Exception:
                log.exception("webhook %s: unexpected error in delivery", sub.hook.name)
                worked = False
                sub.paused_until = self.clock.time() + self.poll
            if not worked:
                await self._idle(sub)

    async def _idle(self, sub: _Sub) -> None:
        now = self.clock.time()
        if sub.paused_until > now:
            until = sub.paused_until  # nothing can be sent before
        else:
            if sub.wake.is_set():
                return
            until = now + self.poll
            if sub.held is not None and sub.hold_until > now:
                until = min(until, sub.hold_until)
        if self.metrics and sub.gauges_at > now:  # keep the gauges fresh through long pauses
            until = min(until, sub.gauges_at)
        sleeper = asyncio.ensure_future(self.clock.sleep(until - now))
        waker = asyncio.ensure_future(sub.wake.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()
            await asyncio.gather(sleeper, waker, return_exceptions=True)

    async def run_pass(self, name: str) -> bool:
        """One pass for subscription ``name``; True when something was sent."""
        sub = self._subs[name]
        hook = sub.hook
        now = self.clock.time()
        if self.metrics and now >= sub.gauges_at:  # whatever state the subscription is in
            sub.gauges_at = now + GAUGES_EVERY
            await self.status(name)  # refreshes the gauges
        if now < sub.paused_until or not hook.enabled:
            return False
        if now - sub.checked_at >= self.poll:
            sub.disabled = (await self.outbox.state(name)).disabled
            sub.checked_at = now
        if sub.disabled:
            return False
        if sub.bucket is not None and (wait := sub.bucket.ready_in(now)) > 0:
            sub.paused_until = now + wait  # before leasing anything: no lease runs out
            return False
        if now >= sub.maintain_at:
            sub.maintain_at = now + self.maintain_every
            await self.outbox.maintain(name)
        lease = max(self.lease, hook.batch.max_wait + 2 * hook.timeout)
        delivery = None
        if now >= sub.no_due_until:
            delivery = await self.outbox.claim_due(name, self.consumer, now, lease)
            if delivery is None:
                sub.no_due_until = now + self.poll
        if delivery is None:
            delivery = await self._fresh(sub, now, lease)
        if delivery is None:
            return False
        await self._deliver(sub, delivery)
        return True

    async def _fresh(self, sub: _Sub, now: float, lease: float) -> Delivery | None:
        hook = sub.hook
        held, sub.held = sub.held, None
        want = hook.batch.max_events - (len(held.events) if held else 0)
        parts = await self.outbox.claim_new(hook.name, self.consumer, now, lease, want)
        if held is not None:
            parts.insert(0, held)
        if not parts:
            return None
        batch = Delivery.join(parts)
        critical = self.settings.critical
        oldest = min(e.timestamp for e in batch.events)
        if (
            len(batch.events) < hook.batch.max_events
            and now < oldest + hook.batch.max_wait
            and not any(e.type in critical for e in batch.events)
        ):
            sub.held, sub.hold_until = batch, oldest + hook.batch.max_wait
            return None
        return batch

    async def _deliver(self, sub: _Sub, delivery: Delivery) -> None:
        hook = sub.hook
        assert self._sender is not None, "start() the worker first"
        if sub.bucket is not None:
            sub.bucket.take(self.clock.time())
        msg_id = delivery.unit or delivery_id(delivery.events, hook.batched)
        body = delivery_body(delivery.events, hook.batched, hook.format, hook.templates)
        started = time.perf_counter()
        outcome = await self._sender.post(hook, msg_id, body)
        await self._settle(sub, delivery, msg_id, outcome)
        if self.metrics:
            self.metrics.latency.labels(hook.name).observe(time.perf_counter() - started)
            self.metrics.deliveries.labels(hook.name, outcome.verdict.value).inc()
            if outcome.verdict is Verdict.DELIVERED:
                self.metrics.delivered_events.labels(hook.name).inc(len(delivery.events))

    async def test(self, hook: WebhookSettings, event: Event) -> dict[str, Any]:
        """POST ``event`` to ``hook`` as a delivery would (signed, formatted, batched
        shape), now; report the answer without settling anything."""
        assert self._sender is not None, "start() the worker first"
        body = delivery_body([event], hook.batched, hook.format, hook.templates)
        msg_id = delivery_id([event], hook.batched)
        started = time.perf_counter()
        outcome = await self._sender.post(hook, msg_id, body)
        return {
            "id": msg_id,
            "url": hook.url,
            "delivered": outcome.verdict is Verdict.DELIVERED,
            "outcome": outcome.verdict.value,
            "status": outcome.status,
            "error": outcome.error or None,
            "elapsed_ms": round((time.perf_counter() - started) * 1000, 3),
        }

    async def _settle(self, sub: _Sub, d: Delivery, msg_id: str, outcome: Outcome) -> None:
        name, retry = sub.hook.name, sub.hook.retry
        now = self.clock.time()
        attempts = d.attempts + 1
        try:
            await self._acked(sub)
        except StorageError as exc:  # those events go out again after their lease
            log.warning("webhook %s: an acknowledgement failed: %s", name, exc)
            if self.metrics:
                self.metrics.outbox_errors.labels("deliver").inc()
        if outcome.verdict is Verdict.DELIVERED:
            # Not waited for: the next claim goes ahead meanwhile (the outbox never
            # hands out leased events, and SQLite runs its calls in order). A failed
            # ack surfaces at the next settle or status; the events are then sent
            # again once their lease runs out (at-least-once).
            sub.acking = asyncio.ensure_future(self.outbox.ack(name, d, now))
            if sub.failing:
                log.warning("webhook %s: delivering again", name)
            sub.failing = False
            return
        if not sub.failing:
            log.warning("webhook %s: delivery failed: %s", name, outcome.error)
        sub.failing = True
        if outcome.verdict is Verdict.GONE:
            reason = f"the receiver answered 410 Gone at {iso(now)}"
            await self.outbox.set_disabled(name, True, reason, now)
            await self.outbox.retry(
                name, d, unit=msg_id, attempts=d.attempts, at=now, error=outcome.error, now=now
            )
            sub.no_due_until = now
            sub.disabled, sub.checked_at = True, now
            log.warning("webhook %s: disabled: %s", name, reason)
            sub.gauges_at = 0.0  # show it on the next pass, not GAUGES_EVERY later
            return
        delay = None
        if outcome.verdict is Verdict.RETRY:
            delay = backoff(retry.schedule, attempts, retry.jitter, self.rng)
        if delay is None:
            reason = outcome.error
            if outcome.verdict is Verdict.RETRY:
                reason = f"gave up after {attempts} attempts; last error: {outcome.error}"
            await self.outbox.bury(name, d, attempts=attempts, reason=reason, now=now)
            log.warning("webhook %s: %d event(s) dead-lettered: %s", name, len(d.events), reason)
            sub.gauges_at = 0.0
            return
        if outcome.retry_after is not None:
            delay = max(delay, outcome.retry_after)
            sub.paused_until = now + outcome.retry_after
        else:
            sub.paused_until = now + min(delay, self.max_pause)
        await self.outbox.retry(
            name, d, unit=msg_id, attempts=attempts, at=now + delay, error=outcome.error, now=now
        )
        sub.no_due_until = min(sub.no_due_until, now + delay)

    @staticmethod
    async def _acked(sub: _Sub) -> None:
        """Wait for the subscription's last ack; ``StorageError`` if it failed."""
        acking = sub.acking
        if acking is not None:
            try:
                await asyncio.shield(acking)  # a cancelled caller leaves it running
            finally:
                if sub.acking is acking and acking.done():
                    sub.acking = None

    # -- operators ---------------------------------------------------------------

    def _known(self, name: str) -> _Sub:
        if name not in self._subs:
            raise KeyError(name)
        return self._subs[name]

    def hook(self, name: str) -> WebhookSettings:
        """The settings of subscription ``name``; ``KeyError`` if there is none."""
        return self._known(name).hook

    async def status(self, name: str | None = None) -> list[SubscriptionStatus]:
        """A snapshot per subscription (or just ``name``); refreshes the gauges."""
        subs = [self._known(name)] if name else list(self._subs.values())
        for sub in subs:
            await self._acked(sub)  # so the figures include it
        hooks = [sub.hook for sub in subs]
        now = self.clock.time()
        out = []
        for hook in hooks:
            state = await self.outbox.state(hook.name)
            stats = await self.outbox.stats(hook.name)
            status = SubscriptionStatus(
                name=hook.name,
                url=hook.safe_url,
                enabled=hook.enabled,
                disabled=state.disabled,
                disabled_reason=state.disabled_reason,
                depth=stats.depth,
                oldest_pending_age=None if stats.oldest is None else max(0.0, now - stats.oldest),
                last_success=state.last_success,
                last_error=state.last_error,
                last_error_at=state.last_error_at,
                consecutive_failures=state.failures,
                dead_letters=stats.dead,
            )
            out.append(status)
            if self.metrics:
                m = self.metrics
                m.depth.labels(hook.name).set(status.depth)
                m.oldest.labels(hook.name).set(status.oldest_pending_age or 0.0)
                m.dead.labels(hook.name).set(status.dead_letters)
                m.disabled.labels(hook.name).set(1 if status.disabled else 0)
        return out

    async def set_disabled(self, name: str, disabled: bool, reason: str | None = None) -> None:
        """Disable or re-enable a subscription for every instance (shared state)."""
        sub = self._known(name)
        now = self.clock.time()
        await self.outbox.set_disabled(name, disabled, reason or "disabled by an operator", now)
        sub.disabled, sub.checked_at, sub.paused_until = disabled, now, 0.0
        sub.no_due_until = float("-inf")
        sub.wake.set()  # events parked by a 410 are due at once

    async def dead_letters(
        self, name: str, after: str | None = None, limit: int = 100
    ) -> list[DeadLetter]:
        self._known(name)
        return await self.outbox.dead_letters(name, after, limit)

    async def replay(self, name: str, ids: Sequence[str] | None = None) -> int:
        """Dead letters (these ids, or all) back into the queue; how many."""
        self._known(name)
        moved = await self.outbox.replay(name, ids, self.clock.time())
        self._subs[name].wake.set()
        return moved
