"""Log output through real HTTP: access lines, sampling, formats, reload, a blocked stderr.

In-process tests point the log pipeline at a file (or a pipe nobody reads)
with ``logs.setup(..., fd=...)``; one test runs ``sluice serve`` as a real
process whose stderr is a pipe nobody reads.
"""

from __future__ import annotations

import fcntl
import http.client
import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from proxy import logs
from proxy.config import LoggingConfig
from proxy.limits.identity import masked
from tests.inproc import running, write_rules
from tests.linkkit import Storage, client_for, sluice_on
from tests.proc import SLUICE, http_get, metric_sum
from tests.servers import free_port, wait_for_port
from tests.upstream import make_upstream

ServerFactory = Callable[..., Awaitable[TestServer]]
KEY = "alice-secret-key"

RULES = """
listen: {listen}
admin: {{listen: "{admin}"}}
upstreams:
  app: {{url: "http://127.0.0.1:{port}"}}
  down: {{url: "http://127.0.0.1:{down}"}}
limits:
  - {{name: one, key: "header:X-Key | ip", algorithm: fixed_window, limit: 1, window: 1h}}
  - {{name: roomy, key: ip, algorithm: token_bucket, capacity: 1000, refill: 1/s}}
routes:
  - {{name: limited, match: {{path_prefix: /echo/limited}}, upstream: app, limits: [one, roomy]}}
  - {{name: down, match: {{path_prefix: /down}}, upstream: down}}
  - {{name: open, match: {{path_prefix: /}}, upstream: app}}
logging: {logging}
"""


@dataclass
class Captured:
    """The log pipeline of this process, writing to a file."""

    pipeline: logs.LogPipeline
    path: Path

    def lines(self) -> list[str]:
        assert self.pipeline.flush(5)
        return self.path.read_text().splitlines()

    def access(self) -> list[dict[str, Any]]:
        found = []
        for line in self.lines():
            if line.startswith("{") and '"logger":"sluice.access"' in line:
                found.append(json.loads(line))
        return found


def capture_to(path: Path, settings: LoggingConfig) -> Iterator[Captured]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        yield Captured(logs.setup(settings, fd=fd), path)
    finally:
        logs.shutdown()
        os.close(fd)


@pytest.fixture
def captured(tmp_path: Path) -> Iterator[Captured]:
    yield from capture_to(tmp_path / "sluice.log", LoggingConfig())


@pytest.fixture
async def upstream(aiohttp_server: ServerFactory) -> TestServer:
    return await aiohttp_server(make_upstream())


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def rules(directory: Path, upstream: TestServer, logging_: str) -> Path:
    return write_rules(directory, RULES, port=upstream.port, down=free_port(), logging=logging_)


async def status_of(client: aiohttp.ClientSession, url: str, **kw: Any) -> int:
    async with client.get(url, **kw) as r:
        await r.read()
        return r.status


# ---------------------------------------------------------------- access lines


async def test_access_lines_for_allowed_rejected_and_failed_requests(
    tmp_path: Path, upstream: TestServer, captured: Captured, client: aiohttp.ClientSession
) -> None:
    async with running(rules(tmp_path, upstream, "{access: true}")) as sluice:
        key = {"X-Key": KEY}
        url = sluice.url + "/echo/limited/x?token=abc"
        assert await status_of(client, url, headers=key) == 200
        assert await status_of(client, url, headers=key) == 429
        assert await status_of(client, sluice.url + "/status/503") == 503
        assert await status_of(client, sluice.url + "/down/x") == 502
    allowed, rejected, relayed, failed = captured.access()
    hashed = masked(f"header:X-Key={KEY}")
    assert hashed.startswith("header:X-Key=#")

    for line in (allowed, rejected, relayed, failed):
        assert set(line) >= {"ts", "level", "logger", "method", "path", "route", "status"}
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"])
        assert (line["level"], line["logger"], line["method"]) == ("info", "sluice.access", "GET")
        assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0

    assert (allowed["path"], allowed["route"], allowed["status"]) == (
        "/echo/limited/x",
        "limited",
        200,
    )
    assert (allowed["upstream"], allowed["upstream_status"]) == ("app", 200)
    assert 0 <= allowed["upstream_ms"] <= allowed["duration_ms"]
    assert allowed["rules"] == [
        {"rule": "one", "client": hashed, "result": "allowed", "retry_after": 0.0},
        {"rule": "roomy", "client": "ip=127.0.0.1", "result": "allowed", "retry_after": 0.0},
    ]

    assert (rejected["route"], rejected["status"]) == ("limited", 429)
    assert "upstream" not in rejected and "upstream_status" not in rejected
    one, roomy = rejected["rules"]
    assert (one["rule"], one["client"], one["result"]) == ("one", hashed, "rejected")
    assert 3590 < one["retry_after"] <= 3600
    assert (roomy["rule"], roomy["result"]) == ("roomy", "allowed")

    assert (relayed["route"], relayed["status"], relayed["upstream_status"]) == ("open", 503, 503)
    assert relayed["rules"] == []
    # the upstream never answered: Sluice's own 502, no upstream status
    assert (failed["route"], failed["status"], failed["upstream"]) == ("down", 502, "down")
    assert failed["upstream_status"] is None

    # (the test upstream runs in this process: its own aiohttp.access lines are not Sluice's)
    ours = [line for line in captured.lines() if "aiohttp.access" not in line]
    assert not [line for line in ours if KEY in line or "token=abc" in line]


