"""Rate-limit response headers, from the decided outcomes (pure).

Two families, chosen per route:

* ``x-ratelimit``: ``X-RateLimit-Limit`` / ``-Remaining`` / ``-Reset`` (seconds
  until reset), as Envoy, Kong and GitHub send them, for the binding quota:
  the one with the fewest requests left.
* ``ietf``: draft-ietf-httpapi-ratelimit-headers (-10) structured fields,
  one list member per quota: ``RateLimit-Policy: "api";q=100;w=60`` and
  ``RateLimit: "api";r=42;t=17``.

``Retry-After`` (whole seconds, rounded up, never below ``t``) is set on
denials whatever the families.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from proxy.limits.algorithms import Outcome


@dataclass(frozen=True, slots=True)
class Quoted:
    """One quota's outcome, with its header label and policy member pre-rendered
    (both are static per quota, so the engine builds them once per config)."""

    label: str  # the quota's name as an sf-string
    policy: str  # its RateLimit-Policy member
    outcome: Outcome

    @classmethod
    def of(cls, name: str, window_s: float, outcome: Outcome) -> Quoted:
        return cls(sf_string(name), policy_item(name, outcome.limit, window_s), outcome)


def _seconds(ms: float) -> int:
    return max(0, math.ceil(ms / 1000 - 1e-9))


def sf_string(text: str) -> str:
    """An RFC 8941 sf-string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def policy_item(name: str, limit: int, window_s: float) -> str:
    """One ``RateLimit-Policy`` member (static per quota: built once per config)."""
    return f"{sf_string(name)};q={limit};w={max(1, round(window_s))}"


def retry_after_seconds(denied: Sequence[Outcome]) -> int:
    """The longest wait among the denying quotas, in whole seconds, at least 1."""
    return max(1, max((_seconds(o.retry_after_ms) for o in denied), default=1))


def render(
    quotas: Sequence[Quoted], families: Sequence[str], retry_after: int | None = None
) -> dict[str, str]:
    headers: dict[str, str] = {}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if not quotas:
        return headers
    if len(quotas) == 1:
        q = quotas[0]
        _render_one(headers, q.label, q.policy, q.outcome, families)
        return headers
    if "x-ratelimit" in families:
        binding = min(quotas, key=lambda q: (q.outcome.remaining, -q.outcome.reset_ms))
        headers["X-RateLimit-Limit"] = str(binding.outcome.limit)
        headers["X-RateLimit-Remaining"] = str(binding.outcome.remaining)
        headers["X-RateLimit-Reset"] = str(_seconds(binding.outcome.reset_ms))
    if "ietf" in families:
        headers["RateLimit-Policy"] = ", ".join(q.policy for q in quotas)
        headers["RateLimit"] = ", ".join(
            f"{q.label};r={q.outcome.remaining};t={_seconds(q.outcome.reset_ms)}" for q in quotas
        )
    return headers


def render_one(
    label: str, policy: str, outcome: Outcome, families: Sequence[str]
) -> dict[str, str]:
    """``render`` of one quota, allowed (no ``Retry-After``): the request path's common case."""
    headers: dict[str, str] = {}
    _render_one(headers, label, policy, outcome, families)
    return headers


def _render_one(
    headers: dict[str, str], label: str, policy: str, outcome: Outcome, families: Sequence[str]
) -> None:
    remaining = str(outcome.remaining)
    reset = str(_seconds(outcome.reset_ms))
    if "x-ratelimit" in families:
        headers["X-RateLimit-Limit"] = str(outcome.limit)
        headers["X-RateLimit-Remaining"] = remaining
        headers["X-RateLimit-Reset"] = reset
    if "ietf" in families:
        headers["RateLimit-Policy"] = policy
        headers["RateLimit"] = f"{label};r={remaining};t={reset}"
