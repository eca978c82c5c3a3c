"""The status page's pure parts: rate rings, histogram quantiles, the rejection tally."""

from __future__ import annotations

import pytest

from proxy.status.clients import Tally, TopClient, member, ranked, split_member, window_minutes
from proxy.status.series import Ring, quantile

A = ("decisions", "r", "allowed")


def test_rates_between_neighbouring_samples() -> None:
    ring = Ring(10)
    ring.add(100.0, {A: 0})
    ring.add(102.0, {A: 10})
    ring.add(104.0, {A: 14})
    assert ring.times() == [102.0, 104.0]
    assert ring.rates([A, ("missing",)]) == {A: [5.0, 2.0], ("missing",): [0.0, 0.0]}


def test_a_counter_reset_is_not_a_negative_rate() -> None:
    ring = Ring(10)
    ring.add(0.0, {A: 50})
    ring.add(1.0, {A: 60})
    ring.add(2.0, {A: 3})  # a worker replaced: its counts are gone
    assert ring.rates([A])[A] == [10.0, 3.0]
    assert ring.increase(60) == (2.0, {A: 13.0})


def test_increase_covers_about_the_window_asked() -> None:
    ring = Ring(100)
    for t in range(0, 121, 2):
        ring.add(float(t), {A: t * 3})
    span, grown = ring.increase(60)
    assert span == 60.0 and grown[A] == 180.0
    assert Ring(5).increase(60) == (0.0, {})


def test_the_ring_forgets_the_oldest_and_ignores_time_going_back() -> None:
    ring = Ring(3)
    for t in range(5):
        ring.add(float(t), {A: t})
    ring.add(2.0, {A: 100})  # a clock step back: ignored
    assert len(ring) == 3 and ring.times() == [3.0, 4.0]
    assert ring.latest() == {A: 4}
    with pytest.raises(ValueError):
        Ring(1)


def test_quantile_interpolates_like_prometheus() -> None:
    buckets = [(0.001, 50.0), (0.01, 90.0), (0.1, 100.0), (float("inf"), 100.0)]
    assert quantile(0.5, buckets) == pytest.approx(0.001)
    assert quantile(0.9, buckets) == pytest.approx(0.01)
    assert quantile(0.95, buckets) == pytest.approx(0.01 + 0.09 * 0.5)
    assert quantile(0.99, []) is None
    assert quantile(0.99, [(0.1, 0.0), (float("inf"), 0.0)]) is None
    assert quantile(0.99, [(0.1, 1.0), (float("inf"), 10.0)]) == 0.1  # in +Inf: top bound


def test_tally_counts_bounds_and_drains_the_largest() -> None:
    tally = Tally(max_entries=3, keep=2)
    for _ in range(5):
        tally.add("live", "r", "a")
    tally.add("live", "r", "b", 3)
    tally.add("live", "r", "c")
    tally.add("live", "r", "d", 7)  # a fourth key: over max_entries, counted as overflow
    tally.add("candidate", "r", "a")  # also over the bound
    assert tally.overflow == 8 and len(tally) == 3
    assert tally.drain() == {"live": {("r", "a"): 5, ("r", "b"): 3}}
    assert len(tally) == 0
    tally.merge([(("live", "r", "a"), 2)])
    assert tally.drain() == {"live": {("r", "a"): 2}}


def test_windows_members_and_ranking() -> None:
    assert window_minutes("5m", 600.0 + 59) == [10, 9, 8, 7, 6]
    assert len(window_minutes("1h", 0.0)) == 60
    with pytest.raises(ValueError, match="5m, 1h"):
        window_minutes("2h", 0.0)
    assert split_member(member("rule", "header:K=a\tb")) == ("rule", "header:K=a\tb")
    counts = {("r", "b"): 2.0, ("r", "a"): 2.0, ("q", "z"): 5.0, ("r", "zero"): 0.0}
    assert ranked(counts, 10) == [
        TopClient("q", "z", 5),
        TopClient("r", "a", 2),
        TopClient("r", "b", 2),
    ]
    assert ranked(counts, 1) == [TopClient("q", "z", 5)]
