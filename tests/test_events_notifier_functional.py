"""The emitter side and the delivery edge cases, through real receivers on loopback."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxy.events.emitter import Emitter
from proxy.events.model import Event
from proxy.events.outbox_sqlite import SqliteOutbox
from proxy.events.service import Notifier, open_outbox
from proxy.events.settings import NotificationsSettings
from tests.test_events_support import Receiver, hook, notifications

KIB = 1024


@pytest.fixture
async def notifiers() -> AsyncIterator[list[Notifier]]:
    made: list[Notifier] = []
    yield made
    for notifier in made:
        await notifier.close()


async def start(
    made: list[Notifier], settings: NotificationsSettings, tmp_path: Path, **kwargs: Any
) -> Notifier:
    outbox = open_outbox("memory://", str(tmp_path / "data"))
    options: dict[str, Any] = {"poll": 0.05, "max_pause": 0.1, "flush_interval": 0.02}
    notifier = Notifier(settings, outbox, **{**options, **kwargs})
    await notifier.start()
    made.append(notifier)
    return notifier


async def test_a_rejection_storm_becomes_a_few_events_with_exact_counts(
    tmp_path: Path, notifiers: list[Notifier]
) -> None:
    rx = await Receiver().start()
    try:
        settings = notifications(hook(rx.url), aggregate=0.25)
        notifier = await start(notifiers, settings, tmp_path)
        started = time.perf_counter()
        for _ in range(50):  # 50,000 rejections from one client over about a second
            for _hit in range(1000):
                notifier.rejected("login", "203.0.113.9", "api")
            notifier.rejected("login", "198.51.100.1", "api")
            await asyncio.sleep(0.02)
        spent = time.perf_counter() - started

        def total(client: str) -> int:
            return sum(e["data"]["count"] for e in rx.events() if e["data"]["client"] == client)

        await rx.wait_for(lambda: total("203.0.113.9") == 50_000 and total("198.51.100.1") == 50)
        storm = [e for e in rx.events() if e["data"]["client"] == "203.0.113.9"]
        assert 2 <= len(storm) <= 10
        assert all(e["type"] == "rate_limit.rejected" for e in storm)
        assert {(e["data"]["rule"], e["data"]["route"]) for e in storm} == {("login", "api")}
        assert all(e["data"]["first_seen"] <= e["data"]["last_seen"] for e in storm)
        assert spent < 5.0
    finally:
        await rx.stop()


class StuckOutbox(SqliteOutbox):
    """An outbox whose appends never finish (e.g. a store that hangs)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.release = asyncio.Event()

    async def append(self, subscription: str, events: Sequence[Event], *, batch: int = 1) -> None:
        await self.release.wait()
        await super().append(subscription, events, batch=batch)


async def test_a_full_buffer_drops_and_counts_but_never_blocks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outbox = StuckOutbox(tmp_path / "events.sqlite3")
    settings = notifications(hook("http://127.0.0.1:9/"), buffer=10)
    emitter = Emitter(settings, outbox, flush_interval=0.01)
    await emitter.start()
    try:
        with caplog.at_level(logging.WARNING, "sluice.events"):
            accepted = 0
            started = time.perf_counter()
            for i in range(1000):
                accepted += emitter.emit("link.created", {"code": f"c{i}"})
                if i % 100 == 0:
                    await asyncio.sleep(0.01)  # the flusher runs, and hangs on the outbox
            spent = time.perf_counter() - started
        assert accepted == 10 and emitter.dropped == 990 and emitter.buffered == 10
        assert spent < 1.0
        warnings = [r.getMessage() for r in caplog.records if "buffer full" in r.getMessage()]
        assert len(warnings) == 1  # at most one per interval
        outbox.release.set()
        await emitter.close()
        assert emitter.buffered == 0
        assert (await outbox.stats("hook")).depth == 10
    finally:
        outbox.release.set()
        await emitter.close()
        await outbox.close()


async def test_slack_format_renders_the_template(tmp_path: Path, notifiers: list[Notifier]) -> None:
    rx = await Receiver().start()
    try:
        template = {"rate_limit.rejected": "{client} hit {rule} {count} times on {route}"}
        settings = notifications(
            hook(rx.url, format="slack", templates=template),
            critical=frozenset({"rate_limit.rejected"}),  # no aggregation: one event per call
        )
        notifier = await start(notifiers, settings, tmp_path)
        notifier.rejected("login", "203.0.113.9", "api")
        notifier.emit("link.deleted", {"code": "promo"})
        await rx.wait_for(lambda: len(rx.requests) == 2)
        texts = sorted(r.body["text"] for r in rx.requests)
        assert texts == ["203.0.113.9 hit login 1 times on api", "Short link promo deleted"]
        assert rx.bad_signatures == 0
    finally:
        await rx.stop()


async def test_huge_or_hanging_answers_are_cut_off(
    tmp_path: Path, notifiers: list[Notifier]
) -> None:
    async def answer(n: int, msg_id: str) -> web.StreamResponse:
        if n == 0:  # 10 MB of error page
            return web.Response(status=500, body=b"x" * (10 * KIB * KIB))
        if n == 1:  # success with a 10 MB body: judged on the status
            return web.Response(status=200, body=b"y" * (10 * KIB * KIB))
        await asyncio.sleep(30)  # hangs
        return web.Response(status=204)

    rx = await Receiver(behaviour=answer).start()
    try:
        settings = notifications(hook(rx.url, timeout=0.5, schedule=(0.01,) * 3))
        notifier = await start(notifiers, settings, tmp_path)
        started = time.perf_counter()
        notifier.emit("link.deleted", {"code": "a"})
        await rx.wait_for(lambda: len(rx.requests) == 2)
        await asyncio.sleep(0.1)
        (status,) = await notifier.status()
        assert status.depth == 0 and status.last_success is not None
        assert status.last_error == "HTTP 500: " + "x" * 200 + "…"
        assert time.perf_counter() - started < 2.0
        notifier.emit("link.deleted", {"code": "b"})
        await rx.wait_for(lambda: len(rx.requests) == 3)
        await asyncio.sleep(0.7)
        (status,) = await notifier.status()
        assert status.last_error == "no answer within 0.5s" and status.depth == 1
    finally:
        await rx.stop()


