"""Redis memory per tracked client, per algorithm (DESIGN §3).

For each algorithm, on a redis-server of its own that only this uses:
FLUSHALL, load the check script, read ``used_memory``; then make ``clients``
distinct clients (10.x.y.z) send one request each, as the real check script
sees it: ``EVALSHA CHECK_SHA`` with the keys and ARGV Sluice itself builds
(``proxy.limits.engine``'s rule plans and client hashing, ``check_args``),
pipelined on one connection; read ``used_memory`` again. The difference over
the number of keys created is what one tracked client costs: its key, value,
TTL and its share of the keyspace and expires tables (their bucket arrays
grow in powers of two, so the share depends a little on the count). Redis's
time per script call meanwhile (``INFO commandstats``) is noted as well: the
server-side cost of one check of a new client with that algorithm.

The keys are checked against the engine's own path first: for a sample of
clients a ``Limiter`` with a recording store must produce exactly the same
keys and ARGV (so the figures are for the keys production writes, and the
check would fail if the key format moved).

The policy is 10 per hour for every algorithm (token bucket: capacity 10,
refill 10/h) so that no state expires during the measurement (GCRA's and the
token bucket's state lives only until one request's worth has refilled).
``sliding_window_log`` keeps one sorted-set entry per admitted request; it is
measured with one entry per client, then one client in five sends a second
request and the difference over their number is the cost of each further entry.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import hiredis
import yaml

from bench import sluice
from bench.redis_stats import CommandCounts, RedisProbe
from proxy import config as configmod
from proxy.config import Config
from proxy.limits.algorithms import ALGORITHMS, Outcome
from proxy.limits.engine import Limiter
from proxy.limits.identity import identify
from proxy.limits.plans import RulePlan, _client_hash, plan_rules
from proxy.limits.scripts import CHECK_SCRIPT, CHECK_SHA, check_args
from proxy.limits.store import Check
from proxy.metrics import Metrics

RULE = "per_client"  # the rule's name is part of each key, so its length counts
ROUTE = "all"
VERIFY_SAMPLE = 200
FURTHER_SHARE = 5  # sliding_window_log: a second request from one client in this many


def memory_limit(algorithm: str) -> dict[str, object]:
    rule: dict[str, object] = {"name": RULE, "key": "ip", "algorithm": algorithm}
    if algorithm == "token_bucket":
        rule.update(capacity=10, refill="10/h")
    else:
        rule.update(limit=10, window="1h")
    return rule


def client_ip(i: int) -> str:
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


class _Headers:
    def get(self, key: str, /) -> str | None:
        return None

    def getall(self, key: str, default: Sequence[str], /) -> Sequence[str]:
        return default


class _Request:
    """The little of a request the engine reads for a per-IP rule."""

    method = "GET"
    path = "/bench/item"
    headers = _Headers()
    query: dict[str, str] = {}
    cookies: dict[str, str] = {}


class _Recorder:
    """A LimitStore that records what it is asked and admits everything."""

    def __init__(self) -> None:
        self.calls: list[list[Check]] = []

    async def decide(self, checks: Sequence[Check]) -> list[Outcome]:
        self.calls.append(list(checks))
        return [Outcome(True, c.policy.limit, c.policy.limit - 1, 0.0, 0.0) for c in checks]

    async def close(self) -> None:
        pass


def _config(algorithm: str) -> Config:
    data = sluice.rules(
        sluice.Variant(redis=True, limits=(memory_limit(algorithm),)),
        port=1,
        admin_port=2,
        upstream="http://127.0.0.1:3",
        storage="redis://127.0.0.1:4/0",
        data_dir=Path("var"),
    )
    return configmod.loads(yaml.safe_dump(data), f"<memory {algorithm}>")


Command = tuple[str | int, ...]


def _builder(config: Config) -> Callable[[int], Command]:
    """Client index -> the EVALSHA Sluice sends for that client's request."""
    plan: RulePlan = plan_rules(config.limits, config.storage)[RULE]
    rule = plan.rule
    args = check_args(plan.policies, [rule.cost] * len(plan.policies))
    request = _Request()

    def build(i: int) -> Command:
        client = identify(rule.key, request, client_ip(i), ROUTE)
        prefix = f"sl:{{{_client_hash(client or 'anonymous')}}}:"
        keys = [prefix + tag for tag in plan.tags]
        return ("EVALSHA", CHECK_SHA, len(keys), *keys, *args)

    return build


