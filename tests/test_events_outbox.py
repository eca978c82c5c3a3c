"""The outbox contract, run against every implementation: SQLite, Redis, Redis Cluster."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from proxy.events.model import Event, batch_id
from proxy.events.outbox import Delivery, Outbox
from proxy.events.outbox_redis import RedisOutbox, keys_for
from proxy.events.outbox_sqlite import SqliteOutbox
from proxy.storage.redis_client import open_redis
from proxy.storage.redis_cluster import key_slot
from tests.servers import RedisServer

SUB = "ops"


class Stores:
    """Opens outbox objects on one backing store (a file or a Redis), as a restart would."""

    def __init__(self, make: Callable[[], Outbox], kind: str) -> None:
        self.make = make
        self.kind = kind
        self.opened: list[Outbox] = []

    def open(self) -> Outbox:
        outbox = self.make()
        self.opened.append(outbox)
        return outbox


@pytest.fixture(params=["sqlite", "redis", "cluster"])
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stores]:
    if request.param == "sqlite":
        made = Stores(lambda: SqliteOutbox(tmp_path / "events.sqlite3"), "sqlite")
    elif request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis")
        made = Stores(lambda: RedisOutbox(open_redis(server.url, timeout=2.0)), "redis")
    else:
        cluster = request.getfixturevalue("redis_cluster")
        cluster.flushall()
        made = Stores(lambda: RedisOutbox(open_redis(cluster.url, timeout=2.0)), "cluster")
    yield made
    for outbox in made.opened:
        await outbox.close()


def each(deliveries: list[Delivery]) -> list[Delivery]:
    """Claimed deliveries as one per event (a store may group events)."""
    return [one for d in deliveries for one in d.each()]


def events(n: int, now: float | None = None) -> list[Event]:
    at = time.time() if now is None else now
    return [Event.create("link.created", {"code": f"c{i}"}, at) for i in range(n)]


async def test_append_claim_ack(stores: Stores) -> None:
    outbox = stores.open()
    now = time.time()
    sent = events(5, now)
    await outbox.append(SUB, sent)
    assert (await outbox.stats(SUB)).depth == 5
    a = await outbox.claim_new(SUB, "a", now, 30, 3)
    b = await outbox.claim_new(SUB, "b", now, 30, 10)
    assert [d.events[0].id for d in a + b] == [e.id for e in sent]  # disjoint, in order
    assert all(d.fresh and d.attempts == 0 for d in a + b)
    assert a[0].events[0].raw == sent[0].raw
    assert await outbox.claim_new(SUB, "c", now, 30, 10) == []
    for d in a + b:
        await outbox.ack(SUB, d, now)
    stats = await outbox.stats(SUB)
    assert (stats.depth, stats.oldest, stats.dead) == (0, None, 0)
    state = await outbox.state(SUB)
    assert state.last_success == pytest.approx(now, abs=0.01) and state.failures == 0
    assert await outbox.stats("another") == (await outbox.stats("another"))  # unknown: empty


async def test_a_failed_batch_is_retried_as_the_same_batch(stores: Stores) -> None:
    outbox = stores.open()
    now = time.time()
    await outbox.append(SUB, events(3, now))
    first, second, third = await outbox.claim_new(SUB, "a", now, 30, 3)
    batch = first.merge(second)
    unit = batch_id([e.id for e in batch.events])
    await outbox.ack(SUB, third, now)
    await outbox.retry(SUB, batch, unit=unit, attempts=1, at=now + 10, error="HTTP 503", now=now)
    assert await outbox.claim_due(SUB, "a", now + 5, 30) is None
    stats = await outbox.stats(SUB)
    assert stats.depth == 2 and stats.oldest == pytest.approx(now, abs=0.01)
    state = await outbox.state(SUB)
    assert (state.last_error, state.failures) == ("HTTP 503", 1)
    due = await outbox.claim_due(SUB, "b", now + 10, 30)
    assert due is not None and due.unit == unit and due.attempts == 1
    assert [e.id for e in due.events] == [e.id for e in batch.events]
    assert [e.raw for e in due.events] == [e.raw for e in batch.events]
    assert await outbox.claim_due(SUB, "c", now + 10, 30) is None  # leased to b
    await outbox.retry(SUB, due, unit=unit, attempts=2, at=now + 20, error="HTTP 500", now=now)
    again = await outbox.claim_due(SUB, "b", now + 20, 30)
    assert again is not None and again.attempts == 2 and len(again.events) == 2
    await outbox.ack(SUB, again, now + 20)
    assert (await outbox.stats(SUB)).depth == 0
    assert (await outbox.state(SUB)).failures == 0


async def test_an_expired_lease_is_taken_over(stores: Stores) -> None:
    """A consumer that dies holding events loses them to another after the lease."""
    outbox = stores.open()
    now = time.time()
    await outbox.append(SUB, events(2, now))
    fresh, unit_source = await outbox.claim_new(SUB, "dead", now, 0.2, 2)
    await outbox.retry(SUB, unit_source, unit="evt_u", attempts=1, at=now, error="x", now=now)
    assert await outbox.claim_due(SUB, "dead", now, 0.2) is not None
    assert await outbox.claim_new(SUB, "alive", now, 0.2, 10) == []
    assert await outbox.claim_due(SUB, "alive", now, 0.2) is None
    await asyncio.sleep(0.3)  # Redis measures a pending entry's idle time itself
    later = now + 0.3
    taken = await outbox.claim_new(SUB, "alive", later, 0.2, 10)
    assert [d.events[0].id for d in taken] == [fresh.events[0].id]
    unit = await outbox.claim_due(SUB, "alive", later, 0.2)
    assert unit is not None and unit.events[0].id == unit_source.events[0].id


async def test_dead_letters_page_and_replay(stores: Stores) -> None:
    outbox = stores.open()
    now = time.time()
    sent = events(5, now)
    await outbox.append(SUB, sent)
    claimed = await outbox.claim_new(SUB, "a", now, 30, 5)
    await outbox.bury(SUB, claimed[0].merge(claimed[1]), attempts=1, reason="HTTP 400", now=now)
    for d in claimed[2:]:
        await outbox.retry(SUB, d, unit=d.events[0].id, attempts=3, at=now, error="e", now=now)
        unit = await outbox.claim_due(SUB, "a", now, 30)
        assert unit is not None
        await outbox.bury(SUB, unit, attempts=4, reason="gave up", now=now)
    stats = await outbox.stats(SUB)
    assert (stats.depth, stats.dead) == (0, 5)
    pages, after = [], None
    while page := await outbox.dead_letters(SUB, after, 2):
        pages.append(page)
        after = page[-1].event.id
    assert [len(p) for p in pages] == [2, 2, 1]
    dead = [d for p in pages for d in p]
    assert [d.event.id for d in dead] == [e.id for e in sent]
    assert [d.event.raw for d in dead] == [e.raw for e in sent]
    assert [(d.attempts, d.reason) for d in dead[:3]] == [(1, "HTTP 400")] * 2 + [(4, "gave up")]
    assert await outbox.replay(SUB, [sent[3].id, "evt_unknown"], now) == 1
    assert await outbox.replay(SUB, None, now) == 4
    stats = await outbox.stats(SUB)
    assert (stats.depth, stats.dead) == (5, 0)
    back = await outbox.claim_new(SUB, "b", now, 30, 10)
    assert sorted(d.events[0].id for d in back) == sorted(e.id for e in sent)
    assert all(d.attempts == 0 for d in back)


async def test_disabled_state_is_shared(stores: Stores) -> None:
    one, two = stores.open(), stores.open()
    now = time.time()
    await one.set_disabled(SUB, True, "410 Gone", now)
    state = await two.state(SUB)
    assert state.disabled and state.disabled_reason == "410 Gone"
    await two.set_disabled(SUB, False, None, now)
    assert not (await one.state(SUB)).disabled


async def test_events_survive_a_restart(stores: Stores) -> None:
    first = stores.open()
    now = time.time()
    sent = events(20, now)
    await first.append(SUB, sent)
    leased = await first.claim_new(SUB, "crashed", now, 0.2, 5)
    assert len(leased) == 5
    await first.close()
    stores.opened.remove(first)
    second = stores.open()
    await asyncio.sleep(0.3)
    got: list[str] = []
    while batch := await second.claim_new(SUB, "new", now + 0.3, 0.2, 7):
        got += [d.events[0].id for d in batch]
        for d in batch:
            await second.ack(SUB, d, now)
    assert sorted(got) == sorted(e.id for e in sent)
    assert (await second.stats(SUB)).depth == 0


async def test_subscriptions_are_separate_queues(stores: Stores) -> None:
    outbox = stores.open()
    now = time.time()
    await outbox.append("a", events(2, now))
    await outbox.append("b", events(3, now))
    assert len(await outbox.claim_new("a", "x", now, 30, 10)) == 2
    assert len(await outbox.claim_new("b", "x", now, 30, 10)) == 3


async def test_redis_trims_only_what_the_group_no_longer_needs(redis: RedisServer) -> None:
    outbox = RedisOutbox(open_redis(redis.url, timeout=2.0))
    try:
        k = outbox.keys(SUB)
        now = time.time()
        await outbox.append(SUB, events(10, now))
        claimed = await outbox.claim_new(SUB, "a", now, 30, 10)
        for d in claimed[1:]:
            await outbox.ack(SUB, d, now)
        await outbox.maintain(SUB)
        assert await outbox.backend.execute("XLEN", k.stream) == 10  # the first is pending
        await outbox.ack(SUB, claimed[0], now)
        await outbox.append(SUB, events(4, now))  # appended, not yet read by anyone
        await outbox.maintain(SUB)
        assert await outbox.backend.execute("XLEN", k.stream) == 5  # last delivered + 4 unread
        assert len(await outbox.claim_new(SUB, "b", now, 30, 10)) == 4
    finally:
        await outbox.close()


def test_a_subscriptions_keys_share_one_cluster_slot() -> None:
    keys = keys_for("sluice:events", "ops-team")
    slots = {key_slot(getattr(keys, part)) for part in keys.__slots__}
    assert slots == {key_slot("ops-team")}
    assert keys.stream == "sluice:events:{ops-team}:stream"


async def test_claims_in_batches_are_disjoint_and_in_order(stores: Stores) -> None:
    """``append``'s batch hint (SQLite: one row per batch) changes nothing a consumer sees."""
    outbox = stores.open()
    now = time.time()
    sent = events(23, now)
    await outbox.append(SUB, sent[:10], batch=4)
    await outbox.append(SUB, sent[10:], batch=4)
    assert (await outbox.stats(SUB)).depth == 23
    got = []
    for consumer, limit in (("a", 3), ("b", 4), ("a", 6), ("c", 1), ("b", 100)):
        claimed = each(await outbox.claim_new(SUB, consumer, now, 30, limit))
        assert len(claimed) == min(limit, 23 - len(got))
        got += claimed
    assert [d.events[0].id for d in got] == [e.id for e in sent]
    assert [d.events[0].raw for d in got] == [e.raw for e in sent]
    await outbox.ack(SUB, Delivery.join(got[:7]), now)
    assert (await outbox.stats(SUB)).depth == 16
    await outbox.ack(SUB, Delivery.join(got[7:]), now)
    assert (await outbox.stats(SUB)).depth == 0


