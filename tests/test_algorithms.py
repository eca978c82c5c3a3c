"""Pure tests of the rate-limit algorithms over an explicit clock (no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.limits.algorithms import (
    ALGORITHMS,
    BucketState,
    CounterState,
    GcraState,
    LogState,
    Outcome,
    Policy,
    State,
    WindowState,
    decide,
    decide_one,
    evaluate,
    peek,
    refund,
    ttl_ms,
)

T0 = 1_700_000_000_000.0  # ms; a multiple of every window used below
US = 0.001  # one microsecond, in ms


@dataclass
class Client:
    """One key's state driven through decide() like the memory store does."""

    policy: Policy
    state: State | None = None
    tokens: list[str] = field(default_factory=list)

    def hit(self, at: float, cost: int = 1) -> Outcome:
        decision = evaluate([self.policy], [self.state], at, [cost])
        if decision.states is not None:
            self.state = decision.states[0]
            self.tokens.append(decision.tokens[0])
        return decision.outcomes[0]

    def admitted(self, times: list[float], cost: int = 1) -> int:
        return sum(self.hit(at, cost).allowed for at in times)


def allowed(remaining: int, reset: float, limit: int) -> Outcome:
    return Outcome(True, limit, remaining, reset, 0.0)


def denied(remaining: int, reset: float, retry: float, limit: int) -> Outcome:
    return Outcome(False, limit, remaining, reset, retry)


# -- fixed window ---------------------------------------------------------------


def test_fixed_window_counts_and_anchors_at_first_request() -> None:
    c = Client(Policy("fixed_window", 3, 1000))
    assert c.hit(T0 + 250) == allowed(2, 1000, 3)
    assert c.hit(T0 + 500) == allowed(1, 750, 3)
    assert c.hit(T0 + 600) == allowed(0, 650, 3)
    assert c.hit(T0 + 1000) == denied(0, 250, 250, 3)
    assert c.hit(T0 + 1250 - US).allowed is False
    assert c.hit(T0 + 1250) == allowed(2, 1000, 3)  # a new window opens at this request
    assert c.state == WindowState((T0 + 1250) * 1000, 1)


def test_fixed_window_cost() -> None:
    c = Client(Policy("fixed_window", 5, 1000))
    assert c.hit(T0, cost=3) == allowed(2, 1000, 5)
    assert c.hit(T0 + 100, cost=3) == denied(2, 900, 900, 5)
    assert c.hit(T0 + 100, cost=2) == allowed(0, 900, 5)


def test_fixed_window_refund_only_its_window() -> None:
    p = Policy("fixed_window", 3, 1000)
    c = Client(p)
    c.hit(T0, cost=2)
    assert refund(p, c.state, T0 + 10, 2, c.tokens[-1]) is None
    c.hit(T0, cost=2)
    assert refund(p, c.state, T0 + 10, 1, "") == WindowState(T0 * 1000, 1)
    assert refund(p, c.state, T0 + 10, 1, "123") == c.state  # another window's token
    assert refund(p, c.state, T0 + 1000, 1, c.tokens[-1]) is None  # window over


# -- sliding window log -----------------------------------------------------------


def test_log_is_exact_over_any_window() -> None:
    c = Client(Policy("sliding_window_log", 3, 1000))
    assert [c.hit(T0 + t).remaining for t in (0, 100, 200)] == [2, 1, 0]
    assert c.hit(T0 + 300) == denied(0, 900, 700, 3)  # the entry at 0 leaves at 1000
    assert c.hit(T0 + 1000 - US).allowed is False
    assert c.hit(T0 + 1000) == allowed(0, 1000, 3)
    assert c.hit(T0 + 1050, cost=2) == denied(0, 950, 150, 3)  # entries at 100 and 200 must go


