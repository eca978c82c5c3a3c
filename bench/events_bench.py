"""CPU per event of the webhook pipeline: emit → SQLite outbox → signed POST → ack.

    .venv/bin/python bench/events_bench.py [--events 20000] [--batch 1] [--max-wait 0.5]
        [--rate 4000] [--profile out.prof]

One process, like a Sluice worker: a ``Notifier`` on a fresh SQLite outbox in
a temp dir, one subscription to every event, delivered to ``bench/upstream_app.py``
(another process: its CPU is not counted). ``redirect.followed`` events are
emitted at ``--rate`` per second (0: all at once) while delivery runs, then
the run waits until every event was delivered. Printed: CPU µs per event of
this process (every thread), split into the emitting phase and the drain that
follows, and events delivered per second.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from proxy.events.outbox_sqlite import SqliteOutbox
from proxy.events.service import Notifier
from proxy.events.settings import BatchSettings, NotificationsSettings, WebhookSettings
from proxy.events.signing import decode_secret

HERE = Path(__file__).resolve().parent
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
DATA = {
    "code": "hot",
    "variant": None,
    "referrer_host": "(direct)",
    "ua_family": "other",
    "client": "0123456789abcdef",
}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) of this process's threads: the main one, the rest."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path("/proc/self/task").iterdir():
        name = "main" if int(task.name) == os.getpid() else "others"
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


async def wait_port(port: int) -> None:
    for _ in range(200):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError("the receiver did not start")


async def run(args: argparse.Namespace, port: int) -> None:
    await wait_port(port)
    with tempfile.TemporaryDirectory() as tmp:
        hook = WebhookSettings(
            "bench",
            f"http://127.0.0.1:{port}/hook",
            (decode_secret(SECRET),),
            batch=BatchSettings(args.batch, args.max_wait),
        )
        settings = NotificationsSettings(webhooks=(hook,), buffer=max(10000, args.events))
        outbox = SqliteOutbox(Path(tmp) / "events.sqlite3")
        notifier = Notifier(settings, outbox, poll=0.2)
        if args.no_delivery:
            await notifier.emitter.start()  # the outbox only: nothing is sent
        else:
            await notifier.start()
        profiler = cProfile.Profile() if args.profile else None
        if profiler:
            profiler.enable()
        wall, cpu = time.perf_counter(), time.process_time()
        step = 100
        for i in range(0, args.events, step):
            for _ in range(min(step, args.events - i)):
                notifier.emit("redirect.followed", DATA)
            if args.rate:
                due = wall + (i + step) / args.rate
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
            else:
                await asyncio.sleep(0)
        emit_wall, emit_cpu = time.perf_counter() - wall, time.process_time() - cpu
        depth = (await notifier.status("bench"))[0].depth
        delivered_during = args.events - depth - notifier.emitter.buffered
        while not args.no_delivery:
            status = (await notifier.status("bench"))[0]
            if status.depth == 0 and notifier.emitter.buffered == 0:
                break
            await asyncio.sleep(0.05)
        await notifier.emitter.flush()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if profiler:
            profiler.disable()
            profiler.dump_stats(args.profile)
        n = args.events
        threads = ", ".join(
            f"{name} {1e6 * seconds / n:.1f}" for name, seconds in thread_cpu().items()
        )
        print(
            f"batch {args.batch:>4}: {1e6 * cpu / n:6.1f} us CPU/event in all "
            f"({1e6 * emit_cpu / n:5.1f} while emitting at {n / emit_wall:,.0f}/s, "
            f"delivered {delivered_during / n:.0%} by then); "
            f"{n / wall:,.0f} events/s end to end\n  CPU us/event by thread "
            f"(since the process started): {threads}"
        )
        await notifier.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=1, help="batch.max_events")
    parser.add_argument("--max-wait", type=float, default=0.5, help="batch.max_wait, seconds")
    parser.add_argument("--rate", type=float, default=4000, help="events/s emitted (0: flat out)")
    parser.add_argument(
        "--no-delivery", action="store_true", help="emit and store only (no delivery worker)"
    )
    parser.add_argument("--profile", help="write a cProfile of the run here")
    port = free_port()
    receiver = subprocess.Popen(
        [sys.executable, str(HERE / "upstream_app.py"), "--port", str(port)]
    )
    try:
        asyncio.run(run(parser.parse_args(), port))
    finally:
        receiver.terminate()
        receiver.wait()


if __name__ == "__main__":
    main()
