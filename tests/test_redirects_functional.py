"""Short-code redirects through real HTTP, on both link stores (SQLite file, real Redis).

The upstream of every Sluice here is down: redirects never need it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.clicks import Click
from proxy.config import MissLimit, RedirectsConfig, load, loads
from proxy.errors import ConfigError
from proxy.links.analytics import day_of
from proxy.missguard import MissGuard
from proxy.redirects import append_query, host_matches, prefers_html, redirect_code
from proxy.runtime import Runtime
from proxy.worker import StartError, start_listeners
from tests.inproc import Sluice
from tests.linkkit import SECRET, Client, Storage, client_for, rules_file, sluice_on, storage_for
from tests.proc import metric_sum

BROWSER = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0"
HTML = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


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


async def metrics_text(client: Client) -> str:
    return (await client.call("GET", client.sluice.admin_url + "/metrics")).text


async def test_status_per_link_location_and_cache_control(client: Client) -> None:
    default = await client.create(url="https://example.com/a")
    codes = {s: (await client.create(url=f"https://example.com/{s}", status=s))["code"] for s in
             (301, 302, 307, 308)}  # fmt: skip
    reply = await client.follow(default["code"])
    assert reply.status == 302  # redirects.status
    assert reply.headers["Location"] == "https://example.com/a"
    assert reply.headers["Cache-Control"] == "private, max-age=0"
    assert reply.text == ""
    for status, code in codes.items():
        reply = await client.follow(code)
        assert reply.status == status
        assert reply.headers["Location"] == f"https://example.com/{status}"
        permanent = status in (301, 308)
        expected = "public, max-age=86400" if permanent else "private, max-age=0"
        assert reply.headers["Cache-Control"] == expected
    head = await client.follow(codes[308], method="HEAD")
    assert (head.status, head.headers["Location"], head.text) == (
        308,
        "https://example.com/308",
        "",
    )
    capped = await client.create(url="https://example.com/c", status=301, max_clicks=9)
    assert (await client.follow(capped["code"])).headers["Cache-Control"] == "no-store"
    soon = await client.create(url="https://example.com/e", status=308, expires_in=90)
    max_age = (await client.follow(soon["code"])).headers["Cache-Control"]
    assert max_age in ("public, max-age=89", "public, max-age=90")
    # the upstream is down: proxied paths fail, redirects did not care
    assert (await client.call("GET", client.sluice.url + "/anything")).status == 502
    text = await metrics_text(client)
    assert metric_sum(text, "sluice_redirects_total", status="308") == 3
    assert metric_sum(text, "sluice_requests_total", route="redirects") == 8


async def test_unknown_code_is_404_html_for_browsers_json_for_apis(client: Client) -> None:
    reply = await client.follow("no-such-code", headers={"Accept": HTML})
    assert reply.status == 404
    assert reply.headers["Content-Type"].startswith("text/html")
    assert "Link not found" in reply.text and "no-such-code" in reply.text
    for accept in (None, "*/*", "application/json", "text/html;q=0.5, application/json"):
        reply = await client.follow("no-such-code", headers={"Accept": accept} if accept else {})
        assert reply.status == 404
        assert reply.headers["Content-Type"].startswith("application/json")
        assert reply.json()["error"] == "not_found"
    assert (await client.follow("bad!code")).json()["error"] == "not_found"
    assert (await client.follow("")).status == 404


async def test_expired_and_over_cap_are_410(client: Client) -> None:
    now = time.time()
    old = {"code": "old-one", "url": "https://example.com/old"}
    line = json.dumps({**old, "created_at": now - 100, "expires_at": now - 1})
    reply = await client.api("POST", "/api/links:import", data=line)
    assert reply.json() == {"imported": 1, "skipped": []}
    gone = await client.follow("old-one", headers={"Accept": HTML})
    assert gone.status == 410 and "expired" in gone.text
    assert (await client.follow("old-one")).json()["error"] == "expired"
    assert (await client.follow("old-one", method="HEAD")).status == 410

    once = await client.create(url="https://example.com/once", max_clicks=1)
    assert (await client.follow(once["code"], method="HEAD")).status == 302  # HEAD counts nothing
    assert (await client.follow(once["code"])).status == 302
    over = await client.follow(once["code"])
    assert over.status == 410 and over.json()["error"] == "click_limit_reached"
    assert (await client.follow(once["code"], method="HEAD")).status == 410


async def test_click_cap_is_exact_under_concurrency(client: Client) -> None:
    link = await client.create(url="https://example.com/cap", max_clicks=7)
    replies = await asyncio.gather(*(client.follow(link["code"]) for _ in range(60)))
    statuses = sorted(r.status for r in replies)
    assert statuses == [302] * 7 + [410] * 53
    await client.drain()
    stats = (await client.api("GET", f"/api/links/{link['code']}/stats")).json()
    assert stats["clicks"] == 7 and stats["total"] == 7


async def test_query_passthrough(tmp_path: Path, storage: Storage) -> None:
    extra = "  query_passthrough: true"
    async with sluice_on(tmp_path / "q", storage, extra=extra) as s, client_for(s) as client:
        plain = await client.create(url="https://example.com/p")
        fragment = await client.create(url="https://example.com/p?a=1#top")
        reply = await client.follow(plain["code"] + "?utm_source=mail&x=%20y")
        assert reply.headers["Location"] == "https://example.com/p?utm_source=mail&x=%20y"
        reply = await client.follow(fragment["code"] + "?utm=1")
        assert reply.headers["Location"] == "https://example.com/p?a=1&utm=1#top"
        assert (await client.follow(plain["code"])).headers["Location"] == "https://example.com/p"
    async with sluice_on(tmp_path / "n", storage) as s, client_for(s) as client:
        reply = await client.follow(plain["code"] + "?utm=1")  # off by default
        assert reply.headers["Location"] == "https://example.com/p"


async def test_storage_cost_per_redirect(client: Client) -> None:
    """A cached link without a cap costs no store call; a capped one exactly one."""
    links = client.sluice.runtime.links
    assert links is not None
    free = await client.create(url="https://example.com/free")
    capped = await client.create(url="https://example.com/capped", max_clicks=1000)
    await client.follow(free["code"])
    await client.follow(capped["code"])
    await client.drain()
    before = dict(links.calls)
    for _ in range(10):
        assert (await client.follow(free["code"])).status == 302
    path_ops = ("get", "take_click", "click_count")
    assert {op: links.calls[op] - before.get(op, 0) for op in path_ops} == dict.fromkeys(
        path_ops, 0
    )
    for _ in range(10):
        assert (await client.follow(capped["code"])).status == 302
    assert links.calls["take_click"] - before.get("take_click", 0) == 10
    assert links.calls["get"] == before["get"]
    await client.drain()  # the uncapped clicks are counted off the request path
    shown = (await client.api("GET", f"/api/links/{free['code']}")).json()
    assert shown["clicks"] == 11
    text = await metrics_text(client)
    assert metric_sum(text, "sluice_link_cache_total", result="hit") == 20
    assert metric_sum(text, "sluice_link_cache_total", result="miss") == 2
    assert metric_sum(text, "sluice_link_store_latency_seconds_count", op="take_click") == 11


async def test_enumeration_is_limited(tmp_path: Path, storage: Storage) -> None:
    async with sluice_on(tmp_path / "m", storage, miss_limit=5) as s, client_for(s) as client:
        live = await client.create(url="https://example.com/live")
        scanner = {"X-Forwarded-For": "203.0.113.7"}
        for name in ("favicon.ico", "robots.txt"):  # browsers ask for these: never charged
            assert (await client.follow(name, headers=scanner)).status == 404
        for i in range(5):
            assert (await client.follow(f"guess-{i}", headers=scanner)).status == 404
        refused = await client.follow("guess-5", headers=scanner)
        assert refused.status == 429
        body = refused.json()
        assert body["error"] == "rate_limited" and body["rule"] == "miss_limit"
        assert int(refused.headers["Retry-After"]) == body["retry_after"] > 600
        # a live code answers the same while blocked: hits cannot be told from misses
        assert (await client.follow(live["code"], headers=scanner)).status == 429
        # another client is unaffected
        other = await client.follow(live["code"], headers={"X-Forwarded-For": "198.51.100.1"})
        assert other.status == 302


async def test_redirect_rate_limits(tmp_path: Path, storage: Storage) -> None:
    async with sluice_on(tmp_path / "r", storage, redirect_limit=3) as s, client_for(s) as client:
        link = await client.create(url="https://example.com/limited")
        first = await client.follow(link["code"])
        assert first.status == 302 and first.headers["X-RateLimit-Remaining"] == "2"
        for _ in range(2):
            assert (await client.follow(link["code"])).status == 302
        denied = await client.follow(link["code"])
        assert denied.status == 429
        assert denied.json()["rule"] == "per_ip_redirects"
        text = await metrics_text(client)
        assert metric_sum(text, "sluice_ratelimit_decisions_total", rule="per_ip_redirects") == 4


async def test_other_methods_are_405(client: Client) -> None:
    link = await client.create(url="https://example.com/m")
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
        reply = await client.follow(link["code"], method=method)
        assert reply.status == 405
        assert reply.headers["Allow"] == "GET, HEAD"
        assert reply.json()["error"] == "method_not_allowed"


async def test_ab_variants_are_sticky_by_cookie(client: Client) -> None:
    variants = [
        {"url": "https://a.example/", "weight": 1},
        {"url": "https://b.example/", "weight": 1},
    ]
    link = await client.create(variants=variants)
    code = link["code"]
    seen = set()
    for _ in range(40):  # fresh visitors: both variants are drawn (p of one only: 2^-39)
        reply = await client.follow(code)
        seen.add(reply.headers["Location"])
        cookie = reply.headers["Set-Cookie"]
        assert cookie.startswith("sluice_ab=") and f"Path=/s/{code}" in cookie
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert seen == {"https://a.example/", "https://b.example/"}
    first = await client.follow(code)
    key = first.headers["Set-Cookie"].split(";", 1)[0].split("=", 1)[1]
    for _ in range(20):
        again = await client.follow(code, headers={"Cookie": f"sluice_ab={key}"})
        assert again.headers["Location"] == first.headers["Location"]
    await client.drain()
    stats = (await client.api("GET", f"/api/links/{code}/stats")).json()
    assert sum(stats["variants"].values()) == 61 and set(stats["variants"]) == {"0", "1"}


async def test_analytics_and_events(client: Client) -> None:
    runtime = client.sluice.runtime
    events: list[tuple[str, dict[str, Any]]] = []
    runtime.events.append(lambda kind, data: events.append((kind, data)))
    link = await client.create(url="https://example.com/stats")
    code = link["code"]
    visitors = [
        ("198.51.100.1", BROWSER),
        ("198.51.100.2", "curl/8.5.0"),
        ("198.51.100.1", BROWSER),
    ]
    for ip, agent in visitors:
        headers = {
            "X-Forwarded-For": ip,
            "User-Agent": agent,
            "Referer": "https://News.Example.org/item?id=1",
        }
        assert (await client.follow(code, headers=headers)).status == 302
    await client.follow(code, method="HEAD")  # neither counted nor emitted
    await client.drain()
    stats = (await client.api("GET", f"/api/links/{code}/stats")).json()
    today = day_of(time.time())
    assert stats["until"] == today and stats["per_day"][today] == 3
    assert stats["clicks"] == 3 and stats["total"] == 3
    assert stats["referrers"] == [{"host": "news.example.org", "clicks": 3}]
    assert stats["ua_families"]["browser"] == 2 and stats["ua_families"]["cli"] == 1
    assert stats["unique_visitors"] == 2
    followed = [data for kind, data in events if kind == "redirect.followed"]
    assert len(followed) == 3
    assert followed[0] == {
        "code": code,
        "variant": None,
        "referrer_host": "news.example.org",
        "ua_family": "browser",
        "client": followed[0]["client"],
    }
    assert followed[0]["client"] == followed[2]["client"] != followed[1]["client"]
    assert "198.51.100" not in repr(events)  # never the raw address
    assert [kind for kind, _ in events].count("link.created") == 1
    top = (await client.api("GET", "/api/links/top?window=1h")).json()
    assert top == {"window": "1h", "links": [{"code": code, "clicks": 3}]}


async def test_full_analytics_queue_drops_and_counts(tmp_path: Path, storage: Storage) -> None:
    extra = "  analytics_queue: 1"
    async with sluice_on(tmp_path / "d", storage, extra=extra) as s, client_for(s) as client:
        link = await client.create(url="https://example.com/busy")
        replies = await asyncio.gather(*(client.follow(link["code"]) for _ in range(30)))
        assert all(r.status == 302 for r in replies)  # the answers never wait for analytics
        await client.drain()
        links = s.runtime.links
        assert links is not None
        recorder = links.recorder
        assert recorder.recorded + recorder.dropped == 30  # every click accounted for
        # deterministically: a second click offered before the task ran is dropped
        click = Click(link["code"], time.time(), "(direct)", "cli", None, "v", count=True)
        assert links.record(click) is True and links.record(click) is False
        await client.drain()
        text = await metrics_text(client)
        assert metric_sum(text, "sluice_link_analytics_dropped_total") == recorder.dropped
        stats = (await client.api("GET", f"/api/links/{link['code']}/stats")).json()
        assert stats["total"] == recorder.recorded


async def test_restart_keeps_every_link(tmp_path: Path, storage: Storage) -> None:
    made: list[dict[str, Any]] = []
    async with sluice_on(tmp_path / "one", storage) as s, client_for(s) as client:
        for i in range(5):
            made.append(await client.create(url=f"https://example.com/{i}", tags=["keep"]))
        made.append(await client.create(url="https://example.com/c", code="custom-one"))
        made.append(await client.create(url="https://example.com/cap", max_clicks=2))
        assert (await client.follow(made[-1]["code"])).status == 302
    async with sluice_on(tmp_path / "two", storage) as s, client_for(s) as client:
        for link in made:
            reply = await client.follow(link["code"])
            assert (reply.status, reply.headers["Location"]) == (302, link["url"])
        assert (await client.follow(made[-1]["code"])).status == 410  # its count survived too
        listed = (await client.api("GET", "/api/links?limit=100")).json()["links"]
        assert {x["code"] for x in listed} == {x["code"] for x in made}
        assert len((await client.api("GET", "/api/links?tag=keep")).json()["links"]) == 5


async def test_host_based_redirects(tmp_path: Path, storage: Storage) -> None:
    """``redirects.host`` without a prefix: every path on that host is a code."""
    extra = "  host: Go.Example"
    async with (
        sluice_on(tmp_path / "h", storage, extra=extra, prefix=None) as s,
        client_for(s) as client,
    ):
        link = await client.create(url="https://example.com/h", code="promo")
        assert link["path"] == "/promo"
        reply = await client.call("GET", f"{s.url}/promo", headers={"Host": "go.example:8080"})
        assert (reply.status, reply.headers["Location"]) == (302, "https://example.com/h")
        other = await client.call("GET", f"{s.url}/promo", headers={"Host": "api.example"})
        assert other.status == 502  # not the redirect host: routed to the (down) upstream
        loop = await client.api("POST", "/api/links", {"url": "https://go.example/anything"})
        assert loop.status == 400 and "loop" in loop.json()["message"]


async def test_store_down_answers_503(tmp_path: Path) -> None:
    from tests.servers import free_port

    dead = Storage("redis", f"redis://127.0.0.1:{free_port()}/0", tmp_path / "data")
    async with sluice_on(tmp_path / "x", dead) as s, client_for(s) as client:
        reply = await client.follow("anything")
        assert reply.status == 503 and reply.json()["error"] == "links_unavailable"
        api = await client.api("GET", "/api/links")
        assert api.status == 503 and api.json()["error"] == "links_unavailable"
        ready = (await client.call("GET", s.admin_url + "/readyz")).json()
        assert ready["links"]["state"] == "unavailable"


async def test_reload_applies_a_new_miss_limit(tmp_path: Path, storage: Storage) -> None:
    async with sluice_on(tmp_path / "l", storage, miss_limit=1) as s, client_for(s) as client:
        assert (await client.follow("nope-1")).status == 404
        assert (await client.follow("nope-2")).status == 429
        rules_file(tmp_path / "l", storage, miss_limit=50, listen=str(s.config.listen),
                   admin=str(s.config.admin.listen))  # fmt: skip
        assert s.runtime.reload() and s.config.redirects is not None
        assert s.config.redirects.miss_limit == MissLimit(50, 3600.0)
        assert (await client.follow("nope-3")).status == 404  # a fresh guard, new budget


# -- the pure parts of the redirect path ------------------------------------------------


def test_content_negotiation() -> None:
    assert prefers_html(HTML)
    assert prefers_html("text/html")
    assert not prefers_html(None) and not prefers_html("*/*")
    assert not prefers_html("application/json, text/html;q=0.9")
    assert prefers_html("application/json;q=0.5, text/html")
    assert not prefers_html("text/html;q=0")
    assert not prefers_html("text/html;q=x")


def test_append_query() -> None:
    assert append_query("https://e.com/", "a=1") == "https://e.com/?a=1"
    assert append_query("https://e.com/?x=1", "a=1") == "https://e.com/?x=1&a=1"
    assert append_query("https://e.com/?", "a=1") == "https://e.com/?a=1"
    assert append_query("https://e.com/p#f", "a=1") == "https://e.com/p?a=1#f"
    assert append_query("https://e.com/", "q=a b&é") == "https://e.com/?q=a%20b&%C3%A9"


def test_redirect_code_and_host() -> None:
    prefixed = RedirectsConfig(prefix="/s/")
    assert redirect_code(prefixed, "any.host", "/s/abc") == "abc"
    assert redirect_code(prefixed, "any.host", "/s") is None
    assert redirect_code(prefixed, "any.host", "/api/x") is None
    hosted = RedirectsConfig(prefix=None, host="go.example")
    assert redirect_code(hosted, "GO.example:8443", "/abc") == "abc"
    assert redirect_code(hosted, "go.example.", "/abc") == "abc"
    assert redirect_code(hosted, "other.example", "/abc") is None
    assert host_matches("go.example:8080", "go.example:8080")
    assert not host_matches("go.example:8080", "go.example:9090")
    assert not host_matches("go.example:8080", "go.example")


def test_miss_guard_refills_with_its_clock() -> None:
    now = [0.0]
    guard = MissGuard(3, 60.0, clock=lambda: now[0], max_clients=2)
    for _ in range(3):
        assert guard.blocked("a") == 0.0
        guard.miss("a")
    assert guard.blocked("a") == pytest.approx(20.0)  # one token per 20 s
    now[0] = 19.0
    assert guard.blocked("a") == pytest.approx(1.0)
    now[0] = 20.0
    assert guard.blocked("a") == 0.0 and guard.blocked("b") == 0.0
    guard.miss("b")
    guard.miss("c")  # over max_clients: the least recently charged full-or-oldest go
    assert len(guard) <= 2


def test_redirect_config_errors() -> None:
    with pytest.raises(ConfigError) as caught:
        loads(
            "redirects:\n"
            "  host: 'bad host'\n"
            "  miss_limit: {limit: 0, windw: 1m}\n"
            "  analytics_queue: 0\n"
            "  cache_ttl: soon\n",
            "rules.yaml",
        )
    assert str(caught.value).splitlines() == [
        "rules.yaml:2: redirects.host: 'bad host' is not a valid host name",
        "rules.yaml:3: redirects.miss_limit.limit: must be at least 1, got 0",
        "rules.yaml:3: redirects.miss_limit.windw: unknown key (did you mean 'window'?)",
        "rules.yaml:4: redirects.analytics_queue: must be at least 1, got 0",
        "rules.yaml:5: redirects.cache_ttl: " + caught.value.problems[-1].message,
    ]
    assert loads("redirects: {miss_limit: false}\n").redirects == RedirectsConfig(miss_limit=None)


async def test_a_changed_code_secret_stops_the_start(tmp_path: Path, storage: Storage) -> None:
    async with sluice_on(tmp_path / "s1", storage) as s, client_for(s) as client:
        await client.create(url="https://example.com/kept")
    path = rules_file(tmp_path / "s2", storage)
    path.write_text(path.read_text().replace(SECRET, "another-secret-0123456789abcdef"))
    runtime = Runtime(load(path))
    try:
        with pytest.raises(StartError, match="code_secret differs"):
            await start_listeners(runtime, reuse_port=False)
    finally:
        await runtime.close()
