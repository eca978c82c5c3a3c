"""Rate-limit checks on Redis: one EVALSHA per request (per slot group in a cluster).

Keys are ``sl:{<client hash>}:<rule>:<algorithm>:<quota>``: the hash tag is
the client identity, so every rule of one request that keys on the same
identity lands in one Redis Cluster slot and is decided by one atomic script
call. When a request's keys span slots (say a per-IP and a per-API-key rule),
each slot group is one script call, sent concurrently; if any group has an
enforced denial (or fails), the groups that admitted are refunded with the
script's refund mode, so a denied request consumes no quota anywhere. The
refund is a second round trip only on that path, and between the two calls
another request may briefly see the consumed quota (it can be denied early,
never admitted beyond the limit).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import hiredis

from proxy.config import StorageConfig
from proxy.errors import StorageError
from proxy.limits.algorithms import Outcome
from proxy.limits.scripts import (
    CHECK_SCRIPT,
    CHECK_SHA,
    decode_one,
    decode_reply,
    policy_args,
    refund_args,
)
from proxy.limits.store import Check, ClientChecks
from proxy.storage.redis_client import RedisBackend, evalsha_command, open_redis
from proxy.storage.redis_cluster import key_slot

log = logging.getLogger("sluice.storage")
PACKED_MAX = 16_384  # packed EVALSHAs kept, one per ClientChecks (4,096 clients per rule)


def pack_check(checks: Sequence[Check]) -> bytes:
    """The EVALSHA deciding ``checks`` (Redis ``TIME`` as now), packed as RESP."""
    args = ["", "check"]  # now: Redis TIME
    for c in checks:
        args += policy_args(c.policy, c.cost, c.shadow)
    command = evalsha_command(CHECK_SHA, [c.key for c in checks], args)
    packed: bytes = hiredis.pack_command(command)  # type: ignore[arg-type]
    return packed


class RedisLimitStore:
    def __init__(self, backend: RedisBackend, cluster: bool) -> None:
        self.backend = backend
        self.cluster = cluster
        # By id: ``ClientChecks`` are a rule's checks for one client, built once and
        # reused for its requests (``plans.checks_for``), so their command is packed
        # once too. The entry holds them, so their id cannot be reused while cached.
        self._packed: dict[int, tuple[Sequence[Check], bytes]] = {}

    @classmethod
    def from_config(cls, storage: StorageConfig) -> RedisLimitStore:
        backend = open_redis(
            storage.url,
            timeout=storage.timeout,
            connect_timeout=storage.connect_timeout,
            pool_size=storage.pool_size,
        )
        return cls(backend, storage.scheme == "redis+cluster")

    def _packed_for(self, checks: Sequence[Check]) -> bytes:
        """``pack_check(checks)``, kept for ``ClientChecks`` (see ``__init__``); other
        checks are one request's own and packed afresh."""
        if type(checks) is not ClientChecks:
            return pack_check(checks)
        found = self._packed.get(id(checks))
        if found is not None and found[0] is checks:
            return found[1]
        packed = pack_check(checks)
        cache = self._packed
        if len(cache) >= PACKED_MAX:
            del cache[next(iter(cache))]  # the oldest entry
        cache[id(checks)] = (checks, packed)
        return packed

    async def _call(self, checks: Sequence[Check]) -> tuple[list[Outcome], list[str]]:
        if not checks:
            return [], []
        packed = self._packed_for(checks)
        reply = await self.backend.evalsha_packed(CHECK_SCRIPT, checks[0].key, packed)
        return self._decode(checks, reply)

    @staticmethod
    def _decode(checks: Sequence[Check], reply: Any) -> tuple[list[Outcome], list[str]]:
        try:
            return decode_reply([c.policy for c in checks], reply)
        except ValueError as exc:
            raise StorageError(f"unexpected script reply: {exc}") from exc

    def node_of(self, key: str) -> str | None:
        """On a Cluster, the master holding ``key`` (for per-master breakers)."""
        node_of = getattr(self.backend, "node_of", None)
        return node_of(key) if self.cluster and node_of is not None else None

    def masters(self) -> list[str]:
        """On a Cluster, the masters of the current slot map."""
        masters = getattr(self.backend, "masters", None)
        return masters() if self.cluster and masters is not None else []

    async def decide(self, checks: Sequence[Check]) -> list[Outcome]:
        if self.cluster and len(checks) > 1:
            groups: dict[int, list[int]] = {}
            for i, check in enumerate(checks):
                groups.setdefault(key_slot(check.key), []).append(i)
            if len(groups) > 1:
                return await self._decide_across_slots(checks, list(groups.values()))
        if not checks:
            return []
        # ``_call`` inlined: one coroutine less on every request's path.
        packed = self._packed_for(checks)
        reply = await self.backend.evalsha_packed(CHECK_SCRIPT, checks[0].key, packed)
        if len(checks) == 1:  # one quota, the common case: no token, no lists
            try:
                return [decode_one(checks[0].policy, reply)]
            except ValueError as exc:
                raise StorageError(f"unexpected script reply: {exc}") from exc
        return self._decode(checks, reply)[0]

    async def _decide_across_slots(
        self, checks: Sequence[Check], groups: list[list[int]]
    ) -> list[Outcome]:
        parts = [[checks[i] for i in group] for group in groups]
        results: list[Any] = await asyncio.gather(
            *(self._call(p) for p in parts), return_exceptions=True
        )
        failed: BaseException | None = None
        failed_keys: list[str] = []
        for part, result in zip(parts, results, strict=True):
            if isinstance(result, BaseException):
                failed = failed or result
                failed_keys += [c.key for c in part]
        denied = failed is None and any(
            not o.allowed and not c.shadow
            for part, (outcomes, _) in zip(parts, results, strict=True)
            for c, o in zip(part, outcomes, strict=True)
        )
        if failed is not None or denied:
            await self._refund(parts, results)
        if failed is not None:
            error = (
                failed
                if isinstance(failed, StorageError)
                else StorageError(f"cluster call failed: {failed!r}")
            )
            error.failed_keys = failed_keys  # whose masters failed it
            raise error from None if error is failed else failed
        out: list[Outcome | None] = [None] * len(checks)
        for group, (outcomes, _) in zip(groups, results, strict=True):
            for i, outcome in zip(group, outcomes, strict=True):
                out[i] = outcome
        return [o for o in out if o is not None]

    async def _refund(self, parts: list[list[Check]], results: list[Any]) -> None:
        """Undo what the admitting groups consumed (their tokens say what)."""
        calls = []
        for part, result in zip(parts, results, strict=True):
            if isinstance(result, BaseException):
                continue
            outcomes, tokens = result
            if any(not o.allowed and not c.shadow for c, o in zip(part, outcomes, strict=True)):
                continue  # this group denied: its script wrote nothing
            consumed = [(c, t) for c, o, t in zip(part, outcomes, tokens, strict=True) if o.allowed]
            if not consumed:
                continue
            args = refund_args(
                [c.policy for c, _ in consumed],
                [c.cost for c, _ in consumed],
                [t for _, t in consumed],
            )
            calls.append(
                self.backend.evalsha(CHECK_SCRIPT, CHECK_SHA, [c.key for c, _ in consumed], args)
            )
        for result in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(result, BaseException):
                log.warning("refund after a cross-slot denial failed: %r", result)

    async def close(self) -> None:
        await self.backend.close()
