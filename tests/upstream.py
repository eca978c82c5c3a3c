"""A real upstream HTTP app for functional tests (served on a loopback port)."""

from __future__ import annotations

import asyncio

from aiohttp import WSMsgType, web

CANCELLED = web.AppKey("cancelled", asyncio.Event)
SEEN = web.AppKey("seen", list)


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    request.app[SEEN].append(request.raw_path)
    return web.json_response(
        {
            "method": request.method,
            "raw_path": request.raw_path,
            "headers": list(request.headers.items()),
            "body_bytes": len(body),
            "chunked": request.headers.get("Transfer-Encoding") == "chunked",
        }
    )


async def cookies(request: web.Request) -> web.Response:
    response = web.Response(text="ok")
    response.headers.add("Set-Cookie", "a=1; Path=/")
    response.headers.add("Set-Cookie", "b=2; Path=/; HttpOnly")
    response.headers.add("X-Dup", "one")
    response.headers.add("X-Dup", "two")
    response.headers["Connection"] = "keep-alive, X-Hop"
    response.headers["X-Hop"] = "must not pass"
    response.headers["Keep-Alive"] = "timeout=5"
    return response


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("s", "1")))
    return web.Response(text="slow done")


async def wait_cancel(request: web.Request) -> web.Response:
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        request.app[CANCELLED].set()
        raise
    return web.Response(text="never")


async def upload(request: web.Request) -> web.Response:
    total = 0
    async for chunk in request.content.iter_any():
        total += len(chunk)
    return web.json_response(
        {
            "received": total,
            "chunked": request.headers.get("Transfer-Encoding") == "chunked",
        }
    )


async def stream(request: web.Request) -> web.StreamResponse:
    size = int(request.query.get("bytes", "1000000"))
    response = web.StreamResponse()
    response.content_type = "application/octet-stream"
    await response.prepare(request)
    block = b"x" * 65536
    sent = 0
    while sent < size:
        piece = block[: min(len(block), size - sent)]
        await response.write(piece)
        sent += len(piece)
    await response.write_eof()
    return response


async def broken(request: web.Request) -> web.StreamResponse:
    """Promises 1000 bytes, sends 10, then drops the connection."""
    response = web.StreamResponse(headers={"Content-Length": "1000"})
    await response.prepare(request)
    await response.write(b"0123456789")
    await asyncio.sleep(0.05)
    assert request.transport is not None
    request.transport.close()
    return response


async def status(request: web.Request) -> web.Response:
    return web.Response(status=int(request.match_info["code"]), text="status")


async def ws(request: web.Request) -> web.WebSocketResponse:
    sock = web.WebSocketResponse(protocols=("chat",))
    await sock.prepare(request)
    async for msg in sock:
        if msg.type == WSMsgType.TEXT:
            await sock.send_str("echo:" + msg.data)
        elif msg.type == WSMsgType.BINARY:
            await sock.send_bytes(msg.data[::-1])
    return sock


def make_upstream() -> web.Application:
    app = web.Application(client_max_size=1024**3)
    app[CANCELLED] = asyncio.Event()
    app[SEEN] = []
    app.router.add_route("*", "/echo{tail:.*}", echo)
    app.router.add_get("/cookies", cookies)
    app.router.add_get("/slow", slow)
    app.router.add_get("/wait-cancel", wait_cancel)
    app.router.add_post("/upload", upload)
    app.router.add_get("/stream", stream)
    app.router.add_get("/status/{code}", status)
    app.router.add_get("/broken", broken)
    app.router.add_get("/ws", ws)
    return app
