"""Streaming reverse proxying to upstreams.

One pooled ``ClientSession`` per upstream (keep-alive, bounded connections).
Bodies stream both ways in chunks; nothing is buffered whole. Method, path
and the raw query string go upstream byte for byte; hop-by-hop headers
(RFC 9110 §7.6.1, plus every header the ``Connection`` header names) are
dropped in both directions; duplicate headers and ``Set-Cookie`` survive.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.config import Upstream
from proxy.metrics import Metrics, histogram_observe
from proxy.replies import json_error

log = logging.getLogger("sluice.forward")

HOP_BY_HOP = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
# Headers aiohttp's client would invent if absent; a proxy must not add them.
SKIP_AUTO = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
CHUNK = 64 * 1024
VIA = "1.1 sluice"


class BodyTooLarge(Exception):
    pass


def hop_by_hop(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[str]:
    """The hop-by-hop names for one message: the fixed set plus those ``Connection`` lists."""
    named = headers.getall("Connection", ())
    if not named:
        return HOP_BY_HOP
    extra = {token.strip().lower() for value in named for token in value.split(",")}
    return HOP_BY_HOP | extra


def end_to_end(
    headers: CIMultiDictProxy[str] | CIMultiDict[str], drop: Iterable[str] = ()
) -> CIMultiDict[str]:
    skip = hop_by_hop(headers) | frozenset(drop)
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in skip)


def upstream_headers(
    request: web.BaseRequest, upstream: Upstream, trusted_peer: bool
) -> CIMultiDict[str]:
    """Request headers as the upstream should see them."""
    headers = end_to_end(request.headers, ("host",) if not upstream.preserve_host else ())
    peer = request.remote or ""
    prior = request.headers.get("X-Forwarded-For")
    headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    if not (trusted_peer and "X-Forwarded-Proto" in request.headers):
        headers["X-Forwarded-Proto"] = request.scheme
    if not (trusted_peer and "X-Forwarded-Host" in request.headers):
        host = request.headers.get("Host")
        if host is not None:
            headers["X-Forwarded-Host"] = host
        else:
            headers.popall("X-Forwarded-Host", None)
    via = request.headers.get("Via")
    headers["Via"] = f"{via}, {VIA}" if via else VIA
    return headers


class UpstreamClient:
    """A pooled HTTP client for one upstream."""

    def __init__(self, upstream: Upstream, metrics: Metrics) -> None:
        self.active = 0  # requests using this pool right now
        self.idle = asyncio.Event()
        self.upstream = upstream
        self.base = upstream.url
        self.metrics = metrics
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=upstream.max_connections,
                limit_per_host=upstream.max_connections,
                ttl_dns_cache=60,
                enable_cleanup_closed=False,
            ),
            timeout=aiohttp.ClientTimeout(
                total=None, connect=upstream.connect_timeout, sock_read=upstream.read_timeout
            ),
            auto_decompress=False,
            skip_auto_headers=SKIP_AUTO,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self._latency = histogram_observe(metrics.upstream_latency.labels(upstream.name))

    async def close(self) -> None:
        await self.session.close()

    def url_for(self, request: web.BaseRequest) -> URL:
        return URL(self.base + request.raw_path, encoded=True)

    async def forward(
        self,
        request: web.BaseRequest,
        trusted_peer: bool,
        max_body: int,
        extra_headers: Mapping[str, str] | None = None,
    ) -> web.StreamResponse:
        """Send ``request`` upstream and stream the answer back (``extra_headers`` added)."""
        self.active += 1
        try:
            return await self._forward(request, trusted_peer, max_body, extra_headers)
        finally:
            self.active -= 1
            if self.active == 0:
                self.idle.set()

    async def retire(self) -> None:
        """Close once the requests (and WebSockets) already using this pool are done."""
        while self.active:
            self.idle.clear()
            await self.idle.wait()
        await self.close()

    async def _forward(
        self,
        request: web.BaseRequest,
        trusted_peer: bool,
        max_body: int,
        extra_headers: Mapping[str, str] | None,
    ) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._websocket(request, trusted_peer)
        length = request.content_length
        if length is not None and length > max_body:
            return json_error(413, "payload_too_large", f"request body over {max_body} bytes")
        headers = upstream_headers(request, self.upstream, trusted_peer)
        has_body = request.body_exists
        body = LimitedBody(request.content, max_body) if has_body else None
        url = self.url_for(request)
        started = time.perf_counter()
        for attempt in (1, 2):
            try:
                upstream_response = await self.session.request(
                    request.method,
                    url,
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                    compress=None,
                    chunked=None,
                )
                break
            except aiohttp.ServerDisconnectedError:
                # A pooled keep-alive connection the upstream had closed: safe to
                # retry once when nothing of the request body was consumed.
                if attempt == 2 or has_body or request.method not in IDEMPOTENT:
                    return self._failure(
                        502, "upstream_disconnected", "upstream closed the connection"
                    )
            except BodyTooLarge:
                return json_error(413, "payload_too_large", f"request body over {max_body} bytes")
            except (TimeoutError, aiohttp.ServerTimeoutError):
                return self._failure(504, "upstream_timeout", "upstream did not answer in time")
            except aiohttp.ClientConnectorError as exc:
                return self._failure(
                    502, "upstream_unreachable", f"cannot connect to upstream: {exc.os_error}"
                )
            except (aiohttp.ClientError, OSError) as exc:
                if body is not None and body.exceeded:
                    return json_error(
                        413, "payload_too_large", f"request body over {max_body} bytes"
                    )
                return self._failure(
                    502, "upstream_error", f"upstream failed: {type(exc).__name__}"
                )
        else:  # pragma: no cover - the loop always breaks or returns
            raise AssertionError
        self._latency(time.perf_counter() - started)
        try:
            return await self._relay(request, upstream_response, extra_headers)
        finally:
            upstream_response.release()

    async def _relay(
        self,
        request: web.BaseRequest,
        upstream: aiohttp.ClientResponse,
        extra_headers: Mapping[str, str] | None,
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.extend(end_to_end(upstream.headers))
        if extra_headers:
            response.headers.update(extra_headers)
        via = upstream.headers.get("Via")
        response.headers["Via"] = f"{via}, {VIA}" if via else VIA
        try:
            await response.prepare(request)
            if request.method != "HEAD" and upstream.status not in (204, 304):
                while True:
                    try:
                        chunk = await upstream.content.read(CHUNK)
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        return self._cut(request, response, exc)
                    if not chunk:
                        break
                    await response.write(chunk)
            await response.write_eof()
        except ConnectionResetError:  # the client went away mid-answer: nobody left to tell
            log.debug("client went away during the response from %s", self.upstream.name)
        return response

    def _cut(
        self, request: web.BaseRequest, response: web.StreamResponse, exc: BaseException
    ) -> web.StreamResponse:
        """The upstream failed mid-body. Headers are gone already: the only honest signal
        left is to cut the client connection."""
        self.metrics.upstream_errors.labels(self.upstream.name, "body").inc()
        log.warning(
            "upstream %s failed mid-body (%s); closing client connection",
            self.upstream.name,
            type(exc).__name__,
        )
        if request.transport is not None:
            request.transport.close()
        return response

    def _failure(self, status: int, kind: str, message: str) -> web.Response:
        self.metrics.upstream_errors.labels(self.upstream.name, kind).inc()
        log.warning("upstream %s: %s (%s)", self.upstream.name, message, status)
        return json_error(status, kind, message)

    async def _websocket(self, request: web.BaseRequest, trusted_peer: bool) -> web.StreamResponse:
        headers = upstream_headers(request, self.upstream, trusted_peer)
        for name in (
            "Sec-WebSocket-Key",
            "Sec-WebSocket-Version",
            "Sec-WebSocket-Extensions",
            "Sec-WebSocket-Protocol",
        ):
            headers.popall(name, None)
        protocols = [
            p.strip()
            for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")
            if p.strip()
        ]
        try:
            upstream_ws = await self.session.ws_connect(
                self.url_for(request), headers=headers, protocols=protocols, autoping=False
            )
        except aiohttp.WSServerHandshakeError as exc:
            return json_error(502, "upstream_websocket_refused", f"upstream refused: {exc.status}")
        except (TimeoutError, aiohttp.ServerTimeoutError):
            return self._failure(504, "upstream_timeout", "upstream did not answer in time")
        except (aiohttp.ClientError, OSError) as exc:
            return self._failure(502, "upstream_unreachable", f"cannot connect to upstream: {exc}")
        client_ws = web.WebSocketResponse(
            protocols=[upstream_ws.protocol] if upstream_ws.protocol else (), autoping=False
        )
        await client_ws.prepare(request)

        async def pump(
            src: aiohttp.ClientWebSocketResponse | web.WebSocketResponse,
            dst: aiohttp.ClientWebSocketResponse | web.WebSocketResponse,
        ) -> None:
            async for msg in src:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    await dst.send_str(msg.data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    await dst.send_bytes(msg.data)
                elif msg.type == aiohttp.WSMsgType.PING:
                    await dst.ping(msg.data)
                elif msg.type == aiohttp.WSMsgType.PONG:
                    await dst.pong(msg.data)
            await dst.close(code=src.close_code or aiohttp.WSCloseCode.OK)

        tasks = [
            asyncio.ensure_future(pump(client_ws, upstream_ws)),
            asyncio.ensure_future(pump(upstream_ws, client_ws)),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await upstream_ws.close()
            await client_ws.close()
        return client_ws


class LimitedBody:
    """The request body as an async iterator that stops past ``limit`` bytes.

    aiohttp's client wraps whatever the body iterator raises into a connection
    error, so the overflow is also recorded here for the caller to tell apart.
    """

    def __init__(self, stream: aiohttp.StreamReader, limit: int) -> None:
        self.stream = stream
        self.limit = limit
        self.seen = 0
        self.exceeded = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.stream.iter_chunked(CHUNK):
            self.seen += len(chunk)
            if self.seen > self.limit:
                self.exceeded = True
                raise BodyTooLarge
            yield chunk
