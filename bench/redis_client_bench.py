"""EVALSHA throughput and client CPU: Sluice's pipelined client vs ``redis.asyncio``.

Starts its own redis-server on a free loopback port, then, in alternating
rounds on the same server, runs ``--concurrency`` tasks that together make
``--calls`` EVALSHA calls of a one-line script through each client. Prints
calls/s and client CPU per call (``time.process_time``, this process only;
Redis's own time is not in it), the median over rounds, and the ratio.

    .venv/bin/python bench/redis_client_bench.py [--calls 10000] [--concurrency 50]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis.asyncio as redis_asyncio

from proxy.storage.redis_client import open_redis, script_sha
from tests.servers import RedisServer

SCRIPT = b"return redis.call('INCR', KEYS[1])"
Call = Callable[[str], Awaitable[Any]]


async def _drive(call: Call, calls: int, concurrency: int) -> tuple[float, float]:
    """Run ``calls`` calls over ``concurrency`` tasks; return (wall s, cpu s)."""
    per_task = calls // concurrency

    async def worker(i: int) -> None:
        key = f"bench:{i}"
        for _ in range(per_task):
            await call(key)

    wall0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return time.perf_counter() - wall0, time.process_time() - cpu0


async def run(port: int, calls: int, concurrency: int, rounds: int, pool_size: int) -> None:
    sha = script_sha(SCRIPT)
    ours = open_redis(f"redis://127.0.0.1:{port}/0", timeout=1.0, pool_size=pool_size)
    theirs = redis_asyncio.Redis(
        host="127.0.0.1", port=port, socket_timeout=1.0, max_connections=max(concurrency, 10)
    )

    async def call_ours(key: str) -> Any:
        return await ours.evalsha(SCRIPT, sha, (key,), ())

    async def call_theirs(key: str) -> Any:
        return await theirs.evalsha(sha, 1, key)

    clients: dict[str, Call] = {"sluice": call_ours, "redis.asyncio": call_theirs}
    try:
        await call_ours("warm")  # loads the script (NOSCRIPT path) and opens connections
        for call in clients.values():
            await _drive(call, min(calls, 2000), concurrency)
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in clients}
        for r in range(rounds):
            order = list(clients) if r % 2 == 0 else list(reversed(clients))
            for name in order:
                results[name].append(await _drive(clients[name], calls, concurrency))
    finally:
        await ours.close()
        await theirs.aclose()

    done = (calls // concurrency) * concurrency
    summary: dict[str, tuple[float, float]] = {}
    print(f"{done} EVALSHA per round, {concurrency} concurrent tasks, {rounds} rounds, medians:")
    for name, samples in results.items():
        rate = statistics.median(done / wall for wall, _ in samples)
        cpu_us = statistics.median(cpu / done * 1e6 for _, cpu in samples)
        summary[name] = (rate, cpu_us)
        print(f"  {name:<14} {rate:>9,.0f} calls/s   {cpu_us:6.1f} µs CPU/call")
    (r_ours, c_ours), (r_theirs, c_theirs) = summary["sluice"], summary["redis.asyncio"]
    print(f"  ratio sluice/redis.asyncio: {r_ours / r_theirs:.2f}x calls/s, "
          f"{c_ours / c_theirs:.2f}x CPU per call")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=10_000, help="calls per client per round")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pool-size", type=int, default=2, help="connections (sluice client)")
    parser.add_argument("--no-uvloop", action="store_true", help="use the stock asyncio loop")
    args = parser.parse_args()
    if args.concurrency < 1 or args.calls < args.concurrency:
        parser.error("need 1 <= concurrency <= calls")
    loop_factory = None
    if not args.no_uvloop:
        import uvloop

        loop_factory = uvloop.new_event_loop
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp:
        server = RedisServer(Path(tmp)).start()
        try:
            loop_name = "asyncio" if args.no_uvloop else "uvloop"
            print(f"redis-server on 127.0.0.1:{server.port}, loop: {loop_name}")
            with asyncio.Runner(loop_factory=loop_factory) as runner:
                runner.run(
                    run(server.port, args.calls, args.concurrency, args.rounds, args.pool_size)
                )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
