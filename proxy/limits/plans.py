"""Rules prepared once per config load, and each client's checks built from them.

A ``RulePlan`` holds what a request needs of a rule without parsing: its
quotas as ``Policy`` objects (and the ``local`` fallback's, divided by
``storage.expected_instances``), header labels, and per quota the tag of its
key ``sl:{<client hash>}:<rule>:<algorithm>:<fingerprint>``: the hash tag is
the client identity (one Cluster slot per client), the fingerprint changes
with the quota so a changed limit counts afresh. ``checks_for`` builds (and
per plan caches, for its latest clients) one client's checks.

A what-if candidate's plans (``candidate_plans``) are the same with every
check in shadow and keys under ``c:``, so they never share a live counter.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache

from proxy.config import Config, StorageConfig
from proxy.limits.algorithms import Policy
from proxy.limits.headers import policy_item, sf_string
from proxy.limits.store import Check, ClientChecks
from proxy.limitspec import LimitRule

CHECKS_CACHE_MAX = 4096  # per rule: the latest clients' checks, built once (keys hashed once)
ALGO_TAGS = {
    "fixed_window": "fw",
    "sliding_window_log": "swl",
    "sliding_window_counter": "swc",
    "token_bucket": "tb",
    "gcra": "gcra",
}


def _window_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds * 1000:g}ms"


@dataclass(frozen=True, slots=True)
class RulePlan:
    """A rule prepared once per config load, so requests do no parsing."""

    rule: LimitRule
    policies: tuple[Policy, ...]
    local_policies: tuple[Policy, ...]  # limits divided by storage.expected_instances
    labels: tuple[str, ...]  # each quota's name in the IETF headers (sf-string)
    policy_items: tuple[str, ...]  # each quota's RateLimit-Policy member
    tags: tuple[str, ...]  # per quota: "<rule>:<algorithm>:<fingerprint>", part of its key
    # Per client, this rule's checks at its configured cost (see ``checks_for``). A plan
    # lives as long as its config, so a reload starts afresh with the new policies.
    checks: dict[str, ClientChecks] = field(default_factory=dict, compare=False, repr=False)


def _fingerprint(policy: Policy) -> str:
    """Stored state is in units of its policy: a changed limit or window gets fresh keys
    rather than misreading the old state. The check script relies on this too: a fixed
    window's or a window counter's key gets its TTL when its window opens and keeps it
    (``lua/fixed_window.lua``), which is right only while the key's window never
    changes. (24 bits: a changed policy reusing a key takes a 1-in-16-million clash.)"""
    text = f"{policy.limit}/{policy.window_ms!r}/{policy.burst}"
    return hashlib.blake2b(text.encode(), digest_size=3).hexdigest()


def plan_rules(limits: Mapping[str, LimitRule], storage: StorageConfig) -> dict[str, RulePlan]:
    plans = {}
    n = storage.expected_instances
    for name, rule in limits.items():
        policies = tuple(
            Policy(rule.algorithm, q.limit, q.window * 1000, rule.burst) for q in rule.quotas
        )
        local = tuple(
            Policy(p.algorithm, max(1, p.limit // n), p.window_ms, p.burst // n if p.burst else 0)
            for p in policies
        )
        names = (
            (name,)
            if len(rule.quotas) == 1
            else tuple(f"{name}/{_window_text(q.window)}" for q in rule.quotas)
        )
        plans[name] = RulePlan(
            rule,
            policies,
            local,
            tuple(sf_string(n) for n in names),
            tuple(
                policy_item(n, q.limit, q.window) for n, q in zip(names, rule.quotas, strict=True)
            ),
            tuple(f"{name}:{ALGO_TAGS[p.algorithm]}:{_fingerprint(p)}" for p in policies),
        )
    return plans


CANDIDATE_TAG = "c:"  # candidate keys: sl:{client}:c:<rule>:…, never a live rule's counters


def candidate_plans(plans: Mapping[str, RulePlan]) -> dict[str, RulePlan]:
    """A what-if candidate's plans: every check in shadow, under keys of its own (the
    candidate's own ``shadow`` flags stay on its config's rules)."""
    return {
        name: replace(
            plan,
            rule=replace(plan.rule, shadow=True),
            tags=tuple(CANDIDATE_TAG + tag for tag in plan.tags),
            checks={},
        )
        for name, plan in plans.items()
    }


@dataclass(frozen=True, slots=True)
class CandidateRules:
    """A what-if candidate's rules for one request (``proxy.whatif``): decided in the
    same store call as the live ones, in shadow, never changing the answer."""

    config: Config
    plans: Mapping[str, RulePlan]  # from ``candidate_plans``
    rule_names: Sequence[str]
    route: str


def _client_hash(client: str) -> str:
    return hashlib.blake2b(client.encode(), digest_size=9).hexdigest()


@lru_cache(maxsize=CHECKS_CACHE_MAX)
def _key_prefix(client: str) -> str:
    """``sl:{<client hash>}:``: the hash tag keeps one client's keys on one Cluster slot."""
    return f"sl:{{{_client_hash(client)}}}:"


def checks_for(plan: RulePlan, client: str, cost: int) -> Sequence[Check]:
    """The rule's checks for this client; at the rule's own cost they are built once
    per client (the latest ``CHECKS_CACHE_MAX`` clients) and reused: ``ClientChecks``.
    At another cost (``cost: header:…``) they are a list, built for the one request."""
    rule = plan.rule
    if cost != rule.cost:
        prefix = _key_prefix(client)
        return [
            Check(prefix + tag, policy, cost, rule.shadow)
            for tag, policy in zip(plan.tags, plan.policies, strict=True)
        ]
    found = plan.checks.get(client)
    if found is not None:
        return found
    prefix = _key_prefix(client)
    made = ClientChecks(
        Check(prefix + tag, policy, cost, rule.shadow)
        for tag, policy in zip(plan.tags, plan.policies, strict=True)
    )
    cache = plan.checks
    if len(cache) >= CHECKS_CACHE_MAX:
        del cache[next(iter(cache))]  # the oldest entry
    cache[client] = made
    return made
