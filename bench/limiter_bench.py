"""CPU per rate-limit decision: ``Limiter.check`` for one rule, by store.

Starts its own redis-server on a free loopback port, then, in rotated rounds,
runs ``--concurrency`` tasks that together make ``--checks`` decisions of one
``fixed_window`` rule keyed by IP (a limit no run reaches, one client: as the
``sluice-redis1`` bench target) through the engine with each store:

* ``none``: a store that answers at once (the engine's own Python: plans,
  identity, breakers, verdict, headers, metrics);
* ``memory``: the embedded ``memory://`` store (the algorithm in Python);
* ``redis``: the Redis store on the real server (one EVALSHA per decision,
  pipelined: what a request pays for its one round trip, client side).

Prints the median CPU per decision (``time.process_time``: this process only,
Redis's own time is not in it) and decisions per second over the rounds.

    .venv/bin/python bench/limiter_bench.py [--checks 20000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config import loads
from proxy.limits.algorithms import Outcome
from proxy.limits.engine import Limiter
from proxy.limits.plans import plan_rules
from proxy.limits.store import Check, LimitStore, MemoryLimitStore
from proxy.metrics import Metrics
from proxy.storage.redis_limits import RedisLimitStore
from tests.servers import RedisServer

RULES = """
upstreams: {up: "http://127.0.0.1:1"}
storage: {url: "redis://127.0.0.1:%d"}
limits:
  - {name: per_ip, key: ip, algorithm: fixed_window, limit: 1000000000, window: 1h}
routes:
  - {name: all, match: {path_prefix: /}, upstream: up, limits: [per_ip]}
"""


class Request:
    method = "GET"
    path = "/bench/item"
    query: dict[str, str] = {}
    cookies: dict[str, str] = {}
    headers = CIMultiDictProxy(CIMultiDict({"Host": "bench", "Accept": "*/*"}))


class Instant:
    """Answers every check "allowed" at once: no storage at all."""

    cluster = False

    async def decide(self, checks: Sequence[Check]) -> list[Outcome]:
        return [Outcome(True, c.policy.limit, 1, 1000.0, 0.0) for c in checks]

    async def close(self) -> None:
        pass


async def _drive(
    store: LimitStore, text: str, checks: int, concurrency: int
) -> tuple[float, float]:
    config = loads(text)
    plans = plan_rules(config.limits, config.storage)
    limiter = Limiter(store, config.storage, Metrics())
    request = Request()

    async def worker(n: int) -> None:
        for _ in range(n):
            verdict = await limiter.check(config, plans, ["per_ip"], request, "127.0.0.1", "all")
            assert verdict.status is None and not verdict.degraded, verdict

    per_task = checks // concurrency
    await asyncio.gather(*(worker(20) for _ in range(concurrency)))  # warm: script, caches
    wall0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(per_task) for _ in range(concurrency)))
    return time.perf_counter() - wall0, time.process_time() - cpu0


async def run(port: int, checks: int, concurrency: int, rounds: int) -> None:
    text = RULES % port
    redis = RedisLimitStore.from_config(loads(text).storage)
    stores: dict[str, LimitStore] = {
        "none": Instant(),
        "memory": MemoryLimitStore(),
        "redis": redis,
    }
    names = list(stores)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    try:
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                results[name].append(await _drive(stores[name], text, checks, concurrency))
    finally:
        await redis.close()
    done = (checks // concurrency) * concurrency
    print(f"{done} decisions per round, {concurrency} concurrent tasks, {rounds} rounds, medians:")
    for name, samples in results.items():
        rate = statistics.median(done / wall for wall, _ in samples)
        cpu_us = statistics.median(cpu / done * 1e6 for _, cpu in samples)
        spread = sorted(round(cpu / done * 1e6, 1) for _, cpu in samples)
        print(f"  {name:<7} {cpu_us:6.1f} µs CPU/decision {rate:>9,.0f}/s   (all: {spread})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--checks", type=int, default=20_000, help="decisions per store per round")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.concurrency < 1 or args.checks < args.concurrency:
        parser.error("need 1 <= concurrency <= checks")
    import uvloop

    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp:
        server = RedisServer(Path(tmp)).start()
        try:
            print(f"redis-server on 127.0.0.1:{server.port}, loop: uvloop")
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(run(server.port, args.checks, args.concurrency, args.rounds))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
