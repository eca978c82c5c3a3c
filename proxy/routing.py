"""Which route serves a request: the first whose match holds."""

from __future__ import annotations

from collections.abc import Sequence

from proxy.config import Route
from proxy.match import HeaderLookup


class Router:
    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = tuple(routes)

    def route_for(self, method: str, path: str, host: str, headers: HeaderLookup) -> Route | None:
        for route in self.routes:
            if route.match.matches(method, path, host, headers):
                return route
        return None
