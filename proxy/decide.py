"""Decision mode: answer "may this request pass?" for NGINX ``auth_request`` and
Envoy ``ext_authz`` without forwarding anything.

The request to decide on is described either by NGINX's subrequest headers
(``X-Original-URI``, ``X-Original-Method``; the client address through
``X-Forwarded-For`` from a trusted proxy) or, for Envoy's HTTP ext_authz
service, by the incoming request itself (Envoy sends the original method,
path — after an optional ``path_prefix`` — and the allowed headers).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl

from aiohttp import web
from multidict import CIMultiDictProxy, MultiDict, MultiDictProxy

_METHOD = re.compile(r"^[A-Z]{1,20}$")
_MAX_URI = 8192


class BadDescription(ValueError):
    """The decision request does not describe a request we can decide on (→ 400)."""


@dataclass(frozen=True, slots=True)
class Described:
    """The original request, as far as rules and identity need it (a RequestView)."""

    method: str
    path: str
    query_string: str
    headers: CIMultiDictProxy[str]
    cookies: Mapping[str, str]

    @property
    def query(self) -> MultiDictProxy[str]:
        return MultiDictProxy(MultiDict(parse_qsl(self.query_string, keep_blank_values=True)))


def describe(request: web.BaseRequest, source: str, strip_prefix: str | None = None) -> Described:
    """The request ``request`` asks about; ``source`` is auto, nginx or envoy."""
    original = request.headers.get("X-Original-URI")
    if source == "nginx" and original is None:
        raise BadDescription("missing X-Original-URI (set it in the auth_request location)")
    if original is not None and source != "envoy":
        if len(original) > _MAX_URI or not original.startswith("/"):
            raise BadDescription("X-Original-URI must be an absolute path (starting with '/')")
        if any(ord(c) < 0x21 or ord(c) == 0x7F for c in original):
            raise BadDescription("X-Original-URI contains spaces or control characters")
        method = request.headers.get("X-Original-Method", "GET").upper()
        if not _METHOD.match(method):
            raise BadDescription(f"X-Original-Method is not an HTTP method: {method[:40]!r}")
        path, _, query = original.partition("?")
    else:
        method, path, query = request.method, request.path, request.query_string
        if strip_prefix and path.startswith(strip_prefix):
            path = "/" + path[len(strip_prefix) :].lstrip("/")
    return Described(method, path, query, request.headers, request.cookies)
