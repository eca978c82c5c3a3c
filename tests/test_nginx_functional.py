"""The NGINX recipe (deploy/nginx/) end to end: real nginx, real Sluice, real upstream.

``deploy/nginx/nginx.conf`` is the template operators use; it is rendered here
the way its README says (its four ``${NAME}`` placeholders, nothing else) onto
free loopback ports, twice: ``SLUICE_ON_FAILURE=open`` and ``=closed``. Each
nginx runs as its own instance (``nginx -p DIR -c DIR/nginx.conf``, foreground,
pid, logs and temp files inside DIR). Sluice is ``sluice serve -c
deploy/nginx/rules.yaml`` as shipped, its placeholders set through the
environment. The upstream is a threaded HTTP server in this process that
records every request it sees, so "the upstream never saw it" is a count.
Everything is stopped by PID, with bounded waits.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import aiohttp
import pytest

from tests.load import ietf_remaining
from tests.proc import REPO, SluiceProcess, alive, children, free_port
from tests.servers import binary, wait_for_port

NGINX_DIR = REPO / "deploy" / "nginx"
PLACEHOLDERS = ("LISTEN", "UPSTREAM", "SLUICE", "SLUICE_ON_FAILURE")
LIMIT = 10  # deploy/nginx/rules.yaml: per_client, sliding_window_log 10/1m
WRITES = 3  # deploy/nginx/rules.yaml: writes, gcra 3/1m on POST/PUT/PATCH/DELETE
TIMEOUT = aiohttp.ClientTimeout(total=10)


# ---------------------------------------------------------------- the upstream


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    api_key: str | None
    body_sha256: str
    body_bytes: int


class CountingUpstream:
    """An HTTP/1.1 server on a free port that records each request it answers."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                assert "chunked" not in self.headers.get("Transfer-Encoding", "")
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                seen = Seen(
                    self.command,
                    self.path,
                    self.headers.get("X-API-Key"),
                    hashlib.sha256(body).hexdigest(),
                    len(body),
                )
                with upstream.lock:
                    upstream.seen.append(seen)
                reply = json.dumps({"upstream": True, **seen.__dict__}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            do_GET = do_POST = do_PUT = do_DELETE = _answer

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def address(self) -> str:
        host, port = self.server.server_address[:2]
        return f"{host}:{port}"

    def start(self) -> CountingUpstream:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def count(self, api_key: str) -> int:
        with self.lock:
            return sum(1 for s in self.seen if s.api_key == api_key)

    def total(self) -> int:
        with self.lock:
            return len(self.seen)


# ---------------------------------------------------------------- nginx


def render_nginx_conf(**values: str) -> str:
    """The template with exactly its placeholders filled, as envsubst with a list would."""
    template = (NGINX_DIR / "nginx.conf").read_text()
    found = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", template))
    assert found == set(PLACEHOLDERS), f"placeholders in nginx.conf: {sorted(found)}"
    assert set(values) == set(PLACEHOLDERS)
    text = template
    for name, value in values.items():
        text = text.replace("${" + name + "}", value)
    return text


@dataclass
class Nginx:
    """One nginx master (``daemon off``) with its workers, in its own prefix DIR."""

    prefix: Path
    on_failure: str
    sluice: str
    upstream: str
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    workers: dict[int, int | None] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Nginx:
        self.prefix.mkdir(parents=True, exist_ok=True)
        conf = self.prefix / "nginx.conf"
        conf.write_text(
            render_nginx_conf(
                LISTEN=f"127.0.0.1:{self.port}",
                UPSTREAM=self.upstream,
                SLUICE=self.sluice,
                SLUICE_ON_FAILURE=self.on_failure,
            )
        )
        cmd = [binary("nginx"), "-p", str(self.prefix), "-c", str(conf), "-e", "stderr"]
        if os.geteuid() == 0:  # a root master would drop its workers to nginx's default user
            cmd += ["-g", "user root;"]
        log = (self.prefix / "stderr.log").open("wb")
        with log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nginx did not start:\n{self.log()}")
            try:
                wait_for_port(self.port, timeout=0.1)
                break
            except TimeoutError:
                continue
        for pid in children(self.proc.pid):
            self.workers[pid] = _start_time(pid)
        return self

    def log(self) -> str:
        parts = []
        for name in ("stderr.log", "error.log"):
            path = self.prefix / name
            if path.exists():
                parts.append(f"--- {name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            for pid in children(self.proc.pid):
                self.workers.setdefault(pid, _start_time(pid))
            self.proc.send_signal(signal.SIGTERM)  # fast shutdown: workers exit too
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for pid, started in self.workers.items():
            if alive(pid, started):
                os.kill(pid, signal.SIGKILL)


def _start_time(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])
    except OSError:
        return None


# ---------------------------------------------------------------- the stack


@dataclass
class Stack:
    workdir: Path
    upstream: CountingUpstream
    sluice_port: int
    admin_port: int
    open: Nginx
    closed: Nginx
    sluice: SluiceProcess | None = None

    def start_sluice(self, rules: Path = NGINX_DIR / "rules.yaml", **env: str) -> None:
        """``sluice serve -c RULES`` on the ports both nginx instances point at."""
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SLUICE_LISTEN", f"127.0.0.1:{self.sluice_port}")
            mp.setenv("SLUICE_ADMIN_LISTEN", f"127.0.0.1:{self.admin_port}")
            mp.setenv("NGINX_ADDRESS", "127.0.0.1/32")
            mp.setenv("SLUICE_STORAGE_URL", "memory://")
            for name, value in env.items():
                mp.setenv(name, value)
            proc = SluiceProcess(rules, self.sluice_port, self.admin_port, self.workdir)
            self.sluice = proc
            proc.start()

    def stop_sluice(self) -> None:
        if self.sluice is not None:
            self.sluice.stop()
            self.sluice = None


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("nginx-recipe")
    upstream = CountingUpstream().start()
    sluice_port, admin_port = free_port(), free_port()
    sluice_addr = f"127.0.0.1:{sluice_port}"
    stack = Stack(
        workdir,
        upstream,
        sluice_port,
        admin_port,
        Nginx(workdir / "nginx-open", "open", sluice_addr, upstream.address),
        Nginx(workdir / "nginx-closed", "closed", sluice_addr, upstream.address),
    )
    try:
        stack.start_sluice()
        stack.open.start()
        stack.closed.start()
        yield stack
    finally:
        stack.closed.stop()
        stack.open.stop()
        stack.stop_sluice()
        upstream.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        yield s


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, object]:
        data = json.loads(self.body)
        assert isinstance(data, dict)
        return data


