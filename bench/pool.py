"""Paired throughput ratios pooled over several saved bench runs.

One run's median over a few rounds moves with this machine's drift (a round's
ratio ranges over ±15 %); the rounds of several runs, each pair measured side
by side, give a steadier median. Reads the JSON files ``python -m bench
--output`` writes (``samples``: one entry per target, load and round):

    .venv/bin/python -m bench.pool sluice-redis1/sluice bench/recorded/*.json

Prints, per file and pooled, the median [min .. max] of the paired req/s ratio
under the "loaded" load and the same if CPU-bound (CPU per request, inverted).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from statistics import median
from typing import Any


def paired(samples: Sequence[dict[str, Any]], a: str, b: str) -> list[tuple[float, float]]:
    """Per round present for both: (req/s of a / req/s of b, CPU/req of b / CPU/req of a)."""
    loaded = {
        (s["round"], s["target"]): s
        for s in samples
        if s["load"] == "loaded" and s["target"] in (a, b)
    }
    rounds = sorted({r for r, t in loaded if (r, a) in loaded and (r, b) in loaded})
    out = []
    for r in rounds:
        x, y = loaded[(r, a)], loaded[(r, b)]
        rps = float(x["rps"]) / float(y["rps"])
        cpu = float(y["cpu_us_per_request"]) / float(x["cpu_us_per_request"])
        out.append((rps, cpu))
    return out


def _line(name: str, pairs: Sequence[tuple[float, float]]) -> str:
    rps, cpu = [p[0] for p in pairs], [p[1] for p in pairs]
    return (
        f"{name:<34} {len(pairs):>3} rounds  {median(rps):.3f} [{min(rps):.3f} .. {max(rps):.3f}]"
        f"  CPU-bound {median(cpu):.3f} [{min(cpu):.3f} .. {max(cpu):.3f}]"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("ratio", help="target/baseline, e.g. sluice-redis1/sluice")
    parser.add_argument("files", nargs="+", type=Path, help="JSON written by python -m bench")
    args = parser.parse_args(argv)
    a, sep, b = args.ratio.partition("/")
    if not sep or not a or not b:
        parser.error(f"ratio must be target/baseline, got {args.ratio!r}")
    pooled: list[tuple[float, float]] = []
    for path in args.files:
        pairs = paired(json.loads(path.read_text())["samples"], a, b)
        if not pairs:
            parser.error(f"{path}: no round with both {a} and {b} under 'loaded'")
        print(_line(path.name, pairs))
        pooled += pairs
    if len(args.files) > 1:
        print(_line("pooled", pooled))
    return 0


if __name__ == "__main__":
    sys.exit(main())
