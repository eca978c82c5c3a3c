"""The short-link keys of the ``redirects:`` section, read into ``LinksSettings``.

``read_links_settings(sec)`` reads only these keys (marking them known) and
leaves ``sec.finish()`` to the owner of the section::

    redirects:
      code_secret: ${SLUICE_CODE_SECRET}   # optional, >= 16 chars; see below
      min_length: 7                        # generated code length, 7 to 10
      allow_hosts: ["*.example.com"]       # destinations allowed (empty: any)
      deny_hosts: [evil.example]           # destinations refused (wins over allow)
      sticky_cookie: sluice_ab             # A/B stickiness cookie name, or false
      cache_size: 10000                    # hot-link cache entries (0: off)
      cache_ttl: 5s                        # how stale another instance's edit may be

``code_secret`` keys the code permutation. Without it, the store generates a
random secret on first use and keeps it inside itself (the SQLite file's meta
table, or the Redis key ``lk:secret``), so every instance sharing a store
agrees and a restart keeps it. Either way the store records a fingerprint of
the secret and refuses to open with a different one (codes could collide).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from proxy.confread import Section
from proxy.links.codes import MAX_LENGTH, MIN_LENGTH
from proxy.links.validate import HostRules, host_pattern

KEYS = (
    "code_secret",
    "min_length",
    "allow_hosts",
    "deny_hosts",
    "sticky_cookie",
    "cache_size",
    "cache_ttl",
)
DEFAULT_STICKY_COOKIE = "sluice_ab"
_COOKIE_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,64}")


@dataclass(frozen=True, slots=True)
class LinksSettings:
    code_secret: str | None = None
    min_length: int = MIN_LENGTH
    hosts: HostRules = field(default_factory=HostRules)
    sticky_cookie: str | None = DEFAULT_STICKY_COOKIE
    cache_size: int = 10_000
    cache_ttl: float = 5.0


def _secret(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    if len(value.encode()) < 16:
        raise ValueError("must be at least 16 bytes long (use a random string)")
    return value


def _length(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    if not MIN_LENGTH <= value <= MAX_LENGTH:
        raise ValueError(f"must be {MIN_LENGTH} to {MAX_LENGTH}, got {value}")
    return value


def _cookie(value: Any) -> str | None:
    if value is False:
        return None
    if value is True:
        return DEFAULT_STICKY_COOKIE
    if not isinstance(value, str) or not _COOKIE_NAME.fullmatch(value):
        raise ValueError(f"expected a cookie name (token characters) or false, got {value!r}")
    return value


def _patterns(sec: Section, key: str) -> tuple[str, ...]:
    out = []
    for pattern in sec.str_list(key):
        try:
            out.append(host_pattern(pattern))
        except ValueError as exc:
            sec.error(key, str(exc))
    return tuple(out)


def read_links_settings(sec: Section) -> LinksSettings:
    """Read the short-link keys of ``redirects:``; problems go to ``sec.problems``."""
    d = LinksSettings()
    return LinksSettings(
        code_secret=sec.convert("code_secret", None, _secret),
        min_length=sec.convert("min_length", d.min_length, _length),
        hosts=HostRules(allow=_patterns(sec, "allow_hosts"), deny=_patterns(sec, "deny_hosts")),
        sticky_cookie=sec.convert("sticky_cookie", d.sticky_cookie, _cookie),
        cache_size=sec.integer("cache_size", d.cache_size, minimum=0),
        cache_ttl=sec.duration("cache_ttl", d.cache_ttl, positive=False),
    )
