"""The links API on the admin listener (bearer tokens, see ``proxy.adminauth``).

    POST   /api/links                  create (201; an existing identical link: 200)   write
    GET    /api/links                  ?cursor=&limit=1..1000&tag=                    read
    GET    /api/links/top              ?window=1h|1d&limit=1..100                     read
    GET    /api/links/{code}           the link and its click count                   read
    PATCH  /api/links/{code}           change url, expiry, cap, status, tags, variants write
    DELETE /api/links/{code}           204                                            write
    GET    /api/links/{code}/stats     ?since=YYYY-MM-DD&until=YYYY-MM-DD             read
    GET    /api/links:export           every link, oldest first, JSON Lines           read
    POST   /api/links:import           JSON Lines; all lines valid or nothing imported write

Every error is JSON ``{"error", "message"}``. ``OPERATIONS`` is the single
table the routes are registered from and the OpenAPI document
(``proxy.openapi``) is written from.

Creation dedupes by default: the same token asking again for the same URL
(and code, when one is given) gets the existing live link back with ``200``;
``?dedupe=false`` always makes a new link. A custom code someone else holds,
or the same code for another URL, is ``409``.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

from aiohttp import web

from proxy.adminauth import READ, RUNTIME, WRITE, require
from proxy.config import AdminToken, Config
from proxy.errors import StorageError
from proxy.links.analytics import day_of
from proxy.links.errors import CodeSpaceExhausted, CodeTaken, LinkError
from proxy.links.model import Link, link_from_json, link_to_json
from proxy.links.store import LinkStats, LinkStore
from proxy.links.validate import (
    DestinationPolicy,
    check_link,
    parse_link_patch,
    parse_link_request,
)
from proxy.linkservice import LinkService
from proxy.replies import json_reply
from proxy.runtime import Runtime

MAX_JSON_BODY = 64 * 1024
MAX_IMPORT_BODY = 64 * 1024 * 1024
MAX_IMPORT_ERRORS = 20
STATS_DAYS = 30  # the default range of /stats
API_WORDS = frozenset({"top"})  # path segments under /api/links/ that are not codes
WINDOWS = {"1h": "hour", "hour": "hour", "1d": "day", "day": "day"}
NDJSON = "application/x-ndjson"


class ApiError(Exception):
    def __init__(self, status: int, error: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.extra = extra


@dataclass(frozen=True, slots=True)
class Call:
    """What a handler gets: the request, the caller's token, the open store."""

    request: web.Request
    token: AdminToken
    runtime: Runtime
    service: LinkService
    store: LinkStore

    @property
    def config(self) -> Config:
        return self.runtime.snapshot.config

    def query_int(self, name: str, default: int) -> int:
        raw = self.request.query.get(name)
        if raw is None or raw == "":
            return default
        try:
            return int(raw)
        except ValueError:
            raise ApiError(400, "invalid", f"{name} must be an integer, got {raw!r}") from None


Handler = Callable[[Call], Awaitable[web.StreamResponse]]


class ExportAborted(Exception):
    """The store failed after the export's status line was sent."""


@dataclass(frozen=True, slots=True)
class Operation:
    """One route and its OpenAPI description."""

    method: str
    path: str
    handler: Handler
    scope: str
    summary: str
    operation_id: str
    params: tuple[dict[str, Any], ...] = ()
    body: dict[str, Any] | None = None  # OpenAPI requestBody
    responses: dict[str, dict[str, Any]] = field(default_factory=dict)


def link_error(exc: LinkError) -> ApiError:
    if isinstance(exc, CodeTaken):
        return ApiError(409, "code_taken", exc.reason, code=exc.code)
    if isinstance(exc, CodeSpaceExhausted):
        return ApiError(507, "code_space_exhausted", exc.reason)
    if exc.status == 403:
        return ApiError(403, "destination_refused", exc.reason)
    if exc.status == 400:
        return ApiError(400, "invalid", exc.reason)
    return ApiError(exc.status, "link_error", exc.reason)


def error_reply(exc: ApiError) -> web.Response:
    return json_reply(exc.status, {"error": exc.error, "message": exc.message, **exc.extra})


