"""Rate limiting through real HTTP on the embedded (memory://) store."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.inproc import Sluice, running, write_rules
from tests.upstream import make_upstream

RULES = """
listen: {listen}
admin: {{listen: "{admin}"}}
clients: {{trusted_proxies: [10.0.0.0/8], on_missing_key: {missing}}}
upstreams:
  app: {{url: "http://127.0.0.1:{port}"}}
limits:
  - {{name: small, key: "header:X-Key | ip", algorithm: fixed_window, limit: 3, window: 1h}}
  - {{name: big, key: "header:X-Key | ip", algorithm: sliding_window_log, limit: 5, window: 1h}}
  - {{name: shadowed, key: ip, algorithm: fixed_window, limit: 1, window: 1h, shadow: true}}
  - {{name: weighted, key: "header:X-Key", algorithm: token_bucket, capacity: 10, refill: 1/h,
     cost: "header:X-Cost"}}
  - {{name: posts, key: ip, algorithm: gcra, limit: 2, window: 1h, match: {{methods: [POST]}}}}
routes:
  - {{name: two, match: {{path_prefix: /echo/two}}, upstream: app, limits: [small, big]}}
  - name: shadow
    match: {{path_prefix: /echo/shadow}}
    upstream: app
    limits: [shadowed]
  - {{name: cost, match: {{path_prefix: /echo/cost}}, upstream: app, limits: [weighted]}}
  - name: quiet
    match: {{path_prefix: /echo/quiet}}
    upstream: app
    limits: [small]
    rate_limit_headers: {{families: [ietf], on_allowed: false}}
  - {{name: posts, match: {{path_prefix: /echo/posts}}, upstream: app, limits: [posts]}}
  - {{name: open, match: {{path_prefix: /}}, upstream: app}}
