"""Webhook delivery end to end: real receivers on loopback, real Redis, real SQLite.

Every receiver verifies each request with the ``standardwebhooks`` library.
Backoff is measured on a driven clock (no test waits for real minutes) or
with short real schedules.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.errors import StorageError
from proxy.events.delivery import DeliveryWorker
from proxy.events.metrics import EventMetrics
from proxy.events.model import Event
from proxy.events.outbox import Delivery, Outbox
from proxy.events.outbox_redis import RedisOutbox
from proxy.events.outbox_sqlite import SqliteOutbox
from proxy.events.service import Notifier
from proxy.events.settings import NotificationsSettings
from proxy.storage.redis_client import open_redis
from tests.servers import RedisServer
from tests.test_events_support import FakeClock, Receiver, hook, notifications

OutboxFactory = Callable[[], Outbox]


@pytest.fixture(params=["sqlite", "redis"])
def make_outbox(request: pytest.FixtureRequest, tmp_path: Path) -> OutboxFactory:
    """New outbox objects on one store, as separate processes or a restart would open."""
    if request.param == "sqlite":
        return lambda: SqliteOutbox(tmp_path / "events.sqlite3")
    server: RedisServer = request.getfixturevalue("redis")
    return lambda: RedisOutbox(open_redis(server.url, timeout=2.0))


@pytest.fixture
def sqlite_outbox(tmp_path: Path) -> OutboxFactory:
    return lambda: SqliteOutbox(tmp_path / "events.sqlite3")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rx = Receiver()
    yield await rx.start()
    await rx.stop()


class Running:
    """Notifiers started by a test, all closed at its end."""

    def __init__(self) -> None:
        self.items: list[Notifier] = []

    async def start(
        self, settings: NotificationsSettings, outbox: Outbox, **kwargs: Any
    ) -> Notifier:
        options: dict[str, Any] = {"poll": 0.05, "max_pause": 0.1, "flush_interval": 0.02}
        notifier = Notifier(settings, outbox, **{**options, **kwargs})
        await notifier.start()
        self.items.append(notifier)
        return notifier

    async def stop(self, notifier: Notifier) -> None:
        self.items.remove(notifier)
        await notifier.close()


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    made = Running()
    yield made
    for notifier in made.items:
        await notifier.close()


def link(i: int) -> dict[str, Any]:
    return {"code": f"c{i}", "destination": f"https://example.com/{i}"}


async def test_every_request_is_signed_and_verifies(
    make_outbox: OutboxFactory, receiver: Receiver, running: Running
) -> None:
    notifier = await running.start(notifications(hook(receiver.url)), make_outbox())
    for i in range(3):
        assert notifier.emit("link.created", link(i))
    await receiver.wait_for(lambda: len(receiver.requests) == 3)
    assert receiver.bad_signatures == 0
    for request in receiver.requests:
        body = request.body
        assert request.msg_id == body["id"] and body["type"] == "link.created"
        assert set(body) == {"id", "type", "timestamp", "data"}
        assert request.headers["Content-Type"] == "application/json"
    assert sorted(r.body["data"]["code"] for r in receiver.requests) == ["c0", "c1", "c2"]
    (status,) = await notifier.status()
    assert (status.depth, status.dead_letters, status.consecutive_failures) == (0, 0, 0)
    assert status.last_success is not None


async def test_a_wrong_secret_is_rejected_by_the_receiver_and_dead_lettered(
    sqlite_outbox: OutboxFactory, running: Running
) -> None:
    rx = await Receiver(secret="whsec_" + "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB").start()
    try:
        notifier = await running.start(notifications(hook(rx.url)), sqlite_outbox())
        notifier.emit("link.deleted", {"code": "x"})
        await rx.wait_for(lambda: rx.bad_signatures == 1)
        await asyncio.sleep(0.1)
        (status,) = await notifier.status()
        assert rx.requests == [] and status.dead_letters == 1  # 401 is permanent
        assert status.last_error == "HTTP 401"
    finally:
        await rx.stop()


async def test_receiver_down_then_up_gets_every_event_with_stable_ids(
    make_outbox: OutboxFactory, running: Running
) -> None:
    rx = Receiver()  # not listening yet: connections are refused
    settings = notifications(hook(rx.url, schedule=(0.05,) * 100, timeout=0.5))
    notifier = await running.start(settings, make_outbox())
    for i in range(20):
        notifier.emit("link.created", link(i))
    await asyncio.sleep(0.4)
    (status,) = await notifier.status()
    assert status.depth == 20 and status.consecutive_failures >= 1
    assert status.last_error is not None and "request failed" in status.last_error
    await rx.start()
    try:
        await rx.wait_for(lambda: len({r.msg_id for r in rx.requests}) == 20)
        assert rx.bad_signatures == 0
        assert all(r.msg_id == r.body["id"] for r in rx.requests)
        assert sorted(r.body["data"]["code"] for r in rx.requests) == sorted(
            f"c{i}" for i in range(20)
        )
        await asyncio.sleep(0.1)
        (status,) = await notifier.status()
        assert status.depth == 0 and status.dead_letters == 0
    finally:
        await rx.stop()


async def worker_on_clock(
    settings: NotificationsSettings, outbox: Outbox, clock: FakeClock, **kwargs: Any
) -> DeliveryWorker:
    worker = DeliveryWorker(settings, outbox, clock=clock, poll=1.0, max_pause=60.0, **kwargs)
    await worker.start()
    return worker


async def test_500_then_200_retries_the_same_id_after_the_backoff(
    make_outbox: OutboxFactory,
) -> None:
    clock = FakeClock()
    rx = Receiver(
        clock=clock.time, behaviour=lambda n, _: web.Response(status=500 if n == 0 else 204)
    )
    await rx.start()
    outbox = make_outbox()
    event = Event.create("link.deleted", {"code": "x"}, clock.time())
    await outbox.append("hook", [event])
    worker = await worker_on_clock(notifications(hook(rx.url, schedule=(5.0, 30.0))), outbox, clock)
    try:
        await rx.wait_for(lambda: len(rx.requests) == 2)
        first, second = rx.requests
        assert first.msg_id == second.msg_id == event.id
        assert first.body == second.body
        assert second.at - first.at == pytest.approx(5.0)
    finally:
        await worker.close()
        await outbox.close()
        await rx.stop()


async def test_429_retry_after_is_honoured(sqlite_outbox: OutboxFactory) -> None:
    clock = FakeClock()

    def behaviour(n: int, _: str) -> web.Response:
        if n == 0:
            return web.Response(status=429, headers={"Retry-After": "7"})
        return web.Response(status=200)

    rx = await Receiver(clock=clock.time, behaviour=behaviour).start()
    outbox = sqlite_outbox()
    await outbox.append("hook", [Event.create("ping", {"message": "x"}, clock.time())])
    worker = await worker_on_clock(notifications(hook(rx.url, schedule=(1.0, 1.0))), outbox, clock)
    try:
        await rx.wait_for(lambda: len(rx.requests) == 2)
        assert rx.requests[1].at - rx.requests[0].at == pytest.approx(7.0)
    finally:
        await worker.close()
        await outbox.close()
        await rx.stop()


async def test_full_jitter_spreads_retries_within_the_step(sqlite_outbox: OutboxFactory) -> None:
    clock = FakeClock()
    rx = Receiver(
        clock=clock.time, behaviour=lambda n, _: web.Response(status=503 if n < 5 else 204)
    )
    await rx.start()
    outbox = sqlite_outbox()
    await outbox.append("hook", [Event.create("ping", {"message": "x"}, clock.time())])
    settings = notifications(hook(rx.url, schedule=(10.0,) * 5, jitter=1.0))
    worker = await worker_on_clock(settings, outbox, clock)
    try:
        await rx.wait_for(lambda: len(rx.requests) == 6)
        gaps = [b.at - a.at for a, b in zip(rx.requests, rx.requests[1:], strict=False)]
        assert all(0 < gap <= 10.0 for gap in gaps) and len(set(gaps)) > 1
        assert len({r.msg_id for r in rx.requests}) == 1
    finally:
        await worker.close()
        await outbox.close()
        await rx.stop()


async def test_pending_events_are_delivered_after_a_restart(
    make_outbox: OutboxFactory, receiver: Receiver, running: Running
) -> None:
    down = Receiver()  # the first instance only ever meets a dead receiver
    # A short lease: an attempt in flight when it stops (the dead receiver times out
    # after 0.3 s) keeps its claim only that long, not the default's minute.
    first = await running.start(
        notifications(hook(down.url, schedule=(0.05,) * 100, timeout=0.3)),
        make_outbox(),
        lease=0.3,
    )
    for i in range(25):
        first.emit("link.created", link(i))
    await asyncio.sleep(0.15)
    await running.stop(first)  # flushes what is in memory, leaves the rest in the outbox
    second = await running.start(notifications(hook(receiver.url)), make_outbox(), lease=0.3)
    await receiver.wait_for(lambda: len({r.msg_id for r in receiver.requests}) == 25)
    ids = sorted(r.body["data"]["code"] for r in receiver.requests)
    assert sorted(set(ids)) == sorted(f"c{i}" for i in range(25))
    await asyncio.sleep(0.1)
    (status,) = await second.status()
    assert status.depth == 0


async def test_two_workers_sharing_redis_deliver_each_event_once(
    redis: RedisServer, receiver: Receiver, running: Running
) -> None:
    settings = notifications(hook(receiver.url))
    registries = [CollectorRegistry(), CollectorRegistry()]
    one, two = [
        await running.start(settings, RedisOutbox(open_redis(redis.url)), metrics=EventMetrics(r))
        for r in registries
    ]
    for i in range(300):
        (one if i % 2 else two).emit("link.created", link(i))
    await receiver.wait_for(lambda: len(receiver.requests) >= 300)
    await asyncio.sleep(0.2)  # room for any duplicate to show up
    ids = [r.msg_id for r in receiver.requests]
    assert len(ids) == len(set(ids)) == 300
    name, labels = "sluice_webhook_delivered_events_total", {"webhook": "hook"}
    shares = [r.get_sample_value(name, labels) or 0 for r in registries]
    assert sum(shares) == 300 and min(shares) > 0  # both instances took part


async def test_exhausted_events_are_dead_lettered_then_replayed(
    make_outbox: OutboxFactory, running: Running
) -> None:
    healthy = False

    def behaviour(n: int, _: str) -> web.Response:
        return web.Response(status=204 if healthy else 503, text="" if healthy else "busy")

    rx = await Receiver(behaviour=behaviour).start()
    try:
        notifier = await running.start(
            notifications(hook(rx.url, schedule=(0.02, 0.02))), make_outbox(), max_pause=0.0
        )
        sent = [f"c{i}" for i in range(5)]
        for i in range(5):
            notifier.emit("link.created", link(i))
        await rx.wait_for(lambda: len(rx.requests) == 15)  # 3 attempts each
        await asyncio.sleep(0.1)
        (status,) = await notifier.status()
        assert (status.depth, status.dead_letters) == (0, 5)
        pages, after = [], None
        while page := await notifier.dead_letters("hook", after, 2):
            pages.append(page)
            after = page[-1].event.id
        dead = [d for p in pages for d in p]
        assert [len(p) for p in pages] == [2, 2, 1]
        assert sorted(d.event.data["code"] for d in dead) == sent
        assert dead[0].attempts == 3
        assert dead[0].reason == "gave up after 3 attempts; last error: HTTP 503: busy"
        healthy = True
        rx.requests.clear()
        assert await notifier.replay("hook", [dead[0].event.id]) == 1
        await rx.wait_for(lambda: len(rx.requests) == 1)
        assert rx.requests[0].msg_id == dead[0].event.id  # the same id as before
        assert await notifier.replay("hook") == 4
        await rx.wait_for(lambda: len(rx.requests) == 5)
        assert sorted(r.msg_id for r in rx.requests) == sorted(d.event.id for d in dead)
        (status,) = await notifier.status()
        assert status.dead_letters == 0
    finally:
        await rx.stop()


async def test_410_disables_until_re_enabled(make_outbox: OutboxFactory, running: Running) -> None:
    rx = Receiver(behaviour=lambda n, _: web.Response(status=410 if n == 0 else 204))
    await rx.start()
    try:
        notifier = await running.start(notifications(hook(rx.url)), make_outbox())
        for i in range(3):
            notifier.emit("link.created", link(i))
        await rx.wait_for(lambda: len(rx.requests) == 1)
        await asyncio.sleep(0.2)
        (status,) = await notifier.status()
        assert status.disabled and status.disabled_reason is not None
        assert "410 Gone" in status.disabled_reason
        assert status.depth == 3 and len(rx.requests) == 1  # kept, not sent
        await notifier.set_disabled("hook", False)
        await rx.wait_for(lambda: len({r.msg_id for r in rx.requests}) == 3)
        assert rx.requests[1].msg_id == rx.requests[0].msg_id  # the refused one, again
        (status,) = await notifier.status()
        assert not status.disabled
    finally:
        await rx.stop()


class FlakyAcks(SqliteOutbox):
    """An outbox whose first acknowledgement fails (the store hiccups after the POST)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.failed = 0

    async def ack(self, subscription: str, delivery: Delivery, now: float) -> None:
        if not self.failed:
            self.failed += 1
            raise StorageError("disk I/O error")
        await super().ack(subscription, delivery, now)


async def test_a_failed_batch_ack_sends_the_batch_again_and_carries_on(
    tmp_path: Path, receiver: Receiver, running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    """Acks are not waited for before the next claim; one that fails is logged and
    its events go out again once their lease runs out (at-least-once)."""
    outbox = FlakyAcks(tmp_path / "events.sqlite3")
    settings = notifications(hook(receiver.url, max_events=3, max_wait=0.05, timeout=0.2))
    with caplog.at_level(logging.WARNING, "sluice.events"):
        notifier = await running.start(settings, outbox, lease=0.5)
        for i in range(9):
            notifier.emit("link.created", link(i))
        codes = lambda: {e["data"]["code"] for r in receiver.requests for e in r.body}  # noqa: E731
        await receiver.wait_for(lambda: len(codes()) == 9)
        first = receiver.requests[0].msg_id
        await receiver.wait_for(lambda: sum(r.msg_id == first for r in receiver.requests) == 2)
    assert outbox.failed == 1
    assert any("acknowledgement failed" in r.getMessage() for r in caplog.records)
    assert receiver.bad_signatures == 0
    await asyncio.sleep(0.1)
    (status,) = await notifier.status()
    assert (status.depth, status.dead_letters) == (0, 0)
