"""Pure helpers for click analytics: user-agent family, referrer host, time buckets.

Both stores bucket clicks by UTC day (``YYYY-MM-DD``) for ``stats`` and by
hour (Unix hour number) for the ``top`` leaderboard, using the functions here,
so they agree to the bucket.
"""

from __future__ import annotations

import hashlib
import re
import time
from datetime import date, timedelta
from urllib.parse import urlsplit

UA_FAMILIES = ("browser", "bot", "cli", "other")
DIRECT = "(direct)"  # no Referer header
UNKNOWN_REFERRER = "(invalid)"  # a Referer without a usable host
TOP_WINDOWS = {"hour": 3600, "day": 86400}
MAX_STATS_DAYS = 400  # also how long per-day analytics are kept

_BOT = re.compile(
    r"bot\b|bot/|crawl|spider|slurp|facebookexternalhit|facebookcatalog|preview|fetcher|"
    r"scanner|monitor|headless|lighthouse|pingdom|whatsapp|embedly|validator|archiver|"
    r"google-inspectiontool|bingpreview|mediapartners|adsbot|feedfetcher|python-scrapy",
    re.IGNORECASE,
)
_CLI = re.compile(
    r"^(?:curl|wget|httpie|xh|python-requests|python-urllib|python-httpx|aiohttp|"
    r"go-http-client|okhttp|java|apache-httpclient|libwww-perl|lwp|powershell|axios|"
    r"node-fetch|undici|node|got|ruby|faraday|guzzlehttp|rest-client|postmanruntime|"
    r"insomnia|dart|reqwest|hyper|ureq|http\.rb)\b",
    re.IGNORECASE,
)
_BROWSER = re.compile(r"^(?:Mozilla|Opera)/\d.*(?:AppleWebKit|Gecko|Trident|Presto)", re.I)
_HOST = re.compile(r"[a-z0-9._-]{1,253}|\[[0-9a-f:.]{2,45}\]")


def ua_family(user_agent: str | None) -> str:
    """``browser``, ``bot`` (crawlers, link unfurlers, monitors, headless),
    ``cli`` (command-line tools and HTTP libraries) or ``other``."""
    if not user_agent:
        return "other"
    if _BOT.search(user_agent):
        return "bot"
    if _CLI.match(user_agent.strip()):
        return "cli"
    if _BROWSER.match(user_agent.strip()):
        return "browser"
    return "other"


def referrer_host(referer: str | None) -> str:
    """The lower-cased host of a ``Referer`` header, ``(direct)`` without one,
    ``(invalid)`` when it has no usable host (bounded vocabulary for storage)."""
    if not referer or not referer.strip():
        return DIRECT
    try:
        host = urlsplit(referer.strip()).hostname
    except ValueError:
        return UNKNOWN_REFERRER
    if not host:
        return UNKNOWN_REFERRER
    host = host.rstrip(".")
    if ":" in host:
        host = f"[{host}]"
    return host if _HOST.fullmatch(host) else UNKNOWN_REFERRER


def day_of(at: float) -> str:
    """The UTC day of Unix time ``at``, as ``YYYY-MM-DD``."""
    return time.strftime("%Y-%m-%d", time.gmtime(at))


def hour_of(at: float) -> int:
    """The Unix hour number of ``at`` (``at // 3600``), the leaderboard bucket."""
    return int(at // 3600)


def day_range(since_day: str, until_day: str) -> list[str]:
    """Every UTC day from ``since_day`` to ``until_day`` inclusive (``YYYY-MM-DD``).

    ValueError for a malformed day, a reversed range, or more than ``MAX_STATS_DAYS``.
    """
    try:
        start, end = date.fromisoformat(since_day), date.fromisoformat(until_day)
    except ValueError:
        raise ValueError(f"days must be YYYY-MM-DD, got {since_day!r} and {until_day!r}") from None
    count = (end - start).days + 1
    if count < 1:
        raise ValueError(f"{since_day} is after {until_day}")
    if count > MAX_STATS_DAYS:
        raise ValueError(f"at most {MAX_STATS_DAYS} days at a time, asked for {count}")
    return [(start + timedelta(days=i)).isoformat() for i in range(count)]


def window_buckets(window: str, now: float) -> list[tuple[int, float]]:
    """The hour buckets estimating clicks in the last ``window`` (``hour`` or ``day``)
    at ``now``, as (hour number, weight).

    The current (partial) hour and the whole hours before it inside the window
    count fully; the oldest bucket, which the window only partly covers, is
    weighted by the part covered (the sliding-window-counter estimate, assuming
    its clicks were spread evenly).
    """
    if window not in TOP_WINDOWS:
        raise ValueError(f"window must be one of {', '.join(TOP_WINDOWS)}, got {window!r}")
    hours = TOP_WINDOWS[window] // 3600
    current = hour_of(now)
    elapsed = (now - current * 3600) / 3600
    buckets = [(current - i, 1.0) for i in range(hours)]
    if elapsed < 1.0:
        buckets.append((current - hours, 1.0 - elapsed))
    return buckets


def visitor_digest(visitor: str) -> int:
    """A signed 64-bit digest of a visitor identity (what the SQLite store keeps).

    Callers should already pass a keyed hash (of a cookie, or of IP and UA),
    never a raw address; this only makes the stored value fixed-size.
    """
    digest = hashlib.blake2b(visitor.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)
