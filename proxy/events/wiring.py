"""Connecting the event sources (the limiter, the short links) to a ``Notifier``.

The sources expose plain callback lists so they never import the events
package; this module is the one place that knows both sides. Every callback
only appends to the emitter's memory buffer: nothing here waits.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from proxy.limits.identity import masked


class EventSink(Protocol):
    def emit(self, type: str, data: dict[str, Any]) -> bool: ...

    def rejected(self, rule: str, client: str, route: str | None = None) -> None: ...


class LimiterHooks(Protocol):
    on_reject: list[Callable[[str, str, str], None]]
    on_transition: list[Callable[[str, str], None]]
    last_error: str | None


class StorageWatch:
    """Turns breaker transitions into ``storage.degraded`` / ``storage.recovered``."""

    def __init__(
        self,
        sink: EventSink,
        limiter: LimiterHooks,
        backend: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.sink = sink
        self.limiter = limiter
        self.backend = backend
        self.clock = clock
        self.down_since: float | None = None

    def __call__(self, old: str, new: str) -> None:
        if old == "closed" and new == "open":
            self.down_since = self.clock()
            self.sink.emit(
                "storage.degraded",
                {"backend": self.backend, "error": self.limiter.last_error or ""},
            )
        elif new == "closed":
            down = self.clock() - self.down_since if self.down_since is not None else 0.0
            self.down_since = None
            self.sink.emit(
                "storage.recovered", {"backend": self.backend, "down_seconds": round(down, 3)}
            )


def attach(
    sink: EventSink,
    limiter: LimiterHooks,
    backend: str,
    events: list[Callable[[str, dict[str, Any]], None]] | None = None,
) -> Callable[[], None]:
    """Wire ``limiter`` (and the generic ``events`` hook list, if given) to ``sink``;
    return a function that undoes it (for reloads and shutdown)."""

    def rejected(rule: str, client: str, route: str) -> None:
        sink.rejected(rule, masked(client), route)

    def forward(type: str, data: dict[str, Any]) -> None:
        sink.emit(type, data)

    watch = StorageWatch(sink, limiter, backend)
    limiter.on_reject.append(rejected)
    limiter.on_transition.append(watch)
    if events is not None:
        events.append(forward)

    def detach() -> None:
        limiter.on_reject.remove(rejected)
        limiter.on_transition.remove(watch)
        if events is not None and forward in events:
            events.remove(forward)

    return detach
