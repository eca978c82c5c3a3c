"""The Redis link store (standalone, Sentinel or Cluster), on ``proxy.storage.redis_client``.

Keys and scripts are described in ``redis_layout``. Creation writes the index
entries first, then the link hash with an atomic create-if-absent script, so a
link is never missing from its indexes; an interrupted create or delete can
leave index entries without a link, which readers skip (a tag listing also
re-checks the link's tags). A dedupe create holds a short per-(owner, url)
lock, so concurrent identical requests get one link. Unique visitors are a
HyperLogLog estimate (about 0.8 % standard error).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from proxy.errors import StorageError
from proxy.links.analytics import MAX_STATS_DAYS, day_of, hour_of, visitor_digest, window_buckets
from proxy.links.codes import Codec, is_code
from proxy.links.errors import CodeTaken
from proxy.links.model import Link, apply_patch
from proxy.links.redis_layout import (
    CREATE,
    PATCH,
    RECORD_CLICK,
    RELEASE,
    SET_FLOOR,
    TAKE_CLICK,
    TOP,
    TOP_ADD,
    Keys,
    Script,
    decode_link,
    link_fields,
    pairs,
)
from proxy.links.store import (
    GENERATED_ATTEMPTS,
    HOURLY_KEEP,
    TOP_LIMIT,
    ClickRecord,
    ImportResult,
    LinkStats,
    Page,
    SecretMismatch,
    TopEntry,
    build_stats,
    check_limit,
    click_fields,
    counter_floor,
    dedupe_key,
    import_batches,
    parse_cursor,
    reusable,
    secret_fingerprint,
    stats_days,
)
from proxy.storage.redis_client import RedisBackend, open_redis

DAY_TTL = MAX_STATS_DAYS * 86400
LOCK_MS = 5000
_BATCH = 200
Strings = list[str]
Fields = dict[str, bytes]


class RedisLinkStore:
    """``LinkStore`` on Redis; create with ``await RedisLinkStore.open(url_or_backend)``."""

    def __init__(self, backend: RedisBackend, *, namespace: str = "lk", owns: bool = False) -> None:
        self.backend = backend
        self.keys = Keys(namespace)
        self._owns = owns
        self.codec = Codec(b"placeholder-until-open")  # replaced by open()

    @classmethod
    async def open(
        cls,
        target: str | RedisBackend,
        *,
        secret: str | None = None,
        min_length: int = 7,
        namespace: str = "lk",
        call_timeout: float = 2.0,
    ) -> RedisLinkStore:
        """A store on ``target`` (a storage URL, or a backend shared with other users)."""
        if isinstance(target, str):
            store = cls(open_redis(target, timeout=call_timeout), namespace=namespace, owns=True)
        else:
            store = cls(target, namespace=namespace)
        try:
            store.codec = Codec(await store._secret(secret), min_length)
        except BaseException:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        if self._owns:
            await self.backend.close()

    # -- keys and calls -------------------------------------------------------------

    async def _cmd(self, *args: str | int | float, key: str) -> Any:
        return await self.backend.execute(*args, key=key)

    async def _eval(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return await self.backend.evalsha(script.body, script.sha, keys, args)

    async def _secret(self, configured: str | None) -> str:
        key = self.keys.secret
        if configured is None:
            await self._cmd("SET", key, secrets.token_urlsafe(32), "NX", key=key)
            configured = (await self._cmd("GET", key, key=key)).decode()
        assert configured is not None
        fp_key = self.keys.fingerprint
        fingerprint = secret_fingerprint(configured)
        await self._cmd("SET", fp_key, fingerprint, "NX", key=fp_key)
        if (await self._cmd("GET", fp_key, key=fp_key)).decode() != fingerprint:
            raise SecretMismatch(f"Redis (keys {self.keys.ns}:*)")
        return configured

    async def _read(self, code: str) -> tuple[Link, Fields] | None:
        fields = pairs(await self._cmd("HGETALL", self.keys.link(code), key=self.keys.link(code)))
        return (decode_link(code, fields), fields) if "url" in fields else None

    async def _index(self, seq: int, code: str, tags: Iterable[str]) -> None:
        keys = [self.keys.index, *(self.keys.tag(t) for t in tags)]
        await asyncio.gather(*(self._cmd("ZADD", k, "NX", seq, code, key=k) for k in keys))

    async def _insert(self, link: Link, seq: int, dedupe: str | None) -> bool:
        """Index entries first, then the hash if the code is free."""
        await self._index(seq, link.code, link.tags)
        extra = ["seq", str(seq), "dedupe", dedupe or "", "clicks", "0"]
        args = [*link_fields(link), *extra]
        return bool(await self._eval(CREATE, [self.keys.link(link.code)], args))

    # -- links -----------------------------------------------------------------------

    async def create(self, link: Link, *, dedupe_owner: str | None = None) -> tuple[Link, bool]:
        dedupe = dedupe_key(dedupe_owner, link.url) if dedupe_owner else None
        if link.code:
            return await self._create_custom(link, dedupe)
        if dedupe is None:
            return await self._create_generated(link, None), True
        dkey = self.keys.dedupe(dedupe)
        lock, token = dkey + ":lock", secrets.token_hex(8)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LOCK_MS / 1000
        while not await self._cmd("SET", lock, token, "NX", "PX", LOCK_MS, key=lock):
            if loop.time() > deadline:
                break  # the holder died: its lock expires anyway
            await asyncio.sleep(0.01)
        try:
            code = await self._cmd("GET", dkey, key=dkey)
            found = await self._read(code.decode()) if code else None
            if found is not None:
                existing, fields = found
                clicks = int(fields.get("clicks", b"0"))
                if (
                    fields.get("dedupe") == dedupe.encode()
                    and existing.url == link.url
                    and reusable(existing, clicks, link.created_at)
                ):
                    return existing, False
            stored = await self._create_generated(link, dedupe)
            await self._cmd("SET", dkey, stored.code, key=dkey)
            return stored, True
        finally:
            await self._eval(RELEASE, [lock], [token])

    async def _create_custom(self, link: Link, dedupe: str | None) -> tuple[Link, bool]:
        seq = await self._cmd("INCR", self.keys.counter, key=self.keys.counter)
        if not await self._insert(link, seq, dedupe):
            found = await self._read(link.code)
            if found is not None:
                stray = [t for t in link.tags if t not in found[0].tags]
                for t in stray:  # our tag entries point at someone else's link
                    await self._cmd("ZREM", self.keys.tag(t), link.code, key=self.keys.tag(t))
                if dedupe and found[1].get("dedupe") == dedupe.encode():
                    return found[0], False
            raise CodeTaken(link.code)
        if dedupe:
            dkey = self.keys.dedupe(dedupe)
            await self._cmd("SET", dkey, link.code, key=dkey)
        return link, True

    async def _create_generated(self, link: Link, dedupe: str | None) -> Link:
        for _ in range(GENERATED_ATTEMPTS):
            seq = await self._cmd("INCR", self.keys.counter, key=self.keys.counter)
            stored = replace(link, code=self.codec.encode(seq))
            if await self._insert(stored, seq, dedupe):
                return stored
        raise StorageError("generated codes keep colliding with imported ones")

    async def get(self, code: str) -> Link | None:
        if not is_code(code):
            return None
        found = await self._read(code)
        return None if found is None else found[0]

    async def _scan(
        self, key: str, start: str, stop: str, count: int, reverse: bool
    ) -> list[tuple[str, int]]:
        command = "ZREVRANGEBYSCORE" if reverse else "ZRANGEBYSCORE"
        reply = await self._cmd(command, key, start, stop, "WITHSCORES", "LIMIT", 0, count, key=key)
        return [(reply[i].decode(), int(float(reply[i + 1]))) for i in range(0, len(reply), 2)]

    async def list(
        self, cursor: str | None = None, limit: int = 50, tag: str | None = None
    ) -> Page:
        before, limit = parse_cursor(cursor), check_limit(limit)
        key = self.keys.tag(tag) if tag is not None else self.keys.index
        start = f"({before}" if before is not None else "+inf"
        found: list[tuple[int, Link]] = []
        while len(found) <= limit:
            want = limit + 1 - len(found)
            entries = await self._scan(key, start, "-inf", want, reverse=True)
            links = await asyncio.gather(*(self.get(code) for code, _ in entries))
            for (_, seq), link in zip(entries, links, strict=True):
                if link is not None and (tag is None or tag in link.tags):
                    found.append((seq, link))
            if len(entries) < want:
                break
            start = f"({entries[-1][1]}"
        page = found[:limit]
        more = len(found) > limit
        return Page(tuple(link for _, link in page), str(page[-1][0]) if more else None)

    async def patch(self, code: str, changes: Mapping[str, Any]) -> Link | None:
        found = await self._read(code)
        if found is None:
            return None
        old, fields = found
        new = apply_patch(old, changes)
        written = link_fields(new)
        args = [
            x
            for i in range(0, len(written), 2)
            if written[i] in changes
            for x in written[i : i + 2]
        ]
        if args and not await self._eval(PATCH, [self.keys.link(code)], args):
            return None
        if "tags" in changes:
            seq = int(fields["seq"])
            for t in set(old.tags) - set(new.tags):
                await self._cmd("ZREM", self.keys.tag(t), code, key=self.keys.tag(t))
        current = await self._read(code)
        if current is None:
            return None
        if "tags" in changes:  # re-add from what is stored now (a concurrent patch may differ)
            await self._index(seq, code, current[0].tags)
        return current[0]

    async def delete(self, code: str) -> bool:
        found = await self._read(code) if is_code(code) else None
        if found is None:
            return False
        link, fields = found
        key = self.keys.link(code)
        if not await self._cmd("DEL", key, key=key):
            return False
        k = self.keys
        days = [d.decode() for d in await self._cmd("SMEMBERS", k.days(code), key=key)]
        day_keys = [name for d in days for name in (k.day(code, d), k.visitors(code, d))]
        await self._cmd("DEL", k.days(code), *day_keys, key=key)
        removals = [self.keys.index, *(self.keys.tag(t) for t in link.tags)]
        if fields.get("last_click"):  # its leaderboard entries, up to its last click
            last_hour = hour_of(float(fields["last_click"]))
            removals += [self.keys.top(last_hour - i) for i in range(HOURLY_KEEP // 3600 + 1)]
        calls = [self._cmd("ZREM", k, code, key=k) for k in removals]
        if fields.get("dedupe"):
            dkey = self.keys.dedupe(fields["dedupe"].decode())
            calls.append(self._eval(RELEASE, [dkey], [code]))
        await asyncio.gather(*calls)
        return True

    # -- clicks ------------------------------------------------------------------------

    async def take_click(self, code: str, max_clicks: int | None) -> bool:
        cap = "" if max_clicks is None else str(max_clicks)
        return bool(await self._eval(TAKE_CLICK, [self.keys.link(code)], [cap]) == 1)

    async def click_count(self, code: str) -> int:
        value = await self._cmd("HGET", self.keys.link(code), "clicks", key=self.keys.link(code))
        return int(value or 0)

    async def record_click(
        self,
        code: str,
        *,
        at: float,
        referrer_host: str,
        ua_family: str,
        variant: int | None = None,
        visitor: str | None = None,
    ) -> None:
        key, day = self.keys.link(code), day_of(at)
        k = self.keys
        keys = [key, k.day(code, day), k.visitors(code, day), k.days(code)]
        digest = "" if visitor is None else str(visitor_digest(visitor))
        args = [day, repr(at), DAY_TTL, digest, *click_fields(ua_family, variant, referrer_host)]
        if await self._eval(RECORD_CLICK, keys, args):
            await self._eval(TOP_ADD, [self.keys.top(hour_of(at))], [code, HOURLY_KEEP])

    async def record_clicks(self, clicks: Sequence[ClickRecord]) -> None:
        """Concurrent calls: the client pipelines them on its connections."""
        calls: list[Awaitable[Any]] = []
        for c in clicks:
            if c.count:
                calls.append(self.take_click(c.code, None))
            calls.append(
                self.record_click(
                    c.code,
                    at=c.at,
                    referrer_host=c.referrer_host,
                    ua_family=c.ua_family,
                    variant=c.variant,
                    visitor=c.visitor,
                )
            )
        for result in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(result, BaseException):
                raise result

    async def stats(self, code: str, since_day: str, until_day: str) -> LinkStats | None:
        days = stats_days(since_day, until_day)
        key = self.keys.link(code)
        url, clicks, last = await self._cmd("HMGET", key, "url", "clicks", "last_click", key=key)
        if url is None:
            return None
        replies = await asyncio.gather(
            *(self._cmd("HGETALL", self.keys.day(code, d), key=key) for d in days)
        )
        buckets = {
            day: {name: int(value) for name, value in pairs(reply).items()}
            for day, reply in zip(days, replies, strict=True)
        }
        hlls = [self.keys.visitors(code, d) for d in days]
        unique = await self._cmd("PFCOUNT", *hlls, key=key)
        return build_stats(
            code,
            days,
            buckets,
            clicks=int(clicks or 0),
            last_click_at=float(last) if last else None,
            unique_visitors=int(unique),
        )

    async def top(self, window: str, *, now: float, limit: int = 10) -> tuple[TopEntry, ...]:
        buckets = window_buckets(window, now)
        keys = [self.keys.scratch, *(self.keys.top(h) for h, _ in buckets)]
        args = [check_limit(limit, TOP_LIMIT), *(repr(w) for _, w in buckets)]
        reply = await self._eval(TOP, keys, args)
        entries = [
            TopEntry(reply[i].decode(), round(float(reply[i + 1]))) for i in range(0, len(reply), 2)
        ]
        return tuple(
            sorted((e for e in entries if e.clicks > 0), key=lambda e: (-e.clicks, e.code))
        )

    # -- export / import -----------------------------------------------------------------

    async def export(self) -> AsyncIterator[Link]:
        start = "-inf"
        while entries := await self._scan(self.keys.index, start, "+inf", _BATCH, reverse=False):
            for link in await asyncio.gather(*(self.get(code) for code, _ in entries)):
                if link is not None:
                    yield link
            start = f"({entries[-1][1]}"

    async def import_links(self, links: Iterable[Link] | AsyncIterable[Link]) -> ImportResult:
        imported, skipped = 0, Strings()
        counter = self.keys.counter
        async for batch in import_batches(links, _BATCH):
            last = await self._cmd("INCRBY", counter, len(batch), key=counter)
            first = last - len(batch) + 1
            results = await asyncio.gather(
                *(self._insert(link, first + i, None) for i, link in enumerate(batch))
            )
            for link, ok in zip(batch, results, strict=True):
                imported += ok
                if not ok:
                    skipped.append(link.code)
            floor = counter_floor(self.codec, (link.code for link in batch))
            await self._eval(SET_FLOOR, [counter], [floor])
        return ImportResult(imported, tuple(skipped))
