"""What a result depends on: versions, machine, settings, the exact commands."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench.procs import binary
from bench.targets import BY_NAME, Endpoint

REPO = Path(__file__).resolve().parent.parent


def _output(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "?"
    return (done.stdout + done.stderr).strip()


def _git() -> str:
    commit = _output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = _output(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    return commit + (" (with uncommitted changes)" if dirty else "")


def versions() -> dict[str, str]:
    nginx = _output([binary("nginx"), "-v"]).rpartition("/")[2]
    wrk = _output([binary("wrk"), "--version"]).splitlines()[0].split()[1]
    redis = _output([binary("redis-server"), "--version"]).split()
    return {
        "python": platform.python_version(),
        "aiohttp": version("aiohttp"),
        "uvloop": version("uvloop"),
        "nginx": nginx,
        "wrk": wrk,
        "redis": next((w[2:] for w in redis if w.startswith("v=")), "?"),
    }


def describe(
    args: argparse.Namespace,
    layout: Mapping[str, str],
    endpoints: Mapping[str, Endpoint],
    started: float,
    load_before: tuple[float, float, float],
) -> dict[str, Any]:
    return {
        "started": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "wall_seconds": round(time.time() - started, 1),
        "commit": _git(),
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "versions": versions(),
        "settings": {
            "rounds": args.rounds,
            "duration": args.duration,
            "links_duration": args.links_duration,
            "latency_duration": args.latency_duration,
            "warmup": args.warmup,
            "connections": args.connections,
            "paced_connections": args.paced_connections,
            "memory_clients": args.memory_clients,
            "upstream": args.upstream,
            "pin": args.pin,
            "layout": dict(layout),
        },
        "targets": {
            name: {
                "about": BY_NAME[name].about,
                "loads": list(BY_NAME[name].loads or ()) or "all",
                "url": endpoint.url,
                "command": [str(a) for a in endpoint.service.proc.args],  # type: ignore[union-attr]
            }
            for name, endpoint in endpoints.items()
        },
    }


def header(meta: Mapping[str, Any]) -> str:
    machine, settings = meta["machine"], meta["settings"]
    layout = ", ".join(f"{role}→cpu{cpus}" for role, cpus in settings["layout"].items())
    lines = [
        f"Sluice bench {meta['started']}, commit {meta['commit']}, {meta['wall_seconds']} s",
        f"machine: {machine['cpus']} CPUs shared by wrk, the upstream and the target; "
        f"load avg before {machine['loadavg_before'][0]:.2f}, "
        f"after {machine['loadavg_after'][0]:.2f}",
        f"pinning: {settings['pin']}" + (f" ({layout})" if layout else " (scheduler decides)"),
        f"upstream: {settings['upstream']}, fixed small body",
        "versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        "targets:",
        *(f"  {name:<22}{t['about']}" for name, t in meta["targets"].items()),
    ]
    return "\n".join(lines)