def test_log_tokens_are_unique_and_refund_removes_exactly_one_consume() -> None:
    p = Policy("sliding_window_log", 5, 1000)
    c = Client(p)
    c.hit(T0, cost=2)
    c.hit(T0, cost=1)
    assert c.tokens == ["1700000000000000:1", "1700000000000000:2"]
    assert isinstance(c.state, LogState)
    assert [m for _, m in c.state.entries] == [
        "1700000000000000:1:1",
        "1700000000000000:1:2",
        "1700000000000000:2:1",
    ]
    after = refund(p, c.state, T0 + 5, 2, c.tokens[0])
    assert after == LogState(((T0 * 1000, "1700000000000000:2:1"),))
    c.state = after
    c.hit(T0)  # seq 1 is free again, seq 2 is not
    assert c.tokens[-1] == "1700000000000000:1"
    assert refund(p, c.state, T0 + 1000, 1, "") is None  # everything expired


# -- sliding window counter -------------------------------------------------------


def test_counter_weights_the_previous_window() -> None:
    c = Client(Policy("sliding_window_counter", 10, 1000))
    assert c.admitted([T0 + 500] * 12) == 10
    # 25% into the next window the estimate is 10 * 0.75 = 7.5: room for two.
    assert c.hit(T0 + 1250) == allowed(1, 1750, 10)
    assert c.hit(T0 + 1250) == allowed(0, 1750, 10)
    # Needs 10 * (1 - f) + 2 + 1 <= 10, i.e. f >= 0.3: 50 ms from now.
    assert c.hit(T0 + 1250) == denied(0, 1750, 50, 10)
    assert c.hit(T0 + 1300 - US).allowed is False
    assert c.hit(T0 + 1300).allowed is True
    assert c.state == CounterState(T0 / 1000 + 1, 3, 10)


def test_counter_denied_by_the_current_window_waits_for_the_next() -> None:
    c = Client(Policy("sliding_window_counter", 4, 1000))
    assert c.admitted([T0 + 100] * 4) == 4
    # Next window: needs 4 * (1 - f) + 2 <= 4, f >= 0.5.
    assert c.hit(T0 + 200, cost=2) == denied(0, 1800, 1300, 4)
    assert c.hit(T0 + 1500 - US, cost=2).allowed is False
    assert c.hit(T0 + 1500, cost=2) == allowed(0, 1500, 4)


def test_counter_forgets_after_two_windows_and_refunds_by_window() -> None:
    p = Policy("sliding_window_counter", 4, 1000)
    c = Client(p)
    c.hit(T0 + 10, cost=3)
    token = c.tokens[-1]
    assert refund(p, c.state, T0 + 20, 1, token) == CounterState(T0 / 1000, 2, 0)
    assert refund(p, c.state, T0 + 1020, 1, token) == CounterState(T0 / 1000 + 1, 0, 2)
    assert refund(p, c.state, T0 + 1020, 1, "") == CounterState(T0 / 1000 + 1, 0, 3)
    assert refund(p, c.state, T0 + 2000, 1, token) is None
    assert c.hit(T0 + 2000, cost=4) == allowed(0, 2000, 4)


def test_counter_admits_at_most_limit_per_aligned_window_and_under_2x_per_interval() -> None:
    c = Client(Policy("sliding_window_counter", 10, 1000))
    # Worst case for the estimate: the previous window's traffic bunched at its end.
    times = [T0 + 999.0] * 10 + [T0 + 1000 + i for i in range(0, 999)]
    admitted = [t for t in times if c.hit(t).allowed]
    in_second_window = [t for t in admitted if t >= T0 + 1000]
    assert len(in_second_window) <= 10
    assert len([t for t in admitted if T0 + 999 <= t < T0 + 1999]) == 19  # 2 * limit - 1


# -- token bucket -----------------------------------------------------------------


def test_token_bucket_burst_then_rate() -> None:
    c = Client(Policy("token_bucket", 4, 1000))  # one token per 250 ms
    assert [c.hit(T0).remaining for _ in range(4)] == [3, 2, 1, 0]
    assert c.hit(T0) == denied(0, 1000, 250, 4)
    assert c.hit(T0 + 100) == denied(0, 900, 150, 4)
    assert c.hit(T0 + 250 - US).allowed is False
    assert c.hit(T0 + 250) == allowed(0, 1000, 4)
    assert c.hit(T0 + 400, cost=2) == denied(0, 850, 350, 4)
    assert c.state == BucketState(0.0, (T0 + 250) * 1000)


