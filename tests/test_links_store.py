"""The link stores against real storage: SQLite files and a real redis-server (and Cluster).

Every test in the first part runs on both stores; they must behave the same.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from proxy.links.analytics import day_of
from proxy.links.codes import looks_generated
from proxy.links.errors import CodeTaken, LinkError
from proxy.links.model import Link, Variant
from proxy.links.redis_store import RedisLinkStore
from proxy.links.sqlite_store import SQLiteLinkStore
from proxy.links.store import ClickRecord, LinkStore, SecretMismatch, TopEntry
from tests.servers import RedisServer
from tests.topologies import RedisClusterSetup

SECRET = "store-test-secret-0123456789"
T0 = 1_700_006_400.0  # 2023-11-15 00:00:00 UTC, the start of an hour and a day
Opener = Callable[..., Awaitable[LinkStore]]


@pytest.fixture(params=["sqlite", "redis"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """Opens stores of the parametrised kind; each call with a fresh ``name`` is an
    empty store (a new SQLite file, or a new Redis namespace)."""
    if request.param == "sqlite":

        async def sqlite(name: str = "links", secret: str | None = SECRET) -> LinkStore:
            return await SQLiteLinkStore.open(tmp_path / name / "links.sqlite3", secret=secret)

        return sqlite
    server: RedisServer = request.getfixturevalue("redis")

    async def redis(name: str = "links", secret: str | None = SECRET) -> LinkStore:
        return await RedisLinkStore.open(server.url, secret=secret, namespace=name)

    return redis


@pytest.fixture
async def store(open_store: Opener) -> AsyncIterator[LinkStore]:
    opened = await open_store()
    yield opened
    await opened.close()


def new(url: str = "https://example.com/", code: str = "", **fields: Any) -> Link:
    return Link(code, url, T0, **fields)


async def test_create_get_patch_delete(store: LinkStore) -> None:
    link, created = await store.create(new(created_by="alice", tags=("a",)))
    assert created and looks_generated(link.code) and len(link.code) == 7
    assert await store.get(link.code) == link
    assert await store.get("no-such-code") is None
    assert await store.get("not a code!") is None

    patched = await store.patch(
        link.code, {"url": "https://b.example/", "tags": ("b",), "status": 301}
    )
    assert patched == replace(link, url="https://b.example/", tags=("b",), status=301)
    assert await store.get(link.code) == patched
    assert [x.code for x in (await store.list(tag="b")).links] == [link.code]
    assert (await store.list(tag="a")).links == ()
    assert await store.patch("no-such-code", {"max_clicks": 1}) is None
    with pytest.raises(LinkError, match="cannot be changed"):
        await store.patch(link.code, {"code": "x-y"})

    assert await store.delete(link.code) is True
    assert await store.delete(link.code) is False
    assert await store.get(link.code) is None
    assert (await store.list()).links == ()
    assert await store.take_click(link.code, None) is False


async def test_list_pages_newest_first_with_tag_filter(store: LinkStore) -> None:
    made = []
    for i in range(25):
        tags = ("odd",) if i % 2 else ()
        link, _ = await store.create(new(f"https://example.com/{i}", tags=tags))
        made.append(link)
    seen, cursor = [], None
    while True:
        page = await store.list(cursor, limit=10)
        seen.extend(page.links)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == made[::-1]
    # A link created while paging does not shift later pages.
    first = await store.list(limit=5)
    await store.create(new("https://example.com/late"))
    second = await store.list(first.next_cursor, limit=5)
    assert second.links == tuple(made[::-1][5:10])
    odd, cursor = [], None
    while True:
        page = await store.list(cursor, limit=3, tag="odd")
        odd.extend(page.links)
        if not page.next_cursor:
            break
        cursor = page.next_cursor
    assert odd == [x for x in made[::-1] if x.tags == ("odd",)]
    assert (await store.list(tag="none")).links == ()
    with pytest.raises(LinkError, match="invalid cursor"):
        await store.list("abc")
    with pytest.raises(LinkError, match="limit"):
        await store.list(limit=0)


async def test_custom_codes_conflict(store: LinkStore) -> None:
    link, created = await store.create(new(code="spring-sale", created_by="alice"))
    assert created and link.code == "spring-sale"
    with pytest.raises(CodeTaken) as info:
        await store.create(new("https://other.example/", code="spring-sale"))
    assert info.value.status == 409
    # Case-sensitive: a different code.
    assert (await store.create(new(code="Spring-Sale")))[1]
    # Idempotent for the same owner and URL with dedupe; taken for anyone else.
    mine = await store.create(new(code="promo-x", created_by="alice"), dedupe_owner="alice")
    assert await store.create(new(code="promo-x"), dedupe_owner="alice") == (mine[0], False)
    with pytest.raises(CodeTaken):
        await store.create(new(code="promo-x"), dedupe_owner="bob")
    assert [x.code for x in (await store.list()).links] == ["promo-x", "Spring-Sale", "spring-sale"]


async def test_dedupe(store: LinkStore) -> None:
    first, created = await store.create(new(created_by="alice"), dedupe_owner="alice")
    assert created
    assert await store.create(new(created_by="alice"), dedupe_owner="alice") == (first, False)
    assert (await store.create(new(), dedupe_owner="bob"))[1]
    assert (await store.create(new("https://example.com/other"), dedupe_owner="alice"))[1]
    assert (await store.create(new()))[1]  # without dedupe: always a new link
    # A dead link (over its cap) is not handed out again.
    capped, _ = await store.create(
        new("https://capped.example/", max_clicks=1), dedupe_owner="alice"
    )
    assert await store.take_click(capped.code, 1)
    again, created = await store.create(new("https://capped.example/"), dedupe_owner="alice")
    assert created and again.code != capped.code
    expiring, _ = await store.create(
        new("https://soon.example/", expires_at=T0 + 10), dedupe_owner="alice"
    )
    later = replace(new("https://soon.example/"), created_at=T0 + 11)
    assert (await store.create(later, dedupe_owner="alice"))[0].code != expiring.code


async def test_concurrent_dedupe_creates_one_link(store: LinkStore) -> None:
    results = await asyncio.gather(
        *(store.create(new("https://same.example/"), dedupe_owner="carol") for _ in range(20))
    )
    assert len({link.code for link, _ in results}) == 1
    assert sum(created for _, created in results) == 1


async def test_take_click_cap_is_exact_under_concurrency(store: LinkStore) -> None:
    capped, _ = await store.create(new(max_clicks=37))
    results = await asyncio.gather(*(store.take_click(capped.code, 37) for _ in range(200)))
    assert sum(results) == 37
    assert await store.click_count(capped.code) == 37
    free, _ = await store.create(new("https://free.example/"))
    assert all(await asyncio.gather(*(store.take_click(free.code, None) for _ in range(50))))
    assert await store.click_count(free.code) == 50
    assert await store.click_count("no-such-code") == 0


async def test_stats_by_day_range(store: LinkStore) -> None:
    link, _ = await store.create(new(variants=(Variant("https://a/", 1), Variant("https://b/", 1))))
    day1, day2, day3 = T0, T0 + 86400, T0 + 2 * 86400
    clicks = [
        (day1 + 10, "news.example", "browser", 0, "v1"),
        (day1 + 20, "news.example", "browser", 1, "v1"),
        (day1 + 30, "(direct)", "bot", 1, "v2"),
        (day2 + 10, "blog.example", "cli", 0, "v3"),
        (day2 + 20, "news.example", "browser", 0, "v1"),
        (day3 + 10, "late.example", "other", 1, "v9"),
    ]
    for at, ref, family, variant, visitor in clicks:
        assert await store.take_click(link.code, None)
        await store.record_click(
            link.code, at=at, referrer_host=ref, ua_family=family, variant=variant, visitor=visitor
        )
    stats = await store.stats(link.code, day_of(day1), day_of(day2))
    assert stats is not None
    assert stats.clicks == 6  # lifetime
    assert stats.total == 5
    assert stats.per_day == {"2023-11-15": 3, "2023-11-16": 2}
    assert stats.referrers == (("news.example", 3), ("(direct)", 1), ("blog.example", 1))
    assert stats.ua_families == {"browser": 3, "bot": 1, "cli": 1, "other": 0}
    assert stats.variants == {0: 3, 1: 2}
    assert stats.unique_visitors == 3
    assert stats.last_click_at == day3 + 10
    empty = await store.stats(link.code, "2020-01-01", "2020-01-02")
    assert (
        empty is not None
        and empty.total == 0
        and empty.per_day == {"2020-01-01": 0, "2020-01-02": 0}
    )
    assert await store.stats("no-such-code", "2023-11-15", "2023-11-15") is None
    with pytest.raises(LinkError, match="after"):
        await store.stats(link.code, "2023-11-16", "2023-11-15")
    # Clicks on an unknown link are not recorded anywhere.
    await store.record_click("no-such-code", at=day3, referrer_host="x", ua_family="bot")
    assert await store.top("hour", now=day3 + 60) == (TopEntry(link.code, 1),)


async def test_record_clicks_in_one_batch(store: LinkStore) -> None:
    """The analytics task's batches: same totals as one call per click."""
    link, _ = await store.create(new())
    other, _ = await store.create(new(url="https://example.com/other"))
    batch = [
        ClickRecord(link.code, T0 + i, "news.example", "browser", None, f"v{i % 7}", i % 2 == 0)
        for i in range(300)
    ]
    batch.append(ClickRecord(other.code, T0, "(direct)", "bot", None, None, True))
    batch.append(ClickRecord("nosuchcode", T0, "(direct)", "bot", None, None, True))
    await store.record_clicks(batch)
    stats = await store.stats(link.code, day_of(T0), day_of(T0))
    assert stats is not None
    assert stats.total == 300
    assert stats.clicks == 150  # only the clicks flagged to count
    assert stats.unique_visitors == 7
    assert stats.referrers == (("news.example", 300),)
    assert await store.click_count(other.code) == 1
    await store.record_clicks([])


