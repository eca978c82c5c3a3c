"""Circuit breaker state machine and header rendering (pure)."""

from __future__ import annotations

from proxy.limits.algorithms import Outcome
from proxy.limits.breaker import Breaker
from proxy.limits.headers import Quoted, render, retry_after_seconds


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_breaker_opens_probes_and_closes() -> None:
    clock = Clock()
    moves: list[tuple[str, str]] = []
    b = Breaker(3, 1.0, max_reset=4.0, clock=clock, on_change=lambda a, z: moves.append((a, z)))
    for _ in range(2):
        assert b.allow()
        b.failure()
    assert b.state == "closed"
    b.failure()
    assert b.state == "open" and not b.allow()
    clock.t += 1.0
    assert b.allow()  # the one probe
    assert not b.allow()  # nobody else while it is out
    b.failure()  # probe failed: open again, wait doubled
    assert b.state == "open"
    clock.t += 1.5
    assert not b.allow()
    clock.t += 0.5
    assert b.allow()
    b.success()
    assert b.state == "closed" and b.allow()
    assert moves == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]


def test_breaker_backoff_is_capped() -> None:
    clock = Clock()
    b = Breaker(1, 1.0, max_reset=4.0, clock=clock)
    b.failure()
    for _ in range(5):
        clock.t += b.reset
        assert b.allow()
        b.failure()
    assert b.reset == 4.0


def test_success_resets_the_failure_count() -> None:
    b = Breaker(2, 1.0, clock=Clock())
    b.failure()
    b.success()
    b.failure()
    assert b.state == "closed"


def test_render_both_families() -> None:
    quotas = [
        Quoted.of("burst", 1, Outcome(True, 10, 7, 300.0, 0.0)),
        Quoted.of('we"ird', 86400, Outcome(True, 1000, 2, 50_000_001.0, 0.0)),
    ]
    h = render(quotas, ("x-ratelimit", "ietf"))
    assert h["X-RateLimit-Limit"] == "1000"  # the binding quota: fewest left
    assert h["X-RateLimit-Remaining"] == "2"
    assert h["X-RateLimit-Reset"] == "50001"
    assert h["RateLimit-Policy"] == '"burst";q=10;w=1, "we\\"ird";q=1000;w=86400'
    assert h["RateLimit"] == '"burst";r=7;t=1, "we\\"ird";r=2;t=50001'
    assert "Retry-After" not in h


def test_retry_after_is_the_longest_wait_rounded_up() -> None:
    denied = [Outcome(False, 1, 0, 0, 1200.0), Outcome(False, 1, 0, 0, 30_000.5)]
    assert retry_after_seconds(denied) == 31
    assert retry_after_seconds([Outcome(False, 1, 0, 0, 0.0)]) == 1
    assert render([], ("ietf",), 5) == {"Retry-After": "5"}
