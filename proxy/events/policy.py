"""Pure delivery decisions: what a response means, how long to back off, how fast to send.

Status handling follows Standard Webhooks:

* 2xx: delivered.
* 410 Gone: the receiver wants no more; the subscription is disabled (its
  events stay queued, and flow again when an operator re-enables it).
* 408, 409, 425, 429, 3xx (redirects are not followed), 5xx, connection
  errors and timeouts: retried on the schedule; ``Retry-After`` is honoured
  as a floor for the next attempt and pauses the whole subscription.
* Any other 4xx: permanent; the events go straight to the dead-letter list.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from enum import Enum

MAX_RETRY_AFTER = 86400.0
RETRYABLE_4XX = frozenset({408, 409, 425, 429})


class Verdict(Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    DEAD = "dead"
    GONE = "gone"


@dataclass(frozen=True, slots=True)
class Outcome:
    verdict: Verdict
    error: str = ""
    status: int | None = None
    retry_after: float | None = None


def classify(status: int, retry_after: float | None = None, detail: str = "") -> Outcome:
    """The outcome of an HTTP answer ``status``."""
    if 200 <= status < 300:
        return Outcome(Verdict.DELIVERED, status=status)
    error = f"HTTP {status}" + (f": {detail}" if detail else "")
    if status == 410:
        return Outcome(Verdict.GONE, error, status)
    if status < 400 or status >= 500 or status in RETRYABLE_4XX:
        return Outcome(Verdict.RETRY, error, status, retry_after)
    return Outcome(Verdict.DEAD, error, status)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta seconds or an HTTP date)."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return min(float(text), MAX_RETRY_AFTER)
    try:
        when = parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return min(max(0.0, when - now), MAX_RETRY_AFTER)


def backoff(
    schedule: tuple[float, ...], attempts: int, jitter: float, rng: random.Random
) -> float | None:
    """The delay before the next attempt after ``attempts`` failed ones, or None
    when the schedule is exhausted. Full jitter (``jitter=1``) draws uniformly
    from (0, step]; ``jitter=0`` is the step itself."""
    if attempts < 1 or attempts > len(schedule):
        return None
    step = schedule[attempts - 1]
    return step * (1.0 - jitter * rng.random())


class TokenBucket:
    """``rate`` requests per second with a burst of ``max(1, rate)``; time is passed in."""

    def __init__(self, rate: float, now: float) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = self.capacity
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def ready_in(self, now: float) -> float:
        """Seconds until a token is available (0: now); takes nothing."""
        self._refill(now)
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate

    def take(self, now: float) -> None:
        self._refill(now)
        self.tokens -= 1.0