async def test_top_leaderboard(store: LinkStore) -> None:
    a, _ = await store.create(new("https://a.example/"))
    b, _ = await store.create(new("https://b.example/"))
    c, _ = await store.create(new("https://c.example/"))
    now = T0 + 30 * 3600 + 1800  # half past an hour

    async def clicks(link: Link, count: int, at: float) -> None:
        for _ in range(count):
            await store.record_click(
                link.code, at=at, referrer_host="(direct)", ua_family="browser"
            )

    await clicks(a, 5, now - 60)  # this hour
    await clicks(b, 3, now - 60)
    await clicks(b, 4, now - 3600)  # the previous hour: half of it is in the last hour
    await clicks(b, 10, now - 5 * 3600)
    await clicks(c, 8, now - 24 * 3600)  # the oldest bucket of the day window: weighted 0.5
    await clicks(c, 50, now - 26 * 3600)  # outside both windows
    tied = sorted((TopEntry(a.code, 5), TopEntry(b.code, 5)), key=lambda e: e.code)
    assert await store.top("hour", now=now) == tuple(tied)  # b: 3 + 4 * 0.5
    assert await store.top("day", now=now) == (
        TopEntry(b.code, 17),
        TopEntry(a.code, 5),
        TopEntry(c.code, 4),
    )
    assert await store.top("day", now=now, limit=1) == (TopEntry(b.code, 17),)
    await store.delete(b.code)
    assert [e.code for e in await store.top("day", now=now)] == [a.code, c.code]
    with pytest.raises(ValueError, match="window"):
        await store.top("week", now=now)


