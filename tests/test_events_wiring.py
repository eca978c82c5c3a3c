"""The limiter's rejections and breaker transitions reach the events sink."""

from __future__ import annotations

from typing import Any

from proxy.config import StorageConfig
from proxy.events.wiring import attach
from proxy.limits.engine import Limiter
from proxy.limits.store import MemoryLimitStore
from proxy.metrics import Metrics


class Sink:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.rejections: list[tuple[str, str, str | None]] = []

    def emit(self, type: str, data: dict[str, Any]) -> bool:
        self.events.append((type, data))
        return True

    def rejected(self, rule: str, client: str, route: str | None = None) -> None:
        self.rejections.append((rule, client, route))


def limiter() -> Limiter:
    return Limiter(MemoryLimitStore(), StorageConfig(breaker_failures=1), Metrics())


def test_rejections_are_forwarded_with_masked_keys() -> None:
    sink, lim = Sink(), limiter()
    detach = attach(sink, lim, "redis")
    lim._rejected("per_key", "header:X-API-Key=sk_live_secret", "api")
    assert len(sink.rejections) == 1
    rule, client, route = sink.rejections[0]
    assert (rule, route) == ("per_key", "api")
    assert "sk_live_secret" not in client and client.startswith("header:X-API-Key=#")
    detach()
    lim._rejected("per_key", "ip=1.1.1.1", "api")
    assert len(sink.rejections) == 1


def test_breaker_transitions_become_storage_events() -> None:
    sink, lim = Sink(), limiter()
    attach(sink, lim, "redis")
    lim.last_error = "StorageTimeout: no reply within 50 ms"
    lim.breaker.failure()  # threshold 1: open
    assert sink.events == [
        ("storage.degraded", {"backend": "redis", "error": "StorageTimeout: no reply within 50 ms"})
    ]
    lim.breaker.opened_at -= 10  # the reset has passed: the next call probes
    assert lim.breaker.allow()
    lim.breaker.success()
    kind, data = sink.events[-1]
    assert kind == "storage.recovered" and data["backend"] == "redis"
    assert data["down_seconds"] >= 0


def test_generic_hook_forwards_link_events() -> None:
    sink, lim = Sink(), limiter()
    hooks: list[Any] = []
    attach(sink, lim, "memory", hooks)
    for hook in hooks:
        hook("link.created", {"code": "abc", "destination": "https://x", "expires_at": None})
    assert sink.events == [
        ("link.created", {"code": "abc", "destination": "https://x", "expires_at": None})
    ]