async def test_show_keys_logs_raw_client_keys(
    tmp_path: Path, upstream: TestServer, captured: Captured, client: aiohttp.ClientSession
) -> None:
    async with running(rules(tmp_path, upstream, "{access: true, show_keys: true}")) as sluice:
        assert await status_of(client, sluice.url + "/echo/limited", headers={"X-Key": KEY}) == 200
    (line,) = captured.access()
    assert line["rules"][0]["client"] == f"header:X-Key={KEY}"


async def test_access_lines_for_redirects(tmp_path: Path, captured: Captured) -> None:
    storage = Storage("sqlite", "memory://", tmp_path / "data")
    async with (
        sluice_on(tmp_path / "s", storage, extra="logging: {access: true}") as sluice,
        client_for(sluice) as links,
    ):
        code = (await links.create(url="https://example.com/x"))["code"]
        assert (await links.follow(code)).status == 302
        assert (await links.follow("no-such-code")).status == 404
    found, missing = captured.access()
    rule = {
        "rule": "per_ip_redirects",
        "client": "ip=127.0.0.1",
        "result": "allowed",
        "retry_after": 0.0,
    }
    assert (found["path"], found["route"], found["status"]) == (f"/s/{code}", "redirects", 302)
    assert found["rules"] == [rule]
    assert "upstream" not in found
    assert (missing["route"], missing["status"], missing["rules"]) == ("redirects", 404, [rule])


async def test_sampling_and_reload_of_level_and_access(
    tmp_path: Path, upstream: TestServer, captured: Captured, client: aiohttp.ClientSession
) -> None:
    path = rules(tmp_path, upstream, "{access: 'sample:0.0', level: warning}")
    async with running(path) as sluice:
        for _ in range(30):
            assert await status_of(client, sluice.url + "/echo/x") == 200
        assert captured.access() == []
        assert logging.getLogger().level == logging.WARNING
        logging.getLogger("sluice.test").info("not at warning")

        text = path.read_text()
        path.write_text(
            text.replace("{access: 'sample:0.0', level: warning}", "{access: true, level: debug}")
        )
        assert sluice.runtime.reload()
        for _ in range(30):
            assert await status_of(client, sluice.url + "/echo/x") == 200
        assert len(captured.access()) == 30
        assert logging.getLogger().level == logging.DEBUG
    assert not any("not at warning" in line for line in captured.lines())


def test_sampled_share(monkeypatch: pytest.MonkeyPatch) -> None:
    draws = iter([0.1, 0.3, 0.24, 0.9, 0.0])
    monkeypatch.setattr(logs, "_random", lambda: next(draws))
    assert [logs.sampled(0.25) for _ in range(5)] == [True, False, True, False, True]
    assert not logs.sampled(0.0) and logs.sampled(1.0)


def test_level_override_beats_config_and_reload(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "x.log", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        logs.setup(LoggingConfig(level="debug"), level="error", fd=fd)
        assert logging.getLogger().level == logging.ERROR
        logs.apply(LoggingConfig(level="info"))
        assert logging.getLogger().level == logging.ERROR
        assert logging.getLogger("sluice.access").level == logging.INFO
    finally:
        logs.shutdown()
        os.close(fd)


# ---------------------------------------------------------------- formats


def test_json_format_lines_parse(tmp_path: Path) -> None:
    for captured in capture_to(tmp_path / "json.log", LoggingConfig(format="json")):
        log = logging.getLogger("sluice.test")
        log.warning('a %s with "quotes"\nand a second line', "message")
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            log.exception("it failed")
        logs.access_log.info("access", extra={"access": {"method": "GET", "status": 200}})
        first, second, third = (json.loads(line) for line in captured.lines())
    assert set(first) == {"ts", "level", "logger", "message"}
    assert (first["level"], first["logger"]) == ("warning", "sluice.test")
    assert first["message"] == 'a message with "quotes"\nand a second line'
    assert (second["level"], second["message"]) == ("error", "it failed")
    assert second["exception"].startswith("Traceback (most recent call last):")
    assert second["exception"].endswith("ZeroDivisionError: division by zero")
    assert third["logger"] == "sluice.access" and third["status"] == 200


def test_text_format_keeps_the_classic_line_and_json_access(tmp_path: Path) -> None:
    for captured in capture_to(tmp_path / "text.log", LoggingConfig()):
        logging.getLogger("sluice.test").warning("hello %d", 7)
        logs.access_log.info("access", extra={"access": {"status": 204}})
        plain, access = captured.lines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING sluice.test: hello 7", plain)
    assert json.loads(access)["status"] == 204


# ---------------------------------------------------------------- a blocked stderr


def small_pipe() -> tuple[int, int]:
    """A pipe whose buffer holds one page: a few log lines fill it."""
    read, write = os.pipe()
    fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, 4096)
    return read, write


