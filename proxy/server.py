"""The main listener: route, (limit), forward.

A low-level ``aiohttp.web.Server`` with one handler: Sluice adds no paths of
its own to the main listener, so the URL dispatcher would only cost time.
"""

from __future__ import annotations

import logging

from aiohttp import web

from proxy.metrics import Children, method_label, status_class
from proxy.replies import json_error, json_reply
from proxy.runtime import Runtime

log = logging.getLogger("sluice.server")


class MainHandler:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.requests = Children(runtime.metrics.requests)
        self.in_flight = runtime.metrics.in_flight

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        snap = self.runtime.snapshot
        route = snap.router.route_for(request.method, request.path, request.host, request.headers)
        route_name = route.name if route else "none"
        status = 500
        self.in_flight.inc()
        try:
            if route is None:
                response: web.StreamResponse = json_error(
                    404, "no_route", f"no route matches {request.method} {request.path}"
                )
            elif route.upstream is None:
                response = json_error(404, "no_upstream", f"route {route.name} forwards nowhere")
            else:
                extra: dict[str, str] | None = None
                if route.limits:
                    verdict = await self.runtime.limiter.check(
                        snap.config,
                        snap.plans,
                        route.limits,
                        request,
                        request.remote,
                        route.name,
                        route.headers,
                    )
                    if verdict.status is not None:
                        response = json_reply(verdict.status, verdict.body or {}, verdict.headers)
                        status = response.status
                        return response
                    extra = verdict.headers
                client = snap.upstreams[route.upstream]
                response = await client.forward(
                    request, snap.trusted(request.remote), snap.config.server.max_body_size, extra
                )
            status = response.status
            return response
        finally:
            self.in_flight.dec()
            self.requests(route_name, method_label(request.method), status_class(status)).inc()


def make_server(runtime: Runtime) -> web.Server:
    cfg = runtime.snapshot.config.server
    return web.Server(
        MainHandler(runtime),
        handler_cancellation=True,  # a client that goes away cancels its upstream request
        max_line_size=cfg.max_header_size,
        max_field_size=cfg.max_header_size,
        keepalive_timeout=cfg.keepalive_timeout,
        access_log=None,
    )
