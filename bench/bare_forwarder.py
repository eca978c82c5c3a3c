"""A bare aiohttp forwarder: the ceiling Sluice is measured against.

One process on uvloop, aiohttp's low-level ``web.Server`` (what Sluice's main
listener uses), one pooled ``ClientSession``, response bodies streamed in
chunks, hop-by-hop headers dropped. No routing, limits, metrics or
``X-Forwarded-*``: whatever Sluice costs beyond this is Sluice's own.

Self-contained (imports nothing from this repository) so it runs as a script::

    python bench/bare_forwarder.py --port 8100 --upstream http://127.0.0.1:9000
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import aiohttp
import uvloop
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)
CHUNK = 64 * 1024


def _end_to_end(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP)


class Forwarder:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, limit_per_host=256),
            timeout=aiohttp.ClientTimeout(total=None, connect=2, sock_read=30),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        async with self.session.request(
            request.method,
            self.upstream + request.raw_path,
            headers=_end_to_end(request.headers),
            data=request.content if request.body_exists else None,
            allow_redirects=False,
        ) as upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            response.headers.extend(_end_to_end(upstream.headers))
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(CHUNK):
                await response.write(chunk)
            await response.write_eof()
            return response


async def serve(port: int, upstream: str) -> None:
    forwarder = Forwarder(upstream)
    runner = web.ServerRunner(web.Server(forwarder, access_log=None))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    await forwarder.session.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:9000")
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.upstream))


if __name__ == "__main__":
    main()