def test_token_bucket_remaining_is_floored_and_refund_caps_at_full() -> None:
    p = Policy("token_bucket", 3, 300)  # one token per 100 ms
    c = Client(p)
    c.hit(T0, cost=3)
    assert peek(p, c.state, T0 + 150) == allowed(1, 150, 3)  # 1.5 tokens
    assert refund(p, c.state, T0 + 150, 1, "") == BucketState(2.5 * 300_000, (T0 + 150) * 1000)
    assert refund(p, c.state, T0 + 150, 3, "") is None


# -- GCRA -------------------------------------------------------------------------


def test_gcra_default_burst_is_limit() -> None:
    c = Client(Policy("gcra", 4, 1000))  # emission interval 250 ms
    assert [c.hit(T0).remaining for _ in range(4)] == [3, 2, 1, 0]
    assert c.hit(T0 + 100) == denied(0, 900, 150, 4)
    assert c.hit(T0 + 250) == allowed(0, 1000, 4)
    assert c.state == GcraState((T0 + 1250) * 1000, 0)


def test_gcra_burst_one_spaces_requests() -> None:
    c = Client(Policy("gcra", 3, 1000, burst=1))  # one per 333.333 ms, no bunching
    assert c.hit(T0) == allowed(0, 333.334, 3)
    assert c.hit(T0 + 333.333) == denied(0, 0.001, 0.001, 3)
    assert c.hit(T0 + 333.334).allowed is True
    assert c.state == GcraState((T0 + 666.667) * 1000, 1)  # TAT = T0 + 666.6666... ms


def test_gcra_burst_above_limit() -> None:
    c = Client(Policy("gcra", 1, 1000, burst=5))
    assert c.admitted([T0] * 7) == 5
    assert c.hit(T0 + 999).allowed is False
    assert c.hit(T0 + 1000) == allowed(0, 5000, 1)
    assert c.hit(T0 + 1000, cost=6) == denied(0, 5000, 1000, 1)  # more than the burst: never


# -- common rules -------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_cost_above_capacity_is_denied_with_one_window(algorithm: str) -> None:
    c = Client(Policy(algorithm, 3, 2000))
    assert c.hit(T0, cost=4) == denied(3, 0, 2000, 3)
    assert c.state is None


def test_all_or_nothing() -> None:
    loose, tight = Policy("fixed_window", 10, 1000), Policy("sliding_window_log", 1, 1000)
    tight_state = decide([tight], [None], T0, [1])[1]
    assert tight_state is not None
    outcomes, states = decide([loose, tight], [None, tight_state[0]], T0 + 1, [1, 1])
    assert [o.allowed for o in outcomes] == [True, False]
    assert states is None
    assert evaluate([loose, tight], [None, tight_state[0]], T0, [1, 1]).tokens == ["", ""]


def test_validation() -> None:
    with pytest.raises(ValueError, match="unknown algorithm"):
        Policy("leaky", 1, 1000)
    with pytest.raises(ValueError, match="limit"):
        Policy("gcra", 0, 1000)
    with pytest.raises(ValueError, match="window_ms"):
        Policy("gcra", 1, 0.0004)
    with pytest.raises(ValueError, match="gcra only"):
        Policy("token_bucket", 1, 1000, burst=2)
    with pytest.raises(ValueError, match="cost"):
        decide([Policy("gcra", 1, 1000)], [None], T0, [0])
    with pytest.raises(ValueError, match="same length"):
        decide([Policy("gcra", 1, 1000)], [], T0, [1])


def test_ttl() -> None:
    fw = Policy("fixed_window", 1, 1000.5)
    assert ttl_ms(fw, WindowState(T0 * 1000, 1), T0 + 0.25) == 1001  # whole ms, rounded up
    assert ttl_ms(fw, WindowState(T0 * 1000, 1), T0 + 2000) == 0
    assert ttl_ms(fw, None, T0) == 0


# -- properties, every algorithm ----------------------------------------------------