"""

ServerFactory = Callable[..., Awaitable[TestServer]]


@pytest.fixture
async def upstream(aiohttp_server: ServerFactory) -> TestServer:
    return await aiohttp_server(make_upstream())


@pytest.fixture
async def sluice(tmp_path: Path, upstream: TestServer) -> AsyncIterator[Sluice]:
    async with running(write_rules(tmp_path, RULES, port=upstream.port, missing="anonymous")) as s:
        yield s


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def get(
    client: aiohttp.ClientSession, url: str, **kw: object
) -> tuple[int, dict[str, str], dict]:
    async with client.get(url, **kw) as r:  # type: ignore[arg-type]
        body = await r.json()
        return r.status, dict(r.headers), body


async def test_denial_is_429_with_body_and_headers(
    sluice: Sluice, client: aiohttp.ClientSession
) -> None:
    key = {"X-Key": "alice"}
    for i in range(3):
        status, headers, _ = await get(client, sluice.url + "/echo/two", headers=key)
        assert status == 200
        assert headers["X-RateLimit-Limit"] == "3"
        assert headers["X-RateLimit-Remaining"] == str(2 - i)
        assert headers["RateLimit-Policy"] == '"small";q=3;w=3600, "big";q=5;w=3600'
        assert headers["RateLimit"].startswith(f'"small";r={2 - i};t=')
    status, headers, body = await get(client, sluice.url + "/echo/two", headers=key)
    assert status == 429
    assert body == {"error": "rate_limited", "rule": "small", "retry_after": body["retry_after"]}
    assert 3590 <= body["retry_after"] <= 3600
    assert headers["Retry-After"] == str(body["retry_after"])
    assert headers["X-RateLimit-Remaining"] == "0"
    assert headers["Content-Type"].startswith("application/json")
    # another client is unaffected
    status, _, _ = await get(client, sluice.url + "/echo/two", headers={"X-Key": "bob"})
    assert status == 200


async def test_denied_rule_consumes_nothing_from_the_others(
    sluice: Sluice, client: aiohttp.ClientSession
) -> None:
    key = {"X-Key": "carol"}
    for _ in range(3):
        assert (await get(client, sluice.url + "/echo/two", headers=key))[0] == 200
    for _ in range(10):  # denied by `small`; `big` (5/h) must not be charged for these
        assert (await get(client, sluice.url + "/echo/two", headers=key))[0] == 429
    store = sluice.runtime.limiter.store
    big = [k for k in store.states if ":big:" in k]  # type: ignore[attr-defined]
    assert len(big) == 1
    state = store.states[big[0]][0]  # type: ignore[attr-defined]
    assert len(state.entries) == 3  # sliding log: exactly the three admitted requests


async def test_deny_cache_answers_without_storage(
    sluice: Sluice, client: aiohttp.ClientSession
) -> None:
    limiter = sluice.runtime.limiter
    key = {"X-Key": "dave"}
    for _ in range(4):
        await get(client, sluice.url + "/echo/two", headers=key)
    calls = limiter.storage_calls
    for _ in range(20):
        status, headers, _ = await get(client, sluice.url + "/echo/two", headers=key)
        assert status == 429
        assert int(headers["Retry-After"]) > 3500
    assert limiter.storage_calls == calls  # zero round trips for a known-over client
    async with client.get(sluice.admin_url + "/metrics") as r:
        text = await r.text()
    assert 'sluice_ratelimit_deny_cache_hits_total{rule="small"} 20.0' in text
    assert 'sluice_ratelimit_decisions_total{result="rejected",rule="small"} 21.0' in text


async def test_shadow_rule_never_rejects_but_is_counted(
    sluice: Sluice, client: aiohttp.ClientSession
) -> None:
    for _ in range(4):
        status, headers, _ = await get(client, sluice.url + "/echo/shadow")
        assert status == 200
        assert "X-RateLimit-Limit" not in headers  # shadow rules are not advertised
    async with client.get(sluice.admin_url + "/metrics") as r:
        text = await r.text()
    assert 'sluice_ratelimit_decisions_total{result="shadow_rejected",rule="shadowed"} 3.0' in text
    assert 'sluice_ratelimit_decisions_total{result="allowed",rule="shadowed"} 1.0' in text


async def test_cost_header(sluice: Sluice, client: aiohttp.ClientSession) -> None:
    url = sluice.url + "/echo/cost"
    status, headers, _ = await get(client, url, headers={"X-Key": "k", "X-Cost": "7"})
    assert (status, headers["X-RateLimit-Remaining"]) == (200, "3")
    status, _, body = await get(client, url, headers={"X-Key": "k", "X-Cost": "4"})
    assert (status, body["rule"]) == (429, "weighted")
    status, _, _ = await get(client, url, headers={"X-Key": "k", "X-Cost": "3"})
    assert status == 200
    for bad in ("0", "-1", "x", "1.5"):
        status, _, body = await get(client, url, headers={"X-Key": "k", "X-Cost": bad})
        assert (status, body["error"]) == (400, "bad_cost")


async def test_header_families_per_route(sluice: Sluice, client: aiohttp.ClientSession) -> None:
    status, headers, _ = await get(client, sluice.url + "/echo/quiet", headers={"X-Key": "q"})
    assert status == 200
    assert not any(h.lower().startswith(("x-ratelimit", "ratelimit")) for h in headers)
    for _ in range(3):
        await get(client, sluice.url + "/echo/quiet", headers={"X-Key": "q"})
    status, headers, _ = await get(client, sluice.url + "/echo/quiet", headers={"X-Key": "q"})
    assert status == 429
    assert "X-RateLimit-Limit" not in headers
    assert headers["RateLimit"].startswith('"small";r=0;t=')
    assert "Retry-After" in headers


async def test_rule_match_narrows_the_route(sluice: Sluice, client: aiohttp.ClientSession) -> None:
    for _ in range(5):
        assert (await get(client, sluice.url + "/echo/posts"))[0] == 200  # GET: rule skipped
    codes = []
    for _ in range(3):
        async with client.post(sluice.url + "/echo/posts") as r:
            codes.append(r.status)
    assert codes == [200, 200, 429]


@pytest.mark.parametrize(
    ("missing", "expected"), [("deny", 403), ("allow", 200), ("anonymous", 200)]
)
async def test_missing_identity_policy(
    tmp_path: Path, upstream: TestServer, client: aiohttp.ClientSession, missing: str, expected: int
) -> None:
    async with running(write_rules(tmp_path, RULES, port=upstream.port, missing=missing)) as s:
        status, _, body = await get(client, s.url + "/echo/cost")  # no X-Key header
        assert status == expected
        if missing == "deny":
            assert body["error"] == "client_not_identified"
