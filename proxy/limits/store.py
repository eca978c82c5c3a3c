"""Where rate-limit state lives: the interface, and the in-process store.

A store decides one request's checks in one call, all-or-nothing: if any
enforced check denies, no check consumes quota. Shadow checks are decided and
reported like the others but never veto the rest: a shadow denial consumes
nothing and blocks nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from proxy.limits import algorithms
from proxy.limits.algorithms import Outcome, Policy, State


@dataclass(frozen=True, slots=True)
class Check:
    """One quota of one rule for one client: a key, a policy, a cost."""

    key: str
    policy: Policy
    cost: int
    shadow: bool = False


class ClientChecks(tuple[Check, ...]):
    """A rule's checks for one client at the rule's own cost, built once and kept by
    the rule's plan (``plans.checks_for``) for every request of that client: a store
    may keep what it derives from them (the Redis store: the packed command). Checks
    built for one request are a plain list."""

    __slots__ = ()


class LimitStore(Protocol):
    """Decides checks atomically; raises ``StorageError`` when it cannot."""

    async def decide(self, checks: Sequence[Check]) -> list[Outcome]: ...

    async def close(self) -> None: ...


def wall_ms() -> float:
    return time.time() * 1000.0


class MemoryLimitStore:
    """Counters in process memory (the embedded default, and the local fallback).

    Decisions are synchronous, so one request's checks are atomic with respect to
    every other request of this worker. Expired keys are swept incrementally.
    """

    SWEEP_EVERY = 1024

    def __init__(self, clock: Callable[[], float] = wall_ms, max_keys: int = 1_000_000) -> None:
        self.clock = clock
        self.max_keys = max_keys
        self.states: dict[str, tuple[State, float]] = {}
        self._ops = 0

    def _get(self, key: str, now: float) -> State | None:
        entry = self.states.get(key)
        if entry is None:
            return None
        state, expires = entry
        if expires <= now:
            del self.states[key]
            return None
        return state

    def decide_now(self, checks: Sequence[Check]) -> list[Outcome]:
        now = self.clock()
        if len(checks) == 1:  # one quota: the common case, without the lists
            c = checks[0]
            outcome, write, state = algorithms.decide_one(
                c.policy, self._get(c.key, now), now, c.cost, c.shadow
            )
            if write:
                self._store(checks, (state,), now)
            outcomes = [outcome]
        else:
            states = [self._get(c.key, now) for c in checks]
            outcomes, new = algorithms.decide(
                [c.policy for c in checks],
                states,
                now,
                [c.cost for c in checks],
                [c.shadow for c in checks],
            )
            if new is not None:
                self._store(checks, new, now)
        self._ops += 1
        if self._ops % self.SWEEP_EVERY == 0 or len(self.states) > self.max_keys:
            self.sweep(now)
        return outcomes

    async def decide(self, checks: Sequence[Check]) -> list[Outcome]:
        return self.decide_now(checks)

    def _store(self, checks: Sequence[Check], states: Sequence[State | None], now: float) -> None:
        for check, state in zip(checks, states, strict=True):
            if state is None:
                self.states.pop(check.key, None)
                continue
            ttl = algorithms.ttl_ms(check.policy, state, now)
            if ttl > 0:
                self.states[check.key] = (state, now + ttl)
            else:
                self.states.pop(check.key, None)

    def sweep(self, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        expired = [k for k, (_, expires) in self.states.items() if expires <= now]
        for key in expired:
            del self.states[key]

    async def close(self) -> None:
        self.states.clear()
