"""The admin listener: health, readiness, metrics (and later the API and status page)."""

from __future__ import annotations

import hmac
import time

from aiohttp import web

from proxy import __version__
from proxy.config import AdminToken
from proxy.replies import json_reply
from proxy.runtime import Runtime

RUNTIME = web.AppKey("runtime", Runtime)
STARTED = web.AppKey("started", float)


def find_token(tokens: tuple[AdminToken, ...], header: str | None) -> AdminToken | None:
    """The token a bearer header carries, compared in constant time against each one."""
    if not header or not header.startswith("Bearer "):
        return None
    offered = header[7:].strip().encode()
    found = None
    for token in tokens:  # no early exit: the time taken does not depend on which matched
        if hmac.compare_digest(offered, token.token.encode()):
            found = token
    return found


def require(request: web.Request, scope: str) -> AdminToken:
    tokens = request.app[RUNTIME].snapshot.config.admin.tokens
    token = find_token(tokens, request.headers.get("Authorization"))
    if token is None:
        raise web.HTTPUnauthorized(
            text='{"error":"unauthorized","message":"send Authorization: Bearer <admin token>"}',
            content_type="application/json",
            headers={"WWW-Authenticate": 'Bearer realm="sluice"'},
        )
    if scope == "write" and token.scope != "write":
        raise web.HTTPForbidden(
            text='{"error":"forbidden","message":"this token is read-only"}',
            content_type="application/json",
        )
    return token


async def healthz(request: web.Request) -> web.Response:
    return json_reply(200, {"status": "ok", "version": __version__})


async def readyz(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    config = runtime.snapshot.config
    source = config.source
    limiter = runtime.limiter
    body = {
        "status": "ready",
        "config": {"path": source.path, "sha256": source.sha256, "loaded_at": source.loaded_at},
        "last_reload_error": runtime.reload_error,
        "storage": {
            "url": config.storage.safe_url,
            "state": "degraded" if limiter.degraded else "ok",
            "breaker": limiter.breaker.state,
            "last_error": limiter.last_error,
        },
        "uptime_seconds": round(time.time() - request.app[STARTED], 3),
    }
    return json_reply(200, body)


async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[RUNTIME].metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": content_type})


def make_admin_app(runtime: Runtime) -> web.Application:
    app = web.Application()
    app[RUNTIME] = runtime
    app[STARTED] = time.time()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
