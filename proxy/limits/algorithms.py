"""The five rate-limit algorithms as pure functions over an explicit clock.

This module is the in-process (``memory://``) implementation and the oracle the
tests hold the Redis Lua twins (``lua/*.lua``) to: the same operations in the
same order on IEEE doubles, so both give bit-identical answers.

Units. The API speaks milliseconds (floats); internally every time is a whole
number of microseconds held in a float (``now_us = floor(now_ms * 1000 + 0.5)``,
windows likewise, at least 1 µs). Token bucket and GCRA keep their state in
scaled integer units (see below). Every quantity is therefore an integer below
2**53 for realistic policies (limit * window_us < 2**53, e.g. a million per
day), so arithmetic is exact, there are no tolerances, and ``reset_ms`` /
``retry_after_ms`` are whole microseconds: a request retried exactly
``retry_after_ms`` later is admitted (if nothing else consumed meanwhile).

Algorithms and stored state (times in µs since the epoch):

* ``fixed_window`` -- :class:`WindowState`: the window opens at the key's first
  admitted request (not aligned to the clock, so clients do not all reset at
  once) and lasts ``window``. Redis: hash ``{s, n}``.
* ``sliding_window_log`` -- :class:`LogState`: one entry per unit of cost,
  scored by its time; an entry counts while ``score > now - window``. Members
  are ``"<now_us>:<seq>:<j>"`` (``j`` = 1..cost); the consume's token is
  ``"<now_us>:<seq>"``. Redis: a sorted set. Exact, memory O(limit).
* ``sliding_window_counter`` -- :class:`CounterState`: counts in clock-aligned
  windows (index ``floor(now / window)``); the estimate is
  ``previous * (window - elapsed) / window + current`` (Cloudflare's). Redis:
  hash ``{k, c, p}``. Error bound: every aligned window admits at most
  ``limit`` (the estimate is never below ``current``), and the estimate is
  exact when the previous window's traffic was evenly spread. The adversarial
  worst case is traffic bunched at the end of the previous window: then any
  interval of length ``window`` can hold up to ``2 * limit - 1`` admitted
  requests; traffic bunched at its start makes it deny early by the same
  margin. Cloudflare measured 0.003% of requests wrongly decided on real
  traffic.
* ``token_bucket`` -- :class:`BucketState`: capacity ``limit``, refilled
  continuously at ``limit`` per ``window``. The level is kept in token·µs
  (``tokens * window_us``) so refill (``elapsed * limit``) and cost
  (``cost * window_us``) are integer. ``remaining`` is the whole tokens left,
  floored. Redis: hash ``{v, t}``.
* ``gcra`` -- :class:`GcraState`: the theoretical arrival time
  ``tat + frac / limit`` µs (emission interval ``window / limit``). Burst:
  ``burst`` is the bucket depth, the number of requests an idle client may send
  at once; ``0`` means ``limit`` (then GCRA admits exactly what
  ``token_bucket`` does, from one stored value). With ``burst > limit``,
  ``remaining`` can exceed ``limit``. Redis: string ``"<tat>:<frac>"``.

Common rules: ``cost`` is an integer >= 1; a cost above the capacity (``limit``,
or the GCRA burst) can never pass and is denied with ``retry_after`` = one
window. A denied outcome still reports the current ``remaining`` and
``reset``. ``reset`` is the time until the quota would be fully available
again. A stored state that has outlived :func:`ttl_ms` behaves exactly like a
missing one, so expiry is only a memory optimisation. The keys of one call must
be distinct (the caller's job: it knows the keys, this module only sees states).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

ALGORITHMS = (
    "fixed_window",
    "sliding_window_log",
    "sliding_window_counter",
    "token_bucket",
    "gcra",
)


@dataclass(frozen=True, slots=True)
class Policy:
    """One check: one key, one algorithm, one limit (validated on construction)."""

    algorithm: str
    limit: int
    window_ms: float
    burst: int = 0

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.algorithm!r}; expected one of {ALGORITHMS}")
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1:
            raise ValueError(f"limit must be an integer >= 1, got {self.limit!r}")
        if not math.isfinite(self.window_ms) or _us(self.window_ms) < 1:
            raise ValueError(f"window_ms must be finite and at least 0.001, got {self.window_ms!r}")
        if not isinstance(self.burst, int) or self.burst < 0:
            raise ValueError(f"burst must be an integer >= 0, got {self.burst!r}")
        if self.burst and self.algorithm != "gcra":
            raise ValueError(f"burst applies to gcra only, not {self.algorithm}")


class Outcome(NamedTuple):
    """One check's verdict; times in milliseconds (whole microseconds).

    A NamedTuple, not a frozen dataclass: as immutable, and built on every check
    at a quarter of the cost (0.5 vs 1.9 µs here: a frozen dataclass's ``__init__``
    sets each field through ``object.__setattr__``)."""

    allowed: bool
    limit: int
    remaining: int
    reset_ms: float
    retry_after_ms: float


@dataclass(frozen=True, slots=True)
class WindowState:
    start: float
    count: int


@dataclass(frozen=True, slots=True)
class LogState:
    entries: tuple[tuple[float, str], ...]  # (score, member), sorted as Redis sorts them


@dataclass(frozen=True, slots=True)
class CounterState:
    window: float  # index of the current window: floor(now / window_us)
    current: int
    previous: int


@dataclass(frozen=True, slots=True)
class BucketState:
    level: float  # tokens * window_us
    updated: float


@dataclass(frozen=True, slots=True)
class GcraState:
    tat: float  # whole µs; the true TAT is tat + frac / limit
    frac: float


State = WindowState | LogState | CounterState | BucketState | GcraState


@dataclass(frozen=True, slots=True)
class Decision:
    """Result of :func:`evaluate`: ``states`` is None when the call was denied."""

    outcomes: list[Outcome]
    states: list[State | None] | None
    tokens: list[str]  # refund tokens; "" when nothing was consumed


class _Verdict(NamedTuple):
    allowed: bool
    remaining: int
    reset: float  # µs
    retry: float  # µs
    state: State | None  # what to store if the whole call is admitted
    token: str


def _us(ms: float) -> float:
    return float(math.floor(float(ms) * 1000 + 0.5))


def _fmt(x: float) -> str:
    """The text Lua's ``string.format('%.17g', x)`` gives."""
    return f"{x:.17g}"


