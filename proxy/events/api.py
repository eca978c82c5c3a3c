"""Admin API routes for webhooks, ready for the admin app to mount.

    GET  /api/webhooks                         status of every subscription     (read)
    GET  /api/webhooks/{name}                  status of one                    (read)
    GET  /api/webhooks/{name}/dead             ?after=<event id>&limit=1..1000  (read)
    POST /api/webhooks/{name}/dead:replay      {"ids": [...]} or {} for all     (write)
    POST /api/webhooks/{name}/disable          {"reason": "..."} optional       (write)
    POST /api/webhooks/{name}/enable                                            (write)
    POST /api/webhooks/{name}/ping             queue a ping for this one only   (write)
    POST /api/webhooks/{name}:test             send a ping now, return the answer (write)

``guard(request, scope)`` is the admin app's authorisation (it raises the
401/403 itself); ``notifier_of(request)`` finds the running ``Notifier``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from proxy.errors import StorageError
from proxy.events.model import iso
from proxy.events.service import Notifier
from proxy.replies import json_error, json_reply

Guard = Callable[[web.Request, str], object]
Handler = Callable[[web.Request, Notifier], Awaitable[web.StreamResponse]]
MAX_PAGE = 1000


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = json.loads(await request.read() or b"{}")
    except ValueError as exc:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": "bad_json", "message": str(exc)}),
            content_type="application/json",
        ) from exc
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(
            text='{"error":"bad_json","message":"expected a JSON object"}',
            content_type="application/json",
        )
    return body


async def _list(request: web.Request, notifier: Notifier) -> web.StreamResponse:
    return json_reply(200, {"webhooks": [s.as_dict() for s in await notifier.status()]})


async def _one(request: web.Request, notifier: Notifier) -> web.StreamResponse:
    (status,) = await notifier.status(request.match_info["name"])
    return json_reply(200, status.as_dict())


async def _dead(request: web.Request, notifier: Notifier) -> web.StreamResponse:
    name = request.match_info["name"]
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_PAGE:
        return json_error(400, "bad_limit", f"limit must be 1 to {MAX_PAGE}")
    page = await notifier.dead_letters(name, request.query.get("after") or None, limit)
    items = [
        {
            "id": d.event.id,
            "type": d.event.type,
            "attempts": d.attempts,
            "reason": d.reason,
            "dead_at": iso(d.dead_at),
            "event": json.loads(d.event.raw),
        }
        for d in page
    ]
    after = page[-1].event.id if len(page) == limit else None
    return json_reply(200, {"items": items, "next": after})


async def _replay(request: web.Request, notifier: Notifier) -> web.StreamResponse:
    body = await _body(request)
    ids = body.get("ids")
    if ids is not None and not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
        return json_error(400, "bad_ids", "ids must be a list of event ids")
    moved = await notifier.replay(request.match_info["name"], ids)
    return json_reply(200, {"replayed": moved})


async def _disable(request: web.Request, notifier: Notifier) -> web.StreamResponse:
    name = request.match_info["name"]
    reason = (await _body(request)).get("reason")
    await notifier.set_disabled(name, True, str(reason) if reason else None)
    return await _one(request, notifier)


async def _enable(request: web.Request, notifier: Notifier) -> web.StreamResponse:
    await notifier.set_disabled(request.match_info["name"], False)
    return await _one(request, notifier)


async def _ping(request: web.Request, notifier: Notifier) -> web.StreamResponse:
    event_id = await notifier.ping(request.match_info["name"])
    return json_reply(202, {"id": event_id})


async def _test(request: web.Request, notifier: Notifier) -> web.StreamResponse:
    result = await notifier.test(request.match_info["name"])
    return json_reply(200, result)


def routes(
    notifier_of: Callable[[web.Request], Notifier | None],
    guard: Guard,
    prefix: str = "/api/webhooks",
) -> list[web.RouteDef]:
    def wrap(scope: str, handler: Handler) -> Callable[[web.Request], Awaitable[Any]]:
        async def run(request: web.Request) -> web.StreamResponse:
            guard(request, scope)
            notifier = notifier_of(request)
            if notifier is None:
                return json_error(503, "notifications_off", "notifications are not running")
            try:
                return await handler(request, notifier)
            except KeyError:
                name = request.match_info.get("name", "")
                return json_error(404, "unknown_webhook", f"no webhook named {name!r}")
            except StorageError as exc:
                return json_error(503, "outbox_unavailable", str(exc))

        return run

    return [
        web.get(prefix, wrap("read", _list)),
        web.get(prefix + "/{name}", wrap("read", _one)),
        web.get(prefix + "/{name}/dead", wrap("read", _dead)),
        web.post(prefix + "/{name}/dead:replay", wrap("write", _replay)),
        web.post(prefix + "/{name}/disable", wrap("write", _disable)),
        web.post(prefix + "/{name}/enable", wrap("write", _enable)),
        web.post(prefix + "/{name}/ping", wrap("write", _ping)),
        web.post(prefix + "/{name:[^/:]+}:test", wrap("write", _test)),
    ]
