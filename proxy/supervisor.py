"""Several workers sharing the listeners through SO_REUSEPORT.

The supervisor validates the config, checks that the ports are free (a probe
bind without SO_REUSEPORT, so a second Sluice cannot silently share them),
points prometheus-client at a fresh multiprocess directory, forks the
workers and then only relays signals: SIGHUP reloads every worker, SIGTERM
drains them all. A worker that dies unexpectedly is replaced.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess

from proxy.config import Config, Listen

log = logging.getLogger("sluice.supervisor")
PR_SET_PDEATHSIG = 1


def probe(listen: Listen) -> str | None:
    """None if ``listen`` can be bound now, else the reason it cannot."""
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((listen.host, listen.port))
        except OSError as exc:
            return listen.bind_error(exc)
    return None


class Supervisor:
    def __init__(self, config: Config, workers: int, target: Callable[[], int]) -> None:
        self.config = config
        self.count = workers
        self.target = target
        self.ctx = multiprocessing.get_context("fork")
        self.workers: list[BaseProcess] = []
        self.stopping = False
        self.pending: list[int] = []

    def _spawn(self) -> BaseProcess:
        proc = self.ctx.Process(target=_child, args=(self.target, os.getpid()), daemon=False)
        proc.start()
        return proc

    def run(self) -> int:
        for listen in (self.config.listen, self.config.admin.listen):
            reason = probe(listen)
            if reason:
                log.error("%s", reason)
                return 1
        metrics_dir = tempfile.mkdtemp(prefix="sluice-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        try:
            return self._loop()
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)

    def _loop(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda s, _f: self.pending.append(s))
        self.workers = [self._spawn() for _ in range(self.count)]
        log.info(
            "supervisor pid %d started %d workers: %s",
            os.getpid(),
            self.count,
            " ".join(str(w.pid) for w in self.workers),
        )
        restarts: list[float] = []
        while True:
            while self.pending:
                received = self.pending.pop(0)
                if received == signal.SIGHUP:
                    self._signal_all(signal.SIGHUP)
                else:
                    return self._drain()
            for i, proc in enumerate(self.workers):
                if proc.is_alive():
                    continue
                self._forget(proc)
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < 60] + [now]
                if len(restarts) > 5 * self.count:
                    log.error(
                        "workers keep dying (%d restarts in a minute); giving up", len(restarts)
                    )
                    self._drain()
                    return 1
                log.error("worker %s exited with %s; starting a new one", proc.pid, proc.exitcode)
                self.workers[i] = self._spawn()
            time.sleep(0.2)

    def _signal_all(self, sig: int) -> None:
        for proc in self.workers:
            if proc.pid and proc.is_alive():
                os.kill(proc.pid, sig)

    def _forget(self, proc: BaseProcess) -> None:
        from prometheus_client import multiprocess

        if proc.pid:
            multiprocess.mark_process_dead(proc.pid)

    def _drain(self) -> int:
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.config.server.shutdown_grace + 5
        for proc in self.workers:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.error("worker %s did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.join(5)
        log.info("supervisor stopped")
        return 0


def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGTERM this worker when the supervisor dies (even by SIGKILL), so an
    orphan never keeps serving on the shared port."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the supervisor's own drain must do
        return
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _child(target: Callable[[], int], parent: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    _die_with_parent(parent)
    os._exit(target())
