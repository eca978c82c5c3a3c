"""A tiny upstream API for trying Sluice out (``make run``).

``python -m proxy.demo --rules rules.yaml`` starts this upstream on
127.0.0.1:9000 and ``sluice serve`` in front of it, and stops both on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys

from aiohttp import web


async def hello(request: web.Request) -> web.Response:
    return web.json_response({"service": "demo-upstream", "path": request.path_qs})


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response(
        {
            "method": request.method,
            "path": request.raw_path,
            "headers": {k: v for k, v in request.headers.items()},
            "body_bytes": len(body),
        }
    )


async def items(request: web.Request) -> web.Response:
    return web.json_response({"items": [{"id": i, "name": f"item-{i}"} for i in range(1, 4)]})


def make_demo_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/", hello)
    app.router.add_route("*", "/api/echo", echo)
    app.router.add_get("/api/items", items)
    app.router.add_route("*", "/{tail:.*}", hello)
    return app


async def run_upstream(host: str, port: int) -> None:
    runner = web.AppRunner(make_demo_app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description="Sluice in front of a demo upstream")
    parser.add_argument("--rules", default="rules.yaml")
    parser.add_argument("--upstream-port", type=int, default=9000)
    parser.add_argument("--upstream-only", action="store_true")
    args = parser.parse_args()
    if args.upstream_only:
        asyncio.run(run_upstream("127.0.0.1", args.upstream_port))
        return 0
    upstream = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "proxy.demo",
            "--upstream-only",
            "--upstream-port",
            str(args.upstream_port),
        ]
    )
    print(json.dumps({"demo_upstream": f"http://127.0.0.1:{args.upstream_port}"}), flush=True)
    proxy = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "-c", args.rules])
    try:
        return proxy.wait()
    except KeyboardInterrupt:
        proxy.send_signal(signal.SIGTERM)
        return proxy.wait()
    finally:
        upstream.send_signal(signal.SIGTERM)
        upstream.wait(10)


if __name__ == "__main__":
    raise SystemExit(main())
