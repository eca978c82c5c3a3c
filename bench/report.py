"""Medians, paired ratios, the printed table and the JSON file."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from statistics import mean, median
from typing import Any

from bench.runner import Sample
from bench.wrk import Load

BASELINES = ("bare", "nginx", "upstream")
# DESIGN.md §3: added latency over the bare upstream at moderate load.
TARGET_P50_MS = 1.0
TARGET_P99_MS = 5.0
THROUGHPUT_LOAD = "loaded"
MODERATE_LOAD = "paced"
DISTURBED = 0.2  # CPUs busy outside the bench above which a figure is suspect

Stat = dict[str, float]


def _spread(values: Sequence[float]) -> Stat:
    return {"median": median(values), "min": min(values), "max": max(values)}


def _by_round(samples: Sequence[Sample], load: str, target: str) -> dict[int, Sample]:
    return {s.round: s for s in samples if s.load == load and s.target == target}


def summarize(samples: Sequence[Sample], loads: Sequence[Load], targets: Sequence[str]) -> Any:
    """Per load and target: the median over rounds of each figure."""
    out: dict[str, dict[str, Stat]] = {}
    for load in loads:
        rows: dict[str, Stat] = {}
        for target in targets:
            runs = list(_by_round(samples, load.name, target).values())
            if not runs:
                continue
            rows[target] = {
                "rps": median(r.result.rps for r in runs),
                "p50_ms": median(r.result.p50 for r in runs),
                "p90_ms": median(r.result.p90 for r in runs),
                "p99_ms": median(r.result.p99 for r in runs),
                "cpu_us_per_request": median(r.cpu_us_per_request for r in runs),
                "errors": sum(r.result.errors for r in runs),
                "foreign_cpu": median(r.foreign_cpu for r in runs),
                "rounds": len(runs),
            }
        out[load.name] = rows
    return out


def _paired(
    samples: Sequence[Sample],
    load: str,
    a: str,
    b: str,
    figure: Callable[[Sample, Sample], float],
) -> Stat | None:
    left, right = _by_round(samples, load, a), _by_round(samples, load, b)
    values = [figure(left[r], right[r]) for r in sorted(left.keys() & right.keys())]
    return _spread(values) if values else None


def _rps_ratio(x: Sample, y: Sample) -> float:
    return x.result.rps / y.result.rps


def _cpu_ratio(x: Sample, y: Sample) -> float:
    """Throughput ratio if both were CPU-bound: less sensitive to a busy machine."""
    return y.cpu_us_per_request / x.cpu_us_per_request


def _p50_delta(x: Sample, y: Sample) -> float:
    return x.result.p50 - y.result.p50


def _p99_delta(x: Sample, y: Sample) -> float:
    return x.result.p99 - y.result.p99


def compare(samples: Sequence[Sample], loads: Sequence[Load], proxies: Sequence[str]) -> Any:
    """Paired within each round: each Sluice target's throughput over each baseline
    (measured, and from CPU per request), and the latency every proxy adds over
    the upstream (p50 and p99, per load)."""
    out: dict[str, Any] = {"throughput": {}, "cpu_bound_throughput": {}}
    for sluice in (name for name in proxies if name.startswith("sluice")):
        for base in BASELINES:
            pair = f"{sluice}/{base}"
            if stat := _paired(samples, THROUGHPUT_LOAD, sluice, base, _rps_ratio):
                out["throughput"][pair] = stat
            if base != "upstream" and (
                stat := _paired(samples, THROUGHPUT_LOAD, sluice, base, _cpu_ratio)
            ):
                out["cpu_bound_throughput"][pair] = stat
    added: dict[str, dict[str, dict[str, Stat]]] = {}
    for proxy in proxies:
        for load in loads:
            p50 = _paired(samples, load.name, proxy, "upstream", _p50_delta)
            p99 = _paired(samples, load.name, proxy, "upstream", _p99_delta)
            if p50 and p99:
                added.setdefault(proxy, {})[load.name] = {"p50_ms": p50, "p99_ms": p99}
    out["added_latency_over_upstream"] = added
    return out


def verdicts(comparison: Any) -> dict[str, dict[str, bool]]:
    """DESIGN §3's added-latency targets, judged on the moderate (paced) load."""
    out: dict[str, dict[str, bool]] = {}
    for name, by_load in comparison["added_latency_over_upstream"].items():
        moderate = by_load.get(MODERATE_LOAD)
        if name.startswith("sluice") and moderate:
            out[name] = {
                f"p50 < {TARGET_P50_MS:g} ms": moderate["p50_ms"]["median"] < TARGET_P50_MS,
                f"p99 < {TARGET_P99_MS:g} ms": moderate["p99_ms"]["median"] < TARGET_P99_MS,
            }
    return out


