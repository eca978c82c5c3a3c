"""Small JSON answers Sluice gives itself (errors, 404, 429)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


def json_reply(
    status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(body, separators=(",", ":")).encode(),
        content_type="application/json",
        headers=headers,
    )


def json_error(status: int, error: str, message: str, **extra: Any) -> web.Response:
    return json_reply(status, {"error": error, "message": message, **extra})