def policy(config: Config) -> DestinationPolicy:
    """What destinations are checked against: Sluice's own redirect host(s), the
    configured prefix (a link into it would loop) and the operator's host rules."""
    redirects = config.redirects
    assert redirects is not None
    own = [redirects.host] if redirects.host else []
    host = config.listen.host
    if host not in ("0.0.0.0", "::", ""):
        own.append(f"[{host}]" if ":" in host else host)
    prefix = redirects.prefix if redirects.host is None or redirects.prefix else None
    return DestinationPolicy(tuple(own), prefix, redirects.links.hosts)


def link_json(config: Config, link: Link, **extra: Any) -> dict[str, Any]:
    body = link_to_json(link)
    redirects = config.redirects
    if redirects is not None:
        body["path"] = redirects.code_path(link.code)
    body.update(extra)
    return body


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (before reading it all)."""
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "too_large", f"the request body is larger than {limit} bytes")
    data = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        data += chunk
        if len(data) > limit:
            raise ApiError(413, "too_large", f"the request body is larger than {limit} bytes")
    return bytes(data)


async def read_json(request: web.Request) -> Any:
    raw = await read_body(request, MAX_JSON_BODY)
    if not raw.strip():
        raise ApiError(400, "invalid", "the request body must be a JSON object")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "bad_json", f"the request body is not valid JSON: {exc}") from None


def _flag(raw: str | None, name: str, default: bool) -> bool:
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes"):
        return True
    if raw.lower() in ("0", "false", "no"):
        return False
    raise ApiError(400, "invalid", f"{name} must be true or false, got {raw!r}")


def _code(call: Call) -> str:
    return call.request.match_info["code"]


def _not_found(code: str) -> ApiError:
    return ApiError(404, "not_found", f"there is no short link {code!r}")


# -- handlers ---------------------------------------------------------------------------


async def create(call: Call) -> web.StreamResponse:
    body = await read_json(call.request)
    dedupe = _flag(call.request.query.get("dedupe"), "dedupe", True)
    link = parse_link_request(
        body, now=time.time(), created_by=call.token.name, policy=policy(call.config)
    )
    if link.code.lower() in API_WORDS:
        raise ApiError(400, "invalid", f"the code {link.code!r} is reserved")
    owner = call.token.name if dedupe else None
    service = call.service
    stored, created = await service.timed("create", call.store.create(link, dedupe_owner=owner))
    service.forget(stored.code)  # a cached "no such link" must not outlive the creation
    if created:
        call.runtime.metrics.links_created.inc()
        call.runtime.emit(
            "link.created",
            {
                "code": stored.code,
                "url": stored.url,
                "created_by": stored.created_by,
                "tags": list(stored.tags),
            },
        )
    return json_reply(
        201 if created else 200,
        link_json(call.config, stored),
        {"Location": f"/api/links/{stored.code}"},
    )


async def list_links(call: Call) -> web.StreamResponse:
    tag = call.request.query.get("tag") or None
    page = await call.service.timed(
        "list",
        call.store.list(call.request.query.get("cursor") or None, call.query_int("limit", 50), tag),
    )
    return json_reply(
        200,
        {
            "links": [link_json(call.config, link) for link in page.links],
            "next_cursor": page.next_cursor,
        },
    )


async def show(call: Call) -> web.StreamResponse:
    code = _code(call)
    link = await call.service.timed("get", call.store.get(code))
    if link is None:
        raise _not_found(code)
    clicks = await call.service.timed("click_count", call.store.click_count(code))
    return json_reply(200, link_json(call.config, link, clicks=clicks))


async def patch(call: Call) -> web.StreamResponse:
    code = _code(call)
    body = await read_json(call.request)
    changes = parse_link_patch(body, now=time.time(), policy=policy(call.config))
    link = await call.service.timed("patch", call.store.patch(code, changes))
    call.service.forget(code)
    if link is None:
        raise _not_found(code)
    return json_reply(200, link_json(call.config, link))


async def delete(call: Call) -> web.StreamResponse:
    code = _code(call)
    deleted = await call.service.timed("delete", call.store.delete(code))
    call.service.forget(code)
    if not deleted:
        raise _not_found(code)
    call.runtime.emit("link.deleted", {"code": code, "deleted_by": call.token.name})
    return web.Response(status=204)


def stats_json(stats: LinkStats) -> dict[str, Any]:
    return {
        "code": stats.code,
        "since": stats.since_day,
        "until": stats.until_day,
        "clicks": stats.clicks,
        "total": stats.total,
        "per_day": stats.per_day,
        "referrers": [{"host": host, "clicks": n} for host, n in stats.referrers],
        "ua_families": stats.ua_families,
        "variants": {str(i): n for i, n in stats.variants.items()},
        "last_click_at": stats.last_click_at,
        "unique_visitors": stats.unique_visitors,
    }


async def stats(call: Call) -> web.StreamResponse:
    code = _code(call)
    query = call.request.query
    until = query.get("until") or day_of(time.time())
    since = query.get("since")
    if not since:
        try:
            since = (date.fromisoformat(until) - timedelta(days=STATS_DAYS - 1)).isoformat()
        except ValueError:
            raise ApiError(400, "invalid", f"until must be YYYY-MM-DD, got {until!r}") from None
    found = await call.service.timed("stats", call.store.stats(code, since, until))
    if found is None:
        raise _not_found(code)
    return json_reply(200, stats_json(found))


async def top(call: Call) -> web.StreamResponse:
    raw = call.request.query.get("window") or "1h"
    window = WINDOWS.get(raw)
    if window is None:
        raise ApiError(400, "invalid", f"window must be 1h or 1d, got {raw!r}")
    entries = await call.service.timed(
        "top", call.store.top(window, now=time.time(), limit=call.query_int("limit", 10))
    )
    return json_reply(
        200,
        {
            "window": "1h" if window == "hour" else "1d",
            "links": [{"code": e.code, "clicks": e.clicks} for e in entries],
        },
    )


async def export(call: Call) -> web.StreamResponse:
    links: AsyncIterator[Link] = call.store.export()
    first = await anext(links, None)  # a store failure here is still a JSON error
    response = web.StreamResponse(
        headers={
            "Content-Type": NDJSON,
            "Content-Disposition": 'attachment; filename="links.jsonl"',
        }
    )
    response.enable_chunked_encoding()
    await response.prepare(call.request)
    try:
        if first is not None:
            await response.write(_line(first))
            async for link in links:
                await response.write(_line(link))
    except StorageError as exc:
        # The status is sent: abort the chunked body instead, so that clients see
        # a truncated transfer, never what looks like a complete export.
        raise ExportAborted(f"export aborted by the link store: {exc}") from exc
    await response.write_eof()
    return response


def _line(link: Link) -> bytes:
    return json.dumps(link_to_json(link), separators=(",", ":")).encode() + b"\n"


async def import_links(call: Call) -> web.StreamResponse:
    raw = await read_body(call.request, MAX_IMPORT_BODY)
    rules = policy(call.config)
    links: list[Link] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            try:
                obj = json.loads(line)
            except (ValueError, UnicodeDecodeError) as exc:
                raise LinkError(400, f"not valid JSON: {exc}") from None
            link = check_link(link_from_json(obj), rules)
            if link.code.lower() in API_WORDS:
                raise LinkError(400, f"the code {link.code!r} is reserved")
            if link.code in seen:
                raise LinkError(400, f"the code {link.code!r} is also on line {seen[link.code]}")
        except LinkError as exc:
            errors.append(f"line {number}: {exc.reason}")
            if len(errors) >= MAX_IMPORT_ERRORS:
                break
            continue
        seen[link.code] = number
        links.append(link)
    if errors:
        raise ApiError(
            400, "invalid", f"nothing imported: {errors[0]}", errors=errors[:MAX_IMPORT_ERRORS]
        )
    result = await call.service.timed("import", call.store.import_links(links))
    for link in links:
        call.service.forget(link.code)
    return json_reply(200, {"imported": result.imported, "skipped": list(result.skipped)})


# -- dispatch ---------------------------------------------------------------------------


def _wrap(op: Operation) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        token = require(request, op.scope)
        runtime = request.app[RUNTIME]
        service = runtime.links
        try:
            if service is None:
                raise ApiError(
                    404,
                    "links_disabled",
                    "short links are off: add a redirects: section to rules.yaml and restart",
                )
            store = service.store
            if store is None:
                raise ApiError(
                    503,
                    "links_unavailable",
                    f"the link store {service.location} is not available: {service.last_error}",
                )
            return await op.handler(Call(request, token, runtime, service, store))
        except ApiError as exc:
            return error_reply(exc)
        except LinkError as exc:
            return error_reply(link_error(exc))
        except StorageError as exc:
            return error_reply(ApiError(503, "storage_unavailable", f"link store: {exc}"))

    handle.__name__ = op.operation_id
    return handle


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own answers under ``/api/`` (unknown path 404, 405) as JSON too."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if not request.path.startswith("/api/") or exc.content_type == "application/json":
            raise
        if exc.status < 400:
            raise
        error = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
        message = f"{request.method} {request.path}: {exc.reason}"
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        return json_reply(exc.status, {"error": error, "message": message}, headers)


def add_routes(app: web.Application) -> None:
    for op in OPERATIONS:
        app.router.add_route(op.method, op.path, _wrap(op))


CODE = {"name": "code", "in": "path", "required": True, "schema": {"type": "string"}}


def _q(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


def _err(*statuses: int) -> dict[str, dict[str, Any]]:
    return {str(s): {"$ref": f"#/components/responses/E{s}"} for s in statuses}


OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "POST",
        "/api/links",
        create,
        WRITE,
        "Create a short link",
        "createLink",
        params=(
            _q("dedupe", {"type": "boolean", "default": True}, "false: always create a new link"),
        ),
        body={"required": True, "content": {"application/json": {"schema": _ref("LinkInput")}}},
        responses={
            "201": _json("Created", "Link"),
            "200": _json("The same caller's existing live link for this URL (dedupe)", "Link"),
            **_err(400, 401, 403, 409, 413, 503, 507),
        },
    ),
    Operation(
        "GET",
        "/api/links",
        list_links,
        READ,
        "List links, newest first",
        "listLinks",
        params=(
            _q("cursor", {"type": "string"}, "next_cursor of the previous page"),
            _q(
                "limit",
                {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50},
                "page size",
            ),
            _q("tag", {"type": "string"}, "only links with this tag"),
        ),
        responses={"200": _json("One page", "LinkPage"), **_err(400, 401, 503)},
    ),
    Operation(
        "GET",
        "/api/links/top",
        top,
        READ,
        "The most clicked links in the last hour or day",
        "topLinks",
        params=(
            _q(
                "window",
                {"type": "string", "enum": ["1h", "1d"], "default": "1h"},
                "the last hour or day",
            ),
            _q(
                "limit",
                {"type": "integer", "minimum": 1, "maximum": 100, "default": 10},
                "how many",
            ),
        ),
        responses={"200": _json("Leaderboard", "Top"), **_err(400, 401, 503)},
    ),
    Operation(
        "GET",
        "/api/links/{code}",
        show,
        READ,
        "One link and its lifetime click count",
        "getLink",
        params=(CODE,),
        responses={"200": _json("The link", "LinkWithClicks"), **_err(401, 404, 503)},
    ),
    Operation(
        "PATCH",
        "/api/links/{code}",
        patch,
        WRITE,
        "Change a link",
        "patchLink",
        params=(CODE,),
        body={"required": True, "content": {"application/json": {"schema": _ref("LinkPatch")}}},
        responses={"200": _json("The changed link", "Link"), **_err(400, 401, 403, 404, 413, 503)},
    ),
    Operation(
        "DELETE",
        "/api/links/{code}",
        delete,
        WRITE,
        "Delete a link with its counter and analytics",
        "deleteLink",
        params=(CODE,),
        responses={"204": {"description": "Deleted"}, **_err(401, 403, 404, 503)},
    ),
    Operation(
        "GET",
        "/api/links/{code}/stats",
        stats,
        READ,
        "Click analytics of a link between two UTC days (default: the last 30)",
        "linkStats",
        params=(
            CODE,
            _q(
                "since",
                {"type": "string", "format": "date"},
                "first UTC day (default: until - 29 days)",
            ),
            _q("until", {"type": "string", "format": "date"}, "last UTC day (default: today)"),
        ),
        responses={"200": _json("Analytics", "Stats"), **_err(400, 401, 404, 503)},
    ),
    Operation(
        "GET",
        "/api/links:export",
        export,
        READ,
        "Every link, oldest first, one JSON object per line",
        "exportLinks",
        responses={
            "200": {
                "description": "JSON Lines",
                "content": {NDJSON: {"schema": {"type": "string"}}},
            },
            **_err(401, 503),
        },
    ),
    Operation(
        "POST",
        "/api/links:import",
        import_links,
        WRITE,
        "Import links from JSON Lines (existing codes are skipped)",
        "importLinks",
        body={"required": True, "content": {NDJSON: {"schema": {"type": "string"}}}},
        responses={
            "200": _json("What was imported", "ImportResult"),
            **_err(400, 401, 403, 413, 503),
        },
    ),
)