async def test_a_batch_settled_in_parts(stores: Stores) -> None:
    """Delivered, retried and buried events of one claim each end where they should."""
    outbox = stores.open()
    now = time.time()
    sent = events(6, now)
    await outbox.append(SUB, sent, batch=6)
    claimed = each(await outbox.claim_new(SUB, "a", now, 30, 6))
    await outbox.ack(SUB, Delivery.join(claimed[1:3]), now)
    await outbox.retry(
        SUB, Delivery.join(claimed[3:5]), unit="u1", attempts=1, at=now, error="e", now=now
    )
    await outbox.bury(SUB, claimed[5], attempts=1, reason="HTTP 400", now=now)
    stats = await outbox.stats(SUB)
    assert (stats.depth, stats.dead) == (3, 1)  # the first is still leased, two wait to retry
    due = await outbox.claim_due(SUB, "a", now, 30)
    assert due is not None and [e.id for e in due.events] == [e.id for e in sent[3:5]]
    await outbox.ack(SUB, due, now)
    await outbox.ack(SUB, claimed[0], now)
    assert await outbox.claim_new(SUB, "b", now + 60, 30, 10) == []
    stats = await outbox.stats(SUB)
    assert (stats.depth, stats.dead) == (0, 1)
    (dead,) = await outbox.dead_letters(SUB)
    assert dead.event.id == sent[5].id and dead.event.raw == sent[5].raw


