"""The Redis twin of :mod:`proxy.limits.algorithms`: one Lua script, its SHA,
and the pure encoding of its arguments and reply (no I/O here).

The script is ``lua/common.lua``, the five algorithm files and ``lua/check.lua``
(the driver) concatenated, so one EVALSHA decides all of a request's checks.
Calling convention (see ``check.lua``)::

    EVALSHA CHECK_SHA <n> key_1 .. key_n  <now_ms | ''> <'check' | 'refund'>
            then per check: code cost limit window_ms burst [token]

``now`` is '' in production (the script reads Redis ``TIME``, so proxies with
skewed clocks agree); tests pass an explicit time. The keys must be distinct and
each must belong to one algorithm only (its Redis type differs per algorithm).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from importlib.resources import files

from proxy.limits.algorithms import ALGORITHMS, Outcome, Policy

ALGORITHM_CODES: dict[str, int] = {name: code for code, name in enumerate(ALGORITHMS, start=1)}
CHECK_FIELDS = 5  # per check in check mode; refund mode adds the token
REPLY_FIELDS = 5  # per check: allowed, remaining, reset_us, retry_after_us, token

_PARTS = ("common", *ALGORITHMS, "check")


def _source() -> bytes:
    lua = files("proxy.limits") / "lua"
    return b"\n".join((lua / f"{name}.lua").read_bytes() for name in _PARTS)


CHECK_SCRIPT: bytes = _source()
CHECK_SHA: str = hashlib.sha1(CHECK_SCRIPT).hexdigest()


def _now_arg(now_ms: float | None) -> str:
    return "" if now_ms is None else repr(float(now_ms))


@functools.lru_cache(maxsize=4096)  # few policies and costs: build the strings once
def policy_args(policy: Policy, cost: int, shadow: bool = False) -> tuple[str, ...]:
    """One check's part of ARGV in check mode (``check_args`` without the checks)."""
    if isinstance(cost, bool) or not isinstance(cost, int) or cost < 1:
        raise ValueError(f"cost must be an integer >= 1, got {cost!r}")
    code = ALGORITHM_CODES[policy.algorithm]
    return (
        str(-code if shadow else code),  # a negative code marks a shadow check
        str(cost),
        str(policy.limit),
        repr(float(policy.window_ms)),
        str(policy.burst),
    )


def check_args(
    policies: Sequence[Policy],
    costs: Sequence[int],
    now_ms: float | None = None,
    shadow: Sequence[bool] | None = None,
) -> list[str]:
    """ARGV for one all-or-nothing check of ``policies`` (KEYS in the same order).

    ``now_ms`` None means the script uses Redis ``TIME`` (production). ``shadow``
    flags checks that are reported but never veto the call (see
    :func:`proxy.limits.algorithms.evaluate`).
    """
    if len(policies) != len(costs):
        raise ValueError("policies and costs must have the same length")
    flags = [False] * len(policies) if shadow is None else list(shadow)
    if len(flags) != len(policies):
        raise ValueError("shadow must have one flag per policy")
    args = [_now_arg(now_ms), "check"]
    for policy, cost, flag in zip(policies, costs, flags, strict=True):
        args += policy_args(policy, cost, flag)
    return args


def refund_args(
    policies: Sequence[Policy],
    costs: Sequence[int],
    tokens: Sequence[str],
    now_ms: float | None = None,
) -> list[str]:
    """ARGV that undoes one admitted check of ``policies`` with these ``costs``.

    ``tokens`` are the ones that check's reply returned, in the same order.
    """
    if not len(policies) == len(costs) == len(tokens):
        raise ValueError("policies, costs and tokens must have the same length")
    args = [_now_arg(now_ms), "refund"]
    for policy, cost, token in zip(policies, costs, tokens, strict=True):
        args += [*policy_args(policy, cost), token]
    return args


def _token(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


def decode_one(policy: Policy, reply: object) -> Outcome:
    """``decode_reply`` of one check in check mode, without its token: a request's
    decision needs no token (only a refund across Cluster slots does)."""
    if type(reply) is list and len(reply) == REPLY_FIELDS:
        allowed, remaining, reset_us, retry_us, _ = reply
        if type(allowed) is type(remaining) is type(reset_us) is type(retry_us) is int:
            return Outcome(allowed == 1, policy.limit, remaining, reset_us / 1000, retry_us / 1000)
    return decode_reply((policy,), reply)[0][0]  # raises its ValueError, or decodes a tuple


def decode_reply(policies: Sequence[Policy], reply: object) -> tuple[list[Outcome], list[str]]:
    """The script's flat reply as one :class:`Outcome` and one token per check.

    Accepts what redis-py returns with or without ``decode_responses`` (the four
    numbers are integer replies: ints either way). In refund mode the outcomes
    describe each key's standing after the refund (as a cost-0 check) and the
    tokens are empty.
    """
    if not isinstance(reply, list | tuple) or len(reply) != REPLY_FIELDS * len(policies):
        raise ValueError(f"unexpected reply for {len(policies)} checks: {reply!r}")
    outcomes: list[Outcome] = []
    tokens: list[str] = []
    if len(policies) == 1:  # one check: the common case, unpacked without slicing
        allowed, remaining, reset_us, retry_us, token = reply
        if not (type(allowed) is type(remaining) is type(reset_us) is type(retry_us) is int):
            raise ValueError(f"unexpected reply for 1 check: {reply!r}")
        limit = policies[0].limit
        return [Outcome(allowed == 1, limit, remaining, reset_us / 1000, retry_us / 1000)], [
            _token(token)
        ]
    at = 0
    for policy in policies:
        allowed, remaining, reset_us, retry_us, token = reply[at : at + REPLY_FIELDS]
        at += REPLY_FIELDS
        if not (type(allowed) is type(remaining) is type(reset_us) is type(retry_us) is int):
            raise ValueError(f"unexpected reply for {len(policies)} checks: {reply!r}")
        # µs / 1000 here rounds exactly as the Python twin's ``us / 1000`` does.
        outcomes.append(
            Outcome(allowed == 1, policy.limit, remaining, reset_us / 1000, retry_us / 1000)
        )
        tokens.append(_token(token))
    return outcomes, tokens
