"""Pure tests of the link model (JSON, resolve, A/B, Cache-Control), analytics helpers, cache."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from typing import Any

import pytest

from proxy.links.analytics import (
    DIRECT,
    MAX_STATS_DAYS,
    UNKNOWN_REFERRER,
    day_of,
    day_range,
    hour_of,
    referrer_host,
    ua_family,
    window_buckets,
)
from proxy.links.cache import MISSING, LinkCache
from proxy.links.errors import LinkError
from proxy.links.model import (
    PERMANENT_MAX_AGE,
    Expired,
    Link,
    Live,
    OverCap,
    Variant,
    apply_patch,
    cache_control,
    choose_variant,
    link_from_json,
    link_to_json,
    resolve,
)

NOW = 1_700_000_000.0
AB = Link(
    "spring-sale",
    "https://a.example/",
    NOW,
    variants=(
        Variant("https://a.example/", 1),
        Variant("https://b.example/", 2),
        Variant("https://c.example/", 3),
        Variant("https://d.example/", 4),
    ),
)


def test_json_round_trip() -> None:
    link = replace(
        AB,
        created_by="alice",
        expires_at=NOW + 0.123456789,
        max_clicks=5,
        status=301,
        tags=("a", "b"),
    )
    text = json.dumps(link_to_json(link))
    assert link_from_json(json.loads(text)) == link
    plain = Link("abcdefg", "https://x.example/", NOW)
    assert link_from_json(link_to_json(plain)) == plain


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"clicks": 3}, "unknown link field(s): clicks"),
        ({"code": "a"}, "code must match"),
        ({"code": None}, "code must match"),
        ({"url": ""}, "url must be a non-empty string"),
        ({"created_at": "yesterday"}, "created_at must be a number"),
        ({"expires_at": float("nan")}, "expires_at must be a number"),
        ({"max_clicks": 0}, "max_clicks must be a positive integer"),
        ({"status": 200}, "status must be 301, 302, 307, 308 or null"),
        ({"tags": "a"}, "tags must be a list of strings"),
        ({"variants": [{"url": "https://a/"}]}, "variants[0].weight must be a positive integer"),
        ({"created_by": 5}, "created_by must be a string"),
    ],
)
def test_json_refusals(change: dict[str, Any], reason: str) -> None:
    obj = {**link_to_json(AB), **change}
    with pytest.raises(LinkError) as info:
        link_from_json(obj)
    assert reason in info.value.reason
    with pytest.raises(LinkError, match="JSON object"):
        link_from_json([])


def test_apply_patch() -> None:
    assert apply_patch(AB, {"max_clicks": 3}).max_clicks == 3
    with pytest.raises(LinkError, match="cannot be changed: code"):
        apply_patch(AB, {"code": "other"})


def test_resolve() -> None:
    link = Link("abc", "https://a.example/", NOW, expires_at=NOW + 60, max_clicks=2)
    assert resolve(link, NOW, 0) == Live(link)
    assert resolve(link, NOW, 1) == Live(link)
    assert resolve(link, NOW, 2) == OverCap(link)
    assert resolve(link, NOW + 60, 0) == Expired(link)  # expiry is exclusive
    assert resolve(link, NOW + 61, 5) == Expired(link)  # expiry wins over the cap
    assert resolve(Link("abc", "https://a.example/", NOW), NOW + 1e9, 10**9) == Live(
        Link("abc", "https://a.example/", NOW)
    )


def test_variant_weights_are_respected() -> None:
    rng = random.Random(1234)
    draws = 100_000
    counts = [0] * 4
    for _ in range(draws):
        choice = choose_variant(AB, None, rng)
        assert choice is not None
        counts[choice[0]] += 1
    total = sum(v.weight for v in AB.variants)
    expected = [draws * v.weight / total for v in AB.variants]
    chi2 = sum((c - e) ** 2 / e for c, e in zip(counts, expected, strict=True))
    assert chi2 < 16.27, f"chi-square {chi2:.1f} (3 dof, p=0.001) for {counts}"


def test_sticky_cookie_keeps_a_live_variant() -> None:
    rng = random.Random(5)
    for index, variant in enumerate(AB.variants):
        assert all(choose_variant(AB, variant.key, rng) == (index, variant) for _ in range(50))
    # The cookie survives reordering; a variant whose URL changed is drawn afresh.
    reordered = replace(AB, variants=AB.variants[::-1])
    assert choose_variant(reordered, AB.variants[0].key, rng) == (3, AB.variants[0])
    stale = AB.variants[1].key
    changed = replace(AB, variants=(AB.variants[0], Variant("https://new.example/", 1000)))
    picks = {choose_variant(changed, stale, random.Random(i)) for i in range(20)}
    assert (1, Variant("https://new.example/", 1000)) in picks
    assert choose_variant(Link("abc", "https://a.example/", NOW), "x", rng) is None


@pytest.mark.parametrize(
    ("status", "changes", "expected"),
    [
        (302, {}, "private, max-age=0"),
        (307, {"expires_at": NOW + 100}, "private, max-age=0"),
        (301, {}, f"public, max-age={PERMANENT_MAX_AGE}"),
        (308, {}, f"public, max-age={PERMANENT_MAX_AGE}"),
        (301, {"expires_at": NOW + 100.9}, "public, max-age=100"),
        (308, {"expires_at": NOW + 10 * 86400}, f"public, max-age={PERMANENT_MAX_AGE}"),
        (301, {"expires_at": NOW + 0.5}, "no-store"),
        (301, {"max_clicks": 10}, "no-store"),
        (308, {"variants": AB.variants}, "no-store"),
    ],
)
def test_cache_control(status: int, changes: dict[str, Any], expected: str) -> None:
    link = replace(Link("abc", "https://a.example/", NOW), **changes)
    assert cache_control(link, status, NOW) == expected


@pytest.mark.parametrize(
    ("agent", "family"),
    [
        (
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
            "Chrome/124.0 Safari/537.36",
            "browser",
        ),
        ("Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0", "browser"),
        ("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)", "bot"),
        ("Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)", "bot"),
        ("facebookexternalhit/1.1", "bot"),
        ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 HeadlessChrome/120.0", "bot"),
        ("curl/8.5.0", "cli"),
        ("Wget/1.21", "cli"),
        ("python-requests/2.31", "cli"),
        ("Go-http-client/1.1", "cli"),
        ("", "other"),
        (None, "other"),
        ("SomethingElse/1.0", "other"),
    ],
)
def test_ua_family(agent: str | None, family: str) -> None:
    assert ua_family(agent) == family


@pytest.mark.parametrize(
    ("referer", "host"),
    [
        ("https://News.Example.com:8443/a?b", "news.example.com"),
        ("android-app://com.example.app/", "com.example.app"),
        ("http://[2001:db8::1]/", "[2001:db8::1]"),
        (None, DIRECT),
        ("  ", DIRECT),
        ("not a url", UNKNOWN_REFERRER),
        ("https://", UNKNOWN_REFERRER),
        ("https://bad host\u00e9/", UNKNOWN_REFERRER),
        ("http://[::1", UNKNOWN_REFERRER),
    ],
)
def test_referrer_host(referer: str | None, host: str) -> None:
    assert referrer_host(referer) == host


def test_time_buckets() -> None:
    assert day_of(0) == "1970-01-01" and hour_of(7199.9) == 1
    assert day_range("2024-02-28", "2024-03-01") == ["2024-02-28", "2024-02-29", "2024-03-01"]
    with pytest.raises(ValueError, match="after"):
        day_range("2024-03-02", "2024-03-01")
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        day_range("yesterday", "2024-03-01")
    with pytest.raises(ValueError, match=f"at most {MAX_STATS_DAYS}"):
        day_range("2020-01-01", "2024-01-01")
    half_past = 3600 * 100 + 1800
    assert window_buckets("hour", half_past) == [(100, 1.0), (99, 0.5)]
    day = window_buckets("day", half_past)
    assert len(day) == 25 and day[0] == (100, 1.0) and day[-1] == (76, 0.5)
    assert window_buckets("hour", 3600 * 100) == [(100, 1.0), (99, 1.0)]
    with pytest.raises(ValueError, match="window"):
        window_buckets("week", 0)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_cache_lru_ttl_and_invalidation() -> None:
    clock = Clock()
    cache: LinkCache[str] = LinkCache(size=2, ttl=5, clock=clock)
    assert cache.get("a") is MISSING
    cache.put("a", "A")
    cache.put("b", None)  # a remembered miss
    assert cache.get("b") is None and cache.get("a") == "A"  # a is now the most recent
    cache.put("c", "C")  # evicts the least recently used: b
    assert cache.get("b") is MISSING and len(cache) == 2
    cache.invalidate("a")
    assert cache.get("a") is MISSING
    clock.now = 4.9
    assert cache.get("c") == "C"
    clock.now = 5.0
    assert cache.get("c") is MISSING and len(cache) == 0
    off: LinkCache[str] = LinkCache(size=0, ttl=5, clock=clock)
    off.put("a", "A")
    assert off.get("a") is MISSING
    with pytest.raises(ValueError):
        LinkCache(size=-1, ttl=1)