async def test_a_late_settle_removes_only_what_it_delivered(tmp_path: Path) -> None:
    """A consumer whose lease ran out settles after another took part of its batch:
    the taker's part stays until the taker settles it."""
    outbox = SqliteOutbox(tmp_path / "events.sqlite3")
    try:
        now = time.time()
        sent = events(6, now)
        await outbox.append(SUB, sent, batch=6)
        slow = await outbox.claim_new(SUB, "slow", now, 1, 6)
        taken = await outbox.claim_new(SUB, "fast", now + 2, 30, 2)  # splits the segment
        assert [e.id for d in taken for e in d.events] == [e.id for e in sent[:2]]
        await outbox.ack(SUB, Delivery.join(slow), now + 3)  # late, but it did deliver them
        assert (await outbox.stats(SUB)).depth == 2  # fast's two, still leased to it
        assert await outbox.claim_new(SUB, "other", now + 3, 30, 10) == []
        await outbox.ack(SUB, Delivery.join(taken), now + 3)
        assert (await outbox.stats(SUB)).depth == 0
    finally:
        await outbox.close()


async def test_sqlite_rows_of_older_files_are_still_delivered(tmp_path: Path) -> None:
    """Fresh events stored one row each (before segments) are claimed first."""
    path = tmp_path / "events.sqlite3"
    outbox = SqliteOutbox(path)
    try:
        now = time.time()
        old, new = events(2, now), events(2, now)
        await outbox.append(SUB, new, batch=2)
        with sqlite3.connect(path) as db:
            db.executemany(
                "INSERT INTO outbox (sub, event_id, body, created_at, next_attempt_at) "
                "VALUES (?, ?, ?, ?, ?)",
                [(SUB, e.id, e.raw, e.timestamp, e.timestamp) for e in old],
            )
        assert (await outbox.stats(SUB)).depth == 4
        claimed = each(await outbox.claim_new(SUB, "a", now, 30, 3))
        assert [d.events[0].id for d in claimed] == [e.id for e in old + new[:1]]
        await outbox.ack(SUB, Delivery.join(claimed), now)
        rest = await outbox.claim_new(SUB, "a", now, 30, 3)
        assert [e.id for d in rest for e in d.events] == [new[1].id]
        await outbox.ack(SUB, rest[0], now)
        assert (await outbox.stats(SUB)).depth == 0
    finally:
        await outbox.close()
