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

A target that ``settles`` (short links, webhooks: see ``targets``) is then left
alone until its processes are idle; the CPU it spent after wrk stopped is the
sample's ``after_cpu_seconds`` (recording the clicks still queued: at most
``redirects.analytics_queue`` of them, so a figure per run, not per request).
After the warm-up they settle while the next targets warm up. Its Sluice
counters, read once it is idle, give the redirects answered, the clicks whose
analytics were dropped, and the webhook events queued and delivered; a target
with webhooks has them resumed just before its own runs and paused after, so
its ``backlog`` (events queued, not delivered) is delivered during its next
run and not while another target is measured.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from bench import wrk
from bench.procs import (
    BenchError,
    cpu_seconds,
    machine_busy_seconds,
    own_seconds,
    reaped_children_seconds,
)
from bench.redis_stats import CommandCounts
from bench.sluice import FLOOD_PREFIX, Counters, read_counters, set_webhook
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
    errors: int  # socket errors + answers of the wrong kind (see ``unexpected``)
    storage: CommandCounts | None = None  # commands its Redis ran meanwhile
    redis_cpu_us_per_request: float | None = None
    sluice: Counters | None = None  # failed storage calls, requests let through unchecked, ...
    after_cpu_seconds: float | None = None  # spent after wrk stopped, until idle
    backlog: int | None = None  # webhook events queued and not yet delivered at the end


@dataclass(frozen=True)
class Measurement:
    result: WrkResult
    cpu_us_per_request: float
    foreign_cpu: float
    errors: int
    storage: CommandCounts | None
    redis_cpu_us_per_request: float | None
    sluice: Counters | None
    after_cpu_seconds: float | None = None
    backlog: int | None = None


@dataclass(frozen=True)
class Plan:
    rounds: int
    loads: tuple[Load, ...]
    warmup: int  # seconds of untimed load per target before round 1; 0 for none
    wrk_cpus: str | None
    only: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # target -> its loads
    durations: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (target, load)

    def targets(self, names: Sequence[str], load: str) -> list[str]:
        return [n for n in names if n not in self.only or load in self.only[n]]

    def load_for(self, name: str, load: Load) -> Load:
        seconds = self.durations.get((name, load.name))
        return load if seconds is None else replace(load, duration=seconds)


def rotated(names: Sequence[str], round_index: int) -> list[str]:
    """``names`` started at a different one each round (a load with none: none)."""
    if not names:
        return []
    shift = round_index % len(names)
    return [*names[shift:], *names[:shift]]


def _ours(lab_pids: Sequence[int]) -> float:
    return cpu_seconds(lab_pids) + reaped_children_seconds() + own_seconds()


def rejected_share(mix: Sequence[str]) -> float:
    """The share of a mixed run's requests meant to be answered 429."""
    return sum(p.startswith(FLOOD_PREFIX) for p in mix) / len(mix) if mix else 0.0


def unexpected(
    result: WrkResult,
    denies: bool,
    redirected: int | None = None,
    rejected_share: float = 0.0,
    slack: int = 0,
) -> int:
    """Answers of the wrong kind: status >= 400 (wrk's "Non-2xx or 3xx" count, which
    leaves 3xx out), or for a target meant to deny, the others; for one meant to
    redirect, also the answers Sluice did not count as redirects (``redirected``); for
    a mixed one, 429s beyond ``rejected_share`` of the requests (give or take the
    ``slack`` requests in flight when wrk stopped). wrk counts 429s and 5xx alike, so
    a mixed run's 5xx show only as 429s too many."""
    if rejected_share:
        expected = result.requests * rejected_share
        return result.socket_errors + max(0, round(abs(result.non_2xx - expected)) - slack)
    wrong = result.requests - result.non_2xx if denies else result.non_2xx
    if redirected is not None:
        wrong += max(0, result.requests - result.non_2xx - redirected)
    return result.socket_errors + wrong


SETTLE_STEP = 0.2  # seconds between CPU readings while waiting for a target to go idle
SETTLE_QUIET = 0.015  # CPU seconds per step below which it is idle (~1 clock tick)
SETTLE_LIMIT = 30.0
FLUSH_WAIT = 0.6  # Sluice's events emitter moves its buffer to the outbox every 0.5 s


def settle(pids: Sequence[int], minimum: float = 0.0) -> tuple[float, bool]:
    """Wait until ``pids`` use (almost) no CPU, and at least ``minimum`` seconds;
    (CPU seconds they used meanwhile, idle?)."""
    first = last = cpu_seconds(pids)
    started = time.monotonic()
    while time.monotonic() - started < SETTLE_LIMIT:
        time.sleep(SETTLE_STEP)
        now = cpu_seconds(pids)
        if now - last < SETTLE_QUIET and time.monotonic() - started >= minimum:
            return now - first, True
        last = now
    return last - first, False