def _range(stat: Stat, fmt: str) -> str:
    if stat["min"] == stat["max"]:
        return f"{stat['median']:{fmt}}"
    return f"{stat['median']:{fmt}} [{stat['min']:{fmt}} .. {stat['max']:{fmt}}]"


def _tables(summary: Any, loads: Sequence[Load], rounds: int) -> list[str]:
    lines: list[str] = []
    for load in loads:
        lines.append("")
        lines.append(f"{load.name}: {load.about}; wrk {' '.join(load.args()[:3])}")
        lines.append(
            f"  {'target':<16}{'req/s':>10}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
            f"{'CPU us/req':>12}{'errors':>8}{'other CPU':>11}"
        )
        for name, row in summary[load.name].items():
            lines.append(
                f"  {name:<16}{row['rps']:>10,.0f}{row['p50_ms']:>9.3f}{row['p90_ms']:>9.3f}"
                f"{row['p99_ms']:>9.3f}{row['cpu_us_per_request']:>12.1f}{row['errors']:>8}"
                f"{row['foreign_cpu']:>11.2f}"
            )
    return [
        f"(every figure is the median over {rounds} round{'s' if rounds > 1 else ''})",
        *lines,
        "",
        "CPU us/req: CPU time of the target's own processes per request (for the upstream",
        "  row, the upstream's). other CPU: CPUs kept busy by processes outside the bench",
        f"  during the measurement, out of {os.cpu_count()}; above {DISTURBED} the row is"
        " disturbed.",
    ]


def _ratios(comparison: Any) -> list[str]:
    lines = ["", f"throughput ratios ({THROUGHPUT_LOAD}; paired per round: median [min .. max])"]
    for pair, stat in comparison["throughput"].items():
        lines.append(f"  {pair:<24}{_range(stat, '.3f')}")
    lines += ["", "the same if CPU-bound (baseline's CPU us/req over Sluice's; steadier)"]
    for pair, stat in comparison["cpu_bound_throughput"].items():
        lines.append(f"  {pair:<24}{_range(stat, '.3f')}")
    return lines


def _added_latency(comparison: Any) -> list[str]:
    lines = [
        "",
        "added latency over the upstream, ms (paired per round: median [min .. max]);",
        f"  under '{THROUGHPUT_LOAD}' it is mostly queueing (latency ~ connections / req/s)",
        f"  {'proxy':<12}{'load':<10}{'p50':<34}p99",
    ]
    for proxy, by_load in comparison["added_latency_over_upstream"].items():
        for load_name, stat in by_load.items():
            lines.append(
                f"  {proxy:<12}{load_name:<10}{_range(stat['p50_ms'], '+.3f'):<34}"
                f"{_range(stat['p99_ms'], '+.3f')}"
            )
    judged = verdicts(comparison)
    if judged:
        lines += ["", f"DESIGN §3 added-latency targets, at moderate load ({MODERATE_LOAD}):"]
        for name, checks in judged.items():
            text = ", ".join(f"{c}: {'met' if ok else 'NOT met'}" for c, ok in checks.items())
            lines.append(f"  {name}: {text}")
    return lines


def disturbance(samples: Sequence[Sample]) -> float:
    """Mean CPUs taken by processes outside the bench over all measurements."""
    return mean(s.foreign_cpu for s in samples) if samples else 0.0


def _warning(samples: Sequence[Sample]) -> list[str]:
    other = disturbance(samples)
    if other < DISTURBED:
        return []
    return [
        "",
        f"WARNING: other processes kept {other:.2f} of {os.cpu_count()} CPUs busy on average"
        " during this run:",
        "  absolute figures are low and noisy; trust the paired ratios (and the CPU-bound",
        "  ones) more, and rerun on a quiet machine before quoting numbers.",
    ]


def render(
    summary: Any, comparison: Any, loads: Sequence[Load], samples: Sequence[Sample], rounds: int
) -> str:
    return "\n".join(
        [
            *_tables(summary, loads, rounds),
            *_ratios(comparison),
            *_added_latency(comparison),
            *_warning(samples),
        ]
    )


def write_json(
    path: Path, meta: Mapping[str, Any], samples: Sequence[Sample], summary: Any, comparison: Any
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "meta": dict(meta),
        "summary": summary,
        "comparison": comparison,
        "verdicts": verdicts(comparison),
        "foreign_cpu_mean": disturbance(samples),
        "samples": [
            {
                "round": s.round,
                "load": s.load,
                "target": s.target,
                "cpu_us_per_request": s.cpu_us_per_request,
                "foreign_cpu": s.foreign_cpu,
                **asdict(s.result),
            }
            for s in samples
        ],
    }
    path.write_text(json.dumps(data, indent=2) + "\n")
