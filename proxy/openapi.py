"""The OpenAPI 3 document of the admin API, served at ``/api/openapi.json``.

Paths come from the same ``Operation`` table the routes are registered from
(``proxy.api_links.OPERATIONS``), so the document cannot list a handler that
does not exist; a test checks the reverse against the app's router.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from proxy import __version__, api_status, api_webhooks
from proxy.api_links import OPERATIONS, Operation
from proxy.links.model import REDIRECT_STATUSES

OPENAPI_PATH = "/api/openapi.json"
_STATUS_TEXT = {
    400: "Invalid request (the message says which field and why)",
    401: "No or unknown bearer token",
    403: "A read-only token on a write, or a destination the operator refuses",
    404: "No such link (or short links are not configured)",
    409: "The custom code is taken",
    413: "The request body is too large",
    503: "The link store is unavailable",
    507: "No generated code left",
}

_STR = {"type": "string"}
_NULL_STR = {"type": "string", "nullable": True}
_TIME = {"type": "number", "nullable": True, "description": "Unix seconds"}
_VARIANT = {
    "type": "object",
    "required": ["url", "weight"],
    "additionalProperties": False,
    "properties": {
        "url": _STR,
        "weight": {"type": "integer", "minimum": 1, "maximum": 10000},
    },
}
_EDITABLE: dict[str, Any] = {
    "url": {"type": "string", "format": "uri"},
    "expires_at": _TIME,
    "expires_in": {
        "oneOf": [{"type": "string"}, {"type": "number"}],
        "description": "a duration such as 7d, or seconds",
    },
    "max_clicks": {"type": "integer", "minimum": 1, "nullable": True},
    "status": {"type": "integer", "enum": list(REDIRECT_STATUSES), "nullable": True},
    "tags": {"type": "array", "items": _STR, "maxItems": 16},
    "variants": {"type": "array", "items": _VARIANT, "minItems": 2, "maxItems": 10},
}
_LINK_PROPERTIES: dict[str, Any] = {
    "code": _STR,
    "url": _STR,
    "created_at": {"type": "number", "description": "Unix seconds"},
    "created_by": _NULL_STR,
    "expires_at": _TIME,
    "max_clicks": {"type": "integer", "nullable": True},
    "status": {"type": "integer", "enum": list(REDIRECT_STATUSES), "nullable": True},
    "tags": {"type": "array", "items": _STR},
    "variants": {"type": "array", "items": _VARIANT},
    "path": {"type": "string", "description": "where the link is followed, e.g. /s/CODE"},
}
SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error", "message"],
        "properties": {"error": _STR, "message": _STR},
    },
    "Link": {
        "type": "object",
        "required": ["code", "url", "created_at"],
        "properties": _LINK_PROPERTIES,
    },
    "LinkWithClicks": {
        "allOf": [
            {"$ref": "#/components/schemas/Link"},
            {"type": "object", "properties": {"clicks": {"type": "integer"}}},
        ]
    },
    "LinkInput": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Za-z0-9_-]{3,64}$"},
            **_EDITABLE,
        },
        "description": "url is required unless variants are given",
    },
    "LinkPatch": {"type": "object", "additionalProperties": False, "properties": _EDITABLE},
    "LinkPage": {
        "type": "object",
        "required": ["links", "next_cursor"],
        "properties": {
            "links": {"type": "array", "items": {"$ref": "#/components/schemas/Link"}},
            "next_cursor": _NULL_STR,
        },
    },
    "Top": {
        "type": "object",
        "properties": {
            "window": _STR,
            "links": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"code": _STR, "clicks": {"type": "integer"}},
                },
            },
        },
    },
    "Stats": {
        "type": "object",
        "properties": {
            "code": _STR,
            "since": {"type": "string", "format": "date"},
            "until": {"type": "string", "format": "date"},
            "clicks": {"type": "integer", "description": "lifetime click counter"},
            "total": {"type": "integer", "description": "clicks in the range"},
            "per_day": {"type": "object", "additionalProperties": {"type": "integer"}},
            "referrers": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"host": _STR, "clicks": {"type": "integer"}},
                },
            },
            "ua_families": {"type": "object", "additionalProperties": {"type": "integer"}},
            "variants": {"type": "object", "additionalProperties": {"type": "integer"}},
            "last_click_at": _TIME,
            "unique_visitors": {"type": "integer"},
        },
    },
    "ImportResult": {
        "type": "object",
        "properties": {
            "imported": {"type": "integer"},
            "skipped": {"type": "array", "items": _STR},
        },
    },
}


def _operation(op: Operation) -> dict[str, Any]:
    out: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "description": f"Needs a token with {op.scope} scope.",
        "responses": op.responses,
    }
    if op.params:
        out["parameters"] = list(op.params)
    if op.body is not None:
        out["requestBody"] = op.body
    return out


def document(operations: Iterable[Operation] = OPERATIONS) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op)
    paths.update(api_webhooks.openapi_paths())
    paths.update(api_status.openapi_paths())
    paths[OPENAPI_PATH] = {
        "get": {
            "operationId": "openapi",
            "summary": "This document",
            "security": [],
            "responses": {"200": {"description": "OpenAPI 3 document"}},
        }
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Sluice admin API",
            "version": __version__,
            "description": "Short links and webhooks on the admin listener. Every error is JSON "
            '{"error", "message"}.',
        },
        "paths": paths,
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": SCHEMAS,
            "responses": {
                f"E{status}": {
                    "description": text,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                    },
                }
                for status, text in _STATUS_TEXT.items()
            },
        },
    }
