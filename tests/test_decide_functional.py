"""Decision mode over real HTTP: NGINX auth_request and Envoy ext_authz request shapes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.inproc import Sluice, running, write_rules

RULES = """
listen: {listen}
admin: {{listen: "{admin}"}}
clients: {{trusted_proxies: [127.0.0.1/32]}}
limits:
  - {{name: per_ip, key: ip, algorithm: fixed_window, limit: 2, window: 1h}}
  - {{name: writes, key: ip, algorithm: fixed_window, limit: 1, window: 1h,
     match: {{methods: [POST], path_prefix: /api/}}}}
routes:
  - name: nginx
    kind: decide
    match: {{path: /_auth}}
    limits: [per_ip, writes]
    decide: {{source: nginx, deny_status: 403}}
  - name: envoy
    kind: decide
    match: {{path_prefix: /authz}}
    limits: [writes]
    decide: {{source: envoy, strip_prefix: true}}
"""

LISTENER = """
listen: {listen}
admin: {{listen: "{admin}"}}
mode: decide
decide: {{source: nginx, deny_status: 403}}
clients: {{trusted_proxies: [127.0.0.1/32]}}
limits:
  - {{name: api, key: "header:X-API-Key | ip", algorithm: gcra, limit: 1, window: 1h}}
routes:
  - {{name: api, match: {{path_prefix: /api/}}, limits: [api]}}
"""


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def sluice(tmp_path: Path) -> AsyncIterator[Sluice]:
    async with running(write_rules(tmp_path, RULES)) as s:
        yield s


def nginx_headers(uri: str, client_ip: str, method: str = "GET") -> dict[str, str]:
    return {"X-Original-URI": uri, "X-Original-Method": method, "X-Forwarded-For": client_ip}


async def test_nginx_auth_request_allows_then_denies_with_403(
    sluice: Sluice, client: aiohttp.ClientSession
) -> None:
    url = sluice.url + "/_auth"
    for remaining in ("1", "0"):
        async with client.get(url, headers=nginx_headers("/api/x?a=1", "203.0.113.7")) as r:
            assert r.status == 200
            assert r.headers["X-RateLimit-Remaining"] == remaining
    async with client.get(url, headers=nginx_headers("/api/x", "203.0.113.7")) as r:
        assert r.status == 403  # what auth_request understands as a denial
        assert int(r.headers["Retry-After"]) > 3000
        assert (await r.json())["error"] == "rate_limited"
    # another client behind the same NGINX (XFF believed: 127.0.0.1 is trusted)
    async with client.get(url, headers=nginx_headers("/api/x", "203.0.113.8")) as r:
        assert r.status == 200


async def test_rules_see_the_described_method_and_path(
    sluice: Sluice, client: aiohttp.ClientSession
) -> None:
    url = sluice.url + "/_auth"
    async with client.get(url, headers=nginx_headers("/api/x", "198.51.100.1", "POST")) as r:
        assert r.status == 200
    async with client.get(url, headers=nginx_headers("/api/y", "198.51.100.1", "POST")) as r:
        assert (r.status, (await r.json())["rule"]) == (403, "writes")
    async with client.get(url, headers=nginx_headers("/other", "198.51.100.1", "POST")) as r:
        assert r.status == 200  # `writes` matches /api/ only


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "missing X-Original-URI"),
        ({"X-Original-URI": "api/x"}, "must be an absolute path"),
        ({"X-Original-URI": "http://evil/x"}, "must be an absolute path"),
        ({"X-Original-URI": "/a b"}, "spaces or control characters"),
        ({"X-Original-URI": "/a", "X-Original-Method": "G E T"}, "not an HTTP method"),
    ],
)
async def test_bad_descriptions_are_400(
    sluice: Sluice, client: aiohttp.ClientSession, headers: dict[str, str], message: str
) -> None:
    async with client.get(sluice.url + "/_auth", headers=headers) as r:
        assert r.status == 400
        body = await r.json()
        assert body["error"] == "bad_decision_request"
        assert message in body["message"]


async def test_envoy_ext_authz_shape(sluice: Sluice, client: aiohttp.ClientSession) -> None:
    """Envoy sends the original method and path (after its path_prefix) and headers."""
    envoy = {
        "x-forwarded-for": "192.0.2.44",
        "x-envoy-expected-rq-timeout-ms": "200",
        "x-request-id": "abc",
        "x-envoy-internal": "true",
    }
    async with client.post(sluice.url + "/authz/api/orders", headers=envoy) as r:
        assert r.status == 200
    async with client.post(sluice.url + "/authz/api/orders", headers=envoy) as r:
        assert r.status == 429
        assert "Retry-After" in r.headers
        assert (await r.json())["rule"] == "writes"
    async with client.post(sluice.url + "/authz/elsewhere", headers=envoy) as r:
        assert r.status == 200  # stripped path /elsewhere: `writes` does not apply


async def test_listener_wide_decide_mode(tmp_path: Path, client: aiohttp.ClientSession) -> None:
    async with running(write_rules(tmp_path, LISTENER)) as s:
        h = {**nginx_headers("/api/a", "192.0.2.1"), "X-API-Key": "k"}
        async with client.get(s.url + "/anything", headers=h) as r:
            assert r.status == 200
        async with client.get(s.url + "/anything", headers=h) as r:
            assert r.status == 403  # decide.deny_status: what NGINX auth_request understands
            assert "Retry-After" in r.headers
        async with client.get(s.url + "/", headers=nginx_headers("/public", "192.0.2.1")) as r:
            assert r.status == 200  # no route: nothing limits it
        async with client.get(s.url + "/", headers={"X-Original-URI": "relative"}) as r:
            assert r.status == 400
        async with client.get(s.url + "/api/a") as r:  # source nginx: the header is required
            assert r.status == 400
