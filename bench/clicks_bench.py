"""Click analytics throughput on the SQLite link store: one call per click vs batches.

    .venv/bin/python bench/clicks_bench.py [--clicks 2000] [--batch 256]

Prints clicks/s and CPU µs per click for both ways, on a fresh store in a temp dir.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from proxy.links.model import Link
from proxy.links.sqlite_store import SQLiteLinkStore
from proxy.links.store import ClickRecord


async def run(clicks: int, batch_size: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = await SQLiteLinkStore.open(
            Path(tmp) / "links.sqlite3", secret="bench-secret-0123456789", min_length=7
        )
        await store.create(Link("hot", "https://example.com/", time.time()))
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(clicks):
            await store.take_click("hot", None)
            await store.record_click(
                "hot", at=time.time(), referrer_host="(direct)", ua_family="cli", visitor=f"v{i}"
            )
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(
            f"one by one:      {clicks / wall:8.0f} clicks/s {1e6 * cpu / clicks:6.0f} us CPU/click"
        )
        batch = [
            ClickRecord("hot", time.time(), "(direct)", "cli", None, f"v{i}", True)
            for i in range(batch_size)
        ]
        rounds = max(1, clicks // batch_size)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(rounds):
            await store.record_clicks(batch)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        n = rounds * batch_size
        print(
            f"batches of {batch_size:<4} {n / wall:8.0f} clicks/s {1e6 * cpu / n:6.0f} us CPU/click"
        )
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clicks", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    asyncio.run(run(args.clicks, args.batch))


if __name__ == "__main__":
    main()
