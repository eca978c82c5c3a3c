"""Rules files for the Sluice targets.

A Sluice target is a ``Variant``: the limits its one catch-all route carries
and whether storage is Redis (one redis-server shared by the run) or the
embedded ``memory://``. Everything else is fixed so variants differ only in
what they are meant to measure. The Redis-backed ones:

* ``REDIS1``: one per-IP rule whose limit no run reaches (``big_limit``), so
  every request pays one EVALSHA and is then forwarded;
* ``REDIS5``: five such rules, one per algorithm, all keyed by IP: the same
  identity, so one EVALSHA decides all five (keys share the hash tag);
* ``DENIED``: one rule of 1 request per hour: after the first request every
  request is a 429 answered from the local deny cache, without Redis.

Short links and webhooks (all ``memory://``: the links live in SQLite under
the target's ``data_dir``, as do the events' outbox):

* ``REDIRECT``: ``redirects: {prefix: /s/}`` and an admin token; once it is
  up the harness creates the link ``hot`` (``create_link``) and wrk asks for
  ``/s/hot``: a cached link without a click cap, so no store call per click;
* ``REJECT``: ``REDIRECT`` plus one memory:// rule of 1 request per hour on
  the proxied route: every request after the first is a 429 from the deny
  cache. (A ``shadow: true`` rule would let every request through, but shadow
  rejections are not handed to the events emitter: only enforced ones are.)
* ``MIXED``: ``REJECT``'s rule on a ``/flood/`` route only, the rest proxied
  without limits; wrk (``mixed.lua``) requests ``MIX`` in turn: 8 proxied
  requests, 1 click on ``/s/hot``, 1 request over the rule (a 429): mostly
  proxied traffic where every click emits an event (the rejections, all from
  wrk's one client, are aggregated into one event per 10 s);
* ``*_HOOKS``: the same with ``notifications.webhooks``: one subscription to
  every event type, delivered to the lab's nginx upstream (``return 200`` to
  any POST, ~10 µs each, on the upstream's CPU), in batches (``HOOK_BATCH``:
  up to 100 events per signed POST, held at most 1 s), as a subscription
  receiving one event per click should be configured. Each redirect emits one
  ``redirect.followed`` event (not aggregated: one event per click);
  rejections are aggregated into one ``rate_limit.rejected`` event per rule
  and client per ``notifications.aggregate`` (10 s).

wrk sends everything from 127.0.0.1: one client, so one key per rule.

``read_counters`` reads a running Sluice's own account from its admin
``/metrics``: storage calls that failed (a timeout, say) and requests let
through unchecked because of them (``degraded`` decisions, fail-open), so a
run where the storage path broke down is told apart from one that measured it.
"""

from __future__ import annotations

import http.client
import json
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import astuple, dataclass
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from bench.procs import BenchError


@dataclass(frozen=True)
class Variant:
    limits: tuple[Mapping[str, object], ...] = ()
    redis: bool = False
    denies: bool = False  # meant to answer 429 to (nearly) every request
    redirects: bool = False  # ``redirects: {prefix: /s/}``, an admin token, the link ``hot``
    webhooks: bool = False  # one webhook subscribed to every event, to the upstream
    mixed: bool = False  # proxied, redirected and rejected requests in turn (``MIX``)


REDIRECT_PREFIX = "/s/"
HOT_CODE = "hot"
HOT_URL = "https://example.com/landing"
ADMIN_TOKEN = "bench-admin-token-0123456789abcdef"  # a throwaway, for the generated rules
WEBHOOK_NAME = "bench"
WEBHOOK_PATH = "/bench/webhook"  # on the upstream: nginx answers 200 to any method
WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
HOOK_BATCH = {"max_events": 100, "max_wait": "1s"}  # one POST per click cannot keep up


BIG = 1_000_000  # per window: ~6k req/s for ~4 min stays far below it in any window


def big_limit(name: str, algorithm: str = "fixed_window") -> dict[str, object]:
    """A per-IP limit no bench run can reach, for any algorithm.

    A million per minute (token bucket: a million, refilled at that rate):
    limit x window in microseconds stays below 2**53, as the algorithms assume.
    The sliding-window log keeps one entry per request in its window, so its
    window is 1 s: the sorted set holds about a second's requests (a few thousand).
    """
    rule: dict[str, object] = {"name": name, "key": "ip", "algorithm": algorithm}
    if algorithm == "token_bucket":
        rule.update(capacity=BIG, refill=f"{BIG}/m")
    elif algorithm == "sliding_window_log":
        rule.update(limit=BIG, window="1s")
    else:
        rule.update(limit=BIG, window="1m")
    return rule


