"""Real ``sluice serve`` processes and a tiny real upstream, for process-level tests.

Nothing is mocked. ``SluiceProcess`` starts ``python -m proxy serve`` with its
output captured to a file, waits until the admin ``/healthz`` answers and is
stopped by PID (SIGTERM, then SIGKILL for anything left, workers included).
The upstream is an aiohttp app run in its own process
(``python -m tests.proc upstream PORT``) so that nothing in the test's event
loop can slow it down or be blocked by it.

Upstream endpoints (chosen by the last path segment, so any route prefix works):

- ``…/slow?delay=S``   answers ``slow S`` after S seconds (default 1.5)
- ``…/count``          reads the request body in chunks without keeping it;
                       answers ``{"bytes": N, "sha256": HEX}``
- ``…/stream?bytes=N`` streams N bytes of ``pattern_chunk(i)`` chunks
- anything else        ``{"method", "path", "pid"}`` as JSON
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.servers import free_port, wait_for_port

REPO = Path(__file__).resolve().parent.parent
CHUNK = 64 * 1024
SLUICE = [sys.executable, "-m", "proxy"]


# ---------------------------------------------------------------- processes


def _start_time(pid: int) -> int | None:
    """The kernel start time of ``pid`` (identifies it even if the PID is reused)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])


def _state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[0]


def alive(pid: int, started: int | None = None) -> bool:
    """True while ``pid`` runs (zombies count as gone); with ``started``, only that process."""
    state = _state(pid)
    if state is None or state in ("Z", "X"):
        return False
    return started is None or _start_time(pid) == started


