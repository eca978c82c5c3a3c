"""One serving process: both listeners, reloads, graceful drain.

``serve()`` is what ``sluice serve`` runs in each worker. It owns the event
loop's lifetime: SIGHUP or a change of the rules file reloads the config;
SIGTERM / SIGINT stop accepting, let in-flight requests finish within
``server.shutdown_grace``, then exit.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from proxy.admin import make_admin_app
from proxy.config import Config, Listen
from proxy.links.store import SecretMismatch
from proxy.runtime import Runtime
from proxy.server import make_server

log = logging.getLogger("sluice.worker")
WATCH_INTERVAL = 1.0
# The cyclic GC's thresholds once a worker serves (CPython's default: 700, 10, 10).
# A request allocates a few dozen tracked objects that outlive it briefly (futures,
# tasks, aiohttp's request state); at 700 the young generation was collected about
# every 40 requests and the full heap every few thousand: ~20 µs per request, 4-5 %
# of a proxied request's CPU (bench, ``python_gc_*`` metrics). Refcounting frees
# almost everything anyway; the collector only finds cycles, which stay few.
GC_THRESHOLDS = (10_000, 20, 10)


class StartError(Exception):
    """The worker cannot start (the message says why)."""


class ListenError(StartError):
    pass


@dataclass
class Listeners:
    main: web.BaseRunner
    admin: web.BaseRunner


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


async def start_listeners(runtime: Runtime, reuse_port: bool) -> Listeners:
    """Open the runtime's resources (link store), then both listeners."""
    try:
        await runtime.start()
    except SecretMismatch as exc:
        raise StartError(str(exc)) from exc
    config = runtime.snapshot.config
    main = web.ServerRunner(make_server(runtime), shutdown_timeout=config.server.shutdown_grace)
    admin = web.AppRunner(make_admin_app(runtime), access_log=None, shutdown_timeout=2.0)
    await main.setup()
    await admin.setup()
    try:
        await _site(main, config.listen, reuse_port)
        await _site(admin, config.admin.listen, reuse_port)
    except ListenError:
        await main.cleanup()
        await admin.cleanup()
        raise
    return Listeners(main, admin)


async def _site(runner: web.BaseRunner, listen: Listen, reuse_port: bool) -> None:
    site = web.TCPSite(runner, listen.host, listen.port, reuse_port=reuse_port, backlog=1024)
    try:
        await site.start()
    except OSError as exc:
        raise ListenError(listen.bind_error(exc)) from exc


async def serve(config: Config, *, reuse_port: bool = False, ready_fd: int | None = None) -> int:
    """Run one worker until SIGTERM/SIGINT; return the exit status."""
    runtime = Runtime(config)
    try:
        listeners = await start_listeners(runtime, reuse_port)
    except StartError as exc:
        log.error("%s", exc)
        await runtime.close()
        return 1
    tune_gc()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, runtime.reload)
    watcher = loop.create_task(_watch(runtime))
    log.info("pid %d serving on %s (admin %s)", os.getpid(), config.listen, config.admin.listen)
    if ready_fd is not None:
        os.write(ready_fd, b"1")
        os.close(ready_fd)
    await stop.wait()
    log.info(
        "pid %d draining (grace %.1fs)", os.getpid(), runtime.snapshot.config.server.shutdown_grace
    )
    watcher.cancel()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.remove_signal_handler(sig)
    # A second SIGTERM during the drain ends the process at once.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    await listeners.main.cleanup()  # stop accepting, wait for in-flight requests
    await listeners.admin.cleanup()
    await runtime.close()
    log.info("pid %d stopped", os.getpid())
    return 0


def tune_gc() -> None:
    """Once started: move what startup built (modules, config, app) out of the
    collector's sight (``gc.freeze``: a full collection no longer walks it) and
    collect the young generations less often (``GC_THRESHOLDS``)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def _watch(runtime: Runtime) -> None:
    """Reload when the rules file or its what-if candidate changes (mtime, size or inode:
    editors replace files)."""
    stamp = _file_stamp(runtime.path)
    while True:
        await asyncio.sleep(WATCH_INTERVAL)
        now = _file_stamp(runtime.path)
        if now != stamp and now is not None:
            stamp = now
            runtime.reload()
        elif runtime.candidate_changed():  # the what-if file was edited
            runtime.reload()
