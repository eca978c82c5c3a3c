"""Rejection storms → one ``rate_limit.rejected`` event per (rule, client) per interval.

Pure: the caller passes the time. A key's window opens at its first rejection
and closes ``interval`` seconds later; ``due(now)`` returns the closed windows
(``count``, ``first_seen``, ``last_seen``) and forgets them, so the next
rejection opens a new window. Counts are exact: every ``add`` lands in exactly
one window. Memory is bounded by ``max_keys`` open windows; a rejection for a
new key beyond that is refused (the caller counts it as dropped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.events.model import iso


@dataclass(slots=True)
class Window:
    rule: str
    client: str
    route: str | None
    count: int
    first_seen: float
    last_seen: float

    def data(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "route": self.route,
            "client": self.client,
            "count": self.count,
            "first_seen": iso(self.first_seen),
            "last_seen": iso(self.last_seen),
        }


class RejectionAggregator:
    def __init__(self, interval: float, max_keys: int = 10000) -> None:
        if interval < 0 or max_keys < 1:
            raise ValueError("interval must be >= 0 and max_keys >= 1")
        self.interval = interval
        self.max_keys = max_keys
        self._open: dict[tuple[str, str], Window] = {}
        self._next_due = float("inf")

    def __len__(self) -> int:
        return len(self._open)

    def add(self, rule: str, client: str, now: float, route: str | None = None) -> bool:
        """Count one rejection; False when a new window would exceed ``max_keys``."""
        window = self._open.get((rule, client))
        if window is not None:
            window.count += 1
            if now > window.last_seen:
                window.last_seen = now
            return True
        if len(self._open) >= self.max_keys:
            return False
        self._open[(rule, client)] = Window(rule, client, route, 1, now, now)
        self._next_due = min(self._next_due, now + self.interval)
        return True

    def next_due(self) -> float:
        """When the earliest open window closes (``inf`` when none is open)."""
        return self._next_due

    def due(self, now: float) -> list[Window]:
        """The windows closed by ``now``, oldest first; they are forgotten."""
        if now < self._next_due:
            return []
        closed = [w for w in self._open.values() if w.first_seen + self.interval <= now]
        for w in closed:
            del self._open[(w.rule, w.client)]
        self._next_due = min(
            (w.first_seen + self.interval for w in self._open.values()), default=float("inf")
        )
        return sorted(closed, key=lambda w: w.first_seen)

    def drain(self) -> list[Window]:
        """Every open window, closed now (at shutdown)."""
        out = sorted(self._open.values(), key=lambda w: w.first_seen)
        self._open.clear()
        self._next_due = float("inf")
        return out
