"""A circuit breaker for the storage path (pure state machine, injectable clock).

closed ──N consecutive failures──► open ──after `reset`──► half-open (one probe)
  ▲                                  ▲                         │
  └────────────── probe succeeds ────┼─────────────────────────┘
                                     └── probe fails: open again, wait doubled (≤ max)

While open, callers get ``allow() == False`` at once and apply each rule's
``on_storage_error`` without waiting on a dead store.
"""

from __future__ import annotations

import time
from collections.abc import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class Breaker:
    def __init__(
        self,
        failures: int,
        reset: float,
        max_reset: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, str], None] | None = None,
    ) -> None:
        self.threshold = failures
        self.base_reset = reset
        self.max_reset = max_reset
        self.clock = clock
        self.on_change = on_change
        self.state = CLOSED
        self.failures = 0
        self.reset = reset
        self.opened_at = 0.0
        self.probing = False

    def allow(self) -> bool:
        """May a call go to storage now? In half-open, only one probe at a time."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN and self.clock() - self.opened_at >= self.reset:
            self._move(HALF_OPEN)
        if self.state == HALF_OPEN and not self.probing:
            self.probing = True
            return True
        return False

    def abandon(self) -> None:
        """A call that ended with neither success nor failure (its request was cancelled):
        free the probe slot so the next call can probe."""
        self.probing = False

    def success(self) -> None:
        self.failures = 0
        self.probing = False
        if self.state != CLOSED:
            self.reset = self.base_reset
            self._move(CLOSED)

    def failure(self) -> None:
        self.failures += 1
        self.probing = False
        if self.state == HALF_OPEN:
            self.reset = min(self.max_reset, self.reset * 2)
            self.opened_at = self.clock()
            self._move(OPEN)
        elif self.state == CLOSED and self.failures >= self.threshold:
            self.opened_at = self.clock()
            self._move(OPEN)

    def _move(self, new: str) -> None:
        old, self.state = self.state, new
        if self.on_change and old != new:
            self.on_change(old, new)