REDIS1 = Variant(redis=True, limits=(big_limit("per_ip"),))
REDIS5 = Variant(
    redis=True,
    limits=tuple(
        big_limit(f"per_ip_{tag}", algorithm)
        for tag, algorithm in (
            ("fw", "fixed_window"),
            ("log", "sliding_window_log"),
            ("swc", "sliding_window_counter"),
            ("tb", "token_bucket"),
            ("gcra", "gcra"),
        )
    ),
)
TINY = {"name": "tiny", "key": "ip", "algorithm": "fixed_window", "limit": 1, "window": "1h"}
DENIED = Variant(redis=True, limits=(TINY,), denies=True)
REDIRECT = Variant(redirects=True)
REDIRECT_HOOKS = Variant(redirects=True, webhooks=True)
REJECT = Variant(limits=(TINY,), denies=True, redirects=True)
REJECT_HOOKS = Variant(limits=(TINY,), denies=True, redirects=True, webhooks=True)
MIXED = Variant(limits=(TINY,), redirects=True, mixed=True)
MIXED_HOOKS = Variant(limits=(TINY,), redirects=True, webhooks=True, mixed=True)
FLOOD_PREFIX = "/flood/"  # the mixed variants' route under TINY: 429 after its first request
PROXIED = "/bench/item?id=1"
MIX = (PROXIED,) * 8 + (REDIRECT_PREFIX + HOT_CODE, FLOOD_PREFIX + "x")


def rules(
    variant: Variant, *, port: int, admin_port: int, upstream: str, storage: str, data_dir: Path
) -> dict[str, object]:
    admin: dict[str, object] = {"listen": f"127.0.0.1:{admin_port}"}
    extra: dict[str, object] = {}
    if variant.redirects:
        admin["token"] = ADMIN_TOKEN
        extra["redirects"] = {"prefix": REDIRECT_PREFIX}
    if variant.webhooks:
        hook = {"name": WEBHOOK_NAME, "url": upstream + WEBHOOK_PATH, "secret": WEBHOOK_SECRET}
        extra["notifications"] = {
            "webhooks": [{**hook, "events": ["*"], "batch": dict(HOOK_BATCH)}]
        }
    return {
        "listen": f"127.0.0.1:{port}",
        "admin": admin,
        "storage": {"url": storage, "data_dir": str(data_dir)},
        "upstreams": {"origin": {"url": upstream}},
        "limits": [dict(limit) for limit in variant.limits],
        "routes": _routes(variant),
        "server": {"shutdown_grace": "1s"},
        **extra,
    }


def _routes(variant: Variant) -> list[dict[str, object]]:
    names = [str(limit["name"]) for limit in variant.limits]
    everything = {"name": "all", "match": {"path_prefix": "/"}, "upstream": "origin"}
    if not variant.mixed:
        return [{**everything, "limits": names}]
    flood = {"name": "flood", "match": {"path_prefix": FLOOD_PREFIX}, "upstream": "origin"}
    return [{**flood, "limits": names}, {**everything, "limits": []}]


def write_rules(path: Path, data: Mapping[str, object]) -> Path:
    path.write_text(yaml.safe_dump(dict(data), sort_keys=False))
    return path


def command(rules_file: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "-c",
        str(rules_file),
        "--log-level",
        "warning",
    ]