async def _engine_commands(config: Config, count: int) -> list[Command]:
    """What the engine itself sends for the first ``count`` clients."""
    recorder = _Recorder()
    limiter = Limiter(recorder, config.storage, Metrics())
    plans = plan_rules(config.limits, config.storage)
    for i in range(count):
        await limiter.check(config, plans, [RULE], _Request(), client_ip(i), ROUTE)
    out: list[Command] = []
    for checks in recorder.calls:
        keys = [c.key for c in checks]
        args = check_args(
            [c.policy for c in checks], [c.cost for c in checks], shadow=[c.shadow for c in checks]
        )
        out.append(("EVALSHA", CHECK_SHA, len(keys), *keys, *args))
    return out


def verify_keys(algorithm: str) -> Callable[[int], Command]:
    """The command builder for ``algorithm``, checked against the engine's own output."""
    config = _config(algorithm)
    build = _builder(config)
    engine = asyncio.run(_engine_commands(config, VERIFY_SAMPLE))
    ours = [build(i) for i in range(VERIFY_SAMPLE)]
    if [tuple(map(str, c)) for c in engine] != [tuple(map(str, c)) for c in ours]:
        raise RuntimeError(
            f"bench/redis_memory.py builds different keys or ARGV than the engine for"
            f" {algorithm}: {ours[0]} vs {engine[0] if engine else None}"
        )
    return build


@dataclass(frozen=True)
class MemoryRow:
    algorithm: str
    clients: int  # keys created
    bytes_per_client: float
    redis_type: str
    encoding: str
    memory_usage_one_key: int  # MEMORY USAGE of one key (value + key; no table share)
    redis_us_per_check: float  # Redis's time per EVALSHA while creating them (new keys)
    seconds: float
    per_further_entry: float | None = None  # sliding_window_log: each extra request


def _fill(url: str, commands: Iterator[Command], deadline: float) -> int:
    """Run ``commands`` on a connection of their own; how many were admitted."""
    conn = RedisProbe(url)
    admitted = 0
    try:
        chunk: list[Command] = []
        for command in commands:
            chunk.append(command)
            if len(chunk) == 2000:
                admitted += _admitted(conn.pipeline(chunk))
                chunk = []
                if time.monotonic() > deadline:
                    break
        admitted += _admitted(conn.pipeline(chunk)) if chunk else 0
    finally:
        conn.close()
    time.sleep(0.05)  # let the server free the closed client before reading memory
    return admitted


def _admitted(replies: list[Any]) -> int:
    for reply in replies:
        if isinstance(reply, hiredis.ReplyError):
            raise RuntimeError(f"check script failed: {reply}")
        if not isinstance(reply, list) or int(reply[0]) != 1:
            raise RuntimeError(f"check script denied or misread a fresh client: {reply!r}")
    return len(replies)


def measure_one(probe: RedisProbe, algorithm: str, clients: int, budget: float) -> MemoryRow:
    build = verify_keys(algorithm)
    started = time.monotonic()
    deadline = started + budget
    probe.call("FLUSHALL")
    probe.call("SCRIPT", "LOAD", CHECK_SCRIPT)
    before, stats = probe.used_memory(), probe.command_stats()
    made = _fill(probe.url, (build(i) for i in range(clients)), deadline)
    after, counts = probe.used_memory(), CommandCounts.between(stats, probe.command_stats())
    keys = int(probe.call("DBSIZE"))
    if keys != made:
        raise RuntimeError(f"{algorithm}: {made} clients admitted but {keys} keys in Redis")
    sample = build(0)[3]
    assert isinstance(sample, str)
    row = MemoryRow(
        algorithm,
        keys,
        (after - before) / max(keys, 1),
        probe.call("TYPE", sample).decode(),
        probe.call("OBJECT", "ENCODING", sample).decode(),
        int(probe.call("MEMORY", "USAGE", sample, "SAMPLES", "0")),
        counts.script_usec / max(counts.script_calls, 1),
        0.0,
    )
    further = None
    if algorithm == "sliding_window_log" and made:
        subset = max(1, made // FURTHER_SHARE)
        again = _fill(probe.url, (build(i) for i in range(subset)), deadline + budget)
        further = (probe.used_memory() - after) / max(again, 1)
    return replace(row, seconds=round(time.monotonic() - started, 2), per_further_entry=further)


def measure(url: str, clients: int, budget: float = 8.0) -> list[MemoryRow]:
    """Every algorithm in turn on the redis-server at ``url`` (which it flushes)."""
    probe = RedisProbe(url)
    rows = []
    try:
        for algorithm in ALGORITHMS:
            row = measure_one(probe, algorithm, clients, budget)
            print(
                f"memory {algorithm:<24} {row.bytes_per_client:7.1f} B/client"
                f" ({row.clients} clients, {row.seconds:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
            rows.append(row)
        probe.call("FLUSHALL")
    finally:
        probe.close()
    return rows
