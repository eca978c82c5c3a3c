"""The link store interface, shared by the SQLite and Redis stores, and their common pure parts.

Both stores behave the same:

- Creation with ``Link.code == ""`` takes the next value of the store's
  counter and encodes it (``codes.Codec``); a custom code that exists raises
  ``CodeTaken``. With ``dedupe_owner``, a generated-code create returns the
  newest live link (not expired, not over its cap) that the same owner created
  for the same normalised URL; a custom-code create is idempotent for the same
  owner and URL (returns the existing link) and ``CodeTaken`` otherwise.
- ``list`` pages newest first; the cursor is an opaque string (the creation
  sequence number of the last link returned), stable under concurrent creates.
- The click counter is apart from the link: ``take_click`` increments it
  atomically only while under ``max_clicks``; ``record_click`` only feeds the
  analytics (per UTC day: total, UA family, variant, referrer host, unique
  visitors; per hour: the leaderboard). The redirect path calls both.
- Per-day analytics are kept ``MAX_STATS_DAYS``; hourly buckets 26 hours.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.links.analytics import UA_FAMILIES, day_range
from proxy.links.codes import Codec
from proxy.links.errors import LinkError
from proxy.links.model import Link, Live, resolve

MAX_PAGE = 1000
TOP_REFERRERS = 10
TOP_LIMIT = 100
GENERATED_ATTEMPTS = 8  # a generated code is taken only after importing foreign codes
IMPORT_COUNTER_CEILING = 2**32  # see counter_floor()
HOURLY_KEEP = 26 * 3600


@dataclass(frozen=True, slots=True)
class Page:
    links: tuple[Link, ...]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class LinkStats:
    """Clicks of one link between two UTC days (inclusive).

    ``clicks`` is the lifetime counter (what the cap counts); the rest covers
    the range. ``unique_visitors`` is exact on SQLite and a HyperLogLog
    estimate (about 0.8 % standard error) on Redis.
    """

    code: str
    since_day: str
    until_day: str
    clicks: int
    total: int
    per_day: dict[str, int]
    referrers: tuple[tuple[str, int], ...]
    ua_families: dict[str, int]
    variants: dict[int, int]
    last_click_at: float | None
    unique_visitors: int


@dataclass(frozen=True, slots=True)
class TopEntry:
    code: str
    clicks: int  # estimated clicks in the window (see analytics.window_buckets)


@dataclass(frozen=True, slots=True)
class ImportResult:
    imported: int
    skipped: tuple[str, ...]  # codes that already existed (left untouched)


@dataclass(frozen=True, slots=True)
class ClickRecord:
    """One click for the analytics, as the redirect handler saw it."""

    code: str
    at: float  # Unix time
    referrer_host: str
    ua_family: str
    variant: int | None
    visitor: str | None  # keyed hash of the client identity, never the address itself
    count: bool = False  # also add it to the lifetime counter (uncapped links only)


class LinkStore(Protocol):
    """Where links, their click counters and their analytics live.

    Every method may raise ``proxy.errors.StorageError`` when the backend fails.
    """

    codec: Codec

    async def create(self, link: Link, *, dedupe_owner: str | None = None) -> tuple[Link, bool]:
        """Store ``link`` (``code == ""``: generate one); (stored link, created?).
        Raises ``CodeTaken`` for a custom code in use."""
        ...

    async def get(self, code: str) -> Link | None: ...

    async def list(
        self, cursor: str | None = None, limit: int = 50, tag: str | None = None
    ) -> Page:
        """Links newest first, ``limit`` at a time, optionally only those tagged ``tag``."""
        ...

    async def patch(self, code: str, changes: Mapping[str, Any]) -> Link | None:
        """Apply validated ``changes`` (keys from ``model.PATCHABLE``); None if absent."""
        ...

    async def delete(self, code: str) -> bool:
        """Remove the link, its counter and its analytics; False if it did not exist."""
        ...

    async def take_click(self, code: str, max_clicks: int | None) -> bool:
        """Count one click unless that would exceed ``max_clicks`` (atomic); False
        when over the cap or when the link does not exist."""
        ...

    async def click_count(self, code: str) -> int: ...

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
        """Add one click at Unix time ``at`` to the analytics (not to the counter)."""
        ...

    async def record_clicks(self, clicks: Sequence[ClickRecord]) -> None:
        """Record many clicks at once (the analytics task's batches): each one's
        analytics, and its lifetime counter where ``count`` says so. One transaction
        on SQLite; concurrent, pipelined calls on Redis."""
        ...

    async def stats(self, code: str, since_day: str, until_day: str) -> LinkStats | None: ...

    async def top(self, window: str, *, now: float, limit: int = 10) -> tuple[TopEntry, ...]:
        """The most clicked links in the last ``hour`` or ``day`` before ``now``."""
        ...

    def export(self) -> AsyncIterator[Link]:
        """Every link, oldest first (so an import keeps the listing order)."""
        ...

    async def import_links(self, links: Iterable[Link] | AsyncIterable[Link]) -> ImportResult:
        """Insert links as they are (codes, times); existing codes are skipped.
        Callers re-validate foreign files with ``validate.check_link`` first."""
        ...

    async def close(self) -> None: ...


# -- shared pure helpers ---------------------------------------------------------


def dedupe_key(owner: str, url: str) -> str:
    return hashlib.sha256(f"{owner}\x00{url}".encode()).hexdigest()


def reusable(link: Link, clicks: int, now: float) -> bool:
    """Whether a dedupe hit may be returned instead of creating a new link."""
    return isinstance(resolve(link, now, clicks), Live)


def parse_cursor(cursor: str | None) -> int | None:
    if cursor is None or cursor == "":
        return None
    if not cursor.isdigit() or len(cursor) > 19:
        raise LinkError(400, f"invalid cursor {cursor!r}")
    return int(cursor)


def stats_days(since_day: str, until_day: str) -> list[str]:
    try:
        return day_range(since_day, until_day)
    except ValueError as exc:
        raise LinkError(400, str(exc)) from None


def check_limit(limit: int, maximum: int = MAX_PAGE) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= maximum:
        raise LinkError(400, f"limit must be 1 to {maximum}, got {limit!r}")
    return limit


def counter_floor(codec: Codec, codes: Iterable[str]) -> int:
    """The counter value an import must raise the store's counter to.

    An imported code of the generated form that decodes, under this store's
    secret, to a counter below ``IMPORT_COUNTER_CEILING`` was (almost surely)
    generated with this secret: new codes must start after it. Codes from
    another secret decode to random counters, mostly above the ceiling; the
    rare one that collides later is skipped at creation (``GENERATED_ATTEMPTS``).
    """
    floor = 0
    for code in codes:
        counter = codec.decode(code)
        if counter is not None and counter < IMPORT_COUNTER_CEILING:
            floor = max(floor, counter)
    return floor


def secret_fingerprint(secret: str) -> str:
    """What a store records to notice a changed ``code_secret`` (not the secret)."""
    return hmac.new(secret.encode(), b"sluice.links.fingerprint", "sha256").hexdigest()[:16]


class SecretMismatch(Exception):
    """The configured code secret differs from the one the store's codes came from."""

    def __init__(self, where: str) -> None:
        super().__init__(
            f"redirects.code_secret differs from the secret the links in {where} were "
            "generated with: new codes could collide with existing ones. Restore the old "
            "secret, or export the links and import them into an empty store."
        )


def build_stats(
    code: str,
    days: list[str],
    buckets: Mapping[str, Mapping[str, int]],
    *,
    clicks: int,
    last_click_at: float | None,
    unique_visitors: int,
) -> LinkStats:
    """``LinkStats`` from per-day counters named as both stores name them:
    ``n`` (total), ``u:<ua family>``, ``v:<variant index>``, ``r:<referrer host>``."""
    per_day = {day: 0 for day in days}
    families = dict.fromkeys(UA_FAMILIES, 0)
    variants: dict[int, int] = {}
    referrers: dict[str, int] = {}
    for day, counters in buckets.items():
        for name, count in counters.items():
            kind, _, value = name.partition(":")
            if kind == "n":
                per_day[day] = per_day.get(day, 0) + count
            elif kind == "u":
                families[value] = families.get(value, 0) + count
            elif kind == "v" and value.isdigit():
                variants[int(value)] = variants.get(int(value), 0) + count
            elif kind == "r":
                referrers[value] = referrers.get(value, 0) + count
    top = sorted(referrers.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_REFERRERS]
    return LinkStats(
        code=code,
        since_day=days[0],
        until_day=days[-1],
        clicks=clicks,
        total=sum(per_day.values()),
        per_day=per_day,
        referrers=tuple(top),
        ua_families=families,
        variants=dict(sorted(variants.items())),
        last_click_at=last_click_at,
        unique_visitors=unique_visitors,
    )


def click_fields(ua_family: str, variant: int | None, referrer_host: str) -> list[str]:
    """The per-day counter names one click increments (besides ``n``)."""
    names = [f"u:{ua_family if ua_family in UA_FAMILIES else 'other'}", f"r:{referrer_host}"]
    if variant is not None:
        names.append(f"v:{variant}")
    return names


async def import_batches(
    links: Iterable[Link] | AsyncIterable[Link], size: int
) -> AsyncIterator[list[Link]]:
    """The links of an import in batches of at most ``size``; a link without a code
    is refused (``ValueError``) before its batch is handed out."""
    batch: list[Link] = []
    async for link in iterate(links):
        if not link.code:
            raise ValueError("an imported link must have a code")
        batch.append(link)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


async def iterate(links: Iterable[Link] | AsyncIterable[Link]) -> AsyncIterator[Link]:
    """Iterate a sync or async iterable of links asynchronously (for ``import_links``)."""
    if isinstance(links, AsyncIterable):
        async for link in links:
            yield link
    else:
        for link in links:
            yield link