def _ceil(x: float) -> float:
    return float(math.ceil(x))


def _floor(x: float) -> float:
    return float(math.floor(x))


def _capacity(policy: Policy) -> int:
    """Most cost one request can ever pass: the limit, or GCRA's burst."""
    if policy.algorithm == "gcra" and policy.burst:
        return policy.burst
    return policy.limit


# -- fixed window -------------------------------------------------------------


def _fixed_window(lim: int, w: float, state: State | None, now: float, cost: int) -> _Verdict:
    if isinstance(state, WindowState) and now < state.start + w:
        start, count = state.start, state.count
    else:
        start, count = now, 0
    token = _fmt(start) if cost > 0 else ""
    if cost > lim:
        reset = start + w - now if count > 0 else 0.0
        return _Verdict(False, lim - count, reset, w, None, "")
    if count + cost <= lim:
        count += cost
        reset = start + w - now if count > 0 else 0.0
        return _Verdict(True, lim - count, reset, 0.0, WindowState(start, count), token)
    return _Verdict(False, lim - count, start + w - now, start + w - now, None, "")


def _fixed_window_refund(
    lim: int, w: float, state: State | None, now: float, cost: int, token: str
) -> State | None:
    if not isinstance(state, WindowState) or now >= state.start + w:
        return None
    if token not in ("", _fmt(state.start)):
        return state
    count = max(0, state.count - cost)
    return WindowState(state.start, count) if count > 0 else None


# -- sliding window log -------------------------------------------------------