async def call(
    session: aiohttp.ClientSession,
    url: str,
    method: str = "GET",
    key: str | None = None,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    sent = dict(headers or {})
    if key is not None:
        sent["X-API-Key"] = key
    async with session.request(method, url, data=data, headers=sent) as r:
        return Answer(r.status, dict(r.headers), await r.read())


def assert_limited(answer: Answer, rule: str) -> None:
    """The 429 nginx.conf builds from Sluice's 403 matches what Sluice sends itself."""
    assert answer.status == 429, answer
    assert answer.headers["Content-Type"] == "application/json"
    retry = int(answer.headers["Retry-After"])
    assert retry >= 1
    assert answer.json() == {"error": "rate_limited", "rule": rule, "retry_after": retry}
    assert answer.headers["X-RateLimit-Remaining"] == "0"
    assert f'"{rule}";r=0' in answer.headers["RateLimit"]
    assert f'"{rule}";q=' in answer.headers["RateLimit-Policy"]


# ---------------------------------------------------------------- tests


async def test_allowed_requests_reach_the_upstream_with_their_body(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    """The decision subrequest carries no body, the proxied request keeps all of it
    (200 KiB: more than nginx keeps in memory, so it goes through a temp file)."""
    body = os.urandom(200 * 1024)
    answer = await call(session, stack.open.url + "/api/orders?x=1", "POST", "body-key", body)
    assert answer.status == 200, answer
    seen = answer.json()
    assert seen["upstream"] is True
    assert (seen["method"], seen["path"]) == ("POST", "/api/orders?x=1")
    assert (seen["body_bytes"], seen["body_sha256"]) == (
        len(body),
        hashlib.sha256(body).hexdigest(),
    )
    # Sluice decided on the described request: the POST-only rule applied.
    assert ietf_remaining(answer.headers["RateLimit"]) == {
        "per_client": LIMIT - 1,
        "writes": WRITES - 1,
    }
    assert answer.headers["X-RateLimit-Limit"] == str(WRITES)  # the binding quota
    get = await call(session, stack.open.url + "/api/items", key="body-key")
    assert get.status == 200
    assert ietf_remaining(get.headers["RateLimit"]) == {"per_client": LIMIT - 2}  # not a write
    assert stack.upstream.count("body-key") == 2


async def test_over_the_limit_clients_get_429_and_the_upstream_never_sees_them(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    """30 concurrent GETs of one client: exactly the limit is admitted (the rule is
    exact), the rest are 429 with Retry-After and Sluice's JSON body, and the
    upstream saw exactly the admitted ones."""
    answers = await asyncio.gather(
        *(call(session, stack.open.url + f"/api/items/{i}", key="greedy") for i in range(30))
    )
    codes = sorted(a.status for a in answers)
    assert codes == [200] * LIMIT + [429] * (30 - LIMIT)
    for answer in answers:
        if answer.status == 429:
            assert_limited(answer, "per_client")
        else:
            assert answer.json()["upstream"] is True
    assert stack.upstream.count("greedy") == LIMIT
    # The other instance asks the same Sluice: the client is over the limit there too.
    assert_limited(await call(session, stack.closed.url + "/api/x", key="greedy"), "per_client")
    assert stack.upstream.count("greedy") == LIMIT


async def test_writes_limit_denies_posts_and_their_bodies_never_travel(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    codes = []
    for i in range(WRITES + 2):
        answer = await call(session, stack.open.url + "/api/w", "POST", "writer", b"x" * (i + 1))
        codes.append(answer.status)
        if answer.status == 429:
            assert_limited(answer, "writes")
    assert codes == [200] * WRITES + [429, 429]
    assert stack.upstream.count("writer") == WRITES
    assert (await call(session, stack.open.url + "/api/r", key="writer")).status == 200


async def test_a_forged_forwarded_for_does_not_make_a_new_client(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    """Without an API key the client is its address; nginx.conf overwrites
    X-Forwarded-For with $remote_addr, so inventing one per request does not help."""
    codes = [
        (
            await call(
                session,
                stack.closed.url + "/public",
                headers={"X-Forwarded-For": f"203.0.113.{i}"},
            )
        ).status
        for i in range(LIMIT + 2)
    ]
    assert codes == [200] * LIMIT + [429, 429]


async def test_sluice_hung_fails_open_or_closed_after_the_read_timeout(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    """Sluice stopped with SIGSTOP (connections accepted, no answer): after
    nginx.conf's proxy_read_timeout (1 s) the variant's policy applies."""
    assert stack.sluice is not None
    before = stack.upstream.total()
    stack.sluice.signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        opened, closed = await asyncio.gather(
            call(session, stack.open.url + "/api/hung", key="hung-open"),
            call(session, stack.closed.url + "/api/hung", key="hung-closed"),
        )
        waited = time.monotonic() - started
    finally:
        stack.sluice.signal(signal.SIGCONT)
    assert opened.status == 200 and opened.json()["upstream"] is True
    assert "X-RateLimit-Limit" not in opened.headers  # nobody decided
    assert closed.status == 503
    assert closed.json() == {"error": "rate_limiter_unavailable"}
    assert stack.upstream.total() == before + 1
    assert 0.9 < waited < 5
    # Sluice answers again at once.
    assert (await call(session, stack.closed.url + "/api/x", key="hung-after")).status == 200


async def test_sluice_down_fails_open_or_closed_then_recovers(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    """Sluice stopped (connection refused): the ``open`` variant forwards unchecked,
    body included; the ``closed`` one answers 503 and the upstream sees nothing.
    A Sluice that answers 503 itself (a fail-closed rule whose Redis is down) is
    respected by both. Once Sluice is back, both enforce limits again."""
    stack.stop_sluice()
    try:
        before = stack.upstream.total()
        body = b"while sluice is down"
        for _ in range(LIMIT + 2):  # more than the limit: nothing counts
            opened = await call(session, stack.open.url + "/api/down", "POST", "down", body)
            assert opened.status == 200, opened
            assert opened.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
            assert "X-RateLimit-Limit" not in opened.headers
            closed = await call(session, stack.closed.url + "/api/down", "POST", "down", body)
            assert closed.status == 503, closed
            assert closed.json() == {"error": "rate_limiter_unavailable"}
        assert stack.upstream.total() == before + LIMIT + 2  # only the open variant's

        # Sluice up, its rules fail closed, its Redis unreachable: it answers 503.
        strict = stack.workdir / "rules-fail-closed.yaml"
        shipped = (NGINX_DIR / "rules.yaml").read_text()
        assert "on_storage_error: allow" in shipped
        strict.write_text(shipped.replace("on_storage_error: allow", "on_storage_error: deny"))
        stack.start_sluice(strict, SLUICE_STORAGE_URL=f"redis://127.0.0.1:{free_port()}/0")
        before = stack.upstream.total()
        for nginx in (stack.open, stack.closed):
            answer = await call(session, nginx.url + "/api/strict", key="strict")
            assert answer.status == 503, answer
            assert answer.json() == {"error": "storage_unavailable"}
        assert stack.upstream.total() == before
        stack.stop_sluice()
    finally:
        if stack.sluice is None:
            stack.start_sluice()

    for nginx in (stack.open, stack.closed):  # the shipped rules again, on a fresh store
        codes = [
            (await call(session, nginx.url + "/api/back", key=f"back-{nginx.on_failure}")).status
            for _ in range(LIMIT + 1)
        ]
        assert codes == [200] * LIMIT + [429]
