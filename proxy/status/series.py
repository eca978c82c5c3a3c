"""Rates over the last minutes from cumulative totals sampled every few seconds.

The status page's charts come from here. A sampler reads the instance's
counters (all workers added up) every ``interval`` seconds and ``add``s them;
rates are differences between neighbouring samples, so every worker that
samples the same totals draws the same chart, whichever one answers the page.

A total that goes down between two samples (a worker replaced, its counters
gone) is not a negative rate: that step counts what the newer sample holds
beyond zero, the way Prometheus' ``rate()`` treats a counter reset.

Pure: no clock, no I/O; times are whatever the caller passes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import pairwise

Key = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Sample:
    at: float
    totals: Mapping[Key, float]


def _increase(old: float, new: float) -> float:
    return new - old if new >= old else new


class Ring:
    """The last ``capacity`` samples, oldest first."""

    def __init__(self, capacity: int) -> None:
        if capacity < 2:
            raise ValueError("a ring needs room for at least two samples")
        self._samples: deque[Sample] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self._samples)

    def add(self, at: float, totals: Mapping[Key, float]) -> None:
        if self._samples and at <= self._samples[-1].at:
            return  # a clock step back or a duplicate tick: keep the series monotonic
        self._samples.append(Sample(at, dict(totals)))

    def latest(self) -> Mapping[Key, float]:
        return self._samples[-1].totals if self._samples else {}

    def start(self) -> float | None:
        """When the oldest sample was taken (where the first rate point begins)."""
        return self._samples[0].at if self._samples else None

    def times(self) -> list[float]:
        """When each rate point ends (one fewer than the samples)."""
        samples = list(self._samples)
        return [b.at for b in samples[1:]]

    def rates(self, keys: Iterable[Key]) -> dict[Key, list[float]]:
        """Per-second rate of each key between neighbouring samples, aligned with ``times``."""
        samples = list(self._samples)
        out: dict[Key, list[float]] = {}
        for key in keys:
            points = []
            for a, b in pairwise(samples):
                gained = _increase(a.totals.get(key, 0.0), b.totals.get(key, 0.0))
                points.append(gained / (b.at - a.at))
            out[key] = points
        return out

    def keys(self) -> set[Key]:
        seen: set[Key] = set()
        for sample in self._samples:
            seen.update(sample.totals)
        return seen

    def increase(self, seconds: float) -> tuple[float, dict[Key, float]]:
        """How much every key grew over about the last ``seconds``: (the span actually
        covered, the increases). The span is 0 with fewer than two samples."""
        samples = list(self._samples)
        if len(samples) < 2:
            return 0.0, {}
        last = samples[-1]
        first = samples[0]
        for sample in reversed(samples[:-1]):
            first = sample
            if last.at - sample.at >= seconds:
                break
        span = last.at - first.at
        grown: dict[Key, float] = {}
        # Step by step, so a reset inside the span is not read as a huge drop.
        start = samples.index(first)
        for a, b in pairwise(samples[start:]):
            for key, value in b.totals.items():
                gained = _increase(a.totals.get(key, 0.0), value)
                if gained:
                    grown[key] = grown.get(key, 0.0) + gained
        return span, grown


def quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """The ``q`` quantile of a histogram given as (upper bound, cumulative count) pairs,
    interpolating linearly inside the bucket (as Prometheus' ``histogram_quantile``).
    None when the histogram is empty; the largest finite bound when the quantile falls
    in the ``+Inf`` bucket."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    total = ordered[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if bound == float("inf"):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower
