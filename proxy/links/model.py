"""The link model and the pure decisions taken when a short code is followed.

A ``Link`` is immutable; its click counter lives apart in the store (so the
hot path never rewrites the link). ``resolve`` says whether a link may still be
followed, ``choose_variant`` picks an A/B destination, ``cache_control`` says
how long a browser or CDN may keep the redirect. JSON (de)serialisation here is
the one used by the API and by export/import (one object per line).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from proxy.links.codes import is_code
from proxy.links.errors import LinkError

REDIRECT_STATUSES = (301, 302, 307, 308)
PERMANENT = (301, 308)
# max-age of a permanent redirect without expiry: long enough for browsers and
# CDNs to save round trips, short enough that a patched or deleted link heals
# within a day (a 301/308 without Cache-Control is kept by browsers indefinitely).
PERMANENT_MAX_AGE = 86400
NOT_CACHED = "private, max-age=0"
NO_STORE = "no-store"


@dataclass(frozen=True, slots=True)
class Variant:
    """One A/B destination: a validated URL and a positive integer weight."""

    url: str
    weight: int

    @property
    def key(self) -> str:
        """Stable name of this variant for a sticky cookie: survives reordering,
        changes when the URL changes (then the visitor is assigned afresh)."""
        return hashlib.sha256(self.url.encode()).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class Link:
    """A short link. ``code`` is ``""`` on a link about to be created with a
    generated code. ``status`` None means the configured default. With
    ``variants``, the redirect goes to a chosen variant; ``url`` stays the
    canonical destination (listings, dedupe)."""

    code: str
    url: str
    created_at: float
    created_by: str | None = None
    expires_at: float | None = None
    max_clicks: int | None = None
    status: int | None = None
    tags: tuple[str, ...] = ()
    variants: tuple[Variant, ...] = ()


PATCHABLE = frozenset({"url", "expires_at", "max_clicks", "status", "tags", "variants"})
_FIELDS = tuple(f.name for f in fields(Link))


def link_to_json(link: Link) -> dict[str, Any]:
    """The JSON object of ``link`` (times are Unix seconds, so they round-trip exactly)."""
    return {
        "code": link.code,
        "url": link.url,
        "created_at": link.created_at,
        "created_by": link.created_by,
        "expires_at": link.expires_at,
        "max_clicks": link.max_clicks,
        "status": link.status,
        "tags": list(link.tags),
        "variants": [{"url": v.url, "weight": v.weight} for v in link.variants],
    }


def _number(obj: Mapping[str, Any], key: str, optional: bool) -> float | None:
    value = obj.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise LinkError(400, f"{key} must be a number of seconds since the epoch")
    return float(value)


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LinkError(400, f"{what} must be a positive integer, got {value!r}")
    return value


def _optional_str(obj: Mapping[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise LinkError(400, f"{key} must be a string")
    return value


def link_from_json(obj: Any) -> Link:
    """A ``Link`` from its JSON object; checks shapes and types (not the URL policy:
    see ``validate.check_link``). Raises ``LinkError(400)``."""
    if not isinstance(obj, Mapping):
        raise LinkError(400, "a link must be a JSON object")
    unknown = sorted(set(obj) - set(_FIELDS))
    if unknown:
        raise LinkError(400, f"unknown link field(s): {', '.join(unknown)}")
    code, url = obj.get("code"), obj.get("url")
    if not isinstance(code, str) or not is_code(code):
        raise LinkError(400, f"code must match [A-Za-z0-9_-]{{3,64}}, got {code!r}")
    if not isinstance(url, str) or not url:
        raise LinkError(400, "url must be a non-empty string")
    max_clicks = obj.get("max_clicks")
    status = obj.get("status")
    if status is not None and status not in REDIRECT_STATUSES:
        raise LinkError(400, f"status must be 301, 302, 307, 308 or null, got {status!r}")
    tags = obj.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise LinkError(400, "tags must be a list of strings")
    raw_variants = obj.get("variants") or []
    if not isinstance(raw_variants, list):
        raise LinkError(400, "variants must be a list")
    variants = []
    for i, item in enumerate(raw_variants):
        if not isinstance(item, Mapping) or not isinstance(item.get("url"), str):
            raise LinkError(400, f"variants[{i}] must be an object with a url and a weight")
        variants.append(
            Variant(item["url"], _positive_int(item.get("weight"), f"variants[{i}].weight"))
        )
    created_at = _number(obj, "created_at", optional=False)
    assert created_at is not None
    return Link(
        code=code,
        url=url,
        created_at=created_at,
        created_by=_optional_str(obj, "created_by"),
        expires_at=_number(obj, "expires_at", optional=True),
        max_clicks=None if max_clicks is None else _positive_int(max_clicks, "max_clicks"),
        status=None if status is None else int(status),
        tags=tuple(tags),
        variants=tuple(variants),
    )


def apply_patch(link: Link, changes: Mapping[str, Any]) -> Link:
    """``link`` with ``changes`` (already validated values, keys from ``PATCHABLE``)."""
    unknown = sorted(set(changes) - PATCHABLE)
    if unknown:
        raise LinkError(400, f"these fields cannot be changed: {', '.join(unknown)}")
    return replace(link, **changes)


# -- following a link ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Live:
    link: Link


@dataclass(frozen=True, slots=True)
class Expired:
    link: Link


@dataclass(frozen=True, slots=True)
class OverCap:
    link: Link


Resolution = Live | Expired | OverCap


def resolve(link: Link, now: float, clicks: int) -> Resolution:
    """Whether ``link`` may be followed at ``now`` after ``clicks`` counted clicks.

    Expiry wins over the cap. The authoritative cap check is the store's atomic
    ``take_click``; this is the pure rule (for a cached count, or a listing).
    """
    if link.expires_at is not None and now >= link.expires_at:
        return Expired(link)
    if link.max_clicks is not None and clicks >= link.max_clicks:
        return OverCap(link)
    return Live(link)


def choose_variant(
    link: Link, sticky: str | None, rng: random.Random
) -> tuple[int, Variant] | None:
    """The A/B variant for this visit as (index, variant); None without variants.

    ``sticky`` is the visitor's cookie value: when it names a variant still in
    the link (``Variant.key``), that one is kept; otherwise a weighted draw.
    """
    if not link.variants:
        return None
    if sticky:
        for i, variant in enumerate(link.variants):
            if variant.key == sticky:
                return i, variant
    draw = rng.randrange(sum(v.weight for v in link.variants))
    for i, variant in enumerate(link.variants):
        draw -= variant.weight
        if draw < 0:
            return i, variant
    raise AssertionError("unreachable: the draw is below the total weight")


def cache_control(link: Link, status: int, now: float) -> str:
    """The ``Cache-Control`` of a redirect answered with ``status``.

    - 302/307: ``private, max-age=0`` (every click comes back to be counted).
    - 301/308 of a link with a click cap or variants: ``no-store`` (a cached
      permanent redirect would bypass the cap, the A/B draw and the count).
    - 301/308 otherwise: ``public, max-age=N``, N = ``PERMANENT_MAX_AGE``, or the
      whole seconds left before expiry when that is sooner (never cached past it).
    """
    if status not in PERMANENT:
        return NOT_CACHED
    if link.max_clicks is not None or link.variants:
        return NO_STORE
    max_age = PERMANENT_MAX_AGE
    if link.expires_at is not None:
        left = math.floor(link.expires_at - now)
        if left <= 0:
            return NO_STORE
        max_age = min(max_age, left)
    return f"public, max-age={max_age}"
