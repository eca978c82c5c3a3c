"""``sluice serve`` as a real process on real sockets: reload, drain, workers, limits of input.

Every Sluice and upstream here is a separate OS process on free loopback
ports, started by ``tests.proc`` and stopped by PID in a finalizer.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config import load
from proxy.runtime import Runtime
from proxy.worker import tune_gc
from tests.proc import (
    CHUNK,
    Processes,
    RouteSpec,
    SluiceProcess,
    UpstreamProcess,
    alive,
    established_sockets,
    free_port,
    get_json,
    http_get,
    metric_sum,
    pattern_chunk,
    pattern_digest,
    render_rules,
    rss_kib,
    write_rules,
    write_rules_keeping_stamp,
)

StartSluice = Callable[..., SluiceProcess]
ROUTE_A = (RouteSpec("a", "/a/"),)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpstreamProcess]:
    up = UpstreamProcess(tmp_path_factory.mktemp("upstream")).start()
    try:
        yield up
    finally:
        up.stop()


@pytest.fixture
def procs() -> Iterator[Processes]:
    started = Processes()
    try:
        yield started
    finally:
        started.stop_all()


@pytest.fixture
def start_sluice(tmp_path: Path, upstream: UpstreamProcess, procs: Processes) -> StartSluice:
    """Write a rules file on free ports and start ``sluice serve`` on it (stopped at teardown)."""

    def start(
        routes: tuple[RouteSpec, ...] = (RouteSpec("all", "/"),),
        workers: int = 1,
        shutdown_grace: str = "5s",
    ) -> SluiceProcess:
        main_port, admin_port = free_port(), free_port()
        rules = tmp_path / f"rules-{main_port}.yaml"
        write_rules(
            rules,
            render_rules(
                main_port, admin_port, upstream.url, routes, shutdown_grace=shutdown_grace
            ),
        )
        sluice = SluiceProcess(rules, main_port, admin_port, tmp_path, workers=workers)
        procs.add(sluice)
        return sluice.start()

    return start


def rules_for(sluice: SluiceProcess, upstream: UpstreamProcess, *routes: RouteSpec) -> str:
    return render_rules(sluice.main_port, sluice.admin_port, upstream.url, routes)


def eventually(check: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what} (last: {result!r})")
        time.sleep(every)


def status_of(sluice: SluiceProcess, path: str) -> int:
    return http_get(sluice.main_port, path)[0]


def readyz(sluice: SluiceProcess) -> Any:
    status, body = get_json(sluice.admin_port, "/readyz")
    assert status == 200
    return body


async def settled_requests_total(sluice: SluiceProcess, expected: float) -> None:
    """Wait until /metrics counts ``expected`` requests, then check a few more reads agree.

    A request is counted just after its response is written, so the client can
    see the response a moment before the counter moves: allow that moment.
    """
    deadline = time.monotonic() + 2
    while True:
        text = (await asyncio.to_thread(http_get, sluice.admin_port, "/metrics"))[2].decode()
        got = metric_sum(text, "sluice_requests_total", route="all")
        if got == expected:
            break
        assert time.monotonic() < deadline, f"sluice_requests_total is {got}, sent {expected}"
        await asyncio.sleep(0.02)
    # Each read may be answered by either worker; every answer must be the sum of both.
    for _ in range(8):
        text = (await asyncio.to_thread(http_get, sluice.admin_port, "/metrics"))[2].decode()
        assert metric_sum(text, "sluice_requests_total", route="all") == expected
        assert metric_sum(text, "sluice_requests_in_flight") == 0


def metrics_text(sluice: SluiceProcess) -> str:
    status, _, body = http_get(sluice.admin_port, "/metrics")
    assert status == 200
    return body.decode()


# ---------------------------------------------------------------- reload


def test_file_change_reloads_new_route(
    start_sluice: StartSluice, upstream: UpstreamProcess
) -> None:
    sluice = start_sluice(ROUTE_A)
    status, _, body = http_get(sluice.main_port, "/b/x")
    assert status == 404
    assert json.loads(body)["error"] == "no_route"

    new_text = rules_for(sluice, upstream, RouteSpec("a", "/a/"), RouteSpec("b", "/b/"))
    written = time.monotonic()
    write_rules(sluice.rules, new_text)
    eventually(lambda: status_of(sluice, "/b/x") == 200, 3.0, "the new route /b/ served")
    assert time.monotonic() - written < 3.0

    status, _, body = http_get(sluice.main_port, "/b/x?q=1")
    assert (status, json.loads(body)["path"]) == (200, "/b/x?q=1")
    assert status_of(sluice, "/a/x") == 200
    ready = readyz(sluice)
    assert ready["config"]["sha256"] == hashlib.sha256(new_text.encode()).hexdigest()
    assert ready["last_reload_error"] is None
    text = metrics_text(sluice)
    assert metric_sum(text, "sluice_config_reloads_total", result="ok") == 1
    assert metric_sum(text, "sluice_config_last_reload_successful") == 1


def test_sighup_reloads(start_sluice: StartSluice, upstream: UpstreamProcess) -> None:
    sluice = start_sluice((RouteSpec("a", "/a/"), RouteSpec("b", "/b/")))
    assert status_of(sluice, "/b/x") == 200
    # Same size, same inode, old mtime restored: the file watcher cannot see this change.
    write_rules_keeping_stamp(
        sluice.rules, rules_for(sluice, upstream, RouteSpec("a", "/a/"), RouteSpec("b", "/c/"))
    )
    time.sleep(1.3)  # longer than the watcher's 1 s poll
    assert status_of(sluice, "/c/x") == 404, "the watcher reloaded; the SIGHUP test proves nothing"

    sluice.signal(signal.SIGHUP)
    eventually(lambda: status_of(sluice, "/c/x") == 200, 2.0, "/c/ served after SIGHUP")
    assert status_of(sluice, "/b/x") == 404
    assert metric_sum(metrics_text(sluice), "sluice_config_reloads_total", result="ok") == 1


def test_failed_reload_keeps_last_good_config(
    start_sluice: StartSluice, upstream: UpstreamProcess
) -> None:
    sluice = start_sluice(ROUTE_A)
    good = sluice.rules.read_text()

    broken = rules_for(sluice, upstream, RouteSpec("a", "/a/"), RouteSpec("b", "/b/", "upp"))
    line = broken.splitlines().index("    upstream: upp") + 1
    write_rules(sluice.rules, broken)

    def reload_error() -> Any:
        return readyz(sluice)["last_reload_error"]

    error = eventually(reload_error, 3.0, "/readyz reports the failed reload")
    assert error == (
        f"{sluice.rules}:{line}: routes[1].upstream: unknown upstream 'upp' (known: up)"
        " (did you mean 'up'?)"
    )
    assert status_of(sluice, "/a/x") == 200  # the old config keeps serving
    assert status_of(sluice, "/b/x") == 404
    text = metrics_text(sluice)
    failed = metric_sum(text, "sluice_config_reloads_total", result="failed")
    assert failed is not None and failed >= 1
    assert metric_sum(text, "sluice_config_last_reload_successful") == 0
    assert "the last good config keeps serving" in sluice.output()

    # A second, different breakage: a YAML syntax error, reported with its line.
    write_rules(sluice.rules, good.replace("routes:\n", "routes:\n  - [\n", 1))
    yaml_line = good.splitlines().index("routes:") + 3
    eventually(
        lambda: str(reload_error()).startswith(f"{sluice.rules}:{yaml_line}: invalid YAML: "),
        3.0,
        "/readyz reports the YAML error",
    )
    assert status_of(sluice, "/a/x") == 200

    write_rules(sluice.rules, good)  # the operator reverts
    eventually(lambda: reload_error() is None, 3.0, "the reload error is cleared")
    text = metrics_text(sluice)
    assert metric_sum(text, "sluice_config_last_reload_successful") == 1
    assert status_of(sluice, "/a/x") == 200


async def test_reload_does_not_break_requests_in_flight(
    start_sluice: StartSluice, upstream: UpstreamProcess
) -> None:
    """A reload that replaces an upstream's pool lets requests already using it finish."""
    sluice = start_sluice(shutdown_grace="1s")
    text = sluice.rules.read_text()
    async with aiohttp.ClientSession() as session:
        request = asyncio.create_task(fetch(session, sluice.url("/slow/slow?delay=2.5")))
        await wait_in_flight(sluice)
        new_text = text.replace("connect_timeout: 2s", "connect_timeout: 3s")
        assert new_text != text
        write_rules(sluice.rules, new_text)  # a changed upstream: a new pool, the old one retired
        digest = hashlib.sha256(new_text.encode()).hexdigest()

        def reloaded() -> bool:
            return bool(readyz(sluice)["config"]["sha256"] == digest)

        await asyncio.to_thread(eventually, reloaded, 3.0, "the new config loaded")
        assert await asyncio.wait_for(request, 10) == (200, "slow 2.5")
    assert status_of(sluice, "/after") == 200


