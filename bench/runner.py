"""The rounds: every load against every target, interleaved.

Each round visits the targets in a rotated order (round r starts at target
r mod n), so slow drift of the shared machine (thermal, other tenants) hits
every target alike, and ratios can be paired within a round.

Besides wrk's figures each sample records the CPU the target's processes
spent per request, and how much CPU *other* processes (not wrk, not the
harness, not anything the lab started) took meanwhile: on a shared 2-core
machine that is the first thing to look at when a figure looks odd.

For a target backed by Redis, the sample also holds the commands that server
ran during the measurement (``INFO commandstats`` just before and just after
wrk; only one target is loaded at a time, so they are that target's), the
redis-server's CPU per request, and from Sluice's own metrics the storage
calls that failed and the requests it let through unchecked meanwhile.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from bench import wrk
from bench.procs import (
    BenchError,
    cpu_seconds,
    machine_busy_seconds,
    own_seconds,
    reaped_children_seconds,
)
from bench.redis_stats import CommandCounts
from bench.sluice import Counters, read_counters
from bench.targets import Endpoint
from bench.wrk import Load, WrkResult


@dataclass(frozen=True)
class Sample:
    round: int
    load: str
    target: str
    result: WrkResult
    cpu_us_per_request: float  # CPU of the target's own processes (all its workers)
    foreign_cpu: float  # CPUs' worth of time used by processes outside the bench
    errors: int  # socket errors + answers of the wrong kind (non-2xx; 2xx for a denier)
    storage: CommandCounts | None = None  # commands its Redis ran meanwhile
    redis_cpu_us_per_request: float | None = None
    sluice: Counters | None = None  # failed storage calls, requests let through unchecked


@dataclass(frozen=True)
class Measurement:
    result: WrkResult
    cpu_us_per_request: float
    foreign_cpu: float
    errors: int
    storage: CommandCounts | None
    redis_cpu_us_per_request: float | None
    sluice: Counters | None


@dataclass(frozen=True)
class Plan:
    rounds: int
    loads: tuple[Load, ...]
    warmup: int  # seconds of untimed load per target before round 1; 0 for none
    wrk_cpus: str | None


def rotated(names: Sequence[str], round_index: int) -> list[str]:
    shift = round_index % len(names)
    return [*names[shift:], *names[:shift]]


def _ours(lab_pids: Sequence[int]) -> float:
    return cpu_seconds(lab_pids) + reaped_children_seconds() + own_seconds()


def unexpected(result: WrkResult, denies: bool) -> int:
    """Answers of the wrong kind: non-2xx, or for a target meant to deny, 2xx."""
    wrong = result.requests - result.non_2xx if denies else result.non_2xx
    return result.socket_errors + wrong


def measure(
    endpoint: Endpoint, load: Load, wrk_cpus: str | None, lab_pids: Sequence[int]
) -> Measurement:
    """wrk's result, the target's CPU µs per request, foreign CPUs in use, and
    for a Redis-backed target the commands and CPU its Redis spent."""
    pids = endpoint.service.pids()
    redis, metrics = endpoint.redis, endpoint.metrics_url
    if metrics is not None:
        counters_before = read_counters(metrics)
    if redis is not None:
        redis_pids = redis.service.pids()
        stats_before, redis_before = redis.probe.command_stats(), cpu_seconds(redis_pids)
    before, ours, busy, wall = (
        cpu_seconds(pids),
        _ours(lab_pids),
        machine_busy_seconds(),
        time.monotonic(),
    )
    result = wrk.run(endpoint.url, load, wrk_cpus)
    used = cpu_seconds(pids) - before
    foreign = (machine_busy_seconds() - busy) - (_ours(lab_pids) - ours)
    storage = redis_cpu = None
    if redis is not None:
        redis_used = cpu_seconds(redis_pids) - redis_before
        storage = CommandCounts.between(stats_before, redis.probe.command_stats())
        redis_cpu = redis_used * 1e6 / max(result.requests, 1)
    counters = read_counters(metrics) - counters_before if metrics is not None else None
    if endpoint.service.proc.poll() is not None:
        raise BenchError(f"{endpoint.service.name} died under load:\n{endpoint.service.tail()}")
    return Measurement(
        result,
        used * 1e6 / max(result.requests, 1),
        max(foreign, 0.0) / (time.monotonic() - wall),
        unexpected(result, endpoint.denies),
        storage,
        redis_cpu,
        counters,
    )


def run(
    endpoints: Mapping[str, Endpoint], plan: Plan, lab_pids: Callable[[], list[int]]
) -> list[Sample]:
    names = list(endpoints)
    if plan.warmup > 0:
        warm = replace(plan.loads[0], duration=plan.warmup)
        for name in names:
            print(f"warm-up {name} ({plan.warmup}s)", file=sys.stderr, flush=True)
            wrk.run(endpoints[name].url, warm, plan.wrk_cpus)
    pids = lab_pids()
    samples: list[Sample] = []
    for index in range(plan.rounds):
        for load in plan.loads:
            for name in rotated(names, index):
                m = measure(endpoints[name], load, plan.wrk_cpus, pids)
                result = m.result
                samples.append(
                    Sample(
                        index + 1,
                        load.name,
                        name,
                        result,
                        m.cpu_us_per_request,
                        m.foreign_cpu,
                        m.errors,
                        m.storage,
                        m.redis_cpu_us_per_request,
                        m.sluice,
                    )
                )
                calls = (
                    f"  redis {m.storage.client / max(result.requests, 1):.3f} cmd/req"
                    if m.storage is not None
                    else ""
                )
                print(
                    f"round {index + 1}/{plan.rounds} {load.name:<8} {name:<14}"
                    f" {result.rps:>9.0f} req/s  p50 {result.p50:7.3f} ms"
                    f"  p99 {result.p99:7.3f} ms  cpu {m.cpu_us_per_request:6.1f} us/req"
                    f"  other {m.foreign_cpu:4.2f} CPU{calls}"
                    + (f"  ERRORS {m.errors}" if m.errors else "")
                    + (
                        f"  STORAGE ERRORS {m.sluice.storage_errors}, {m.sluice.unchecked}"
                        " requests unchecked"
                        if m.sluice and (m.sluice.storage_errors or m.sluice.unchecked)
                        else ""
                    ),
                    file=sys.stderr,
                    flush=True,
                )
    return samples
