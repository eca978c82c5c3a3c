"""The built-in guard against short-code enumeration (``redirects.miss_limit``).

Each client IP has a token bucket of ``limit`` unknown-code answers, refilled
at ``limit`` per ``window``. Every 404 on the redirect path takes one token.
A client whose bucket is empty is answered ``429`` on EVERY redirect request,
live codes included, until a token is back: were only misses refused, the
difference between a ``302`` and a ``429`` would still tell live codes apart.

Per worker and in memory (no storage call on any path): with N workers or
instances a client gets up to N times ``limit`` before every one refuses it.
An empty code, ``favicon.ico`` and ``robots.txt`` (browsers ask for them on a
redirect host) are never charged. Pure: the clock is injected.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

MAX_CLIENTS = 100_000


class MissGuard:
    def __init__(
        self,
        limit: int,
        window: float,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("limit must be >= 1 and window > 0")
        self.limit = limit
        self.window = window
        self.rate = limit / window  # tokens per second
        self._clock = clock
        self._max = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at

    def __len__(self) -> int:
        return len(self._buckets)

    def _tokens(self, client: str, now: float) -> float:
        item = self._buckets.get(client)
        if item is None:
            return float(self.limit)
        tokens, at = item
        return min(float(self.limit), tokens + (now - at) * self.rate)

    def blocked(self, client: str) -> float:
        """Seconds until ``client`` may be answered again; 0.0 when it may now."""
        tokens = self._tokens(client, self._clock())
        if tokens >= 1.0:
            return 0.0
        return (1.0 - tokens) / self.rate

    def miss(self, client: str) -> None:
        """Charge ``client`` one unknown code."""
        now = self._clock()
        tokens = max(0.0, self._tokens(client, now) - 1.0)
        self._buckets[client] = (tokens, now)
        self._buckets.move_to_end(client)
        if len(self._buckets) > self._max:
            self._prune(now)

    def _prune(self, now: float) -> None:
        """Forget clients whose bucket is full again, then the least recently charged."""
        for client in [c for c in self._buckets if self._tokens(c, now) >= self.limit]:
            del self._buckets[client]
        while len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
