"""The alternative upstream (``--upstream aiohttp``): a minimal aiohttp server.

Same fixed body as the nginx upstream. It exists to show why nginx is the
default: on two cores this one process costs CPU that the proxy under test
then lacks. Self-contained, so it runs as a script::

    python bench/upstream_app.py --port 9000
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import uvloop
from aiohttp import web

BODY = b'{"service":"bench-upstream","ok":true}\n'


async def answer(request: web.BaseRequest) -> web.Response:
    return web.Response(body=BODY, content_type="application/json")


async def serve(port: int) -> None:
    runner = web.ServerRunner(web.Server(answer, access_log=None))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    uvloop.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
