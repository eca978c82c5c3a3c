"""The main listener: redirects, then route, limit and forward (or, in decision mode, answer).

A low-level ``aiohttp.web.Server`` with one handler: Sluice adds no paths of
its own to the main listener except the redirect prefix the operator
configured (checked first, see ``proxy.redirects``), so the URL dispatcher
would only cost time.

With ``logging.access`` on, a request chosen for an access line carries an
``AccessNote`` down its path (rule decisions, upstream status and time); the
others carry ``None`` and pay nothing else.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

from aiohttp import web

from proxy import logs
from proxy.config import DecideConfig, LoggingConfig, Route
from proxy.decide import BadDescription, Described, describe
from proxy.limits.engine import Verdict
from proxy.limits.identity import RequestView
from proxy.logs import AccessNote
from proxy.metrics import Children, method_label, status_class
from proxy.redirects import ROUTE as REDIRECT_ROUTE
from proxy.redirects import RedirectHandler, redirect_code
from proxy.replies import json_error, json_reply
from proxy.runtime import Runtime, Snapshot

log = logging.getLogger("sluice.server")


class MainHandler:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.requests = Children(runtime.metrics.requests)
        self.in_flight = runtime.metrics.in_flight
        self.redirects = RedirectHandler(runtime)
        self.logging: LoggingConfig | None = None

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        snap = self.runtime.snapshot
        settings = snap.config.logging
        if settings is not self.logging:  # the first request after a (re)load
            self.logging = settings
            logs.apply(settings)
        note = (
            AccessNote(time.perf_counter())
            if settings.access and logs.sampled(settings.access)
            else None
        )
        route_name = "none"
        status = 500
        self.in_flight.inc()
        try:
            redirects = snap.config.redirects
            code = (
                redirect_code(redirects, request.host, request.path)
                if redirects is not None and snap.config.mode == "proxy"
                else None
            )
            if code is not None:
                assert redirects is not None
                route_name = REDIRECT_ROUTE
                response = await self.redirects(request, snap, redirects, code, note)
            elif snap.config.mode == "decide":
                route_name, response = await self._decide_listener(request, snap, note)
            else:
                route = snap.router.route_for(
                    request.method, request.path, request.host, request.headers
                )
                if route is not None:
                    route_name = route.name
                response = await self._serve(request, snap, route, note)
            status = response.status
            return response
        except asyncio.CancelledError:  # the client went away
            if note is not None:
                note.cancelled = True
            raise
        except Exception:  # a bug: say so in JSON, log it once, keep serving
            log.exception("unexpected error on %s %s", request.method, request.path)
            return json_error(500, "internal_error", "Sluice failed on this request; see its log")
        finally:
            self.in_flight.dec()
            self.requests(route_name, method_label(request.method), status_class(status)).inc()
            if note is not None:
                logs.access(
                    request.method, request.path, route_name, status, note, settings.show_keys
                )

    async def _serve(
        self,
        request: web.BaseRequest,
        snap: Snapshot,
        route: Route | None,
        note: AccessNote | None,
    ) -> web.StreamResponse:
        if route is None:
            return json_error(404, "no_route", f"no route matches {request.method} {request.path}")
        if route.kind == "decide":
            strip = route.match.path_prefix if route.decide.strip_prefix else None
            try:
                described = describe(request, route.decide.source, strip)
            except BadDescription as exc:
                return json_error(400, "bad_decision_request", str(exc))
            return await self._decision(request, snap, route, described, route.decide, note)
        if route.upstream is None:
            return json_error(404, "no_upstream", f"route {route.name} forwards nowhere")
        extra: dict[str, str] | None = None
        if route.limits or snap.candidate is not None:
            verdict = await self._limit(request, snap, route, request)
            if note is not None:
                note.decided(verdict.decisions)
            if verdict.status is not None:
                return json_reply(verdict.status, verdict.body or {}, verdict.headers)
            extra = verdict.headers
        client = snap.upstreams[route.upstream]
        trusted = snap.trusted(request.remote)
        max_body = snap.config.server.max_body_size
        if note is None:
            return await client.forward(request, trusted, max_body, extra)
        started = time.perf_counter()
        response = await client.forward(request, trusted, max_body, extra)
        # Sluice's own answers (413, 502, 504) are whole web.Responses; relayed ones stream.
        relayed = None if isinstance(response, web.Response) else response.status
        note.forwarded(route.upstream, relayed, time.perf_counter() - started)
        return response

    def _limit(
        self, request: web.BaseRequest, snap: Snapshot, route: Route, view: RequestView
    ) -> Coroutine[Any, Any, Verdict]:
        """The limiter's decision on ``view`` (the limiter's own coroutine, handed over:
        no frame of its own on every limited request's path)."""
        candidate = (
            snap.candidate.for_route(
                view.method, view.path, view.headers.get("Host") or "", view.headers
            )
            if snap.candidate is not None
            else None
        )
        return self.runtime.limiter.check(
            snap.config,
            snap.plans,
            route.limits,
            view,
            request.remote,
            route.name,
            route.headers,
            candidate,
        )

    async def _decide_listener(
        self, request: web.BaseRequest, snap: Snapshot, note: AccessNote | None
    ) -> tuple[str, web.StreamResponse]:
        """``mode: decide``: the described request is routed like proxied traffic would be."""
        decide = snap.config.decide
        try:
            described = describe(request, decide.source)
        except BadDescription as exc:
            return "none", json_error(400, "bad_decision_request", str(exc))
        host = request.headers.get("X-Forwarded-Host") or request.host
        route = snap.router.route_for(described.method, described.path, host, described.headers)
        if route is None:  # nothing limits this request
            return "none", web.Response(status=200, text="allowed\n")
        return route.name, await self._decision(request, snap, route, described, decide, note)

    async def _decision(
        self,
        request: web.BaseRequest,
        snap: Snapshot,
        route: Route,
        described: Described,
        decide: DecideConfig,
        note: AccessNote | None,
    ) -> web.StreamResponse:
        verdict = await self._limit(request, snap, route, described)
        if note is not None:
            note.decided(verdict.decisions)
        if verdict.status is None:
            return web.Response(status=200, text="allowed\n", headers=verdict.headers)
        status = decide.deny_status if verdict.status == 429 else verdict.status
        return json_reply(status, verdict.body or {}, verdict.headers)


def make_server(runtime: Runtime) -> web.Server:
    cfg = runtime.snapshot.config.server
    logs.count_drops(runtime.metrics.log_dropped)
    return web.Server(
        MainHandler(runtime),
        handler_cancellation=True,  # a client that goes away cancels its upstream request
        max_line_size=cfg.max_header_size,
        max_field_size=cfg.max_header_size,
        keepalive_timeout=cfg.keepalive_timeout,
        access_log=None,
    )