async def test_export_then_import_reproduces_every_link(open_store: Opener) -> None:
    source = await open_store("source")
    target = await open_store("target")
    try:
        made = [
            (await source.create(new(f"https://example.com/{i}", tags=("t",) if i % 3 else ())))[0]
            for i in range(12)
        ]
        made.append(
            (
                await source.create(
                    new(
                        code="custom-1",
                        created_by="alice",
                        expires_at=T0 + 3600.25,
                        max_clicks=10,
                        status=308,
                        variants=(Variant("https://a/", 1), Variant("https://b/", 2)),
                    )
                )
            )[0]
        )
        await source.delete(made[4].code)
        del made[4]
        exported = [link async for link in source.export()]
        assert exported == made  # oldest first
        result = await target.import_links(exported)
        assert (result.imported, result.skipped) == (12, ())
        assert [link async for link in target.export()] == made
        assert (await target.list(limit=100)).links == tuple(made[::-1])
        assert [x.code for x in (await target.list(tag="t", limit=100)).links] == [
            x.code for x in made[::-1] if x.tags == ("t",)
        ]
        again = await target.import_links(_aiter(exported[:3]))
        assert (again.imported, again.skipped) == (0, tuple(x.code for x in exported[:3]))
        # Same secret: new codes start after the imported ones, no collision.
        fresh = [await target.create(new(f"https://new.example/{i}")) for i in range(5)]
        assert all(created for _, created in fresh)
        assert not {x.code for x, _ in fresh} & {x.code for x in made}
    finally:
        await source.close()
        await target.close()