policies = st.builds(
    Policy,
    algorithm=st.sampled_from(ALGORITHMS),
    limit=st.integers(1, 6),
    window_ms=st.sampled_from([0.003, 1.0, 333.3334, 1000.0, 60_000.0]),
) | st.builds(
    Policy, algorithm=st.just("gcra"), limit=st.integers(1, 6), window_ms=st.just(700.0),
    burst=st.integers(1, 8),
)  # fmt: skip
timelines = st.lists(
    st.tuples(st.integers(0, 400_000), st.integers(1, 7)), min_size=1, max_size=30
)  # (µs advance, cost)


def capacity(p: Policy) -> int:
    return p.burst or p.limit


def us(ms: float) -> int:
    return round(ms * 1000)


@settings(max_examples=300, deadline=None)
@given(policy=policies, timeline=timelines)
def test_retry_after_and_reset_are_exact(policy: Policy, timeline: list[tuple[int, int]]) -> None:
    """Retrying at now + retry_after admits (1 µs earlier does not); at now + reset
    the quota is full again (1 µs earlier it is not); past ttl_ms the state is
    as good as none. Time is summed in integer µs: near the epoch a float ms has
    a resolution of ~0.24 µs, so sums of float ms can land on the wrong µs."""
    c, now = Client(policy), us(T0)

    def ms(at: int) -> float:
        return at / 1000

    for advance, cost in timeline:
        now += advance
        before = c.state
        outcome = c.hit(ms(now), cost)
        retry, reset = us(outcome.retry_after_ms), us(outcome.reset_ms)
        if not outcome.allowed and cost <= capacity(policy):
            assert retry > 0
            assert evaluate([policy], [before], ms(now + retry), [cost]).states
            assert evaluate([policy], [before], ms(now + retry - 1), [cost]).states is None
        assert peek(policy, c.state, ms(now + reset)).remaining == capacity(policy)
        if reset > 0:
            assert peek(policy, c.state, ms(now + reset - 1)).remaining < capacity(policy)
        expired = ms(now + us(ttl_ms(policy, c.state, ms(now))))
        for cost_later in (1, cost):
            assert evaluate([policy], [c.state], expired, [cost_later]) == evaluate(
                [policy], [None], expired, [cost_later]
            )


@settings(max_examples=200, deadline=None)
@given(limit=st.integers(1, 6), window=st.sampled_from([1.0, 333.3334, 1000.0]), timeline=timelines)
def test_gcra_with_default_burst_decides_like_token_bucket(
    limit: int, window: float, timeline: list[tuple[int, int]]
) -> None:
    bucket, gcra = (
        Client(Policy("token_bucket", limit, window)),
        Client(Policy("gcra", limit, window)),
    )
    now = T0
    for advance, cost in timeline:
        now += advance * US
        assert bucket.hit(now, cost) == gcra.hit(now, cost)


@settings(max_examples=200, deadline=None)
@given(policy=policies, timeline=timelines)
def test_refund_restores_the_standing(policy: Policy, timeline: list[tuple[int, int]]) -> None:
    """Consume then refund at the same instant: the key stands as before."""
    c, now = Client(policy), T0
    for advance, cost in timeline:
        now += advance * US
        before = peek(policy, c.state, now)
        if c.hit(now, cost).allowed:
            c.state = refund(policy, c.state, now, cost, c.tokens[-1])
            assert peek(policy, c.state, now) == before
        c.hit(now, 1)


@settings(max_examples=300, deadline=None)
@given(policy=policies, timeline=timelines, shadow=st.booleans())
def test_decide_one_is_decide_of_one_check(
    policy: Policy, timeline: list[tuple[int, int]], shadow: bool
) -> None:
    """The memory store's one-check path answers and writes what ``decide`` does."""
    state: State | None = None
    now = T0
    for advance, cost in timeline:
        now += advance * US
        (outcome,), states = decide([policy], [state], now, [cost], [shadow])
        one, write, new = decide_one(policy, state, now, cost, shadow)
        assert one == outcome
        assert write == (states is not None)
        if states is not None:
            assert new == states[0]
            state = new
    with pytest.raises(ValueError, match="cost"):
        decide_one(policy, None, now, 0)
