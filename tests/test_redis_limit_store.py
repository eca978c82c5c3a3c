"""The Redis rate-limit store's packed commands: a client's checks (a tuple the rule
plan keeps) are packed into RESP once and resent as is; per-request lists (a
``cost: header:…`` request) are packed afresh; and both decide the same on a real
redis-server as the arguments did."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import hiredis
import pytest

from proxy.config import loads
from proxy.errors import StorageError
from proxy.limits.plans import checks_for, plan_rules
from proxy.limits.scripts import CHECK_SHA, policy_args
from proxy.limits.store import Check, ClientChecks
from proxy.storage import redis_limits
from proxy.storage.redis_client import ScriptCall, open_redis
from proxy.storage.redis_limits import RedisLimitStore
from tests.servers import RedisServer

RULES = """
upstreams: {up: "http://127.0.0.1:1"}
limits:
  - {name: api, key: ip, algorithm: fixed_window, limit: 3, window: 1m, cost: "header:X-Cost"}
routes:
  - {name: r, match: {path_prefix: /}, upstream: up, limits: [api]}
"""


class Recording:
    """A backend that answers every EVALSHA "allowed" and keeps what it was sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    async def evalsha_packed(self, script: bytes, key: str, packed: bytes) -> Any:
        self.sent.append((key, packed))
        n = packed.count(b"sl:{")
        return [1, 2, 60_000_000, 0, b"t"] * n

    async def execute(self, *args: Any, key: Any = None) -> Any:
        raise AssertionError("not used")

    async def evalsha(self, script: bytes, sha: str, keys: Any, args: Any) -> Any:
        raise AssertionError("the store sends packed commands")

    async def evalsha_many(self, calls: Sequence[ScriptCall]) -> list[Any]:
        raise AssertionError("not used")

    async def close(self) -> None:
        pass


def plan() -> Any:
    config = loads(RULES)
    return plan_rules(config.limits, config.storage)["api"]


def expected(checks: Sequence[Check]) -> bytes:
    args: list[str] = ["", "check"]
    for c in checks:
        args += policy_args(c.policy, c.cost, c.shadow)
    return hiredis.pack_command(  # type: ignore[no-any-return]
        ("EVALSHA", CHECK_SHA, len(checks), *(c.key for c in checks), *args)  # type: ignore[arg-type]
    )


async def test_a_clients_checks_are_packed_once_and_resent() -> None:
    backend = Recording()
    store = RedisLimitStore(backend, cluster=False)  # type: ignore[arg-type]
    api = plan()
    checks = checks_for(api, "ip=10.0.0.1", 1)
    assert type(checks) is ClientChecks
    for _ in range(3):
        (outcome,) = await store.decide(checks)
        assert outcome.allowed and outcome.remaining == 2
    (key, first), *rest = backend.sent
    assert key == checks[0].key
    assert first == expected(checks)
    assert all(packed is first for _, packed in rest), "packed again for the same checks"


async def test_per_request_checks_are_not_kept_and_the_cache_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(redis_limits, "PACKED_MAX", 2)
    backend = Recording()
    store = RedisLimitStore(backend, cluster=False)  # type: ignore[arg-type]
    api = plan()
    weighted = checks_for(api, "ip=10.0.0.1", 3)  # another cost than the rule's
    assert type(weighted) is list
    await store.decide(weighted)
    assert backend.sent[-1][1] == expected(weighted)
    assert store._packed == {}
    await store.decide(tuple(checks_for(api, "ip=10.0.0.1", 1)))  # a plain tuple: not kept
    assert store._packed == {}
    for i in range(3):
        await store.decide(checks_for(api, f"ip=10.0.0.{i}", 1))
    assert len(store._packed) == 2
    kept = [checks for checks, _ in store._packed.values()]
    assert kept == [checks_for(api, f"ip=10.0.0.{i}", 1) for i in (1, 2)]


class Garbled(Recording):
    """Answers every EVALSHA with a reply the script never gives."""

    def __init__(self, reply: Any) -> None:
        super().__init__()
        self.reply = reply

    async def evalsha_packed(self, script: bytes, key: str, packed: bytes) -> Any:
        return self.reply


@pytest.mark.parametrize(
    "reply", [[1, 2, b"60000000", 0, b""], [1, 2, 60_000_000, 0], b"OK", None, 7]
)
@pytest.mark.parametrize("quotas", [1, 2])
async def test_a_reply_the_script_never_gives_is_a_storage_error(reply: Any, quotas: int) -> None:
    """So the engine counts it against the breaker and applies on_storage_error, for one
    check (decoded without lists) as for several."""
    store = RedisLimitStore(Garbled(reply), cluster=False)  # type: ignore[arg-type]
    checks = checks_for(plan(), "ip=10.0.0.1", 1)
    with pytest.raises(StorageError, match="unexpected script reply"):
        await store.decide(list(checks) * quotas)


@pytest.fixture
async def store(redis: RedisServer) -> AsyncIterator[RedisLimitStore]:
    backend = open_redis(redis.url, timeout=1.0, connect_timeout=1.0)
    yield RedisLimitStore(backend, cluster=False)
    await backend.close()


async def test_packed_and_fresh_commands_count_alike_on_redis(store: RedisLimitStore) -> None:
    """Through a real redis-server (NOSCRIPT on the first call loads the script): the
    kept tuple and per-request lists of the same key share one counter."""
    api = plan()
    kept = checks_for(api, "ip=10.0.0.9", 1)
    results = []
    for checks in (kept, checks_for(api, "ip=10.0.0.9", 2), kept, kept):
        (outcome,) = await store.decide(checks)
        results.append((outcome.allowed, outcome.remaining))
    # 1 + 2 = 3 consumed: the next one is denied, and a denial consumes nothing
    assert results == [(True, 2), (True, 0), (False, 0), (False, 0)]