async def _aiter(links: list[Link]) -> AsyncIterator[Link]:
    for link in links:
        yield link


async def test_a_changed_secret_is_refused(open_store: Opener) -> None:
    first = await open_store("secrets", secret=None)  # generated and kept in the store
    link, _ = await first.create(new())
    await first.close()
    second = await open_store("secrets", secret=None)
    assert second.codec.encode(1) == first.codec.encode(1)
    assert await second.get(link.code) == link
    await second.close()
    with pytest.raises(SecretMismatch, match="code_secret differs"):
        await open_store("secrets", secret="another-secret-0123456789")


# -- SQLite only ----------------------------------------------------------------------------


async def test_sqlite_keeps_everything_across_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "data" / "links.sqlite3"
    store = await SQLiteLinkStore.open(path)
    link, _ = await store.create(new(code="keep-me", max_clicks=5, tags=("x",)))
    generated, _ = await store.create(new("https://generated.example/"))
    assert await store.take_click("keep-me", 5)
    await store.record_click("keep-me", at=T0, referrer_host="a.example", ua_family="browser")
    await store.close()

    store = await SQLiteLinkStore.open(path)
    try:
        assert await store.get("keep-me") == link
        assert await store.get(generated.code) == generated
        assert await store.click_count("keep-me") == 1
        stats = await store.stats("keep-me", day_of(T0), day_of(T0))
        assert stats is not None and stats.total == 1
        assert (await store.list(tag="x")).links == (link,)
        after, created = await store.create(new("https://after.example/"))
        assert created and after.code not in {"keep-me", generated.code}
    finally:
        await store.close()


RACE = """
import asyncio, sys, time
from pathlib import Path
from proxy.links.model import Link
from proxy.links.errors import CodeTaken
from proxy.links.sqlite_store import SQLiteLinkStore

async def main(path, go, me):
    store = await SQLiteLinkStore.open(path, secret="store-test-secret-0123456789")
    print("ready", flush=True)
    while not Path(go).exists():
        time.sleep(0.001)
    try:
        await store.create(Link("race-code", "https://example.com/" + me, 0.0, me))
        print("won", flush=True)
    except CodeTaken:
        print("taken", flush=True)
    await store.close()

asyncio.run(main(*sys.argv[1:]))
"""


async def test_two_processes_racing_for_one_custom_code(tmp_path: Path, repo_root: Path) -> None:
    path = tmp_path / "links.sqlite3"
    go = tmp_path / "go"
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            RACE,
            str(path),
            str(go),
            name,
            cwd=repo_root,
            stdout=asyncio.subprocess.PIPE,
        )
        for name in ("p1", "p2")
    ]
    for proc in procs:
        assert proc.stdout is not None
        assert (await asyncio.wait_for(proc.stdout.readline(), 20)).strip() == b"ready"
    go.touch()
    outcomes = []
    for proc in procs:
        out, _ = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0
        outcomes.append(out.decode().strip())
    assert sorted(outcomes) == ["taken", "won"]
    store = await SQLiteLinkStore.open(path, secret=SECRET)
    try:
        winner = await store.get("race-code")
        assert winner is not None
        assert winner.created_by == ("p1", "p2")[outcomes.index("won")]
    finally:
        await store.close()


