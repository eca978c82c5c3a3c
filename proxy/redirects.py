"""Short-code redirects on the main listener, answered before any route is matched.

A request is a redirect request when ``redirects.host`` is unset or equals its
Host, and its path starts with ``redirects.prefix`` (``/`` when only a host is
set); the rest of the path is the code. Only GET and HEAD are answered (other
methods ``405``); a redirect works whatever state the upstreams are in.

Per GET, in order (link-store calls in brackets):

1. miss guard: a client over its budget of unknown codes → ``429`` [0]
2. ``redirects.limits`` through the rate limiter (route name ``redirects``) → ``429`` [0]
3. the link: hot-link cache, else one read [0 or 1]; none → ``404`` (charged
   to the miss guard); expired → ``410``
4. a click cap: one atomic ``take_click`` [1]; refused → ``410``
5. A/B variant (sticky cookie), ``Location`` (+ the request's query string
   with ``redirects.query_passthrough``), ``Cache-Control`` from the link
6. the click is queued for the analytics task and ``redirect.followed`` is
   emitted; neither is awaited

So a cached link without a cap costs no store call, a capped one exactly one.
HEAD answers what GET would without counting a click (a capped link costs one
read of its counter). ``404`` and ``410`` are a small HTML page for clients
that prefer ``text/html`` (browsers) and JSON ``{"error", "message"}`` otherwise.
"""

from __future__ import annotations

import html
import logging
import time
from urllib.parse import quote

from aiohttp import web

from proxy.clicks import Click
from proxy.config import HeaderPolicy, RedirectsConfig
from proxy.errors import StorageError
from proxy.limits.identity import client_ip
from proxy.links.analytics import referrer_host, ua_family
from proxy.links.codes import is_code
from proxy.links.model import Expired, cache_control, choose_variant, resolve
from proxy.linkservice import LinkService
from proxy.logs import AccessNote
from proxy.metrics import Children
from proxy.replies import json_reply
from proxy.runtime import Runtime, Snapshot