def children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (from /proc), zombies excluded."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            found.append(int(entry.name))
    return sorted(found)


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (VmRSS from /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def established_sockets(pid: int, local_port: int) -> int:
    """How many ESTABLISHED IPv4 TCP sockets with ``local_port`` ``pid`` holds open."""
    wanted = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        port = int(cols[1].rsplit(":", 1)[1], 16)
        if port == local_port and cols[3] == "01":
            wanted.add(cols[9])
    count = 0
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in wanted:
            count += 1
    return count


def _stop_pid(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM ``proc`` by PID and wait; SIGKILL if it outlives ``timeout``."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
    return proc.returncode


@dataclass
class SluiceProcess:
    """One ``sluice serve -c RULES [--workers N]`` process."""

    rules: Path
    main_port: int
    admin_port: int
    workdir: Path
    workers: int = 1
    extra_args: Sequence[str] = ()
    proc: subprocess.Popen[bytes] | None = None
    # Worker PIDs seen while running, with their start times, so a finalizer
    # can make sure none outlives the test without risking a recycled PID.
    seen_children: dict[int, int | None] = field(default_factory=dict)

    @property
    def log_path(self) -> Path:
        return self.workdir / f"sluice-{self.main_port}.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def command(self) -> list[str]:
        cmd = [*SLUICE, "serve", "-c", str(self.rules)]
        if self.workers != 1:
            cmd += ["--workers", str(self.workers)]
        return [*cmd, *self.extra_args]

    @property
    def tmpdir(self) -> Path:
        """TMPDIR of the process: the supervisor's metrics directory is made in here."""
        return self.workdir / f"tmp-{self.main_port}"

    def metrics_dirs(self) -> list[Path]:
        return sorted(self.tmpdir.glob("sluice-metrics-*"))

    def start(self, wait: bool = True, timeout: float = 15.0) -> SluiceProcess:
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, "TMPDIR": str(self.tmpdir)},
            )
        if wait:
            self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"sluice exited with {self.proc.returncode} before answering /healthz:\n"
                    + self.output()[-3000:]
                )
            try:
                status, _, _ = http_get(self.admin_port, "/healthz", timeout=0.5)
                if status == 200 and self._workers_up():
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"sluice not healthy after {timeout}s:\n{self.output()[-3000:]}")
            time.sleep(0.03)

    def _workers_up(self) -> bool:
        if self.workers <= 1:
            return True
        kids = self.children()
        # Each worker answers once both its listeners are up; /healthz may have
        # come from the first one, so wait until every worker has logged it.
        return len(kids) == self.workers and self.output().count(" serving on ") >= self.workers

    def children(self) -> list[int]:
        kids = children(self.pid)
        for kid in kids:
            self.seen_children.setdefault(kid, _start_time(kid))
        return kids

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.main_port}{path}"

    def admin_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.admin_port}{path}"

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM by PID and wait; then SIGKILL any worker still alive. Idempotent."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.children()
        code = _stop_pid(self.proc, timeout)
        left = [kid for kid, started in self.seen_children.items() if alive(kid, started)]
        for kid in left:
            os.kill(kid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while any(alive(kid, self.seen_children[kid]) for kid in left):
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers {left} of sluice {self.pid} survived SIGKILL")
            time.sleep(0.02)
        return code


def run_sluice(
    args: Sequence[str], cwd: Path, timeout: float = 30.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m proxy ARGS`` to completion (check, or a serve that must fail)."""
    return subprocess.run(
        [*SLUICE, *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


# ---------------------------------------------------------------- rules files


@dataclass(frozen=True)
class RouteSpec:
    name: str
    prefix: str
    upstream: str = "up"


def render_rules(
    main_port: int,
    admin_port: int,
    upstream_url: str,
    routes: Iterable[RouteSpec] = (RouteSpec("all", "/"),),
    shutdown_grace: str = "5s",
    max_body_size: str = "1GiB",
) -> str:
    """A complete rules file on loopback ports, in-memory storage, one upstream ``up``."""
    lines = [
        f"listen: 127.0.0.1:{main_port}",
        "admin:",
        f"  listen: 127.0.0.1:{admin_port}",
        "storage:",
        "  url: memory://",
        "upstreams:",
        "  up:",
        f"    url: {upstream_url}",
        "    connect_timeout: 2s",
        "    read_timeout: 30s",
        "server:",
        f"  shutdown_grace: {shutdown_grace}",
        f"  max_body_size: {max_body_size}",
        "routes:",
    ]
    for route in routes:
        lines += [
            f"  - name: {route.name}",
            f"    match: {{path_prefix: {route.prefix}}}",
            f"    upstream: {route.upstream}",
        ]
    return "\n".join(lines) + "\n"


def write_rules(path: Path, text: str) -> None:
    """Replace ``path`` atomically, as editors do (new inode: the watcher notices)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_rules_keeping_stamp(path: Path, text: str) -> None:
    """Overwrite ``path`` in place, same size, with its old mtime restored.

    The file watcher compares (mtime, size, inode); after this it sees no
    change, so only an explicit SIGHUP can load the new text.
    """
    before = path.stat()
    data = text.encode()
    if len(data) != before.st_size:
        raise ValueError("the new text must have the same size as the old")
    with path.open("r+b") as f:
        f.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


# ---------------------------------------------------------------- HTTP helpers


def http_get(
    port: int, path: str, timeout: float = 5.0, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One GET on a fresh connection: (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def get_json(port: int, path: str, timeout: float = 5.0) -> tuple[int, Any]:
    """GET ``path`` on a fresh connection and decode the JSON body."""
    status, _, body = http_get(port, path, timeout)
    return status, json.loads(body)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match.group(1) == name:
            labels = dict(_LABEL.findall(match.group(3) or ""))
            out.append((labels, float(match.group(4))))
    return out


def metric_sum(text: str, name: str, **labels: str) -> float | None:
    """Sum of every sample of ``name`` whose labels include ``labels``; None if none match."""
    values = [
        value
        for got, value in metric_samples(text, name)
        if all(got.get(k) == v for k, v in labels.items())
    ]
    return sum(values) if values else None


# ---------------------------------------------------------------- the upstream


def pattern_chunk(i: int) -> bytes:
    """Chunk ``i`` of the test byte stream: distinct per index, so reordering shows."""
    return i.to_bytes(8, "big") * (CHUNK // 8)


def pattern_digest(total: int) -> str:
    """sha256 of the first ``total`` bytes of the pattern stream."""
    digest = hashlib.sha256()
    i = 0
    left = total
    while left > 0:
        chunk = pattern_chunk(i)[:left]
        digest.update(chunk)
        left -= len(chunk)
        i += 1
    return digest.hexdigest()


def upstream_app() -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        action = request.path.rsplit("/", 1)[-1]
        if action == "slow":
            delay = float(request.query.get("delay", "1.5"))
            await asyncio.sleep(delay)
            return web.Response(text=f"slow {delay}")
        if action == "count":
            digest = hashlib.sha256()
            total = 0
            async for chunk in request.content.iter_any():
                total += len(chunk)
                digest.update(chunk)
            return web.json_response({"bytes": total, "sha256": digest.hexdigest()})
        if action == "stream":
            size = int(request.query["bytes"])
            response = web.StreamResponse()
            response.enable_chunked_encoding()
            await response.prepare(request)
            i = 0
            left = size
            while left > 0:
                chunk = pattern_chunk(i)[:left]
                await response.write(chunk)
                left -= len(chunk)
                i += 1
            await response.write_eof()
            return response
        return web.json_response(
            {"method": request.method, "path": request.path_qs, "pid": os.getpid()}
        )

    app = web.Application(client_max_size=0)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


@dataclass
class UpstreamProcess:
    """``upstream_app`` served by its own process on a free loopback port."""

    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> UpstreamProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with (self.workdir / "upstream.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.proc", "upstream", str(self.port)],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        try:
            wait_for_port(self.port, timeout=15)
        except TimeoutError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None:
            _stop_pid(self.proc, 5)


@dataclass
class Processes:
    """Everything a test started, stopped in its finalizer even when the test fails."""

    items: list[SluiceProcess | UpstreamProcess] = field(default_factory=list)

    def add(self, item: SluiceProcess) -> SluiceProcess:
        self.items.append(item)
        return item

    def stop_all(self) -> None:
        for item in reversed(self.items):
            item.stop()


def upstream_main(argv: Sequence[str]) -> int:
    port = int(argv[0])
    web.run_app(
        upstream_app(),
        host="127.0.0.1",
        port=port,
        access_log=None,
        print=None,
        shutdown_timeout=1.0,
    )
    return 0


def _cli(argv: Sequence[str]) -> int:
    if argv[:1] == ["upstream"]:
        return upstream_main(argv[1:])
    print("usage: python -m tests.proc upstream PORT", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(_cli(sys.argv[1:]))


__all__ = [
    "CHUNK",
    "REPO",
    "Processes",
    "RouteSpec",
    "SluiceProcess",
    "UpstreamProcess",
    "alive",
    "children",
    "established_sockets",
    "free_port",
    "get_json",
    "http_get",
    "metric_samples",
    "metric_sum",
    "pattern_chunk",
    "pattern_digest",
    "render_rules",
    "rss_kib",
    "run_sluice",
    "write_rules",
    "write_rules_keeping_stamp",
]
