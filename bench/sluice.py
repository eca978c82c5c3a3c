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

wrk sends everything from 127.0.0.1: one client, so one key per rule.

``read_counters`` reads a running Sluice's own account from its admin
``/metrics``: storage calls that failed (a timeout, say) and requests let
through unchecked because of them (``degraded`` decisions, fail-open), so a
run where the storage path broke down is told apart from one that measured it.
"""

from __future__ import annotations

import re
import sys
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.procs import BenchError


@dataclass(frozen=True)
class Variant:
    limits: tuple[Mapping[str, object], ...] = ()
    redis: bool = False
    denies: bool = False  # meant to answer 429 to (nearly) every request


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
DENIED = Variant(
    redis=True,
    limits=(
        {"name": "tiny", "key": "ip", "algorithm": "fixed_window", "limit": 1, "window": "1h"},
    ),
    denies=True,
)


def rules(
    variant: Variant, *, port: int, admin_port: int, upstream: str, storage: str, data_dir: Path
) -> dict[str, object]:
    return {
        "listen": f"127.0.0.1:{port}",
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "storage": {"url": storage, "data_dir": str(data_dir)},
        "upstreams": {"origin": {"url": upstream}},
        "limits": [dict(limit) for limit in variant.limits],
        "routes": [
            {
                "name": "all",
                "match": {"path_prefix": "/"},
                "upstream": "origin",
                "limits": [str(limit["name"]) for limit in variant.limits],
            }
        ],
        "server": {"shutdown_grace": "1s"},
    }


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


_SAMPLE = re.compile(r"^(sluice_[a-z_]+)\{([^}]*)\} ([0-9.eE+-]+)$", re.M)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class Counters:
    storage_errors: int  # failed storage calls (timeouts, refused connections, ...)
    unchecked: int  # requests let through without a decision (fail-open, breaker open)

    def __sub__(self, other: Counters) -> Counters:
        return Counters(
            self.storage_errors - other.storage_errors, self.unchecked - other.unchecked
        )


def read_counters(metrics_url: str) -> Counters:
    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as response:
            text = response.read().decode()
    except OSError as exc:
        raise BenchError(f"cannot read {metrics_url}: {exc}") from exc
    errors = 0.0
    degraded: dict[str, float] = {}
    for name, labels, value in _SAMPLE.findall(text):
        if name == "sluice_storage_errors_total":
            errors += float(value)
        elif name == "sluice_ratelimit_decisions_total":
            fields = dict(_LABEL.findall(labels))
            if fields.get("result") == "degraded":
                rule = fields.get("rule", "")
                degraded[rule] = degraded.get(rule, 0.0) + float(value)
    # A request let through degrades every rule it carries: count it once.
    return Counters(int(errors), int(max(degraded.values(), default=0.0)))
