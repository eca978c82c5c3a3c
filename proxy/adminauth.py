"""Who may call the admin API: bearer tokens from ``admin.token`` / ``admin.tokens``.

Tokens are compared in constant time (``hmac.compare_digest``, every token
compared whichever matched). No or an unknown token → ``401`` with
``WWW-Authenticate: Bearer``; a read-scoped token on a write → ``403``.
"""

from __future__ import annotations

import hmac
import json

from aiohttp import web

from proxy.config import AdminToken
from proxy.runtime import Runtime

RUNTIME = web.AppKey("runtime", Runtime)
READ, WRITE = "read", "write"


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
    """The caller's token if it has ``scope`` (read or write); else raise 401 / 403."""
    tokens = request.app[RUNTIME].snapshot.config.admin.tokens
    token = find_token(tokens, request.headers.get("Authorization"))
    if token is None:
        message = (
            "send Authorization: Bearer <admin token>"
            if tokens
            else "no admin tokens are configured (admin.token or admin.tokens in rules.yaml)"
        )
        raise web.HTTPUnauthorized(
            text=json.dumps({"error": "unauthorized", "message": message}),
            content_type="application/json",
            headers={"WWW-Authenticate": 'Bearer realm="sluice"'},
        )
    if scope == WRITE and token.scope != WRITE:
        raise web.HTTPForbidden(
            text=json.dumps(
                {"error": "forbidden", "message": f"the token {token.name!r} is read-only"}
            ),
            content_type="application/json",
        )
    return token