def drain(fd: int) -> threading.Thread:
    def run() -> None:
        while os.read(fd, 65536):
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


async def test_blocked_writer_does_not_slow_requests_and_drops_are_counted(
    tmp_path: Path, upstream: TestServer, client: aiohttp.ClientSession
) -> None:
    read, write = small_pipe()
    pipeline = logs.setup(LoggingConfig(buffer=20), fd=write)
    try:
        async with running(rules(tmp_path, upstream, "{access: true}")) as sluice:
            slowest = 0.0
            timeout = aiohttp.ClientTimeout(total=5)
            for _ in range(300):
                started = time.perf_counter()
                assert await status_of(client, sluice.url + "/echo/x", timeout=timeout) == 200
                slowest = max(slowest, time.perf_counter() - started)
            assert slowest < 1.0
            # the writer is stuck on the full pipe, the queue is full, the rest was dropped
            assert pipeline.queue.full()
            assert not pipeline.flush(0.05)
            assert pipeline.dropped >= 300 - 20 - 40
            async with client.get(sluice.admin_url + "/metrics") as r:
                exposed = metric_sum(await r.text(), "sluice_log_dropped_total")
            assert exposed == pipeline.dropped
    finally:
        reader = drain(read)  # unblock the writer so that it can stop
        logs.shutdown()
        os.close(write)
        reader.join(5)
        os.close(read)


@pytest.mark.parametrize("workers", [1, 2])
def test_sluice_with_unread_stderr_pipe_keeps_serving(tmp_path: Path, workers: int) -> None:
    main, admin = free_port(), free_port()
    (tmp_path / "rules.yaml").write_text(
        f"""\
listen: 127.0.0.1:{main}
admin: {{listen: "127.0.0.1:{admin}"}}
limits:
  - {{name: many, key: ip, algorithm: fixed_window, limit: 1000000, window: 1h}}
routes:
  - {{name: decide, kind: decide, match: {{path_prefix: /}}, limits: [many]}}
logging: {{access: true, buffer: 50}}
"""
    )
    cmd = [*SLUICE, "serve", "-c", "rules.yaml", "--workers", str(workers)]
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,  # nobody reads it
        env=env,
    )
    assert proc.stderr is not None
    try:
        fcntl.fcntl(proc.stderr.fileno(), fcntl.F_SETPIPE_SZ, 4096)
        wait_for_port(admin, timeout=15)
        wait_for_port(main, timeout=15)
        conn = http.client.HTTPConnection("127.0.0.1", main, timeout=5)
        slowest = 0.0
        for _ in range(1000):
            started = time.perf_counter()
            conn.request("GET", "/x")
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            slowest = max(slowest, time.perf_counter() - started)
        conn.close()
        assert slowest < 1.0
        _, _, body = http_get(admin, "/metrics")  # any worker's adds up all of them
        dropped = metric_sum(body.decode(), "sluice_log_dropped_total") or 0.0
        assert dropped >= 1000 - 50 * workers - 100
        started = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(15) == 0  # stopping gives up on the stuck writer, it does not hang
        assert time.monotonic() - started < 10
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
        proc.stderr.close()


def test_pipeline_counts_drops_into_a_late_counter() -> None:
    read, write = small_pipe()
    pipeline = logs.LogPipeline(write, "text", capacity=2)
    try:
        for i in range(200):
            message = "x" * 100 + str(i)
            record = logging.LogRecord("t", logging.WARNING, __file__, 1, message, None, None)
            pipeline.handler.handle(record)
        assert pipeline.dropped > 0

        class Counter:
            value = 0.0

            def inc(self, amount: float = 1) -> None:
                self.value += amount

        counter = Counter()
        pipeline.count_drops(counter)
        assert counter.value == pipeline.dropped
        pipeline.drop()
        assert counter.value == pipeline.dropped
    finally:
        reader = drain(read)
        pipeline.close()
        os.close(write)
        reader.join(5)
        os.close(read)
