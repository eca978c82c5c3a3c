"""The request path's metric shortcuts (``counter_inc``, ``histogram_observe``) against
prometheus_client's own ``inc`` / ``observe``: the same exposition, bucket edges
included, and the public methods when the internals they bind are not there."""

from __future__ import annotations

import math
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from proxy.metrics import STORAGE_BUCKETS, counter_inc, histogram_observe

EDGES = [*STORAGE_BUCKETS, 0.0, 1e-9, 1e9, math.inf]


def _pair() -> tuple[CollectorRegistry, Any, CollectorRegistry, Any]:
    made = []
    for _ in range(2):
        registry = CollectorRegistry()
        hist = Histogram("t_seconds", "t", ["op"], buckets=STORAGE_BUCKETS, registry=registry)
        made += [registry, hist.labels("ratelimit")]
    return made[0], made[1], made[2], made[3]


@given(st.lists(st.one_of(st.sampled_from(EDGES), st.floats(0, 10)), max_size=60))
def test_observe_matches_prometheus(amounts: list[float]) -> None:
    theirs_registry, theirs, ours_registry, child = _pair()
    ours = histogram_observe(child)
    assert ours != child.observe  # the shortcut is in use, not the fallback
    for amount in amounts:
        theirs.observe(amount)
        ours(amount)
    assert generate_latest(ours_registry) == generate_latest(theirs_registry)


def test_counter_inc_matches_prometheus() -> None:
    registries = [CollectorRegistry(), CollectorRegistry()]
    children = [
        Counter("d", "d", ["rule", "result"], registry=r).labels("r", "allowed") for r in registries
    ]
    inc = counter_inc(children[1])
    for _ in range(5):
        children[0].inc()
        inc()
    assert generate_latest(registries[1]) == generate_latest(registries[0])
    assert b'd_total{result="allowed",rule="r"} 5.0' in generate_latest(registries[1])


class Plain:
    """A metric child without prometheus_client's internals (a future version)."""

    def __init__(self) -> None:
        self.seen: list[float] = []

    def inc(self) -> None:
        self.seen.append(1)

    def observe(self, amount: float) -> None:
        self.seen.append(amount)


def test_fallbacks_are_the_public_methods() -> None:
    child = Plain()
    counter_inc(child)()
    histogram_observe(child)(0.25)
    assert child.seen == [1, 0.25]