_SAMPLE = re.compile(r"^(sluice_[a-z_]+)(?:\{([^}]*)\})? ([0-9.eE+-]+)$", re.M)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class Counters:
    """Sluice's own counters (totals so far, or the difference of two readings)."""

    storage_errors: int  # failed storage calls (timeouts, refused connections, ...)
    unchecked: int  # requests let through without a decision (fail-open, breaker open)
    redirects: int = 0  # short-link requests answered with a redirect (3xx)
    clicks_dropped: int = 0  # clicks whose analytics were not recorded (queue full)
    events_emitted: int = 0  # events accepted into the emitter's buffer (not aggregated ones)
    events_dropped: int = 0  # events lost because that buffer was full
    events_queued: int = 0  # event copies stored in the outbox (aggregated ones included)
    events_delivered: int = 0  # event copies delivered to the webhook receiver
    deliveries_failed: int = 0  # delivery attempts that did not succeed

    def __sub__(self, other: Counters) -> Counters:
        return Counters(*(a - b for a, b in zip(astuple(self), astuple(other), strict=True)))

    @property
    def backlog(self) -> int:
        """Of cumulative readings: events stored and not delivered yet."""
        return self.events_queued - self.events_delivered


def read_counters(metrics_url: str) -> Counters:
    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as response:
            text = response.read().decode()
    except OSError as exc:
        raise BenchError(f"cannot read {metrics_url}: {exc}") from exc
    totals: dict[str, float] = {}
    degraded: dict[str, float] = {}
    for name, labels, value in _SAMPLE.findall(text):
        fields = dict(_LABEL.findall(labels))
        if name == "sluice_ratelimit_decisions_total":
            if fields.get("result") == "degraded":
                rule = fields.get("rule", "")
                degraded[rule] = degraded.get(rule, 0.0) + float(value)
            continue
        if name == "sluice_redirects_total" and not fields.get("status", "").startswith("3"):
            continue
        if name == "sluice_webhook_deliveries_total":
            if fields.get("result") == "delivered":
                continue
            name = "sluice_webhook_failed_deliveries"
        totals[name] = totals.get(name, 0.0) + float(value)

    def total(name: str) -> int:
        return int(totals.get(name, 0.0))

    return Counters(
        storage_errors=total("sluice_storage_errors_total"),
        # A request let through degrades every rule it carries: count it once.
        unchecked=int(max(degraded.values(), default=0.0)),
        redirects=total("sluice_redirects_total"),
        clicks_dropped=total("sluice_link_analytics_dropped_total"),
        events_emitted=total("sluice_events_emitted_total"),
        events_dropped=total("sluice_events_dropped_total"),
        events_queued=total("sluice_events_outbox_appended_total"),
        events_delivered=total("sluice_webhook_delivered_events_total"),
        deliveries_failed=total("sluice_webhook_failed_deliveries"),
    )


def _admin(admin_url: str, method: str, path: str, body: object = None) -> tuple[int, bytes]:
    """One admin API call with the generated rules' token; (status, body)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(admin_url + path, data=data, method=method)
    request.add_header("Authorization", f"Bearer {ADMIN_TOKEN}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError as exc:
        raise BenchError(f"{method} {admin_url}{path}: {exc}") from exc


def create_link(admin_url: str, base_url: str) -> None:
    """``POST /api/links`` for the hot code, then check ``GET /s/hot`` answers a
    redirect to it (not followed: the answer itself is what wrk will get)."""
    status, body = _admin(admin_url, "POST", "/api/links", {"url": HOT_URL, "code": HOT_CODE})
    if status not in (200, 201):
        raise BenchError(f"POST {admin_url}/api/links: {status} {body[:300]!r}")
    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    try:
        conn.request("GET", REDIRECT_PREFIX + HOT_CODE)
        response = conn.getresponse()
        response.read()
    except OSError as exc:
        raise BenchError(f"GET {base_url}{REDIRECT_PREFIX}{HOT_CODE}: {exc}") from exc
    finally:
        conn.close()
    if not 300 <= response.status < 400 or response.getheader("Location") != HOT_URL:
        raise BenchError(
            f"GET {base_url}{REDIRECT_PREFIX}{HOT_CODE}: {response.status},"
            f" Location {response.getheader('Location')!r} (wanted a redirect to {HOT_URL})"
        )


def set_webhook(admin_url: str, enabled: bool) -> None:
    """Resume or pause the bench's webhook deliveries (``/api/webhooks/bench/...``);
    events keep being queued in the outbox either way."""
    action = "enable" if enabled else "disable"
    status, body = _admin(admin_url, "POST", f"/api/webhooks/{WEBHOOK_NAME}/{action}", {})
    if not 200 <= status < 300:
        raise BenchError(f"{action} webhook {WEBHOOK_NAME}: {status} {body[:300]!r}")
