"""The rounds: every load against every target, interleaved.

Each round visits the targets in a rotated order (round r starts at target
r mod n), so slow drift of the shared machine (thermal, other tenants) hits
every target alike, and ratios can be paired within a round.

Besides wrk's figures each sample records the CPU the target's processes
spent per request, and how much CPU *other* processes (not wrk, not the
harness, not anything the lab started) took meanwhile: on a shared 2-core
machine that is the first thing to look at when a figure looks odd.
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


def measure(
    endpoint: Endpoint, load: Load, wrk_cpus: str | None, lab_pids: Sequence[int]
) -> tuple[WrkResult, float, float]:
    """wrk's result, the target's CPU µs per request, and foreign CPUs in use."""
    pids = endpoint.service.pids()
    before, ours, busy, wall = (
        cpu_seconds(pids),
        _ours(lab_pids),
        machine_busy_seconds(),
        time.monotonic(),
    )
    result = wrk.run(endpoint.url, load, wrk_cpus)
    used = cpu_seconds(pids) - before
    foreign = (machine_busy_seconds() - busy) - (_ours(lab_pids) - ours)
    if endpoint.service.proc.poll() is not None:
        raise BenchError(f"{endpoint.service.name} died under load:\n{endpoint.service.tail()}")
    return (
        result,
        used * 1e6 / max(result.requests, 1),
        max(foreign, 0.0) / (time.monotonic() - wall),
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
                result, cpu, foreign = measure(endpoints[name], load, plan.wrk_cpus, pids)
                samples.append(Sample(index + 1, load.name, name, result, cpu, foreign))
                print(
                    f"round {index + 1}/{plan.rounds} {load.name:<8} {name:<14}"
                    f" {result.rps:>9.0f} req/s  p50 {result.p50:7.3f} ms"
                    f"  p99 {result.p99:7.3f} ms  cpu {cpu:6.1f} us/req  other {foreign:4.2f} CPU"
                    + (f"  ERRORS {result.errors}" if result.errors else ""),
                    file=sys.stderr,
                    flush=True,
                )
    return samples
