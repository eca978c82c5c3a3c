"""The links API on the admin listener through real HTTP, on both link stores."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from openapi_spec_validator import validate

from proxy.admin import make_admin_app
from proxy.openapi import document
from tests.inproc import Sluice, write_rules
from tests.linkkit import (
    READ_AUTH,
    READER,
    WRITE_AUTH,
    WRITER,
    Client,
    Storage,
    client_for,
    rules_file,
    sluice_on,
    storage_for,
)
from tests.proc import Processes, SluiceProcess, metric_sum
from tests.servers import free_port


@pytest.fixture(params=["sqlite", "redis"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    return storage_for(request, tmp_path)


@pytest.fixture
async def sluice(tmp_path: Path, storage: Storage) -> AsyncIterator[Sluice]:
    async with sluice_on(tmp_path / "a", storage) as s:
        yield s


@pytest.fixture
async def client(sluice: Sluice) -> AsyncIterator[Client]:
    async with client_for(sluice) as c:
        yield c


async def test_create_list_show_patch_delete(client: Client) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    client.sluice.runtime.events.append(lambda kind, data: events.append((kind, data)))
    reply = await client.api("POST", "/api/links", {"url": "HTTPS://Example.COM:443/a b"})
    assert reply.status == 201
    link = reply.json()
    code = link["code"]
    assert link["url"] == "https://example.com/a%20b" and link["created_by"] == "writer"
    assert link["path"] == f"/s/{code}" and reply.headers["Location"] == f"/api/links/{code}"
    # the same caller and URL again: the existing link (dedupe), unless asked otherwise
    again = await client.api("POST", "/api/links", {"url": "https://example.com/a%20b"})
    assert (again.status, again.json()["code"]) == (200, code)
    fresh = await client.api("POST", "/api/links?dedupe=false", {"url": "https://example.com/a b"})
    assert fresh.status == 201 and fresh.json()["code"] != code
    custom = await client.create(url="https://example.com/c", code="my-code", tags=["Promo"])
    assert custom["tags"] == ["promo"]
    taken = await client.api(
        "POST", "/api/links", {"url": "https://other.example/", "code": "my-code"}
    )
    assert taken.status == 409
    assert taken.json() == {
        "error": "code_taken",
        "message": "the code 'my-code' is already taken",
        "code": "my-code",
    }
    same = await client.api(
        "POST", "/api/links", {"url": "https://example.com/c", "code": "my-code"}
    )
    assert same.status == 200  # a retried identical request is not an error

    page1 = (await client.api("GET", "/api/links?limit=2", auth=READ_AUTH)).json()
    assert [x["code"] for x in page1["links"]] == ["my-code", fresh.json()["code"]]
    page2 = (await client.api("GET", f"/api/links?limit=2&cursor={page1['next_cursor']}")).json()
    assert [x["code"] for x in page2["links"]] == [code] and page2["next_cursor"] is None
    tagged = (await client.api("GET", "/api/links?tag=promo")).json()["links"]
    assert [x["code"] for x in tagged] == ["my-code"]

    assert (await client.follow(code)).headers["Location"] == "https://example.com/a%20b"
    await client.drain()  # an uncapped link's click is counted off the request path
    shown = (await client.api("GET", f"/api/links/{code}", auth=READ_AUTH)).json()
    assert shown["clicks"] == 1 and shown["url"] == link["url"]
    patched = await client.api(
        "PATCH", f"/api/links/{code}", {"url": "https://example.com/new", "status": 308}
    )
    assert patched.status == 200 and patched.json()["status"] == 308
    moved = await client.follow(code)  # this worker's cache was invalidated at once
    assert (moved.status, moved.headers["Location"]) == (308, "https://example.com/new")

    assert (await client.api("DELETE", f"/api/links/{code}")).status == 204
    assert (await client.follow(code)).status == 404
    missing = await client.api("DELETE", f"/api/links/{code}")
    assert missing.status == 404 and missing.json()["error"] == "not_found"
    assert (await client.api("GET", f"/api/links/{code}")).status == 404
    assert (await client.api("PATCH", f"/api/links/{code}", {"max_clicks": 3})).status == 404

    kinds = [kind for kind, _ in events]
    assert kinds == ["link.created"] * 3 + ["redirect.followed"] * 2 + ["link.deleted"]
    assert events[-1][1] == {"code": code, "deleted_by": "writer"}
    text = (await client.call("GET", client.sluice.admin_url + "/metrics")).text
    assert metric_sum(text, "sluice_links_created_total") == 3


async def test_a_cached_miss_does_not_hide_a_new_code(client: Client) -> None:
    assert (await client.follow("later-code")).status == 404  # cached as "no such link"
    await client.create(url="https://example.com/later", code="later-code")
    assert (await client.follow("later-code")).status == 302


async def test_auth(client: Client) -> None:
    for auth in (
        {},
        {"Authorization": "Bearer wrong-token-0123456789"},
        {"Authorization": "Basic x"},
    ):
        reply = await client.api("GET", "/api/links", auth=auth)
        assert reply.status == 401
        assert reply.headers["WWW-Authenticate"] == 'Bearer realm="sluice"'
        assert reply.json()["error"] == "unauthorized"
    assert (await client.api("GET", "/api/links", auth=READ_AUTH)).status == 200
    for method, path, body in (
        ("POST", "/api/links", {"url": "https://example.com/"}),
        ("PATCH", "/api/links/abc", {"max_clicks": 1}),
        ("DELETE", "/api/links/abc", None),
        ("POST", "/api/links:import", None),
    ):
        reply = await client.api(method, path, body, auth=READ_AUTH)
        assert reply.status == 403, (method, path)
        assert reply.json() == {"error": "forbidden", "message": "the token 'reader' is read-only"}
    assert (await client.api("GET", "/api/links:export", auth={})).status == 401
    # aiohttp's own answers under /api/ are JSON too
    unknown = await client.api("GET", "/api/nothing-here")
    assert unknown.status == 404 and unknown.json()["error"] == "not_found"
    wrong = await client.api("PUT", "/api/links")
    assert wrong.status == 405 and wrong.json()["error"] == "method_not_allowed"
    assert "GET" in wrong.headers["Allow"]


LONG = "https://example.com/" + "x" * 2100

REFUSALS: list[tuple[Any, int, str]] = [
    ({}, 400, "url is required"),
    ({"url": ""}, 400, "non-empty string"),
    ({"url": "ftp://example.com/"}, 400, "only absolute http:// and https:// URLs"),
    ({"url": "/relative"}, 400, "got a relative URL"),
    ({"url": "https://user:pw@example.com/"}, 400, "must not carry credentials"),
    ({"url": "https://exa mple.com/"}, 400, "destination host is invalid"),
    ({"url": "https://example.com:99999/"}, 400, "is not a port number"),
    ({"url": LONG}, 400, "the limit is 2048"),
    ({"url": "https://blocked.example/x"}, 403, "refused by the operator"),
    ({"url": "https://example.com/", "code": "ab"}, 400, "3 to 64 characters"),
    ({"url": "https://example.com/", "code": "a b c"}, 400, "letters, digits"),
    ({"url": "https://example.com/", "code": "Admin"}, 400, "is reserved"),
    ({"url": "https://example.com/", "code": "top"}, 400, "is reserved"),
    ({"url": "https://example.com/", "code": "abcdefg"}, 400, "must contain '-' or '_'"),
    ({"url": "https://example.com/", "code": 5}, 400, "code must be a string"),
    ({"url": "https://example.com/", "status": 303}, 400, "status must be 301"),
    ({"url": "https://example.com/", "max_clicks": 0}, 400, "max_clicks must be a positive"),
    ({"url": "https://example.com/", "tags": ["Bad Tag"]}, 400, "tag 'bad tag'"),
    ({"url": "https://example.com/", "tags": [str(i) for i in range(17)]}, 400, "at most 16"),
    ({"url": "https://example.com/", "expires_at": 1000}, 400, "expires_at is in the past"),
    ({"url": "https://example.com/", "expires_in": "soon"}, 400, "expires_in"),
    ({"url": "https://e.com/", "expires_in": "1d", "expires_at": 9e9}, 400, "not both"),
    ({"variants": [{"url": "https://a.example/", "weight": 1}]}, 400, "2 to 10 items"),
    (
        {
            "variants": [
                {"url": "https://a.example/", "weight": 0},
                {"url": "https://b.example/", "weight": 1},
            ]
        },
        400,
        "variants[0].weight",
    ),
    ({"url": "https://example.com/", "colour": "red"}, 400, "unknown field(s): colour"),
    ([1, 2], 400, "must be a JSON object"),
]


async def test_every_validation_refusal_is_400_with_its_reason(client: Client) -> None:
    for body, status, reason in REFUSALS:
        reply = await client.api("POST", "/api/links", body)
        assert reply.status == status, (body, reply.text)
        answer = reply.json()
        assert set(answer) == {"error", "message"}
        assert reason in answer["message"], (reason, answer)
        assert answer["error"] == ("destination_refused" if status == 403 else "invalid")
    own = f"http://127.0.0.1:{client.sluice.config.listen.port}/s/abc"
    loop = await client.api("POST", "/api/links", {"url": own})
    assert loop.status == 400 and "loop" in loop.json()["message"]
    raw = await client.call(
        "POST", client.sluice.admin_url + "/api/links", data=b"{not json", headers=WRITE_AUTH
    )
    assert raw.status == 400 and raw.json()["error"] == "bad_json"
    huge = await client.api(
        "POST", "/api/links", {"url": "https://example.com/", "tags": ["x" * 70_000]}
    )
    assert huge.status == 413 and huge.json()["error"] == "too_large"
    link = await client.create(url="https://example.com/p")
    for changes, reason in (
        ({"code": "x-y"}, "cannot be changed: code"),
        ({"url": None}, "url cannot be removed"),
        ({"max_clicks": -1}, "max_clicks must be a positive"),
    ):
        reply = await client.api("PATCH", f"/api/links/{link['code']}", changes)
        assert reply.status == 400 and reason in reply.json()["message"]
    for path, reason in (
        ("/api/links?limit=0", "limit must be 1 to 1000"),
        ("/api/links?limit=x", "limit must be an integer"),
        ("/api/links?cursor=abc", "invalid cursor"),
        ("/api/links/top?window=1w", "window must be 1h or 1d"),
        (f"/api/links/{link['code']}/stats?since=2024-13-01", "YYYY-MM-DD"),
        (f"/api/links/{link['code']}/stats?since=2024-02-01&until=2024-01-01", "is after"),
    ):
        reply = await client.api("GET", path)
        assert reply.status == 400 and reason in reply.json()["message"], (path, reply.text)
    # nothing half-created: every refused request left no link behind
    listed = (await client.api("GET", "/api/links?limit=1000")).json()["links"]
    assert [x["code"] for x in listed] == [link["code"]]


async def test_stats_range_and_top(client: Client) -> None:
    link = await client.create(url="https://example.com/s")
    for _ in range(3):
        await client.follow(link["code"])
    await client.drain()
    today = time.strftime("%Y-%m-%d", time.gmtime())
    stats = (await client.api("GET", f"/api/links/{link['code']}/stats?since={today}")).json()
    assert stats["per_day"] == {today: 3} and stats["since"] == stats["until"] == today
    default = (await client.api("GET", f"/api/links/{link['code']}/stats")).json()
    assert len(default["per_day"]) == 30 and default["total"] == 3
    for window in ("1h", "1d"):
        top = (await client.api("GET", f"/api/links/top?window={window}", auth=READ_AUTH)).json()
        assert top["links"] == [{"code": link["code"], "clicks": 3}]
    assert (await client.api("GET", "/api/links/nope-nope/stats")).status == 404


async def test_export_then_import_into_an_empty_store(tmp_path: Path, storage: Storage) -> None:
    async with sluice_on(tmp_path / "src", storage) as s, client_for(s) as client:
        await client.create(url="https://example.com/1", tags=["a", "b"])
        await client.create(url="https://example.com/2", code="custom_2", status=301)
        await client.create(url="https://example.com/3", max_clicks=5, expires_in="7d")
        variants = [
            {"url": "https://a.example/", "weight": 3},
            {"url": "https://b.example/", "weight": 1},
        ]
        await client.create(variants=variants)
        bulk = "".join(  # more than one export batch of either store
            json.dumps({"code": f"bulk-{i}", "url": f"https://bulk.example/{i}", "created_at": i})
            + "\n"
            for i in range(600)
        )
        assert (await client.api("POST", "/api/links:import", data=bulk)).status == 200
        await client.create(url="https://example.com/last")
        exported = await client.api("GET", "/api/links:export", auth=READ_AUTH)
        assert exported.status == 200
        assert exported.headers["Content-Type"] == "application/x-ndjson"
        lines = exported.text.splitlines()
        assert len(lines) == 605
        assert json.loads(lines[0])["tags"] == ["a", "b"]  # in creation order
        assert json.loads(lines[-1])["url"] == "https://example.com/last"
        again = await client.api("POST", "/api/links:import", data=exported.text)
        assert again.json()["imported"] == 0 and len(again.json()["skipped"]) == 605
    async with sluice_on(tmp_path / "dst", storage.other()) as s, client_for(s) as client:
        assert (await client.api("GET", "/api/links")).json()["links"] == []
        bad = exported.text + '{"code": "bad-one", "url": "ftp://x"}\n{"code": 1}\n'
        refused = await client.api("POST", "/api/links:import", data=bad)
        assert refused.status == 400
        answer = refused.json()
        assert answer["message"].startswith("nothing imported: line 606:")
        assert len(answer["errors"]) == 2 and answer["errors"][1].startswith("line 607:")
        assert (await client.api("GET", "/api/links")).json()["links"] == []
        dup = await client.api("POST", "/api/links:import", data=lines[0] + "\n" + lines[0])
        assert dup.status == 400 and "also on line 1" in dup.json()["message"]
        imported = await client.api("POST", "/api/links:import", data=exported.text)
        assert imported.json() == {"imported": 605, "skipped": []}
        reexported = await client.api("GET", "/api/links:export")
        assert reexported.text == exported.text
        first = json.loads(lines[0])
        assert (await client.follow(first["code"])).headers["Location"] == first["url"]
        # new codes after an import never collide with imported ones
        fresh = await client.create(url="https://example.com/after-import")
        assert fresh["code"] not in exported.text


async def test_oversized_import_is_413(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy import api_links

    monkeypatch.setattr(api_links, "MAX_IMPORT_BODY", 1000)
    line = json.dumps({"code": "abc", "url": "https://example.com/", "created_at": 1.0})
    reply = await client.api("POST", "/api/links:import", data=(line + "\n") * 50)
    assert reply.status == 413 and reply.json()["error"] == "too_large"


async def test_openapi_document_matches_the_routes(client: Client) -> None:
    reply = await client.call("GET", client.sluice.admin_url + "/api/openapi.json")
    assert reply.status == 200
    doc = reply.json()
    validate(doc)  # a valid OpenAPI 3 document
    assert doc == json.loads(json.dumps(document()))
    app = make_admin_app(client.sluice.runtime)
    routes = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
        and route.resource.canonical.startswith("/api/")
        and route.method != "HEAD"
    }
    documented = {(method.upper(), path) for path, item in doc["paths"].items() for method in item}
    assert routes == documented
    assert len(routes) == 20  # 10 links routes, 8 webhook routes, 2 status routes
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            statuses = set(operation["responses"])
            if path != "/api/openapi.json":
                assert "401" in statuses, (method, path)
            if method in ("post", "patch", "delete"):
                assert "403" in statuses, (method, path)


async def test_links_off_without_a_redirects_section(tmp_path: Path) -> None:
    body = """
    listen: {listen}
    admin: {{listen: "{admin}", token: writer-token-0123456789}}
    """
    from tests.inproc import running

    async with running(write_rules(tmp_path, body)) as s, client_for(s) as client:
        reply = await client.api("GET", "/api/links")
        assert reply.status == 404 and reply.json()["error"] == "links_disabled"
        assert not (tmp_path / "var").exists()  # no store file was made


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_same_custom_code_from_two_workers(
    tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    """``serve --workers 2``: concurrent creations of one custom code → one 201, one 409."""
    storage = storage_for(_Param(kind, request), tmp_path)
    main, admin = free_port(), free_port()
    rules = rules_file(tmp_path, storage, listen=f"127.0.0.1:{main}", admin=f"127.0.0.1:{admin}")
    processes = Processes()
    proc = processes.add(SluiceProcess(rules, main, admin, tmp_path, workers=2))
    try:
        await asyncio.to_thread(proc.start)
        codes = [f"race-{i}" for i in range(20)]
        connector = aiohttp.TCPConnector(force_close=True)  # new connections: both workers
        async with aiohttp.ClientSession(connector=connector) as session:

            async def post(code: str, n: int) -> int:
                body = {"url": f"https://example.com/{code}/{n}", "code": code}
                async with session.post(
                    proc.admin_url("/api/links"), json=body, headers=WRITE_AUTH
                ) as r:
                    return r.status

            results = await asyncio.gather(*(post(c, n) for c in codes for n in (1, 2)))
            for i, code in enumerate(codes):
                assert sorted(results[2 * i : 2 * i + 2]) == [201, 409], code
            async with session.get(proc.admin_url("/api/links?limit=100"), headers=WRITE_AUTH) as r:
                listed = (await r.json())["links"]
            assert sorted(x["code"] for x in listed) == sorted(codes)
            async with session.get(proc.admin_url("/metrics")) as r:
                text = await r.text()
            assert metric_sum(text, "sluice_links_created_total") == 20  # both workers added up
            assert len(created_per_worker(proc)) == 2  # the race really spanned both workers
    finally:
        await asyncio.to_thread(processes.stop_all)


def created_per_worker(proc: SluiceProcess) -> dict[str, float]:
    """Links created per worker PID, from the workers' prometheus multiprocess files."""
    from prometheus_client.mmap_dict import MmapedDict

    out = {}
    for directory in proc.metrics_dirs():
        for path in directory.glob("counter_*.db"):
            values = MmapedDict(str(path))
            try:
                n = sum(v for k, v, *_ in values.read_all_values() if "links_created" in k)
            finally:
                values.close()
            if n:
                out[path.stem] = n
    return out


class _Param:
    """``storage_for`` takes a parametrised request; this one names the kind directly."""

    def __init__(self, param: str, request: pytest.FixtureRequest) -> None:
        self.param = param
        self._request = request

    def getfixturevalue(self, name: str) -> Any:
        return self._request.getfixturevalue(name)


async def test_every_token_is_compared_whichever_matches(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Constant time: ``hmac.compare_digest`` against every configured token, no early exit."""
    import hmac

    from proxy import adminauth

    compared: list[bytes] = []
    original = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return original(a, b)

    monkeypatch.setattr(adminauth.hmac, "compare_digest", counting)
    for auth in (WRITE_AUTH, READ_AUTH, {"Authorization": "Bearer nobody-0123456789abcdef"}):
        compared.clear()
        await client.api("GET", "/api/links", auth=auth)
        assert compared == [WRITER.encode(), READER.encode()]
