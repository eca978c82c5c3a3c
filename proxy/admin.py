"""The admin listener: health, readiness, metrics, the status page, the links and
webhooks APIs and their OpenAPI document."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from proxy import __version__, api_links, api_status, api_webhooks
from proxy.adminauth import RUNTIME, find_token, require
from proxy.errors import StorageError
from proxy.openapi import OPENAPI_PATH, document
from proxy.replies import json_reply
from proxy.runtime import Runtime

STARTED = web.AppKey("started", float)

__all__ = ["RUNTIME", "STARTED", "find_token", "make_admin_app", "require"]


async def healthz(request: web.Request) -> web.Response:
    return json_reply(200, {"status": "ok", "version": __version__})


async def readyz(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    config = runtime.snapshot.config
    source = config.source
    limiter = runtime.limiter
    body: dict[str, Any] = {
        "status": "ready",
        "config": {"path": source.path, "sha256": source.sha256, "loaded_at": source.loaded_at},
        "last_reload_error": runtime.reload_error,
        "last_reload_error_at": runtime.reload_error_at if runtime.reload_error else None,
        "storage": {
            "url": config.storage.safe_url,
            "state": "degraded" if limiter.degraded else "ok",
            "breaker": limiter.breaker_state,
            "open_nodes": limiter.open_nodes,
            "last_error": limiter.last_error,
        },
        "uptime_seconds": round(time.time() - request.app[STARTED], 3),
    }
    if runtime.snapshot.candidate is not None:  # a bad candidate is ignored: still ready
        body["candidate"] = runtime.snapshot.candidate.describe()
    if runtime.links is not None:
        body["links"] = runtime.links.describe()
    if runtime.notifier is not None:
        try:
            statuses = await runtime.notifier.status()
        except StorageError as exc:  # the outbox is down: say so, stay ready
            body["webhooks"] = {"error": str(exc)}
        else:
            body["webhooks"] = [
                {
                    "name": st.name,
                    "enabled": st.enabled and not st.disabled,
                    "depth": st.depth,
                    "dead_letters": st.dead_letters,
                    "last_error": st.last_error,
                }
                for st in statuses
            ]
    return json_reply(200, body)


async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[RUNTIME].metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def openapi(request: web.Request) -> web.Response:
    return json_reply(200, document())


def make_admin_app(runtime: Runtime) -> web.Application:
    app = web.Application(middlewares=[api_links.json_errors])
    app[RUNTIME] = runtime
    app[STARTED] = time.time()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_route("GET", OPENAPI_PATH, openapi)
    api_links.add_routes(app)
    api_webhooks.add_routes(app)
    api_status.add_routes(app)
    return app