def _log(lim: int, w: float, state: State | None, now: float, cost: int) -> _Verdict:
    entries = state.entries if isinstance(state, LogState) else ()
    cutoff = now - w
    alive = [score for score, _ in entries if score > cutoff]
    newest = max(alive) if alive else now
    if cost > lim:
        reset = newest + w - now if alive else 0.0
        return _Verdict(False, lim - len(alive), reset, w, None, "")
    if len(alive) + cost <= lim:
        used = len(alive) + cost
        token = ""
        kept = entries
        if cost > 0:
            newest = max(newest, now)
            members = {member for _, member in entries}
            seq = 1
            while f"{_fmt(now)}:{seq}:1" in members:
                seq += 1
            token = f"{_fmt(now)}:{seq}"
            added = tuple((now, f"{token}:{j}") for j in range(1, cost + 1))
            kept = tuple(sorted([e for e in entries if e[0] > cutoff] + list(added)))
        reset = newest + w - now if used > 0 else 0.0
        return _Verdict(True, lim - used, reset, 0.0, LogState(kept), token)
    oldest_needed = sorted(alive)[len(alive) + cost - lim - 1]
    return _Verdict(False, lim - len(alive), newest + w - now, oldest_needed + w - now, None, "")


def _log_refund(
    lim: int, w: float, state: State | None, now: float, cost: int, token: str
) -> State | None:
    if not isinstance(state, LogState):
        return None
    gone = {f"{token}:{j}" for j in range(1, cost + 1)} if token else set()
    kept = tuple(e for e in state.entries if e[0] > now - w and e[1] not in gone)
    return LogState(kept) if kept else None


# -- sliding window counter ---------------------------------------------------


def _roll(w: float, state: State | None, now: float) -> tuple[float, int, int]:
    """(window index, current, previous) as seen at ``now``."""
    index = _floor(now / w)
    if not isinstance(state, CounterState):
        return index, 0, 0
    if index <= state.window:  # same window, or the clock stepped back
        return state.window, state.current, state.previous
    if index == state.window + 1:
        return index, 0, state.current
    return index, 0, 0


def _counter(lim: int, w: float, state: State | None, now: float, cost: int) -> _Verdict:
    index, current, previous = _roll(w, state, now)
    start = index * w
    elapsed = max(0.0, now - start)
    used = previous * (w - elapsed) + current * w  # the estimate, scaled by w
    capacity = lim * w
    allowed = cost <= lim and used + cost * w <= capacity
    retry = 0.0
    if allowed:
        current += cost
        used += cost * w
    elif cost > lim:
        retry = w
    elif lim - current - cost >= 0:  # wait for the previous window to fade enough
        retry = start + (w - _floor((lim - current - cost) * w / previous)) - now
    else:  # wait for the next window, then for this one to fade enough
        retry = start + w + (w - _floor((lim - cost) * w / current)) - now
    remaining = math.floor((capacity - used) / w)
    if current > 0:
        reset = (index + 2) * w - now
    elif previous > 0:
        reset = (index + 1) * w - now
    else:
        reset = 0.0
    token = _fmt(index) if allowed and cost > 0 else ""
    new = CounterState(index, current, previous) if allowed else None
    return _Verdict(allowed, remaining, reset, retry, new, token)


def _counter_refund(
    lim: int, w: float, state: State | None, now: float, cost: int, token: str
) -> State | None:
    index, current, previous = _roll(w, state, now)
    if token in ("", _fmt(index)):
        current = max(0, current - cost)
    elif token == _fmt(index - 1):
        previous = max(0, previous - cost)
    if current == 0 and previous == 0:
        return None
    return CounterState(index, current, previous)


# -- token bucket -------------------------------------------------------------


def _refill(lim: int, w: float, state: State | None, now: float) -> tuple[float, float]:
    """(level in token·µs, effective now) at ``now``; a clock step back refills nothing."""
    if not isinstance(state, BucketState):
        return lim * w, now
    at = max(now, state.updated)
    return min(lim * w, state.level + (at - state.updated) * lim), at


def _bucket(lim: int, w: float, state: State | None, now: float, cost: int) -> _Verdict:
    level, at = _refill(lim, w, state, now)
    need = cost * w
    allowed = cost <= lim and level >= need
    if allowed:
        level -= need
    if allowed or cost > lim:
        retry = 0.0 if allowed else w
    else:
        retry = at + _ceil((need - level) / lim) - now
    reset = at + _ceil((lim * w - level) / lim) - now
    new = BucketState(level, at) if allowed else None
    return _Verdict(allowed, math.floor(level / w), reset, retry, new, "")


