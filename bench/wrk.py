"""Running wrk and reading its ``--latency`` report."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.procs import BenchError, binary, pinned

PACED_SCRIPT = Path(__file__).resolve().parent / "paced.lua"
MIXED_SCRIPT = Path(__file__).resolve().parent / "mixed.lua"

_MS_PER = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_PERCENTILE = re.compile(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_TOTAL = re.compile(r"^\s+(\d+) requests in ([\d.]+)(us|ms|s|m|h)", re.M)
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


@dataclass(frozen=True)
class Load:
    """One way of loading a target: a row set of the report."""

    name: str
    about: str
    connections: int
    duration: int  # seconds (wrk takes whole seconds)
    threads: int = 1
    paced: bool = False

    def args(self) -> list[str]:
        args = [f"-t{self.threads}", f"-c{self.connections}", f"-d{self.duration}s"]
        args += ["--latency", "--timeout", "5s"]
        return args + (["-s", str(PACED_SCRIPT)] if self.paced else [])


@dataclass(frozen=True)
class WrkResult:
    rps: float
    requests: int
    seconds: float
    p50: float  # milliseconds
    p75: float
    p90: float
    p99: float
    socket_errors: int
    non_2xx: int

    @property
    def errors(self) -> int:
        return self.socket_errors + self.non_2xx


def _ms(value: str, unit: str) -> float:
    return float(value) * _MS_PER[unit]


def parse(output: str) -> WrkResult:
    percentiles = {int(p): _ms(v, u) for p, v, u in _PERCENTILE.findall(output)}
    rps = _RPS.search(output)
    total = _TOTAL.search(output)
    if rps is None or total is None or set(percentiles) != {50, 75, 90, 99}:
        raise BenchError(f"cannot read wrk's report:\n{output}")
    socket = _SOCKET.search(output)
    non_2xx = _NON_2XX.search(output)
    return WrkResult(
        rps=float(rps.group(1)),
        requests=int(total.group(1)),
        seconds=_ms(total.group(2), total.group(3)) / 1e3,
        p50=percentiles[50],
        p75=percentiles[75],
        p90=percentiles[90],
        p99=percentiles[99],
        socket_errors=sum(int(n) for n in socket.groups()) if socket else 0,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
    )


def run(url: str, load: Load, cpus: str | None, mix: tuple[str, ...] = ()) -> WrkResult:
    """One wrk run; ``mix``: request these paths of ``url``'s host in turn instead."""
    args = load.args()
    if mix:  # the mix replaces the paced script: mixed targets run the "loaded" load only
        args = [a for a in args if a not in ("-s", str(PACED_SCRIPT))]
        cmd = pinned([binary("wrk"), *args, "-s", str(MIXED_SCRIPT), url, "--", *mix], cpus)
    else:
        cmd = pinned([binary("wrk"), *args, url], cpus)
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=load.duration + 30, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish: {' '.join(cmd)}") from exc
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse(done.stdout)