def _warm(endpoint: Endpoint, load: Load, wrk_cpus: str | None) -> None:
    """Untimed load; what it leaves queued is worked off while the next targets warm up."""
    if endpoint.webhooks and endpoint.admin_url:
        set_webhook(endpoint.admin_url, enabled=True)
    wrk.run(endpoint.url, load, wrk_cpus, endpoint.mix)
    if endpoint.webhooks and endpoint.admin_url:
        set_webhook(endpoint.admin_url, enabled=False)


def measure(
    endpoint: Endpoint, load: Load, wrk_cpus: str | None, lab_pids: Sequence[int]
) -> Measurement:
    """wrk's result, the target's CPU µs per request, foreign CPUs in use, and
    for a Redis-backed target the commands and CPU its Redis spent."""
    pids = endpoint.service.pids()
    redis, metrics = endpoint.redis, endpoint.metrics_url
    if endpoint.webhooks and endpoint.admin_url:
        set_webhook(endpoint.admin_url, enabled=True)
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
    result = wrk.run(endpoint.url, load, wrk_cpus, endpoint.mix)
    used = cpu_seconds(pids) - before
    foreign = (machine_busy_seconds() - busy) - (_ours(lab_pids) - ours)
    storage = redis_cpu = None
    if redis is not None:
        redis_used = cpu_seconds(redis_pids) - redis_before
        storage = CommandCounts.between(stats_before, redis.probe.command_stats())
        redis_cpu = redis_used * 1e6 / max(result.requests, 1)
    foreign_cpus = max(foreign, 0.0) / (time.monotonic() - wall)
    # A target that settles is read once idle: the events of the run's last half
    # second reach the outbox then (deliveries are paused by then).
    totals = read_counters(metrics) if metrics is not None and not endpoint.settles else None
    if endpoint.webhooks and endpoint.admin_url:
        set_webhook(endpoint.admin_url, enabled=False)
    after = None
    if endpoint.settles:
        after, idle = settle(pids, FLUSH_WAIT if endpoint.webhooks else 0.0)
        if not idle:
            print(
                f"  {endpoint.service.name} still busy {SETTLE_LIMIT:g}s after the run",
                file=sys.stderr,
            )
        totals = read_counters(metrics) if metrics is not None else None
    counters = totals - counters_before if totals is not None else None
    backlog = totals.backlog if totals is not None and endpoint.webhooks else None
    if endpoint.service.proc.poll() is not None:
        raise BenchError(f"{endpoint.service.name} died under load:\n{endpoint.service.tail()}")
    redirected = counters.redirects if endpoint.redirects and counters is not None else None
    return Measurement(
        result,
        used * 1e6 / max(result.requests, 1),
        foreign_cpus,
        unexpected(
            result, endpoint.denies, redirected, rejected_share(endpoint.mix), load.connections
        ),
        storage,
        redis_cpu,
        counters,
        after,
        backlog,
    )


def _notes(m: Measurement) -> str:
    """The extra figures of a short-link or webhook run, for the progress line."""
    requests = max(m.result.requests, 1)
    out = ""
    if m.after_cpu_seconds is not None:
        out += f"  after {m.after_cpu_seconds:.1f} CPU s"
    c = m.sluice
    if c is not None and c.redirects:
        out += f"  clicks dropped {c.clicks_dropped / c.redirects:.0%}"
    if c is not None and m.backlog is not None:
        out += (
            f"  events {c.events_queued / requests:.2f}/req,"
            f" delivered {c.events_delivered / requests:.2f}/req, backlog {m.backlog}"
        )
    return out


def run(
    endpoints: Mapping[str, Endpoint], plan: Plan, lab_pids: Callable[[], list[int]]
) -> list[Sample]:
    names = list(endpoints)
    if plan.warmup > 0:
        warm = replace(plan.loads[0], duration=plan.warmup)
        for name in names:
            print(f"warm-up {name} ({plan.warmup}s)", file=sys.stderr, flush=True)
            _warm(endpoints[name], warm, plan.wrk_cpus)
        for name in names:
            if endpoints[name].settles:
                settle(endpoints[name].service.pids())
    pids = lab_pids()
    samples: list[Sample] = []
    for index in range(plan.rounds):
        for load in plan.loads:
            for name in rotated(plan.targets(names, load.name), index):
                m = measure(endpoints[name], plan.load_for(name, load), plan.wrk_cpus, pids)
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
                        m.after_cpu_seconds,
                        m.backlog,
                    )
                )
                calls = (
                    f"  redis {m.storage.client / max(result.requests, 1):.3f} cmd/req"
                    if m.storage is not None
                    else ""
                )
                print(
                    f"round {index + 1}/{plan.rounds} {load.name:<8} {name:<21}"
                    f" {result.rps:>9.0f} req/s  p50 {result.p50:7.3f} ms"
                    f"  p99 {result.p99:7.3f} ms  cpu {m.cpu_us_per_request:6.1f} us/req"
                    f"  other {m.foreign_cpu:4.2f} CPU{calls}"
                    + _notes(m)
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