# -- Redis Cluster ---------------------------------------------------------------------------


async def test_redis_cluster_smoke(redis_cluster: RedisClusterSetup) -> None:
    redis_cluster.flushall()
    store = await RedisLinkStore.open(redis_cluster.url, secret=SECRET)
    try:
        custom, _ = await store.create(new(code="cluster-1", tags=("c",), max_clicks=2))
        generated, _ = await store.create(new("https://g.example/"), dedupe_owner="alice")
        assert await store.create(new("https://g.example/"), dedupe_owner="alice") == (
            generated,
            False,
        )
        with pytest.raises(CodeTaken):
            await store.create(new(code="cluster-1"))
        assert await store.get("cluster-1") == custom
        assert (await store.list()).links == (generated, custom)
        assert (await store.list(tag="c")).links == (custom,)
        assert await store.patch("cluster-1", {"tags": ("d",)}) == replace(custom, tags=("d",))
        results = await asyncio.gather(*(store.take_click("cluster-1", 2) for _ in range(20)))
        assert sum(results) == 2
        for at in (T0, T0 + 86400):
            await store.record_click(
                "cluster-1", at=at, referrer_host="r.example", ua_family="cli", visitor="v"
            )
        stats = await store.stats("cluster-1", day_of(T0), day_of(T0 + 86400))
        assert stats is not None
        assert (stats.clicks, stats.total, stats.unique_visitors) == (2, 2, 1)
        assert await store.top("hour", now=T0 + 86400 + 60) == (TopEntry("cluster-1", 1),)
        assert [x.code async for x in store.export()] == ["cluster-1", generated.code]
        assert await store.delete("cluster-1")
        assert await store.stats("cluster-1", day_of(T0), day_of(T0)) is None
    finally:
        await store.close()


# -- Redis specifics and moving between stores ----------------------------------------------


async def test_redis_listing_skips_index_entries_of_interrupted_writes(redis: RedisServer) -> None:
    import redis as redis_py

    store = await RedisLinkStore.open(redis.url, secret=SECRET)
    try:
        kept, _ = await store.create(new(tags=("t",)))
        # What a create interrupted after its index writes (or a delete before its
        # index cleanup) leaves behind: index entries without a link hash.
        with redis_py.Redis.from_url(redis.url) as inspect:
            inspect.zadd("lk:index", {"ghost-1": 1000, "ghost-2": 1001})
            inspect.zadd("lk:tag:t", {"ghost-1": 1000})
            assert inspect.exists("lk:{ghost-1}") == 0
        assert (await store.list(limit=1)).links == (kept,)
        assert (await store.list(tag="t")).links == (kept,)
        assert [x async for x in store.export()] == [kept]
    finally:
        await store.close()


async def test_links_move_from_sqlite_to_redis(tmp_path: Path, redis: RedisServer) -> None:
    sqlite = await SQLiteLinkStore.open(tmp_path / "links.sqlite3")
    made = [
        (await sqlite.create(new(f"https://example.com/{i}", tags=("m",))))[0] for i in range(5)
    ]
    made.append((await sqlite.create(new(code="moved-1", max_clicks=3)))[0])
    secret = await asyncio.to_thread(_stored_secret, tmp_path / "links.sqlite3")
    target = await RedisLinkStore.open(redis.url, secret=secret)
    try:
        result = await target.import_links(sqlite.export())
        assert (result.imported, result.skipped) == (6, ())
        assert [x async for x in target.export()] == made
        fresh, created = await target.create(new("https://after.example/"))
        assert created and fresh.code not in {x.code for x in made}
        assert fresh.code == sqlite.codec.encode(7)  # the same sequence carries on
    finally:
        await sqlite.close()
        await target.close()


def _stored_secret(path: Path) -> str:
    import sqlite3

    with sqlite3.connect(path) as db:
        (secret,) = db.execute("SELECT value FROM meta WHERE key = 'code_secret'").fetchone()
    db.close()
    return str(secret)
