"""One Prometheus registry per worker, with a fixed vocabulary.

Label values are bounded: route and rule names come from the config, methods
are folded to a known set, statuses to their class. Never a client key.

With several workers the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` before
any worker imports prometheus_client; each worker then writes its values to
files there and ``/metrics`` on any worker adds all of them up.
"""

from __future__ import annotations

import bisect
import functools
import math
import os
from collections.abc import Callable
from typing import Any, cast

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

from proxy import __version__

disable_created_metrics()

METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"}
)
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
STORAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)


def counter_inc(child: Any) -> Callable[[], None]:
    """``child.inc`` (by 1) for the request path: its value's own ``inc``, without the
    per-call checks (observability, sign, exemplar) that cannot fail for a labelled
    child incremented by 1. Falls back to ``child.inc`` if prometheus_client changes."""
    inc = getattr(getattr(child, "_value", None), "inc", None)
    return functools.partial(inc, 1) if callable(inc) else child.inc


def histogram_observe(child: Any) -> Callable[[float], None]:
    """``child.observe`` for the request path: the bucket found by bisection instead of
    a Python loop over the bounds (the same bucket: the first bound >= the amount; the
    last bound is +Inf). Falls back to ``child.observe`` if prometheus_client changes."""
    bounds = getattr(child, "_upper_bounds", None)
    buckets = getattr(child, "_buckets", None)
    total = getattr(getattr(child, "_sum", None), "inc", None)
    if not (
        isinstance(bounds, list)
        and isinstance(buckets, list)
        and len(bounds) == len(buckets)
        and bounds
        and bounds[-1] == math.inf
        and callable(total)
    ):
        return cast(Callable[[float], None], child.observe)
    incs = [bucket.inc for bucket in buckets]
    add = total

    def observe(amount: float, _bisect: Callable[..., int] = bisect.bisect_left) -> None:
        add(amount)
        incs[_bisect(bounds, amount)](1)

    return observe


class Children:
    """A metric's labelled children, kept: ``labels()`` validates and locks on every call,
    and on the request path the label sets are few and bounded (config names)."""

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self.children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = self.metric.labels(*values)
        return child


def method_label(method: str) -> str:
    return method if method in METHODS else "OTHER"


def status_class(status: int) -> str:
    return f"{status // 100}xx"


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """Every metric Sluice exports; created once per worker."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        if not multiprocess_dir():  # per process: one worker's would mislead beside the sums
            GCCollector(registry=r)  # python_gc_*: see worker.GC_THRESHOLDS
            ProcessCollector(registry=r)  # process_*: CPU seconds, resident memory, open fds
        self.requests = Counter(
            "sluice_requests",
            "Requests answered on the main listener.",
            ["route", "method", "status_class"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            "sluice_upstream_latency_seconds",
            "Time from sending a request upstream to its response headers.",
            ["upstream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "sluice_upstream_errors",
            "Upstream failures answered with 502/504.",
            ["upstream", "kind"],
            registry=r,
        )
        self.in_flight = Gauge(
            "sluice_requests_in_flight",
            "Requests being handled on the main listener.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.reloads = Counter(
            "sluice_config_reloads", "Configuration reloads by result.", ["result"], registry=r
        )
        self.config_loaded = Gauge(
            "sluice_config_last_reload_success_timestamp_seconds",
            "When the configuration in force was loaded.",
            registry=r,
            multiprocess_mode="max",
        )
        self.config_ok = Gauge(
            "sluice_config_last_reload_successful",
            "1 if the last reload attempt succeeded, 0 if the last good config is still serving.",
            registry=r,
            multiprocess_mode="min",
        )
        self.build_info = Gauge(
            "sluice_build_info",
            "Sluice version.",
            ["version"],
            registry=r,
            multiprocess_mode="max",
        )
        self.build_info.labels(__version__).set(1)
        self.config_ok.set(1)
        self.decisions = Counter(
            "sluice_ratelimit_decisions",
            "Rate-limit decisions by rule and result.",
            ["rule", "result"],
            registry=r,
        )
        self.storage_latency = Histogram(
            "sluice_storage_latency_seconds",
            "Storage call latency.",
            ["op"],
            buckets=STORAGE_BUCKETS,
            registry=r,
        )
        self.storage_errors = Counter(
            "sluice_storage_errors", "Storage failures by kind.", ["kind"], registry=r
        )
        self.breaker_open = Gauge(
            "sluice_storage_breaker_open",
            "1 while the storage circuit breaker is open.",
            registry=r,
            multiprocess_mode="livemax",  # a dead worker's open breaker does not linger
        )
        self.deny_cache_hits = Counter(
            "sluice_ratelimit_deny_cache_hits",
            "Requests denied from the local deny cache without a storage call.",
            ["rule"],
            registry=r,
        )
        self.redirects = Counter(
            "sluice_redirects",
            "Answers to short-code requests on the main listener, by HTTP status.",
            ["status"],
            registry=r,
        )
        self.link_cache = Counter(
            "sluice_link_cache",
            "Hot-link cache lookups on the redirect path (a miss costs a store read).",
            ["result"],
            registry=r,
        )
        self.link_store_latency = Histogram(
            "sluice_link_store_latency_seconds",
            "Link store call latency.",
            ["op"],
            buckets=STORAGE_BUCKETS,
            registry=r,
        )
        self.links_created = Counter(
            "sluice_links_created", "Short links created through the admin API.", registry=r
        )
        self.link_analytics_dropped = Counter(
            "sluice_link_analytics_dropped",
            "Clicks whose analytics were not recorded (queue full, or the store failed).",
            registry=r,
        )
        self.whatif_decisions = Counter(
            "sluice_whatif_decisions",
            "What-if: the candidate rules' decisions (evaluated in shadow) by rule and result.",
            ["rule", "result"],
            registry=r,
        )
        self.whatif_requests = Counter(
            "sluice_whatif_requests",
            "What-if: requests by the live answer and the answer the candidate rules would give "
            "(not_evaluated: answered from the live deny cache or with storage down).",
            ["live", "candidate"],
            registry=r,
        )
        self.whatif_candidate_ok = Gauge(
            "sluice_whatif_candidate_ok",
            "0 while the what-if candidate rules file fails to load (it is ignored), "
            "else 1 (also without a candidate).",
            registry=r,
            multiprocess_mode="min",
        )
        self.log_dropped = Counter(
            "sluice_log_dropped",
            "Log records dropped because the log writer fell behind (stderr slow or blocked).",
            registry=r,
        )

    def exposition(self) -> tuple[bytes, str]:
        """The text to serve on /metrics: this worker's, or all workers' added up."""
        directory = multiprocess_dir()
        if directory:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=directory)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