def _bucket_refund(
    lim: int, w: float, state: State | None, now: float, cost: int, token: str
) -> State | None:
    level, at = _refill(lim, w, state, now)
    level = min(lim * w, level + cost * w)
    return BucketState(level, at) if level < lim * w else None


# -- GCRA ---------------------------------------------------------------------


def _debt(lim: int, state: State | None, now: float) -> float:
    """(TAT - now) * limit, at least 0: the used part of the burst, in µs/limit."""
    if not isinstance(state, GcraState):
        return 0.0
    return max(0.0, (state.tat - now) * lim + state.frac)


def _gcra_state(lim: int, now: float, debt: float) -> GcraState:
    whole = _floor(debt / lim)
    return GcraState(now + whole, debt - whole * lim)


def _gcra(lim: int, w: float, burst: int, state: State | None, now: float, cost: int) -> _Verdict:
    debt = _debt(lim, state, now)
    tolerance = burst * w
    after = debt + cost * w
    allowed = cost <= burst and after <= tolerance
    if allowed or cost > burst:
        retry = 0.0 if allowed else w
    else:
        retry = _ceil((after - tolerance) / lim)
    used = after if allowed else debt
    remaining = math.floor((tolerance - used) / w)
    new = _gcra_state(lim, now, after) if allowed else None
    return _Verdict(allowed, remaining, _ceil(used / lim), retry, new, "")


def _gcra_refund(
    lim: int, w: float, state: State | None, now: float, cost: int, token: str
) -> State | None:
    debt = _debt(lim, state, now) - cost * w
    return _gcra_state(lim, now, debt) if debt > 0 else None


# -- dispatch -----------------------------------------------------------------

_Refund = Callable[[int, float, State | None, float, int, str], State | None]
_REFUNDS: dict[str, _Refund] = {
    "fixed_window": _fixed_window_refund,
    "sliding_window_log": _log_refund,
    "sliding_window_counter": _counter_refund,
    "token_bucket": _bucket_refund,
    "gcra": _gcra_refund,
}


def _verdict(policy: Policy, state: State | None, now: float, cost: int) -> _Verdict:
    lim, w = policy.limit, _us(policy.window_ms)
    match policy.algorithm:
        case "fixed_window":
            return _fixed_window(lim, w, state, now, cost)
        case "sliding_window_log":
            return _log(lim, w, state, now, cost)
        case "sliding_window_counter":
            return _counter(lim, w, state, now, cost)
        case "token_bucket":
            return _bucket(lim, w, state, now, cost)
        case _:
            return _gcra(lim, w, _capacity(policy), state, now, cost)


def _outcome(policy: Policy, v: _Verdict) -> Outcome:
    remaining = max(0, v.remaining)  # below 0 only after a policy shrank under a stored state
    return Outcome(v.allowed, policy.limit, remaining, v.reset / 1000, v.retry / 1000)