async def test_a_failed_batch_keeps_its_webhook_id(
    tmp_path: Path, notifiers: list[Notifier]
) -> None:
    rx = await Receiver(behaviour=lambda n, _: web.Response(status=503 if n == 0 else 204)).start()
    try:
        settings = notifications(hook(rx.url, max_events=5, max_wait=0.3))
        notifier = await start(notifiers, settings, tmp_path)
        for i in range(5):
            notifier.emit("link.deleted", {"code": f"c{i}"})
        await rx.wait_for(lambda: len(rx.requests) == 2)
        first, second = rx.requests
        assert first.msg_id == second.msg_id and first.msg_id.startswith("batch_")
        assert isinstance(first.body, list) and len(first.body) == 5
        assert first.body == second.body
    finally:
        await rx.stop()


async def test_critical_events_skip_the_batch_wait(
    tmp_path: Path, notifiers: list[Notifier]
) -> None:
    rx = await Receiver().start()
    try:
        settings = notifications(hook(rx.url, max_events=50, max_wait=30.0))
        notifier = await start(notifiers, settings, tmp_path, flush_interval=10.0)
        started = time.perf_counter()
        notifier.emit("link.created", {"code": "slow"})
        notifier.emit("storage.degraded", {"backend": "redis", "error": "timeout"})
        await rx.wait_for(lambda: len(rx.requests) == 1, within=3.0)
        assert time.perf_counter() - started < 1.5
        assert sorted(e["type"] for e in rx.events()) == ["link.created", "storage.degraded"]
    finally:
        await rx.stop()


async def test_the_rate_limit_spaces_requests(tmp_path: Path, notifiers: list[Notifier]) -> None:
    rx = await Receiver().start()
    try:
        notifier = await start(notifiers, notifications(hook(rx.url, rate=20.0)), tmp_path)
        for i in range(30):
            notifier.emit("link.deleted", {"code": f"c{i}"})
        await rx.wait_for(lambda: len(rx.requests) == 30)
        spread = rx.requests[-1].at - rx.requests[0].at
        assert spread >= 0.45  # 20 at once (the burst), then 10 more at 20/s
    finally:
        await rx.stop()


async def test_filters_and_ping(tmp_path: Path, notifiers: list[Notifier]) -> None:
    rx_all, rx_login = await Receiver().start(), await Receiver().start()
    try:
        settings = notifications(
            hook(rx_all.url, name="all", events=frozenset({"link.deleted"})),
            hook(rx_login.url, name="login", rules=frozenset({"login"})),
            critical=frozenset({"rate_limit.rejected"}),
        )
        notifier = await start(notifiers, settings, tmp_path)
        notifier.rejected("search", "a", "api")
        notifier.rejected("login", "b", "api")
        notifier.emit("link.deleted", {"code": "x"})
        ping = await notifier.ping("login")
        await rx_login.wait_for(lambda: len(rx_login.requests) == 3)
        await rx_all.wait_for(lambda: len(rx_all.requests) == 1)
        assert [e["type"] for e in rx_all.events()] == ["link.deleted"]
        got = {(e["type"], e["data"].get("rule")) for e in rx_login.events()}
        assert got == {("rate_limit.rejected", "login"), ("link.deleted", None), ("ping", None)}
        assert ping in {r.msg_id for r in rx_login.requests}
        with pytest.raises(KeyError):
            await notifier.ping("nobody")
    finally:
        await rx_all.stop()
        await rx_login.stop()


async def test_a_reload_starts_and_stops_subscriptions(
    tmp_path: Path, notifiers: list[Notifier]
) -> None:
    old, new = await Receiver().start(), await Receiver().start()
    try:
        notifier = await start(notifiers, notifications(hook(old.url, name="old")), tmp_path)
        notifier.emit("link.deleted", {"code": "before"})
        await old.wait_for(lambda: len(old.requests) == 1)
        notifier.apply(notifications(hook(new.url, name="new")))
        notifier.emit("link.deleted", {"code": "after"})
        await new.wait_for(lambda: len(new.requests) == 1)
        await asyncio.sleep(0.1)
        assert [e["data"]["code"] for e in old.events()] == ["before"]
        assert [e["data"]["code"] for e in new.events()] == ["after"]
        assert [s.name for s in await notifier.status()] == ["new"]
    finally:
        await old.stop()
        await new.stop()


async def test_an_event_that_cannot_be_serialised_is_counted_not_fatal(tmp_path: Path) -> None:
    outbox = SqliteOutbox(tmp_path / "events.sqlite3")
    emitter = Emitter(notifications(hook("http://127.0.0.1:9/")), outbox)
    try:
        emitter.emit("link.deleted", 5)  # type: ignore[arg-type]
        emitter.emit("link.deleted", {"code": "fine", "when": time})  # str() of a module
        assert await emitter.flush() == 1
        assert emitter.dropped == 1
        (delivery,) = await outbox.claim_new("hook", "t", time.time(), 30, 10)
        assert delivery.events[0].data["code"] == "fine"
    finally:
        await emitter.close()
        await outbox.close()
