"""Forwarding through real sockets: Sluice in-process between a real client and upstream."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.inproc import Sluice, running, write_rules
from tests.servers import free_port
from tests.upstream import CANCELLED, make_upstream

RULES = """
listen: {listen}
admin: {{listen: "{admin}"}}
clients: {{trusted_proxies: [{trusted}]}}
server: {{max_body_size: 1MB, max_header_size: 16KiB, shutdown_grace: 1s}}
upstreams:
  app: {{url: "http://127.0.0.1:{port}", read_timeout: 500ms, connect_timeout: 500ms}}
  dead: {{url: "http://127.0.0.1:{dead_port}", connect_timeout: 500ms}}
routes:
  - {{name: dead, match: {{path_prefix: /dead/}}, upstream: dead}}
  - {{name: app, match: {{path_prefix: /}}, upstream: app}}
"""

ServerFactory = Callable[..., Awaitable[TestServer]]


@pytest.fixture
async def upstream(aiohttp_server: ServerFactory) -> TestServer:
    return await aiohttp_server(make_upstream())


@pytest.fixture
async def sluice(tmp_path: Path, upstream: TestServer) -> AsyncIterator[Sluice]:
    path = write_rules(
        tmp_path, RULES, port=upstream.port, dead_port=free_port(), trusted="10.0.0.0/8"
    )
    async with running(path) as s:
        yield s


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


async def raw_request(port: int, data: bytes, read_timeout: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    chunks = []
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), read_timeout)
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and b"Connection: close" not in data:
                break
    finally:
        writer.close()
    return b"".join(chunks)


async def test_query_string_and_path_are_byte_exact(sluice: Sluice, upstream: TestServer) -> None:
    odd = b"/echo/a%2Fb/%7Euser;p=1?q=%zz&a=1&a=2&empty=&+plus=%2B&raw=~!*'()&utf=%C3%A9"
    response = await raw_request(
        sluice.config.listen.port,
        b"GET " + odd + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    body = json.loads(response.split(b"\r\n\r\n", 1)[1])
    assert body["raw_path"].encode() == odd


async def test_headers_forwarded_and_hop_by_hop_stripped(
    sluice: Sluice, client: aiohttp.ClientSession
) -> None:
    headers = [
        ("X-Multi", "1"),
        ("X-Multi", "2"),
        ("Connection", "keep-alive, X-Secret-Hop"),
        ("X-Secret-Hop", "drop me"),
        ("TE", "trailers"),
        ("Keep-Alive", "timeout=1"),
        ("Proxy-Authorization", "Basic Zm9v"),
        ("X-Forwarded-For", "6.6.6.6"),
        ("Via", "1.0 corp"),
        ("X-Forwarded-Proto", "https"),
    ]
    async with client.get(sluice.url + "/echo", headers=headers) as r:
        assert r.status == 200
        got = await r.json()
    sent = got["headers"]
    names = [k.lower() for k, _ in sent]
    assert [v for k, v in sent if k == "X-Multi"] == ["1", "2"]
    for hop in ("x-secret-hop", "te", "keep-alive", "proxy-authorization"):
        assert hop not in names
    values = {k.lower(): v for k, v in sent}
    # XFF is appended to (the client is not trusted, so its own claim stays first but is
    # followed by the real peer); Proto is overwritten because the peer is not trusted.
    assert values["x-forwarded-for"] == "6.6.6.6, 127.0.0.1"
    assert values["x-forwarded-proto"] == "http"
    assert values["x-forwarded-host"] == f"127.0.0.1:{sluice.config.listen.port}"
    assert values["via"] == "1.0 corp, 1.1 sluice"
    assert values["host"] != f"127.0.0.1:{sluice.config.listen.port}"  # upstream's own host


async def test_response_keeps_duplicates_and_set_cookie(
    sluice: Sluice, client: aiohttp.ClientSession
) -> None:
    async with client.get(sluice.url + "/cookies") as r:
        assert r.status == 200
        assert r.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/; HttpOnly"]
        assert r.headers.getall("X-Dup") == ["one", "two"]
        assert "X-Hop" not in r.headers
        assert "Keep-Alive" not in r.headers
        assert r.headers["Via"] == "1.1 sluice"


async def test_chunked_upload_streams_through(
    sluice: Sluice, client: aiohttp.ClientSession
) -> None:
    async def body() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"y" * 50_000
            await asyncio.sleep(0)

    async with client.post(sluice.url + "/upload", data=body()) as r:
        assert r.status == 200
        assert await r.json() == {"received": 500_000, "chunked": True}


async def test_body_over_limit_is_413(sluice: Sluice, client: aiohttp.ClientSession) -> None:
    async with client.post(sluice.url + "/upload", data=io.BytesIO(b"z" * 2_000_000)) as r:
        assert r.status == 413
        assert (await r.json())["error"] == "payload_too_large"

    async def body() -> AsyncIterator[bytes]:
        for _ in range(40):
            yield b"z" * 64_000

    async with client.post(sluice.url + "/upload", data=body()) as r:
        assert r.status == 413


async def test_no_route_is_404_json(
    tmp_path: Path, upstream: TestServer, client: aiohttp.ClientSession
) -> None:
    rules = RULES.replace("path_prefix: /}}, upstream: app", "path_prefix: /only/}}, upstream: app")
    path = write_rules(
        tmp_path, rules, port=upstream.port, dead_port=free_port(), trusted="10.0.0.1"
    )
    async with running(path) as s, client.get(s.url + "/elsewhere") as r:
        assert r.status == 404
        assert (await r.json())["error"] == "no_route"


async def test_connect_failure_is_502(sluice: Sluice, client: aiohttp.ClientSession) -> None:
    async with client.get(sluice.url + "/dead/x") as r:
        assert r.status == 502
        body = await r.json()
        assert body["error"] == "upstream_unreachable"


async def test_upstream_timeout_is_504_on_time(
    sluice: Sluice, client: aiohttp.ClientSession
) -> None:
    started = time.monotonic()
    async with client.get(sluice.url + "/slow?s=3") as r:
        assert r.status == 504
        assert (await r.json())["error"] == "upstream_timeout"
    elapsed = time.monotonic() - started
    assert 0.4 < elapsed < 1.5  # read_timeout is 500ms


async def test_client_disconnect_cancels_upstream_request(
    sluice: Sluice, upstream: TestServer
) -> None:
    _reader, writer = await asyncio.open_connection("127.0.0.1", sluice.config.listen.port)
    writer.write(b"GET /wait-cancel HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    await asyncio.wait_for(upstream.app[CANCELLED].wait(), 5)


async def test_huge_header_is_rejected_and_server_survives(
    sluice: Sluice, client: aiohttp.ClientSession
) -> None:
    big = b"X-Big: " + b"a" * (10 * 1024 * 1024) + b"\r\n"
    try:
        response = await raw_request(
            sluice.config.listen.port, b"GET /echo HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n"
        )
        assert response.startswith(b"HTTP/1.1 4")
    except (ConnectionResetError, BrokenPipeError):
        pass  # the server may cut the connection before reading all 10 MB
    async with client.get(sluice.url + "/echo") as r:
        assert r.status == 200


async def test_invalid_header_line_is_400(sluice: Sluice) -> None:
    response = await raw_request(
        sluice.config.listen.port, b"GET /echo HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n"
    )
    assert response.split(b" ", 2)[1] == b"400"


async def test_head_and_status_codes_pass_through(
    sluice: Sluice, client: aiohttp.ClientSession
) -> None:
    for code in (201, 204, 304, 404, 418, 500, 503):
        async with client.get(sluice.url + f"/status/{code}") as r:
            assert r.status == code
    async with client.head(sluice.url + "/echo") as r:
        assert r.status == 200
        assert await r.read() == b""


async def test_websocket_upgrade_passes_through(
    sluice: Sluice, client: aiohttp.ClientSession
) -> None:
    async with client.ws_connect(
        sluice.url.replace("http", "ws") + "/ws", protocols=("chat",)
    ) as ws:
        assert ws.protocol == "chat"
        await ws.send_str("hi")
        assert (await ws.receive()).data == "echo:hi"
        await ws.send_bytes(b"abc")
        assert (await ws.receive()).data == b"cba"


async def test_large_download_streams(sluice: Sluice, client: aiohttp.ClientSession) -> None:
    total = 0
    async with client.get(sluice.url + "/stream?bytes=20000000") as r:
        assert r.status == 200
        async for chunk in r.content.iter_any():
            total += len(chunk)
    assert total == 20_000_000


async def test_metrics_count_requests_by_route_and_status(
    sluice: Sluice, client: aiohttp.ClientSession
) -> None:
    for _ in range(3):
        async with client.get(sluice.url + "/echo") as r:
            await r.read()
    async with client.get(sluice.url + "/dead/") as r:
        await r.read()
    async with client.get(sluice.admin_url + "/metrics") as r:
        text = await r.text()
    assert 'sluice_requests_total{method="GET",route="app",status_class="2xx"} 3.0' in text
    assert 'sluice_requests_total{method="GET",route="dead",status_class="5xx"} 1.0' in text
    assert 'sluice_upstream_errors_total{kind="upstream_unreachable",upstream="dead"} 1.0' in text
    assert 'sluice_upstream_latency_seconds_count{upstream="app"} 3.0' in text
    assert "sluice_requests_in_flight 0.0" in text


async def test_admin_health_and_ready(sluice: Sluice, client: aiohttp.ClientSession) -> None:
    async with client.get(sluice.admin_url + "/healthz") as r:
        assert r.status == 200
    async with client.get(sluice.admin_url + "/readyz") as r:
        body = await r.json()
        assert body["status"] == "ready"
        assert body["config"]["sha256"] == sluice.config.source.sha256
        assert body["last_reload_error"] is None


async def test_trusted_proxy_keeps_forwarded_proto(
    tmp_path: Path, upstream: TestServer, client: aiohttp.ClientSession
) -> None:
    path = write_rules(
        tmp_path, RULES, port=upstream.port, dead_port=free_port(), trusted="127.0.0.1/32"
    )
    async with (
        running(path) as s,
        client.get(s.url + "/echo", headers={"X-Forwarded-Proto": "https"}) as r,
    ):
        values = {k.lower(): v for k, v in (await r.json())["headers"]}
        assert values["x-forwarded-proto"] == "https"


async def test_upstream_failing_mid_body_cuts_the_client_connection(
    sluice: Sluice, client: aiohttp.ClientSession
) -> None:
    with pytest.raises(aiohttp.ClientPayloadError):
        async with client.get(sluice.url + "/broken") as r:
            assert r.status == 200
            await r.read()
    async with client.get(sluice.admin_url + "/metrics") as r:
        assert 'sluice_upstream_errors_total{kind="body",upstream="app"} 1.0' in await r.text()
    async with client.get(sluice.url + "/echo") as r:  # and the next request is fine
        assert r.status == 200


async def test_an_unexpected_error_is_a_json_500_and_serving_goes_on(
    sluice: Sluice, client: aiohttp.ClientSession
) -> None:
    real = sluice.runtime.snapshot.router.route_for

    def broken(*args: object) -> object:
        raise RuntimeError("injected fault")

    sluice.runtime.snapshot.router.route_for = broken  # type: ignore[method-assign]
    try:
        async with client.get(sluice.url + "/echo") as r:
            assert r.status == 500
            assert (await r.json())["error"] == "internal_error"
    finally:
        sluice.runtime.snapshot.router.route_for = real  # type: ignore[method-assign]
    async with client.get(sluice.url + "/echo") as r:
        assert r.status == 200
    async with client.get(sluice.admin_url + "/metrics") as r:
        assert 'sluice_requests_total{method="GET",route="none",status_class="5xx"} 1.0' in (
            await r.text()
        )