log = logging.getLogger("sluice.redirects")
ROUTE = "redirects"  # the route name of redirect requests (limits, metrics)
ALLOWED = "GET, HEAD"
STICKY_MAX_AGE = 30 * 86400
# asked for by browsers and crawlers, not guesses: never charged to the miss guard
UNCHARGED = frozenset({"", "favicon.ico", "robots.txt"})
HEADERS = HeaderPolicy()
_QUERY_SAFE = "!$&'()*+,;=:@/?%-._~"

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:34em;margin:15vh auto;
padding:0 1em;color:#222}}h1{{font-size:1.4em}}</style></head>
<body><h1>{title}</h1><p>{text}</p></body></html>
"""


def host_matches(wanted: str, host: str) -> bool:
    """Whether a request's Host is ``wanted`` (compared with the port only when
    ``wanted`` names one)."""
    host = host.lower()
    if host == wanted:
        return True
    if ":" in wanted and not wanted.endswith("]"):
        return False
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return name.rstrip(".") == wanted


def redirect_code(cfg: RedirectsConfig, host: str, path: str) -> str | None:
    """The code a request names, or None when it is not a redirect request."""
    if cfg.host is not None and not host_matches(cfg.host, host):
        return None
    prefix = cfg.prefix or "/"
    if not path.startswith(prefix):
        return None
    return path[len(prefix) :]


def _quality(item: str) -> tuple[str, float]:
    media, *params = (p.strip() for p in item.split(";"))
    q = 1.0
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                q = float(value)
            except ValueError:
                q = 0.0
    return media.lower(), q


def prefers_html(accept: str | None) -> bool:
    """True when ``Accept`` ranks ``text/html`` above zero and at least as high
    as ``application/json`` (what browsers send); JSON for everything else."""
    if not accept:
        return False
    html_q = json_q = 0.0
    for item in accept.split(","):
        media, q = _quality(item)
        if media == "text/html":
            html_q = max(html_q, q)
        elif media in ("application/json", "application/*"):
            json_q = max(json_q, q)
    return html_q > 0 and html_q >= json_q


def append_query(url: str, raw_query: str) -> str:
    """``url`` with ``raw_query`` added to its query (before any fragment)."""
    query = quote(raw_query, safe=_QUERY_SAFE)
    base, hash_, fragment = url.partition("#")
    joiner = "&" if "?" in base else "?"
    if base.endswith(("?", "&")):
        joiner = ""
    return f"{base}{joiner}{query}{hash_}{fragment}"


def problem(
    request: web.BaseRequest, status: int, error: str, message: str, title: str
) -> web.Response:
    """An error answer in the form the client prefers (HTML page or JSON)."""
    headers = {"Cache-Control": "no-store"}
    if prefers_html(request.headers.get("Accept")):
        page = _PAGE.format(title=html.escape(title), text=html.escape(message))
        return web.Response(
            status=status, text=page, content_type="text/html", charset="utf-8", headers=headers
        )
    return json_reply(status, {"error": error, "message": message}, headers)


class RedirectHandler:
    """Answers redirect requests for one worker (see the module docstring)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.answered = Children(runtime.metrics.redirects)

    async def __call__(
        self,
        request: web.BaseRequest,
        snap: Snapshot,
        cfg: RedirectsConfig,
        code: str,
        note: AccessNote | None = None,
    ) -> web.StreamResponse:
        """Answer one redirect request; ``note``, when the request gets an access line,
        collects the limits' decisions."""
        response = await self._answer(request, snap, cfg, code, note)
        self.answered(str(response.status)).inc()
        return response

    async def _answer(
        self,
        request: web.BaseRequest,
        snap: Snapshot,
        cfg: RedirectsConfig,
        code: str,
        note: AccessNote | None,
    ) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return json_reply(
                405,
                {"error": "method_not_allowed", "message": "short links answer GET and HEAD only"},
                {"Allow": ALLOWED},
            )
        service = self.runtime.links
        if service is None:
            return problem(
                request, 503, "links_unavailable", "short links start on restart", "Unavailable"
            )
        ip = client_ip(request.remote, request.headers, snap.config.clients.trusted_proxies)
        guard = service.guard
        if guard is not None:
            wait = guard.blocked(ip)
            if wait > 0:
                seconds = max(1, int(wait + 0.999))
                if note is not None:
                    note.guarded("miss_limit", f"ip={ip}", wait)
                body = {"error": "rate_limited", "rule": "miss_limit", "retry_after": seconds}
                return json_reply(429, body, {"Retry-After": str(seconds)})
        extra: dict[str, str] | None = None
        candidate = snap.candidate.for_redirects() if snap.candidate is not None else None
        if cfg.limits or candidate is not None:
            verdict = await self.runtime.limiter.check(
                snap.config,
                snap.plans,
                cfg.limits,
                request,
                request.remote,
                ROUTE,
                HEADERS,
                candidate,
            )
            if note is not None:
                note.decided(verdict.decisions)
            if verdict.status is not None:
                return json_reply(verdict.status, verdict.body or {}, verdict.headers)
            extra = verdict.headers
        now = time.time()
        try:
            link = await service.lookup(code) if is_code(code) else None
            if link is None:
                if guard is not None and code not in UNCHARGED:
                    guard.miss(ip)
                return problem(
                    request,
                    404,
                    "not_found",
                    f"there is no short link {code!r}" if code else "no short code given",
                    "Link not found",
                )
            if isinstance(resolve(link, now, 0), Expired):
                return problem(
                    request, 410, "expired", f"the short link {code!r} has expired", "Link expired"
                )
            counted = True
            if link.max_clicks is not None:
                if request.method == "HEAD":
                    counted = await service.clicks(code) < link.max_clicks
                else:
                    counted = await service.take_click(link)
            if not counted:
                return problem(
                    request,
                    410,
                    "click_limit_reached",
                    f"the short link {code!r} has reached its click limit",
                    "Link no longer available",
                )
        except StorageError as exc:
            log.warning("redirect %r: link store failed: %s", code, exc)
            return problem(
                request,
                503,
                "links_unavailable",
                "the link store is unavailable; try again shortly",
                "Unavailable",
            )
        cookie = service.settings.sticky_cookie
        chosen = choose_variant(link, request.cookies.get(cookie) if cookie else None, service.rng)
        variant, destination = (chosen[0], chosen[1].url) if chosen else (None, link.url)
        if cfg.query_passthrough and request.rel_url.raw_query_string:
            destination = append_query(destination, request.rel_url.raw_query_string)
        status = link.status or cfg.status
        headers = {"Location": destination, "Cache-Control": cache_control(link, status, now)}
        if extra:
            headers.update(extra)
        response = web.Response(status=status, headers=headers)
        if chosen is not None and cookie:
            response.set_cookie(
                cookie,
                chosen[1].key,
                path=cfg.code_path(code),
                max_age=STICKY_MAX_AGE,
                httponly=True,
                samesite="Lax",
            )
        if request.method == "GET":
            self._followed(request, service, link.code, link.max_clicks is None, variant, ip, now)
        return response

    def _followed(
        self,
        request: web.BaseRequest,
        service: LinkService,
        code: str,
        uncapped: bool,
        variant: int | None,
        ip: str,
        now: float,
    ) -> None:
        referrer = referrer_host(request.headers.get("Referer"))
        family = ua_family(request.headers.get("User-Agent"))
        visitor = service.visitor(ip, request.headers.get("User-Agent") or "")
        service.record(Click(code, now, referrer, family, variant, visitor, count=uncapped))
        if self.runtime.events:
            self.runtime.emit(
                "redirect.followed",
                {
                    "code": code,
                    "variant": variant,
                    "referrer_host": referrer,
                    "ua_family": family,
                    "client": visitor[:16],
                },
            )
