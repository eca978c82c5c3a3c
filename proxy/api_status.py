"""The status page on the admin listener and the JSON it refreshes from.

``GET /`` serves a page that holds no data (so it needs no token); its script
reads the token from the URL fragment (``/#token=…``, never sent to the
server) or a login form, keeps it in the tab's ``sessionStorage`` and calls
``/api/status`` and ``/api/status/series`` with it (read scope). Everything
is served from the package: no CDN, no build step.
"""

from __future__ import annotations

from importlib.resources import files
from string import Template
from typing import Any

from aiohttp import web

from proxy import __version__
from proxy.adminauth import READ, RUNTIME, require
from proxy.replies import json_reply

_STATIC = files("proxy.status") / "static"
_TYPES = {"status.js": "text/javascript", "status.css": "text/css"}
_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _page() -> str:
    template = Template((_STATIC / "status.html").read_text())
    return template.substitute(version=__version__)


_PAGE = _page()
_ASSETS = {name: (_STATIC / name).read_bytes() for name in _TYPES}


async def page(request: web.Request) -> web.Response:
    return web.Response(text=_PAGE, content_type="text/html", headers=_PAGE_HEADERS)


async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    body = _ASSETS.get(name)
    if body is None:
        raise web.HTTPNotFound()
    return web.Response(
        body=body,
        content_type=_TYPES[name],
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )


async def status(request: web.Request) -> web.Response:
    require(request, READ)
    service = request.app[RUNTIME].status
    if service is None:
        return json_reply(503, {"error": "starting", "message": "the status service is starting"})
    return json_reply(200, await service.status())


async def series(request: web.Request) -> web.Response:
    require(request, READ)
    service = request.app[RUNTIME].status
    if service is None:
        return json_reply(503, {"error": "starting", "message": "the status service is starting"})
    return json_reply(200, service.series())


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", page)
    app.router.add_get("/static/{name}", asset)
    app.router.add_get("/api/status", status)
    app.router.add_get("/api/status/series", series)


_OBJ = {"type": "object"}
_ERRORS = {
    "401": {"$ref": "#/components/responses/E401"},
    "503": {"$ref": "#/components/responses/E503"},
}


def openapi_paths() -> dict[str, dict[str, Any]]:
    def op(op_id: str, summary: str, description: str) -> dict[str, Any]:
        return {
            "get": {
                "operationId": op_id,
                "summary": summary,
                "description": description + " Needs a token with read scope.",
                "tags": ["status"],
                "responses": {
                    "200": {
                        "description": "OK",
                        "content": {"application/json": {"schema": _OBJ}},
                    },
                    **_ERRORS,
                },
            }
        }

    return {
        "/api/status": op(
            "getStatus",
            "The status page's panels",
            "config (path, sha256, loaded_at, last reload error), storage (state, breaker, "
            "p99 over the last minute), decisions per second per rule over the last minute, "
            "the top 10 rate-limited clients in the last 5 minutes and hour, the top links of "
            "the last hour, webhook subscriptions, and the what-if candidate's comparison. "
            'A panel whose storage is down carries {"error": message} instead of data.',
        ),
        "/api/status/series": op(
            "getStatusSeries",
            "Decisions per second per rule and result, one point per sample interval",
            "{interval, times: [unix seconds], rules: {rule: {allowed, rejected, "
            "shadow_rejected, degraded: [per second]}}, whatif: {...}}; from a ring buffer "
            "sampled in the process (all workers added up), about the last 10 minutes.",
        ),
    }
