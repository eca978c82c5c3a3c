"""The webhook routes of the admin API (handlers in ``proxy.events.api``) and their
OpenAPI description, kept side by side so the document matches the router."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.adminauth import RUNTIME, require
from proxy.events import api
from proxy.events.service import Notifier

PREFIX = "/api/webhooks"
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_OBJ = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}


def _err(*statuses: int) -> dict[str, Any]:
    return {str(s): {"$ref": f"#/components/responses/E{s}"} for s in statuses}


# (method, path, operationId, summary, write?, extra parameters, has a JSON body)
_ROUTES: tuple[tuple[str, str, str, str, bool, tuple[dict[str, Any], ...], bool], ...] = (
    (
        "GET",
        PREFIX,
        "listWebhooks",
        "Every subscription: queue depth, oldest pending age, last success and error, "
        "consecutive failures, dead letters",
        False,
        (),
        False,
    ),
    ("GET", PREFIX + "/{name}", "getWebhook", "One subscription's status", False, (_NAME,), False),
    (
        "GET",
        PREFIX + "/{name}/dead",
        "listDeadLetters",
        "Events that exhausted their retries (paged by event id)",
        False,
        (
            _NAME,
            {"name": "after", "in": "query", "required": False, "schema": {"type": "string"}},
            {
                "name": "limit",
                "in": "query",
                "required": False,
                "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
            },
        ),
        False,
    ),
    (
        "POST",
        PREFIX + "/{name}/dead:replay",
        "replayDeadLetters",
        'Queue dead letters again: {"ids": [...]} or {} for all',
        True,
        (_NAME,),
        True,
    ),
    (
        "POST",
        PREFIX + "/{name}/disable",
        "disableWebhook",
        'Stop delivering (events keep queueing): optional {"reason"}',
        True,
        (_NAME,),
        True,
    ),
    (
        "POST",
        PREFIX + "/{name}/enable",
        "enableWebhook",
        "Deliver again (also after a receiver's 410)",
        True,
        (_NAME,),
        False,
    ),
    (
        "POST",
        PREFIX + "/{name}/ping",
        "pingWebhook",
        "Queue a ping event for this subscription only",
        True,
        (_NAME,),
        False,
    ),
    (
        "POST",
        PREFIX + "/{name}:test",
        "testWebhook",
        "Send a ping event to this subscription now and return the receiver's answer "
        "(id, delivered, outcome, status, error, elapsed_ms); nothing is queued",
        True,
        (_NAME,),
        False,
    ),
)


def _notifier(request: web.Request) -> Notifier | None:
    return request.app[RUNTIME].notifier


def add_routes(app: web.Application) -> None:
    app.router.add_routes(api.routes(_notifier, require, PREFIX))


def openapi_paths() -> dict[str, dict[str, Any]]:
    paths: dict[str, dict[str, Any]] = {}
    for method, path, op_id, summary, write, params, body in _ROUTES:
        errors = _err(400, 401, 403, 404, 503) if write else _err(401, 404, 503)
        operation: dict[str, Any] = {
            "operationId": op_id,
            "summary": summary,
            "tags": ["webhooks"],
            "responses": {"200": _OBJ, **errors},
        }
        if params:
            operation["parameters"] = list(params)
        if body:
            operation["requestBody"] = {
                "required": False,
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
        paths.setdefault(path, {})[method.lower()] = operation
    return paths
