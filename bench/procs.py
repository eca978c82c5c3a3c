"""Child processes of a bench run: started in their own session, stopped by PID.

Each child gets a new session so a Ctrl-C at the terminal reaches only the
harness, which then stops the children itself, in reverse start order.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICK = os.sysconf("SC_CLK_TCK")

# Where each role runs: indexes into the CPUs this process may use (so "first"
# and "second" allowed CPU, whatever their numbers). A role not named is not
# pinned. Roles: "wrk" (the load generator), "upstream" (the fast upstream and
# other back ends such as Redis), "proxy" (the target under test).
#   proxy-alone (default): the target has a core of its own; wrk, the upstream
#     and Redis share the other. Each proxy is measured per core, and its
#     throughput tracks its CPU per request.
#   wrk-alone: the target shares a core with the upstream; wrk has the other.
#   none: the scheduler decides.
LAYOUTS: Mapping[str, Mapping[str, int]] = {
    "proxy-alone": {"wrk": 0, "upstream": 0, "proxy": 1},
    "wrk-alone": {"wrk": 0, "upstream": 1, "proxy": 1},
    "none": {},
}
DEFAULT_LAYOUT = "proxy-alone"


def resolve_layout(name: str) -> dict[str, str]:
    """Role -> ``taskset -c`` CPU list; empty (no pinning) with fewer than two CPUs."""
    allowed = sorted(os.sched_getaffinity(0))
    layout = LAYOUTS[name]
    if len(allowed) < 2 or not layout:
        return {}
    return {role: str(allowed[index]) for role, index in layout.items()}


class BenchError(Exception):
    """The run cannot go on; the message says why."""


def binary(name: str) -> str:
    """Path of an executable; Debian puts nginx in /usr/sbin, often not on PATH."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if not found:
        raise BenchError(f"{name} not found: `make bench` installs it (as root on Debian)")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pinned(cmd: Sequence[str], cpus: str | None) -> list[str]:
    return [binary("taskset"), "-c", cpus, *cmd] if cpus else list(cmd)


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (field 3 is index 0)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def children(pid: int) -> list[int]:
    """All descendants of ``pid`` (nginx workers, say), found by scanning /proc."""
    by_parent: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields:
                by_parent.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = by_parent.get(todo.pop(), [])
        found.extend(kids)
        todo.extend(kids)
    return found


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time consumed so far by ``pids`` (live processes only)."""
    ticks = 0
    for pid in pids:
        fields = _stat(pid)
        if fields:
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / CLOCK_TICK


def machine_busy_seconds() -> float:
    """CPU time all CPUs have spent running processes since boot (from /proc/stat).

    Interrupt and softirq time are left out: loopback traffic is mostly softirq
    work that the kernel charges to no process, so counting it would show the
    bench's own traffic (0.4 CPU at 50k req/s here) as someone else's load.
    """
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + steal) / CLOCK_TICK


def reaped_children_seconds() -> float:
    """CPU time of this process's waited-for children so far (wrk runs, say)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def own_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _start_time(pid: int) -> str | None:
    fields = _stat(pid)
    return fields[19] if fields else None


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> list[int]:
        return [self.pid, *children(self.pid)]

    def tail(self, limit: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the PID, SIGKILL after ``timeout``; then kill any orphaned descendant."""
        if self.proc.poll() is not None:
            return
        kids = {pid: _start_time(pid) for pid in children(self.pid)}
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
        for pid, started in kids.items():
            if started is not None and _start_time(pid) == started:  # same process, not reused
                os.kill(pid, signal.SIGKILL)


def start(
    name: str,
    cmd: Sequence[str],
    log: Path,
    cwd: Path,
    env: Mapping[str, str] | None = None,
) -> Service:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    return Service(name, proc, log)


def wait_ready(service: Service, url: str, timeout: float = 20.0) -> None:
    """Until ``url`` answers 200; fail early, with the log, if the process died."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if service.proc.poll() is not None:
            raise BenchError(
                f"{service.name} exited with {service.proc.returncode}:\n{service.tail()}"
            )
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                if response.status == 200:
                    return
                last = f"status {response.status}"
        except urllib.error.HTTPError as exc:
            last = f"status {exc.code}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.05)
    raise BenchError(
        f"{service.name} not ready at {url} after {timeout}s ({last}):\n{service.tail()}"
    )


def wait_redis(service: Service, port: int, timeout: float = 10.0) -> None:
    """Until redis-server answers PING."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.proc.poll() is not None:
            raise BenchError(f"{service.name} exited:\n{service.tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise BenchError(f"{service.name} on {port} did not answer PING:\n{service.tail()}")
