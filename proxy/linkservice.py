"""Short links in one worker: the store, the hot-link cache, the click recorder, the miss guard.

Opened by ``Runtime.start`` when rules.yaml has a ``redirects:`` section,
closed by ``Runtime.close`` after both listeners have drained. A store that
cannot be reached at start (Redis down) is retried in the background with
backoff; meanwhile redirects and the links API answer ``503`` and ``/readyz``
says so. A changed ``code_secret`` (``SecretMismatch``) stops the start.

Hot-link cache: code → link (or "no such link") for ``cache_ttl`` seconds, at
most ``cache_size`` entries, per worker. A PATCH or DELETE through this
worker's admin API invalidates its entry at once; other workers and instances
see the change when their entry expires, so ``cache_ttl`` bounds staleness.
What the cache may skip: a cached link WITHOUT a click cap (and not expired)
is answered with no store call at all (its click is counted later by the
recorder). A capped link always costs exactly one atomic ``take_click``, so
the cap stays exact whatever the cache holds; a link found over its cap is
remembered (same TTL) so that hammering an exhausted link costs nothing.

Visitors are ``HMAC-SHA256(key, client IP + User-Agent)``; the key is derived
from the store's code secret (the codes of 16 counters far beyond any
reachable one), so every worker and instance sharing a store agrees on it
and no stored or emitted value can be turned back into an address without it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from proxy.clicks import Click, ClickRecorder
from proxy.config import RedirectsConfig, StorageConfig
from proxy.errors import StorageError
from proxy.links.cache import MISSING, LinkCache
from proxy.links.codes import Codec
from proxy.links.model import Link
from proxy.links.store import LinkStore, SecretMismatch
from proxy.metrics import Children, Metrics
from proxy.missguard import MissGuard
from proxy.storage.factory import link_store_location, open_link_store

log = logging.getLogger("sluice.links")
T = TypeVar("T")
VISITOR_PROBE = 2**59  # counters this high are never handed out (that is 5.7e17 links)
RETRY_FIRST, RETRY_MAX = 0.5, 30.0
CLOSE_DRAIN = 2.0


def visitor_key(codec: Codec) -> bytes:
    """The key of visitor hashes, derived from the code secret behind ``codec``."""
    probes = codec.encode_many([VISITOR_PROBE + i for i in range(16)])
    return hashlib.sha256(("sluice.visitor.v1|" + "|".join(probes)).encode()).digest()


def _guard(cfg: RedirectsConfig) -> MissGuard | None:
    return MissGuard(cfg.miss_limit.limit, cfg.miss_limit.window) if cfg.miss_limit else None


class LinkService:
    def __init__(
        self,
        storage: StorageConfig,
        redirects: RedirectsConfig,
        metrics: Metrics,
        opener: Callable[[], Awaitable[LinkStore]] | None = None,
    ) -> None:
        self.storage = storage
        self.location = link_store_location(storage)
        self.settings = redirects.links
        self.metrics = metrics
        self.store: LinkStore | None = None
        self.last_error: str | None = None
        self.cache: LinkCache[Link] = LinkCache(
            redirects.links.cache_size, redirects.links.cache_ttl
        )
        self.exhausted: LinkCache[bool] = LinkCache(
            redirects.links.cache_size, redirects.links.cache_ttl
        )
        self.guard = _guard(redirects)
        self.rng = random.Random()
        self.calls: Counter[str] = Counter()  # store calls by op (tests assert the path's cost)
        self._visitor_key = b""
        self._opener = opener or (lambda: open_link_store(storage, redirects.links))
        self._retry: asyncio.Task[None] | None = None
        self._latency = Children(metrics.link_store_latency)
        self._cache_hit = metrics.link_cache.labels("hit")
        self._cache_miss = metrics.link_cache.labels("miss")
        self._redirects = redirects
        self.recorder = ClickRecorder(
            lambda: self.store,
            redirects.analytics_queue,
            self.timed,
            metrics.link_analytics_dropped,
        )

    # -- lifecycle -------------------------------------------------------------------

    @property
    def state(self) -> str:
        return "ok" if self.store is not None else "unavailable"

    async def start(self) -> None:
        """Open the store; on ``StorageError`` keep trying in the background."""
        self.recorder.start()
        try:
            await self._open()
        except StorageError as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning(
                "link store %s unavailable (%s); redirects answer 503 until it opens",
                self.location,
                self.last_error,
            )
            self._retry = asyncio.get_running_loop().create_task(self._keep_opening())

    async def _open(self) -> None:
        store = await self._opener()
        self._visitor_key = visitor_key(store.codec)
        self.store = store
        self.last_error = None
        log.info("link store %s open", self.location)

    async def _keep_opening(self) -> None:
        delay = RETRY_FIRST
        while self.store is None:
            await asyncio.sleep(delay)
            try:
                await self._open()
            except StorageError as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                delay = min(delay * 2, RETRY_MAX)
            except SecretMismatch as exc:
                self.last_error = str(exc)
                log.error("link store %s: %s", self.location, exc)
                return

    def configure(self, redirects: RedirectsConfig) -> None:
        """Apply a reloaded ``redirects:`` (cache and miss guard; the store stays)."""
        old = self._redirects
        self._redirects = redirects
        if (redirects.links.cache_size, redirects.links.cache_ttl) != (
            old.links.cache_size,
            old.links.cache_ttl,
        ):
            self.cache = LinkCache(redirects.links.cache_size, redirects.links.cache_ttl)
            self.exhausted = LinkCache(redirects.links.cache_size, redirects.links.cache_ttl)
        if redirects.miss_limit != old.miss_limit:
            self.guard = _guard(redirects)
        if (redirects.links.code_secret, redirects.links.min_length) != (
            old.links.code_secret,
            old.links.min_length,
        ):
            log.warning("redirects.code_secret / min_length change only on restart")

    async def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            await asyncio.gather(self._retry, return_exceptions=True)
        await self.recorder.close(CLOSE_DRAIN)
        if self.store is not None:
            store, self.store = self.store, None
            await store.close()

    # -- calls -----------------------------------------------------------------------

    def require(self) -> LinkStore:
        if self.store is None:
            raise StorageError(f"the link store {self.location} is not available")
        return self.store

    async def timed(self, op: str, call: Awaitable[T]) -> T:
        """Await one store call, counted and timed under ``op``."""
        self.calls[op] += 1
        started = time.perf_counter()
        try:
            return await call
        finally:
            self._latency(op).observe(time.perf_counter() - started)

    async def lookup(self, code: str) -> Link | None:
        """The link of ``code`` from the cache, else one store read (then cached)."""
        cached = self.cache.get(code)
        if cached is not MISSING:
            self._cache_hit.inc()
            return cached  # type: ignore[return-value]
        self._cache_miss.inc()
        store = self.require()
        link = await self.timed("get", store.get(code))
        self.cache.put(code, link)
        return link

    async def take_click(self, link: Link) -> bool:
        """Count one click of a capped link unless over its cap (one atomic store call)."""
        if self.exhausted.get(link.code) is True:
            return False
        ok = await self.timed("take_click", self.require().take_click(link.code, link.max_clicks))
        if not ok:
            self.exhausted.put(link.code, True)
        return ok

    async def clicks(self, code: str) -> int:
        return await self.timed("click_count", self.require().click_count(code))

    def forget(self, code: str) -> None:
        """Drop what this worker caches about ``code`` (after a create, patch or delete)."""
        self.cache.invalidate(code)
        self.exhausted.invalidate(code)

    def visitor(self, ip: str, user_agent: str) -> str:
        """The keyed hash standing for a client (IP and User-Agent) in analytics and events."""
        message = f"{ip}\x00{user_agent}".encode()
        return hmac.new(self._visitor_key, message, "sha256").hexdigest()[:32]

    def record(self, click: Click) -> bool:
        return self.recorder.offer(click)

    def describe(self) -> dict[str, Any]:
        """For ``/readyz``."""
        return {
            "store": self.location,
            "state": self.state,
            "last_error": self.last_error,
            "cached_links": len(self.cache),
            "analytics_queue": self.recorder.queue.qsize(),
        }
