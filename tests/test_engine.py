"""The limiter's request path, pure (in-process store): keys, the per-rule cache of
checks, and the one-quota fast path agreeing with the general one."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from multidict import CIMultiDict

from proxy.config import Config, HeaderPolicy, loads
from proxy.limits import plans as plans_module
from proxy.limits.algorithms import Outcome
from proxy.limits.engine import Limiter
from proxy.limits.plans import RulePlan, plan_rules
from proxy.limits.store import Check, MemoryLimitStore
from proxy.metrics import Metrics

RULES = """
upstreams: {up: "http://127.0.0.1:1"}
limits:
  - {name: one, key: ip, algorithm: fixed_window, limit: 3, window: 1m, cost: "header:X-Cost"}
  - {name: two, key: ip, algorithm: sliding_window_counter, limit: 2, window: 1m}
  - {name: watch, key: ip, algorithm: gcra, limit: 1, window: 1h, shadow: true}
routes:
  - {name: r, match: {path_prefix: /}, upstream: up, limits: [one]}
"""


@dataclass
class Request:
    method: str = "GET"
    path: str = "/x"
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    query: dict[str, str] = field(default_factory=dict)
    cookies: dict[str, str] = field(default_factory=dict)


class RecordingStore(MemoryLimitStore):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Sequence[Check]] = []

    async def decide(self, checks: Sequence[Check]) -> list[Outcome]:
        self.calls.append(checks)
        return self.decide_now(checks)


def setup(text: str = RULES) -> tuple[Config, dict[str, RulePlan], Limiter, RecordingStore]:
    config = loads(text)
    store = RecordingStore()
    return (
        config,
        plan_rules(config.limits, config.storage),
        Limiter(store, config.storage, Metrics()),
        store,
    )


async def test_keys_are_the_hashed_client_and_the_rule_tag() -> None:
    config, plans, limiter, store = setup()
    verdict = await limiter.check(config, plans, ["one"], Request(), "10.0.0.1", "r")
    assert verdict.status is None
    digest = hashlib.blake2b(b"ip=10.0.0.1", digest_size=9).hexdigest()
    (check,) = store.calls[0]
    assert check.key == f"sl:{{{digest}}}:{plans['one'].tags[0]}"
    assert check.key.startswith(f"sl:{{{digest}}}:one:fw:")
    assert (check.cost, check.shadow) == (1, False)


async def test_checks_are_built_once_per_client_and_the_cache_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(plans_module, "CHECKS_CACHE_MAX", 3)
    config, plans, limiter, store = setup()
    for _ in range(2):
        await limiter.check(config, plans, ["one"], Request(), "10.0.0.1", "r")
    assert store.calls[0] is store.calls[1]  # the same checks, not rebuilt
    for i in range(2, 10):
        await limiter.check(config, plans, ["one"], Request(), f"10.0.0.{i}", "r")
    assert list(plans["one"].checks) == ["ip=10.0.0.7", "ip=10.0.0.8", "ip=10.0.0.9"]
    # A cost from the request's header is decided at that cost, and not cached.
    request = Request(headers=CIMultiDict({"X-Cost": "2"}))
    await limiter.check(config, plans, ["one"], request, "10.0.0.9", "r")
    assert store.calls[-1][0].cost == 2
    assert plans["one"].checks["ip=10.0.0.9"][0].cost == 1
    # A reload plans afresh: new policies get new keys, never the old cached checks.
    new_config, new_plans, _, _ = setup(RULES.replace("limit: 3,", "limit: 4,"))
    await limiter.check(new_config, new_plans, ["one"], Request(), "10.0.0.9", "r")
    assert store.calls[-1][0].key != plans["one"].checks["ip=10.0.0.9"][0].key
    assert store.calls[-1][0].policy.limit == 4


@pytest.mark.parametrize(
    "families", [("x-ratelimit", "ietf"), ("ietf",), ("x-ratelimit",), ()], ids=str
)
async def test_one_quota_fast_path_matches_the_general_path(families: tuple[str, ...]) -> None:
    """One allowed quota takes the fast path; with a shadow rule beside it the same
    request goes the general way: verdicts (headers, decisions) must agree."""
    policy = HeaderPolicy(families=families)
    results = []
    for names in (["one"], ["one", "watch"]):
        config, plans, limiter, _ = setup()
        verdict = await limiter.check(config, plans, names, Request(), "10.0.0.1", "r", policy)
        results.append(verdict)
    fast, general = results
    assert fast.status is general.status is None
    assert fast.headers == general.headers
    assert list(fast.headers) == list(general.headers)  # same order on the wire
    assert fast.decisions == general.decisions[:1]
    assert fast.decisions[0].result == "allowed" and not fast.degraded


async def test_denials_and_the_deny_cache_still_work_with_cached_checks() -> None:
    config, plans, limiter, store = setup()
    codes = []
    for _ in range(5):
        verdict = await limiter.check(config, plans, ["one", "two"], Request(), "10.0.0.1", "r")
        codes.append(verdict.status)
    assert codes == [None, None, 429, 429, 429]
    assert len(store.calls) == 3  # the fourth and fifth come from the deny cache
    assert limiter.deny_cache
