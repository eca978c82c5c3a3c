"""The status page and its JSON over real HTTP, on the embedded store and on Redis."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.limits.identity import masked
from tests.inproc import Sluice, running, write_rules
from tests.servers import RedisServer
from tests.test_events_support import SECRET, Receiver

TOKEN = "status-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RULES = """
listen: {listen}
admin: {{listen: "{admin}", token: {token}}}
storage: {{url: "{url}", data_dir: "{data}", timeout: 50ms, breaker_failures: 2}}
logging: {{show_keys: {show_keys}}}
limits:
  - {{name: small, key: "header:X-Key | ip", algorithm: fixed_window, limit: 3, window: 1h}}
  - {{name: watch, key: ip, algorithm: fixed_window, limit: 1, window: 1h, shadow: true}}
routes:
  - {{name: api, kind: decide, match: {{path_prefix: /api/}}, limits: [small, watch]}}
redirects: {{prefix: /s/}}
notifications:
  webhooks:
    - {{name: ops, url: "{hook}", secret: {secret}, events: [redirect.followed],
       retry: [1h]}}
"""


def rules(tmp_path: Path, url: str, hook: str, show_keys: bool = False) -> Path:
    return write_rules(
        tmp_path,
        RULES,
        token=TOKEN,
        url=url,
        data=tmp_path / "data",
        show_keys=str(show_keys).lower(),
        hook=hook,
        secret=SECRET,
    )


@pytest.fixture
async def failing_receiver() -> AsyncIterator[Receiver]:
    r = await Receiver(behaviour=lambda n, msg_id: web.Response(status=500)).start()
    yield r
    await r.stop()


async def fetch(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    async with http.get(url, headers=headers) as r:
        body = await r.read()
        try:
            return r.status, json.loads(body)
        except ValueError:
            return r.status, body.decode()


async def traffic(s: Sluice, http: aiohttp.ClientSession) -> None:
    """alice: 3 allowed then 4 rejected; bob: 3 allowed then 1 rejected."""
    for key, n in (("alice", 7), ("bob", 4)):
        for _ in range(n):
            async with http.get(s.url + "/api/x", headers={"X-Key": key}) as r:
                await r.read()


async def until(check: Callable[[], Any], within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


async def test_page_and_assets_are_served_without_a_token(
    tmp_path: Path, failing_receiver: Receiver
) -> None:
    async with running(rules(tmp_path, "memory://", failing_receiver.url)) as s:
        async with aiohttp.ClientSession() as http:
            async with http.get(s.admin_url + "/") as r:
                page = await r.text()
                assert r.status == 200 and r.content_type == "text/html"
                assert "default-src 'self'" in r.headers["Content-Security-Policy"]
            assert 'src="/static/status.js"' in page and "http" not in page.split("<body>")[0]
            for name, kind in (("status.js", "text/javascript"), ("status.css", "text/css")):
                async with http.get(s.admin_url + "/static/" + name) as r:
                    assert r.status == 200 and r.content_type == kind
                    assert len(await r.read()) > 500
            status, _ = await fetch(http, s.admin_url + "/static/other.js")
            assert status == 404
            for path in ("/api/status", "/api/status/series"):
                status, body = await fetch(http, s.admin_url + path)
                assert status == 401 and body["error"] == "unauthorized"
                status, _ = await fetch(http, s.admin_url + path, {"Authorization": "Bearer no"})
                assert status == 401


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_panels_after_traffic(
    tmp_path: Path, kind: str, request: pytest.FixtureRequest, failing_receiver: Receiver
) -> None:
    url = "memory://" if kind == "sqlite" else request.getfixturevalue("redis").url
    async with running(rules(tmp_path, url, failing_receiver.url)) as s:
        service = s.runtime.status
        assert service is not None
        async with aiohttp.ClientSession() as http:
            await traffic(s, http)
            async with http.post(
                s.admin_url + "/api/links",
                json={"url": "https://example.com/a", "code": "promo"},
                headers=AUTH,
            ) as r:
                assert r.status == 201
            for _ in range(3):
                async with http.get(s.url + "/s/promo", allow_redirects=False) as r:
                    assert r.status == 302
            assert s.runtime.links is not None
            assert await s.runtime.links.recorder.drain(5.0)
            await service.flush()
            service.sample()

            # the receiver answers 500: the webhooks panel shows the failure
            async def failing() -> bool:
                _, body = await fetch(http, s.admin_url + "/api/status", AUTH)
                subs = body["webhooks"]["subscriptions"]
                return bool(subs and subs[0]["consecutive_failures"] >= 1)

            await until(failing)
            status, body = await fetch(http, s.admin_url + "/api/status", AUTH)
            assert status == 200

        config = body["config"]
        assert config["sha256"] == s.config.source.sha256
        assert config["path"] == str(s.path) and config["last_reload_error"] is None
        assert config["rules"] == ["small", "watch"]

        decisions = body["decisions"]
        span = decisions["window_seconds"]
        assert span > 0
        small = decisions["rules"]["small"]
        assert small["counts"] == {"allowed": 6, "rejected": 5, "shadow_rejected": 0, "degraded": 0}
        assert small["rejected"] == pytest.approx(5 / span, rel=0.05)  # span rounded to ms
        watch = decisions["rules"]["watch"]  # shadow: decided, counted, never rejects
        assert watch["shadow_rejected"] > 0 and watch["rejected"] == 0

        storage = body["storage"]
        assert storage["state"] == "ok" and storage["breaker"] == "closed"
        if kind == "redis":
            assert storage["p99_ms"] is not None and storage["p99_ms"] > 0
            assert storage["calls_per_second"] > 0

        clients = body["clients"]
        assert "error" not in clients
        top = [(e["rule"], e["client"], e["rejections"]) for e in clients["5m"]]
        assert top == [
            ("small", masked("header:X-Key=alice"), 4),
            ("small", masked("header:X-Key=bob"), 1),
        ]
        assert clients["1h"] == clients["5m"]
        assert "alice" not in json.dumps(body)  # keys hashed unless logging.show_keys

        assert body["links"] == {
            "enabled": True,
            "window": "1h",
            "top": [{"code": "promo", "clicks": 3}],
        }
        (sub,) = body["webhooks"]["subscriptions"]
        assert sub["name"] == "ops" and sub["consecutive_failures"] >= 1
        assert "500" in sub["last_error"] and sub["depth"] >= 1

        async with aiohttp.ClientSession() as http:
            status, series = await fetch(http, s.admin_url + "/api/status/series", AUTH)
        assert status == 200
        assert len(series["times"]) >= 1
        assert set(series["rules"]) == {"small", "watch"}
        rejected = series["rules"]["small"]["rejected"]
        assert len(rejected) == len(series["times"])
        assert sum(r * series["interval"] for r in rejected) > 0


async def test_show_keys_shows_raw_clients_and_counts_sum_across_flushes(
    tmp_path: Path, failing_receiver: Receiver
) -> None:
    async with running(rules(tmp_path, "memory://", failing_receiver.url, show_keys=True)) as s:
        service = s.runtime.status
        assert service is not None
        async with aiohttp.ClientSession() as http:
            await traffic(s, http)
            await service.flush()
            await traffic(s, http)  # all 11 rejected now: alice 7 more, bob 4 more
            await service.flush()
            _, body = await fetch(http, s.admin_url + "/api/status", AUTH)
        top = [(e["client"], e["rejections"]) for e in body["clients"]["5m"]]
        assert top == [("header:X-Key=alice", 11), ("header:X-Key=bob", 5)]


async def test_storage_down_shows_degradation_instead_of_failing(
    tmp_path: Path, failing_receiver: Receiver
) -> None:
    """A Redis of this test's own, stopped mid-run: the page's JSON still answers, with
    the storage panel degraded and the panels that need Redis carrying their error."""
    server = RedisServer(tmp_path / "own-redis").start()
    try:
        async with running(rules(tmp_path, server.url, failing_receiver.url)) as s:
            service = s.runtime.status
            assert service is not None
            async with aiohttp.ClientSession() as http:
                await traffic(s, http)
                await service.flush()
                server.stop()
                for i in range(4):  # new clients (not in the deny cache): calls fail
                    async with http.get(s.url + "/api/x", headers={"X-Key": f"c{i}"}) as r:
                        await r.read()
                service.sample()
                started = asyncio.get_running_loop().time()
                status, body = await fetch(http, s.admin_url + "/api/status", AUTH)
                took = asyncio.get_running_loop().time() - started
        assert status == 200 and took < 5
        assert body["storage"]["state"] == "degraded"
        assert body["storage"]["breaker"] in ("open", "half_open")
        assert body["storage"]["last_error"]
        assert "error" in body["clients"] and "error" in body["links"]
        assert body["config"]["sha256"]  # the rest of the page is there
    finally:
        server.stop()


async def test_two_workers_show_the_instance_totals(
    tmp_path: Path, failing_receiver: Receiver
) -> None:
    """``serve --workers 2``: whichever worker answers, the page counts both."""
    from tests.proc import Processes, SluiceProcess
    from tests.servers import free_port

    main, admin = free_port(), free_port()
    path = write_rules(
        tmp_path,
        RULES,
        listen=f"127.0.0.1:{main}",
        admin=f"127.0.0.1:{admin}",
        token=TOKEN,
        url="memory://",
        data=tmp_path / "data",
        show_keys="true",
        hook=failing_receiver.url,
        secret=SECRET,
    )
    processes = Processes()
    proc = processes.add(SluiceProcess(path, main, admin, tmp_path, workers=2))
    try:
        await asyncio.to_thread(proc.start)
        connector = aiohttp.TCPConnector(force_close=True)  # new connections: both workers
        async with aiohttp.ClientSession(connector=connector) as http:
            for i in range(40):
                async with http.get(proc.url(f"/api/x{i}"), headers={"X-Key": f"k{i % 4}"}) as r:
                    await r.read()

            answered_by: set[int] = set()

            async def all_counted() -> bool:
                answers = [await fetch(http, proc.admin_url("/api/status"), AUTH) for _ in range(4)]
                answered_by.update(body["instance"]["pid"] for _, body in answers)
                counted = all(
                    sum(body["decisions"]["rules"]["small"]["counts"].values()) == 40
                    for _, body in answers
                )
                return counted and len(answered_by) == 2  # until both workers answered

            await until(all_counted, within=15)
            _, series = await fetch(http, proc.admin_url("/api/status/series"), AUTH)
        assert answered_by == set(proc.children())  # each worker answered with the totals
        points = series["rules"]["small"]
        edges = [series["start"], *series["times"]]
        spans = [b - a for a, b in itertools.pairwise(edges)]
        pairs = zip(points["allowed"], points["rejected"], spans, strict=True)
        total = sum((a + r) * dt for a, r, dt in pairs)
        assert total == pytest.approx(40, abs=0.5)  # the series adds up to the traffic
    finally:
        await asyncio.to_thread(processes.stop_all)
