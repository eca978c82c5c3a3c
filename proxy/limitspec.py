"""The ``limits:`` entries of rules.yaml: who is counted, how, and how much.

Parsing only; the decisions live in ``proxy.limits``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from proxy.confread import Section, did_you_mean, parse_duration
from proxy.match import Match, read_match

ALGORITHMS = (
    "fixed_window",
    "sliding_window_log",
    "sliding_window_counter",
    "token_bucket",
    "gcra",
)
KEY_SOURCES = ("ip", "header", "query", "cookie", "route", "path", "method")
_NAMED_SOURCES = ("header", "query", "cookie")
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(ms|s|m|h|d|\d+(?:\.\d+)?(?:ms|s|m|h|d))\s*$")
_RULE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True, slots=True)
class KeySource:
    """One part of a client identity: ``ip``, ``ip/64``, ``header:X-API-Key`` …"""

    kind: str
    name: str = ""  # header/query/cookie name
    prefix: int | None = None  # ip/N: group addresses by network prefix

    def __str__(self) -> str:
        if self.kind == "ip" and self.prefix is not None:
            return f"ip/{self.prefix}"
        return f"{self.kind}:{self.name}" if self.name else self.kind


@dataclass(frozen=True, slots=True)
class KeySpec:
    """Alternatives tried in order (first present wins); each is a composite of sources."""

    alternatives: tuple[tuple[KeySource, ...], ...]

    def __str__(self) -> str:
        return " | ".join(" + ".join(str(s) for s in alt) for alt in self.alternatives)


@dataclass(frozen=True, slots=True)
class Quota:
    """``limit`` units per ``window`` seconds (for token_bucket: capacity and full-refill time)."""

    limit: int
    window: float


@dataclass(frozen=True, slots=True)
class LimitRule:
    name: str
    key: KeySpec
    algorithm: str
    quotas: tuple[Quota, ...]
    burst: int = 0
    cost: int = 1
    cost_header: str | None = None
    shadow: bool = False
    on_storage_error: str = "allow"  # allow | deny | local
    match: Match | None = None
    line: int = 0


def parse_key(text: str) -> KeySpec:
    """``header:X-API-Key + path | ip/64`` → KeySpec; ValueError names the bad part."""
    alternatives: list[tuple[KeySource, ...]] = []
    for alt in text.split("|"):
        parts: list[KeySource] = []
        for raw in alt.split("+"):
            part = raw.strip()
            if not part:
                raise ValueError(f"empty key source in {text!r}")
            kind, sep, name = part.partition(":")
            kind = kind.strip()
            prefix = None
            if kind.startswith("ip/"):
                bits = kind[3:]
                if not bits.isdigit() or not 0 < int(bits) <= 128:
                    raise ValueError(f"bad IP prefix in {part!r} (use e.g. ip/64 or ip/24)")
                kind, prefix = "ip", int(bits)
            if kind not in KEY_SOURCES:
                raise ValueError(
                    f"unknown key source {kind!r} in {text!r} (known: "
                    f"{', '.join(KEY_SOURCES)})" + did_you_mean(kind, KEY_SOURCES)
                )
            if kind in _NAMED_SOURCES and not name.strip():
                raise ValueError(f"{kind} needs a name, e.g. {kind}:X-API-Key")
            if kind not in _NAMED_SOURCES and sep:
                raise ValueError(f"{kind} takes no name, got {part!r}")
            parts.append(KeySource(kind, name.strip(), prefix))
        alternatives.append(tuple(parts))
    return KeySpec(tuple(alternatives))


def parse_rate(text: object) -> tuple[float, float]:
    """``10/s``, ``100/m``, ``5/10s`` → (amount, per seconds)."""
    match = _RATE.match(str(text))
    if not match:
        raise ValueError(f"bad refill rate {text!r} (use e.g. 10/s, 100/m, 5/10s)")
    per = match.group(2)
    seconds = parse_duration(per if per[0].isdigit() else f"1{per}")
    amount = float(match.group(1))
    if amount <= 0:
        raise ValueError(f"refill rate must be positive, got {text!r}")
    return amount, seconds


def read_limit(sec: Section) -> LimitRule | None:
    """Read one ``limits:`` entry; problems are recorded in ``sec``."""
    if not sec.ok:
        return None
    name = sec.string("name", required=True) or ""
    if name and not _RULE_NAME.match(name):
        sec.error("name", f"use letters, digits, '_', '-' or '.' (at most 64), got {name!r}")
    key = sec.convert("key", KeySpec(((KeySource("ip"),),)), lambda v: parse_key(str(v)))
    algorithm = sec.choice("algorithm", ALGORITHMS, "sliding_window_counter")
    quotas: list[Quota] = []
    burst = 0
    if algorithm == "token_bucket":
        capacity = sec.integer("capacity", 0, minimum=1, required=True)
        amount, per = sec.convert("refill", (0.0, 0.0), parse_rate, required=True)
        if capacity and amount:
            quotas.append(Quota(capacity, capacity * per / amount))
        for bad in ("limit", "window", "windows", "burst"):
            if sec.has(bad):
                sec.error(bad, f"token_bucket takes capacity and refill, not {bad}")
                sec.seen.add(bad)
    else:
        if sec.has("windows"):
            for item in sec.list_of_sections("windows"):
                limit = item.integer("limit", 0, minimum=1, required=True)
                window = item.duration("window", 0.0, required=True)
                item.finish()
                if limit and window:
                    quotas.append(Quota(limit, window))
        else:
            limit = sec.integer("limit", 0, minimum=1, required=True)
            window = sec.duration("window", 0.0, required=True)
            if limit and window:
                quotas.append(Quota(limit, window))
        if algorithm == "gcra":
            burst = sec.integer("burst", 0, minimum=0)
        for bad in ("capacity", "refill") + (() if algorithm == "gcra" else ("burst",)):
            if sec.has(bad):
                sec.error(bad, f"{algorithm} does not take {bad}")
                sec.seen.add(bad)
    cost, cost_header = 1, None
    cnode = sec.node_of("cost")
    if cnode is not None:
        v = cnode.value
        if isinstance(v, str) and v.startswith("header:") and v[7:].strip():
            cost_header = v[7:].strip()
        elif isinstance(v, int) and not isinstance(v, bool) and v >= 1:
            cost = v
        else:
            sec.error("cost", f"expected a positive integer or header:NAME, got {v!r}")
    rule = LimitRule(
        name=name,
        key=key,
        algorithm=algorithm,
        quotas=tuple(quotas),
        burst=burst,
        cost=cost,
        cost_header=cost_header,
        shadow=sec.boolean("shadow", False),
        on_storage_error=sec.choice("on_storage_error", ("allow", "deny", "local"), "allow"),
        match=read_match(sec.section("match")) if sec.has("match") else None,
        line=sec.node.line,
    )
    sec.finish()
    return rule
