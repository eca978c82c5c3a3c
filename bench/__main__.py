"""``python -m bench``: see ``bench/__init__.py``; ``--help`` lists the options."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

import bench
from bench import redis_memory, report, runner
from bench.meta import describe, header
from bench.procs import DEFAULT_LAYOUT, LAYOUTS, BenchError, resolve_layout
from bench.targets import BY_NAME, TARGETS, Endpoint, Lab
from bench.wrk import Load

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "latest.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument(
        "--duration", type=int, default=5, help="seconds per target per round, loaded (default 5)"
    )
    parser.add_argument(
        "--latency-duration",
        type=int,
        default=2,
        help="seconds per target per round for the paced and unloaded loads (default 2)",
    )
    parser.add_argument(
        "--links-duration",
        type=int,
        default=3,
        help="seconds per round, loaded, for the short-link and webhook targets (default 3;"
        " each also waits after its run until it is idle again)",
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed seconds per target first")
    parser.add_argument("--connections", type=int, default=32, help="wrk -c, loaded (default 32)")
    parser.add_argument(
        "--paced-connections", type=int, default=8, help="wrk -c, paced load (default 8)"
    )
    parser.add_argument(
        "--targets",
        default=",".join(t.name for t in TARGETS),
        help=f"comma-separated subset of: {', '.join(BY_NAME)}",
    )
    parser.add_argument(
        "--pin",
        choices=list(LAYOUTS),
        default=DEFAULT_LAYOUT,
        help=f"CPU layout (default {DEFAULT_LAYOUT}; see bench/procs.py)",
    )
    parser.add_argument(
        "--upstream",
        choices=("nginx", "aiohttp"),
        default="nginx",
        help="what serves the fixed body (default nginx: ~10 us CPU per request)",
    )
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results (bench/results/...)"
    )
    parser.add_argument(
        "--memory-clients",
        type=int,
        default=100_000,
        help="clients created per algorithm for Redis memory per client (default 100000; 0: skip)",
    )
    parser.add_argument(
        "--memory-budget",
        type=float,
        default=8.0,
        help="seconds at most per algorithm creating them (default 8; fewer clients if over)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir (configs, logs)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="~1 min smoke run: 1 round, 2 s loaded, 1 s latency, 10000 clients for memory",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.latency_duration, args.warmup = 1, 2, 1, 1
        args.memory_clients = min(args.memory_clients, 10_000)
        args.links_duration = min(args.links_duration, args.duration)
    unknown = [n for n in args.targets.split(",") if n not in BY_NAME]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
    if min(args.rounds, args.duration, args.latency_duration, args.links_duration) < 1:
        parser.error(
            "--rounds, --duration, --latency-duration and --links-duration must be at least 1"
        )
    if args.memory_clients < 0 or args.memory_clients > 1 << 24:
        parser.error("--memory-clients must be between 0 and 16777216")
    return args


def loads(args: argparse.Namespace) -> tuple[Load, ...]:
    offered = args.paced_connections * 100  # each connection: one request per ~10 ms
    return (
        Load("loaded", "throughput, closed loop", args.connections, args.duration),
        Load(
            "paced",
            f"moderate load, ~{offered} req/s offered (each connection waits"
            " 5-15 ms between requests: bench/paced.lua)",
            args.paced_connections,
            args.latency_duration,
            paced=True,
        ),
        Load("unloaded", "one connection, no queueing", 1, args.latency_duration),
    )


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)  # unwind through the finally below, stopping children
    layout = resolve_layout(args.pin)
    only = {t.name: t.loads for t in TARGETS if t.loads is not None}
    durations = {(t.name, "loaded"): args.links_duration for t in TARGETS if t.links}
    plan = runner.Plan(args.rounds, loads(args), args.warmup, layout.get("wrk"), only, durations)
    workdir = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
    workdir.chmod(0o755)  # nginx workers run unprivileged when the harness is root
    lab = Lab(workdir, layout, args.upstream)
    started = time.time()
    load_before = os.getloadavg()
    try:
        endpoints: dict[str, Endpoint] = {}
        for name in args.targets.split(","):
            target = BY_NAME[name]
            endpoints[name] = target.start(lab, name)
            print(f"started {name}: {endpoints[name].url}", file=sys.stderr, flush=True)
        samples = runner.run(endpoints, plan, lab.pids)
        memory: list[redis_memory.MemoryRow] = []
        if args.memory_clients:
            server = lab.start_redis("redis-memory")
            memory = redis_memory.measure(server.url, args.memory_clients, args.memory_budget)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; stopping what it started", file=sys.stderr)
        return 130
    finally:
        lab.stop_all()
        if args.keep:
            print(f"work dir kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    proxies = [name for name in endpoints if BY_NAME[name].is_proxy]
    summary = report.summarize(samples, plan.loads, list(endpoints))
    comparison = report.compare(samples, plan.loads, proxies)
    storage = report.storage_summary(samples, plan.loads)
    meta = describe(args, layout, endpoints, started, load_before)
    print(header(meta))
    print(
        report.render(
            summary,
            comparison,
            plan.loads,
            samples,
            args.rounds,
            storage,
            memory,
            args.links_duration,
        )
    )
    report.write_json(args.output, meta, samples, summary, comparison, storage, memory)
    table = args.output.with_suffix(".md")
    table.write_text(report.markdown(summary, comparison, storage, memory, meta))
    print(f"\nwrote {args.output} and {table} (the README's table)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