def evaluate(
    policies: Sequence[Policy],
    states: Sequence[State | None],
    now_ms: float,
    costs: Sequence[int],
    shadow: Sequence[bool] | None = None,
) -> Decision:
    """Decide one request's checks together, all-or-nothing.

    Every check is evaluated on its own; if any enforced check denies,
    ``states`` is None (nothing may be written, no check consumes quota),
    every token is "", and the checks that would have allowed report their
    unconsumed standing (a cost-0 check). Otherwise ``states[i]`` is what to store for check ``i``
    and ``tokens[i]`` what :func:`refund` needs to undo it. A ``shadow`` check
    is decided and reported like the others but never vetoes the call; when it
    denies it consumes nothing (its state is returned unchanged, token "").
    The checks' keys must be distinct.
    """
    if not len(policies) == len(states) == len(costs):
        raise ValueError("policies, states and costs must have the same length")
    flags = [False] * len(policies) if shadow is None else list(shadow)
    if len(flags) != len(policies):
        raise ValueError("shadow must have one flag per policy")
    for cost in costs:
        if isinstance(cost, bool) or not isinstance(cost, int) or cost < 1:
            raise ValueError(f"cost must be an integer >= 1, got {cost!r}")
    now = _us(now_ms)
    verdicts = [_verdict(p, s, now, c) for p, s, c in zip(policies, states, costs, strict=True)]
    outcomes = [_outcome(p, v) for p, v in zip(policies, verdicts, strict=True)]
    if all(v.allowed or f for v, f in zip(verdicts, flags, strict=True)):
        return Decision(
            outcomes,
            [v.state if v.allowed else s for v, s in zip(verdicts, states, strict=True)],
            [v.token if v.allowed else "" for v in verdicts],
        )
    # Denied: nothing is consumed, so a check that would have allowed reports its
    # standing as it is (a cost-0 check), not as if this request had been charged.
    standing = [
        o if not v.allowed else _outcome(p, _verdict(p, s, now, 0))
        for p, s, v, o in zip(policies, states, verdicts, outcomes, strict=True)
    ]
    return Decision(standing, None, [""] * len(verdicts))


def decide(
    policies: Sequence[Policy],
    states: Sequence[State | None],
    now_ms: float,
    costs: Sequence[int],
    shadow: Sequence[bool] | None = None,
) -> tuple[list[Outcome], list[State | None] | None]:
    """All-or-nothing decision: ``(outcomes, new_states)``, or ``(outcomes, None)``
    when any enforced check denies, meaning nothing is written. See :func:`evaluate`."""
    decision = evaluate(policies, states, now_ms, costs, shadow)
    return decision.outcomes, decision.states


def decide_one(
    policy: Policy, state: State | None, now_ms: float, cost: int, shadow: bool = False
) -> tuple[Outcome, bool, State | None]:
    """:func:`decide` of a single check, without its lists (a request's common case):
    ``(outcome, write, new_state)``; ``write`` False means nothing may be written.
    A shadow denial writes its state back unchanged, as :func:`evaluate` returns it."""
    if isinstance(cost, bool) or not isinstance(cost, int) or cost < 1:
        raise ValueError(f"cost must be an integer >= 1, got {cost!r}")
    v = _verdict(policy, state, _us(now_ms), cost)
    outcome = _outcome(policy, v)
    if v.allowed:
        return outcome, True, v.state
    return outcome, shadow, state if shadow else None


def peek(policy: Policy, state: State | None, now_ms: float) -> Outcome:
    """The check's current standing without consuming (a cost-0 check)."""
    return _outcome(policy, _verdict(policy, state, _us(now_ms), 0))


def refund(
    policy: Policy, state: State | None, now_ms: float, cost: int, token: str
) -> State | None:
    """Undo one admitted consume of ``cost``; returns the state to store (None: delete).

    ``token`` is the one :func:`evaluate` (or the Lua script) returned for that
    consume. Fixed window and counter refund only the window the token names
    ("" means the current one); the log removes exactly the token's entries
    ("" removes nothing); token bucket and GCRA give the cost back (capped at
    full) and ignore the token.
    """
    now, w = _us(now_ms), _us(policy.window_ms)
    return _REFUNDS[policy.algorithm](policy.limit, w, state, now, cost, token)


def ttl_ms(policy: Policy, state: State | None, now_ms: float) -> float:
    """Whole milliseconds the stored ``state`` stays relevant from ``now_ms``.

    Past it the state behaves exactly as a missing one, so the store may drop
    it. 0 when it already has (or ``state`` is None).
    """
    now, w, lim = _us(now_ms), _us(policy.window_ms), policy.limit
    match state:
        case WindowState(start=start):
            end = start + w
        case LogState(entries=entries) if entries:
            end = max(score for score, _ in entries) + w
        case CounterState(window=index):
            end = (index + 2) * w
        case BucketState(level=level, updated=updated):
            end = updated + _ceil((lim * w - level) / lim)
        case GcraState(tat=tat, frac=frac):
            end = tat + (1 if frac > 0 else 0)
        case _:
            return 0.0
    return max(0.0, _ceil((end - now) / 1000))
