"""Per-master circuit breakers, pure: a stand-in Cluster store whose slot map and dead
masters the test sets (the real Cluster path is in tests/test_cluster_e2e.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from multidict import CIMultiDict

from proxy.config import loads
from proxy.errors import StorageError
from proxy.limits.algorithms import Outcome
from proxy.limits.engine import Limiter
from proxy.limits.plans import plan_rules
from proxy.limits.store import Check, MemoryLimitStore
from proxy.metrics import Metrics
from tests.test_engine import Request

RULES = """
storage: {breaker_failures: 2, breaker_reset: 1s}
upstreams: {up: "http://127.0.0.1:1"}
limits:
  - {name: by_key, key: "header:X-Key", algorithm: fixed_window, limit: 100, window: 1m}
  - {name: by_ip, key: ip, algorithm: fixed_window, limit: 100, window: 1m}
routes:
  - {name: r, match: {path_prefix: /}, upstream: up, limits: [by_key, by_ip]}
"""


class FakeCluster(MemoryLimitStore):
    """Keys go to the master ``owner`` names for their client; ``down`` masters fail."""

    cluster = True

    def __init__(self) -> None:
        super().__init__()
        self.owner: dict[str, str] = {}  # client hash tag -> master
        self.down: set[str] = set()
        self.known = True  # the slot map has been loaded
        self._masters: list[str] = []
        self.hang = False

    def set_masters(self, owner: dict[str, str]) -> None:
        self.owner = owner
        self._masters = sorted(set(owner.values()))  # a new list, as a reload makes

    def masters(self) -> list[str]:
        return self._masters

    def node_of(self, key: str) -> str | None:
        if not self.known:
            return None
        return self.owner.get(key[key.find("{") : key.find("}") + 1])

    async def decide(self, checks: Sequence[Check]) -> list[Outcome]:
        if self.hang:
            await asyncio.sleep(3600)
        if not self.known:
            raise StorageError("slot map unavailable")
        dead = [c.key for c in checks if self.node_of(c.key) in self.down]
        if dead:
            error = StorageError("master down")
            if len({self.node_of(c.key) for c in checks}) > 1:
                error.failed_keys = dead
            raise error
        return self.decide_now(checks)


def tag_of(limiter: Limiter, plans: dict, client: str) -> str:
    from proxy.limits.plans import _key_prefix

    prefix = _key_prefix(client)
    return prefix[prefix.find("{") : prefix.find("}") + 1]


@pytest.fixture
def lab() -> tuple:
    config = loads(RULES)
    store = FakeCluster()
    limiter = Limiter(store, config.storage, Metrics())
    transitions: list[tuple[str, str]] = []
    limiter.on_transition.append(lambda old, new: transitions.append((old, new)))
    plans = plan_rules(config.limits, config.storage)
    return config, plans, limiter, store, transitions


def request(key: str) -> Request:
    return Request(headers=CIMultiDict({"X-Key": key}))


async def decide(lab: tuple, rules: list[str], key: str, ip: str) -> bool:
    """True when the limiter reached the store and decided (not degraded)."""
    config, plans, limiter, _, _ = lab
    verdict = await limiter.check(config, plans, rules, request(key), ip, "r")
    return not verdict.degraded


def place(lab: tuple, owner: dict[str, str]) -> None:
    _, plans, limiter, store, _ = lab
    store.set_masters({tag_of(limiter, plans, client): node for client, node in owner.items()})


async def test_a_dead_master_degrades_only_its_clients(lab: tuple) -> None:
    _, _, limiter, store, transitions = lab
    place(lab, {"header:X-Key=a": "A", "header:X-Key=b": "B"})
    store.down = {"A"}
    for _ in range(2):
        assert not await decide(lab, ["by_key"], "a", "10.0.0.1")
    assert limiter.open_nodes == ["A"] and limiter.breaker_state == "open"
    assert await decide(lab, ["by_key"], "b", "10.0.0.1")  # B's clients: decided as ever
    assert transitions == [("closed", "open")]  # one storage.degraded, not one per master


async def test_a_failed_over_master_does_not_stay_degraded(lab: tuple) -> None:
    _, _, limiter, store, transitions = lab
    place(lab, {"header:X-Key=a": "A"})
    store.down = {"A"}
    for _ in range(2):
        await decide(lab, ["by_key"], "a", "10.0.0.1")
    assert limiter.open_nodes == ["A"]
    place(lab, {"header:X-Key=a": "A2"})  # its replica took over: a new slot map
    assert await decide(lab, ["by_key"], "a", "10.0.0.1")
    assert limiter.open_nodes == [] and limiter.breaker_state == "closed"
    assert transitions == [("closed", "open"), ("open", "closed")]  # recovered reported


async def test_the_store_breaker_closes_once_the_slot_map_is_known(lab: tuple) -> None:
    _, _, limiter, store, transitions = lab
    place(lab, {"header:X-Key=a": "A"})
    store.known = False
    for _ in range(2):
        assert not await decide(lab, ["by_key"], "a", "10.0.0.1")
    assert limiter.breaker_state == "open" and limiter.open_nodes == []
    store.known = True
    assert await decide(lab, ["by_key"], "a", "10.0.0.1")
    assert limiter.breaker_state == "closed"
    assert transitions == [("closed", "open"), ("open", "closed")]


async def test_a_call_across_masters_charges_only_the_one_that_failed(lab: tuple) -> None:
    _, _, limiter, store, _ = lab
    place(lab, {"header:X-Key=a": "A", "ip=10.0.0.1": "B", "header:X-Key=b": "B"})
    store.down = {"A"}
    for _ in range(4):  # by_key on A, by_ip on B: one call spans both
        assert not await decide(lab, ["by_key", "by_ip"], "a", "10.0.0.1")
    assert limiter.open_nodes == ["A"]
    assert limiter.node_breakers["B"].failures == 0
    assert await decide(lab, ["by_key"], "b", "10.0.0.2")  # B's own clients: unaffected


async def test_a_cancelled_call_frees_only_the_probe_it_took(lab: tuple) -> None:
    _, _, limiter, store, _ = lab
    place(lab, {"header:X-Key=a": "A"})
    store.hang = True
    early = asyncio.ensure_future(decide(lab, ["by_key"], "a", "10.0.0.1"))  # A closed
    await asyncio.sleep(0.01)
    a = limiter.node_breakers["A"]
    a.failure()
    a.failure()  # meanwhile A opened (other calls failed) ...
    a.opened_at -= 10  # ... and its reset passed
    probe = asyncio.ensure_future(decide(lab, ["by_key"], "a", "10.0.0.1"))
    await asyncio.sleep(0.01)
    assert a.state == "half_open" and a.probing  # the second call is the probe
    early.cancel()
    await asyncio.gather(early, return_exceptions=True)
    assert a.probing  # the first call, cancelled, did not free the probe it never took
    assert not a.allow()  # so no second probe goes out
    probe.cancel()
    await asyncio.gather(probe, return_exceptions=True)
    assert not a.probing  # the probe's own cancellation freed it