def test_reload_cannot_move_listeners(start_sluice: StartSluice, upstream: UpstreamProcess) -> None:
    sluice = start_sluice(ROUTE_A)
    moved = render_rules(
        free_port(), sluice.admin_port, upstream.url, (RouteSpec("a", "/a/"), RouteSpec("b", "/b/"))
    )
    write_rules(sluice.rules, moved)
    eventually(lambda: status_of(sluice, "/b/x") == 200, 3.0, "the new route on the old port")
    warning = next(
        (
            line
            for line in sluice.output().splitlines()
            if f"listen changed in {sluice.rules}" in line
        ),
        "",
    )
    assert "WARNING" in warning
    assert "change only on restart" in warning
    assert status_of(sluice, "/a/x") == 200


# ---------------------------------------------------------------- drain


async def connect_refused(port: int) -> bool:
    """True once the listener is gone. A connection caught in the backlog of a listener
    that is just closing is reset rather than refused: the same answer."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except (ConnectionRefusedError, ConnectionResetError):
        return True
    writer.close()
    await writer.wait_closed()
    return False


async def wait_in_flight(sluice: SluiceProcess, count: int = 1, within: float = 3.0) -> None:
    """Until the admin /metrics shows ``count`` requests in flight on the main listener."""
    deadline = time.monotonic() + within
    while True:
        text = (await asyncio.to_thread(http_get, sluice.admin_port, "/metrics"))[2].decode()
        if metric_sum(text, "sluice_requests_in_flight") == count:
            return
        assert time.monotonic() < deadline, f"never {count} request(s) in flight"
        await asyncio.sleep(0.02)


async def fetch(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as resp:
        return resp.status, await resp.text()


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_drains_in_flight_request(start_sluice: StartSluice, workers: int) -> None:
    sluice = start_sluice(shutdown_grace="5s", workers=workers)
    async with aiohttp.ClientSession() as session:
        request = asyncio.create_task(fetch(session, sluice.url("/slow/slow?delay=1.5")))
        await wait_in_flight(sluice)

        sent = time.monotonic()
        sluice.signal(signal.SIGTERM)
        while not await connect_refused(sluice.main_port):
            assert time.monotonic() - sent < 1.0, "still accepting connections 1 s after SIGTERM"
            await asyncio.sleep(0.02)
        assert not request.done(), "the listener should close while the request is in flight"

        assert await asyncio.wait_for(request, 5) == (200, "slow 1.5")
        answered = time.monotonic()

    code = await asyncio.to_thread(sluice.wait, 5.0)
    exited = time.monotonic()
    assert code == 0
    assert exited - sent < 5.0, "exceeded server.shutdown_grace"
    assert exited - answered < 1.5, "lingered after the last request had finished"
    log = sluice.output()
    assert log.count("draining (grace 5.0s)") == workers
    assert log.count(" stopped") == workers + (1 if workers > 1 else 0)
    assert not [pid for pid, started in sluice.seen_children.items() if alive(pid, started)]


async def test_drain_is_bounded_by_shutdown_grace(start_sluice: StartSluice) -> None:
    sluice = start_sluice(shutdown_grace="1s")
    async with aiohttp.ClientSession() as session:
        request = asyncio.create_task(fetch(session, sluice.url("/slow/slow?delay=6")))
        await wait_in_flight(sluice)
        sent = time.monotonic()
        sluice.signal(signal.SIGTERM)
        code = await asyncio.to_thread(sluice.wait, 5.0)
        exited = time.monotonic()
        outcome = await asyncio.gather(request, return_exceptions=True)
    assert code == 0
    assert exited - sent < 2.5, f"took {exited - sent:.2f}s with a 1s grace"
    assert outcome[0] != (200, "slow 6.0")


async def test_second_sigterm_ends_the_drain_at_once(start_sluice: StartSluice) -> None:
    sluice = start_sluice(shutdown_grace="10s")
    async with aiohttp.ClientSession() as session:
        request = asyncio.create_task(fetch(session, sluice.url("/slow/slow?delay=6")))
        await wait_in_flight(sluice)
        sluice.signal(signal.SIGTERM)
        first = time.monotonic()
        while not await connect_refused(sluice.main_port):  # draining now
            assert time.monotonic() - first < 1.0, "still accepting 1 s after SIGTERM"
            await asyncio.sleep(0.02)
        sent = time.monotonic()
        sluice.signal(signal.SIGTERM)
        code = await asyncio.to_thread(sluice.wait, 5.0)
        assert time.monotonic() - sent < 1.0
        await asyncio.gather(request, return_exceptions=True)
    assert code == -signal.SIGTERM


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_idle_connections_do_not_delay_shutdown(
    start_sluice: StartSluice, sig: signal.Signals, workers: int
) -> None:
    sluice = start_sluice(shutdown_grace="10s", workers=workers)
    held = []
    try:
        for _ in range(6):  # keep-alive connections left idle after one request each
            conn = socket.create_connection(("127.0.0.1", sluice.main_port), timeout=5)
            held.append(conn)
            conn.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
            assert conn.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")
        held.append(socket.create_connection(("127.0.0.1", sluice.main_port), timeout=5))
        sent = time.monotonic()
        sluice.signal(sig)
        assert sluice.wait(10) == 0
        assert time.monotonic() - sent < 2.0, "idle connections held the drain"
    finally:
        for conn in held:
            conn.close()


# ---------------------------------------------------------------- garbage collector


async def test_serving_worker_collects_garbage_rarely(start_sluice: StartSluice) -> None:
    """Once serving, the worker's young generation is collected every ~10,000 net
    allocations, not CPython's 700 (``worker.GC_THRESHOLDS``): a few times per
    thousand requests instead of ~25 times. Read from the worker's own
    ``python_gc_collections_total``; fails if the tuning is not applied."""
    sluice = start_sluice()

    def collections() -> dict[str, float]:
        _, _, body = http_get(sluice.admin_port, "/metrics")
        text = body.decode()
        found = {
            gen: metric_sum(text, "python_gc_collections_total", generation=gen)
            for gen in ("0", "1", "2")
        }
        assert None not in found.values(), "no python_gc_collections_total samples"
        return {gen: value or 0.0 for gen, value in found.items()}

    async with aiohttp.ClientSession() as session:

        async def burst(n: int) -> None:
            for i in range(n):
                async with session.get(sluice.url(f"/gc/{i}")) as resp:
                    assert resp.status == 200
                    await resp.read()

        # 32 at once, as a loaded proxy sees them: what is allocated in flight swings
        # past 700 often (sequential requests free everything and rarely trigger it).
        await asyncio.gather(*(burst(5) for _ in range(32)))  # warm: connections, caches
        before = await asyncio.to_thread(collections)
        await asyncio.gather(*(burst(60) for _ in range(32)))
        after = await asyncio.to_thread(collections)
    young = after["0"] - before["0"]
    assert young <= 6, f"{young:g} young collections for 1,920 requests (untuned: ~50)"
    assert after["2"] - before["2"] == 0, "a full collection during 1,920 requests"


async def test_first_config_change_unfreezes_what_startup_froze(
    tmp_path: Path, upstream: UpstreamProcess
) -> None:
    """``tune_gc`` freezes the startup heap, the first config with it (it has cycles:
    frozen, it could never be freed once replaced); a reload that replaces it unfreezes."""
    main_port, admin_port = free_port(), free_port()
    rules = tmp_path / "rules.yaml"
    write_rules(rules, render_rules(main_port, admin_port, upstream.url, ROUTE_A))
    runtime = Runtime(load(rules))
    thresholds = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_freeze_count() > 0
        assert runtime.reload()  # the same file: the config is kept, still frozen
        assert gc.get_freeze_count() > 0
        write_rules(
            rules,
            render_rules(main_port, admin_port, upstream.url, (*ROUTE_A, RouteSpec("b", "/b/"))),
        )
        assert runtime.reload()
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        await runtime.close()


# ---------------------------------------------------------------- workers


async def test_two_workers_share_the_port_and_sum_metrics(start_sluice: StartSluice) -> None:
    sluice = start_sluice(workers=2)
    workers = sluice.children()
    assert len(workers) == 2
    assert len(sluice.metrics_dirs()) == 1

    sent = 0
    # Concurrent requests open one connection each and keep it: SO_REUSEPORT spreads them.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def get(path: str) -> int:
            async with session.get(sluice.url(path)) as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(get(f"/w/{i}") for i in range(32)))
        sent += len(statuses)
        assert statuses == [200] * 32
        held = {pid: established_sockets(pid, sluice.main_port) for pid in workers}
        assert sum(held.values()) == 32
        assert all(held.values()), f"one worker served nothing: {held}"

    # Then many requests, each on a fresh connection.
    connector = aiohttp.TCPConnector(limit=16, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def fresh(i: int) -> int:
            async with session.get(sluice.url(f"/f/{i}")) as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(fresh(i) for i in range(160)))
        sent += len(statuses)
        assert statuses == [200] * 160

    await settled_requests_total(sluice, sent)

    sluice.signal(signal.SIGTERM)
    assert await asyncio.to_thread(sluice.wait, 10.0) == 0
    assert not [pid for pid, started in sluice.seen_children.items() if alive(pid, started)]
    assert "supervisor stopped" in sluice.output()
    assert sluice.metrics_dirs() == []


async def test_two_workers_sighup_reloads_every_worker(
    start_sluice: StartSluice, upstream: UpstreamProcess
) -> None:
    sluice = start_sluice((RouteSpec("a", "/a/"),), workers=2)
    write_rules_keeping_stamp(sluice.rules, rules_for(sluice, upstream, RouteSpec("a", "/c/")))
    sluice.signal(signal.SIGHUP)

    connector = aiohttp.TCPConnector(limit=16, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def status(path: str) -> int:
            async with session.get(sluice.url(path)) as resp:
                await resp.read()
                return resp.status

        deadline = time.monotonic() + 3
        while True:
            # 24 fresh connections land on both workers; all must know the new route.
            statuses = await asyncio.gather(*(status(f"/c/{i}") for i in range(24)))
            if statuses == [200] * 24:
                break
            assert time.monotonic() < deadline, f"not every worker reloaded: {statuses}"
            await asyncio.sleep(0.1)
        assert await status("/a/x") == 404


async def test_killed_worker_is_replaced_and_its_counts_kept(start_sluice: StartSluice) -> None:
    sluice = start_sluice(workers=2)
    first = sluice.children()
    connector = aiohttp.TCPConnector(limit=8, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def burst(n: int) -> list[int]:
            async def one(i: int) -> int:
                async with session.get(sluice.url(f"/k/{i}")) as resp:
                    await resp.read()
                    return resp.status

            return await asyncio.gather(*(one(i) for i in range(n)))

        assert await burst(40) == [200] * 40
        await settled_requests_total(sluice, 40)
        os.kill(first[0], signal.SIGKILL)

        def replaced() -> list[int] | None:
            kids = sluice.children()
            return kids if len(kids) == 2 and first[0] not in kids else None

        kids = await asyncio.to_thread(eventually, replaced, 5.0, "a new worker in place")
        assert first[1] in kids
        await asyncio.to_thread(sluice.wait_healthy)
        deadline = time.monotonic() + 5
        while sluice.output().count(" serving on ") < 3:
            assert time.monotonic() < deadline, "the replacement never started serving"
            await asyncio.sleep(0.05)
        assert await burst(40) == [200] * 40

    await settled_requests_total(sluice, 80)  # the dead worker's counts are kept
    assert f"worker {first[0]} exited with -9; starting a new one" in sluice.output()


def test_workers_exit_when_the_supervisor_dies(start_sluice: StartSluice) -> None:
    """A supervisor killed outright must not leave workers serving (and holding the port)."""
    sluice = start_sluice(workers=2)
    workers = {pid: sluice.seen_children[pid] for pid in sluice.children()}
    os.kill(sluice.pid, signal.SIGKILL)
    sluice.wait(5)
    eventually(
        lambda: not any(alive(pid, started) for pid, started in workers.items()),
        5.0,
        "orphaned workers exit",
    )


# ---------------------------------------------------------------- ports in use


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("which", ["main", "admin"])
def test_port_in_use_exits_1(
    tmp_path: Path, upstream: UpstreamProcess, procs: Processes, which: str, workers: int
) -> None:
    main_port, admin_port = free_port(), free_port()
    busy = main_port if which == "main" else admin_port
    rules = tmp_path / "rules.yaml"
    write_rules(rules, render_rules(main_port, admin_port, upstream.url))
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", busy))
        blocker.listen()
        sluice = procs.add(SluiceProcess(rules, main_port, admin_port, tmp_path, workers=workers))
        started = time.monotonic()
        sluice.start(wait=False)
        code = sluice.wait(5)  # a TimeoutExpired here fails the test; the finalizer stops it
        took = time.monotonic() - started
    assert code == 1
    assert took < 5
    assert f"cannot listen on 127.0.0.1:{busy}: address already in use" in sluice.output()


# ---------------------------------------------------------------- streaming


async def test_streams_100mb_each_way_with_bounded_memory(start_sluice: StartSluice) -> None:
    sluice = start_sluice()
    total = 128 * 1024 * 1024
    assert total % CHUNK == 0
    peak = 0

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_kib(sluice.pid))
            await asyncio.sleep(0.01)

    async def body() -> AsyncIterator[bytes]:
        for i in range(total // CHUNK):
            yield pattern_chunk(i)

    expected_digest = pattern_digest(total)
    async with aiohttp.ClientSession() as session:
        async with session.get(sluice.url("/warm")) as resp:
            assert resp.status == 200
        baseline = rss_kib(sluice.pid)
        sampler = asyncio.create_task(sample())
        try:
            async with session.post(sluice.url("/up/count"), data=body()) as resp:
                assert resp.status == 200
                assert await resp.json() == {"bytes": total, "sha256": expected_digest}
            upload_peak = peak

            received = 0
            digest = hashlib.sha256()
            async with session.get(sluice.url(f"/down/stream?bytes={total}")) as resp:
                assert resp.status == 200
                async for chunk in resp.content.iter_chunked(CHUNK):
                    received += len(chunk)
                    digest.update(chunk)
            assert received == total
            assert digest.hexdigest() == expected_digest
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
    limit = baseline + 60 * 1024
    assert upload_peak < limit, f"upload: RSS {upload_peak} KiB, baseline {baseline} KiB"
    assert peak < limit, f"download: RSS {peak} KiB, baseline {baseline} KiB"


# ---------------------------------------------------------------- bad input


def raw_exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` on a raw socket while reading; return what came back before EOF/reset."""
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:

        def send() -> None:
            try:
                sock.sendall(data)
            except OSError:
                pass  # the server may close before taking it all

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        sender.join(timeout)
    return bytes(received)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /x HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (10 * 1024 * 1024) + b"\r\n\r\n",
        b"GET /" + b"a" * (10 * 1024 * 1024) + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=["10MB_header", "10MB_request_line"],
)
def test_huge_header_gets_400_and_process_survives(
    start_sluice: StartSluice, request_bytes: bytes
) -> None:
    sluice = start_sluice()
    request = request_bytes
    for _ in range(3):
        answer = raw_exchange(sluice.main_port, request)
        assert answer.startswith(b"HTTP/1.0 400 Bad Request\r\n") or answer.startswith(
            b"HTTP/1.1 400 Bad Request\r\n"
        ), answer[:200]
    assert sluice.proc is not None and sluice.proc.poll() is None
    assert status_of(sluice, "/still/here") == 200
    assert http_get(sluice.admin_port, "/healthz")[0] == 200


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /x HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: x\r\nX-A: b\x00c\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: x\r\n: no-name\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,  # a TLS ClientHello
    ],
    ids=["no_colon", "nul_in_value", "empty_name", "tls_hello"],
)
def test_invalid_request_gets_400(start_sluice: StartSluice, request_bytes: bytes) -> None:
    sluice = start_sluice()
    answer = raw_exchange(sluice.main_port, request_bytes)
    assert answer.split(b"\r\n", 1)[0] in (b"HTTP/1.0 400 Bad Request", b"HTTP/1.1 400 Bad Request")
    assert status_of(sluice, "/still/here") == 200


@pytest.mark.parametrize("workers", [1, 2])
def test_malformed_yaml_at_startup_exits_1(tmp_path: Path, procs: Processes, workers: int) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "listen: 127.0.0.1:18000\nupstreams:\n  api: http://127.0.0.1:9000\n    read_timeout: 2s\n"
    )
    sluice = procs.add(SluiceProcess(rules, free_port(), free_port(), tmp_path, workers=workers))
    sluice.start(wait=False)
    assert sluice.wait(5) == 1
    expected = f"{rules}:4: invalid YAML: mapping values are not allowed here\n"
    assert sluice.output() == expected
