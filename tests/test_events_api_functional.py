"""The webhook admin routes, mounted on a real aiohttp app."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from proxy.events import api
from proxy.events.model import Event
from proxy.events.outbox_sqlite import SqliteOutbox
from proxy.events.service import Notifier
from tests.test_events_support import hook, notifications

NOTIFIER = web.AppKey("notifier", Notifier)
WRITE = {"X-Scope": "write"}
Client = TestClient[web.Request, web.Application]


def guard(request: web.Request, scope: str) -> None:
    """A stand-in for the admin app's bearer-token check."""
    have = request.headers.get("X-Scope")
    if have is None:
        raise web.HTTPUnauthorized()
    if scope == "write" and have != "write":
        raise web.HTTPForbidden()


@pytest.fixture
async def notifier(tmp_path: Path) -> AsyncIterator[Notifier]:
    settings = notifications(hook("http://127.0.0.1:9/hook", name="ops"))
    made = Notifier(settings, SqliteOutbox(tmp_path / "events.sqlite3"))
    yield made
    await made.close()


@pytest.fixture
async def client(aiohttp_client: AiohttpClient, notifier: Notifier) -> Client:
    app = web.Application()
    app[NOTIFIER] = notifier
    app.router.add_routes(api.routes(lambda r: r.app[NOTIFIER], guard))
    return await aiohttp_client(app)


async def bury(notifier: Notifier, n: int) -> list[str]:
    outbox, now = notifier.outbox, time.time()
    sent = [Event.create("link.deleted", {"code": f"c{i}"}, now) for i in range(n)]
    await outbox.append("ops", sent)
    for d in await outbox.claim_new("ops", "test", now, 30, n):
        await outbox.bury("ops", d, attempts=1, reason="HTTP 404", now=now)
    return [e.id for e in sent]


async def test_status_and_auth(client: Client) -> None:
    assert (await client.get("/api/webhooks")).status == 401
    reply = await client.get("/api/webhooks", headers={"X-Scope": "read"})
    assert reply.status == 200
    (status,) = (await reply.json())["webhooks"]
    assert status["name"] == "ops" and status["depth"] == 0 and status["disabled"] is False
    missing = await client.get("/api/webhooks/nope", headers=WRITE)
    assert missing.status == 404 and (await missing.json())["error"] == "unknown_webhook"
    readonly = await client.post("/api/webhooks/ops/dead:replay", headers={"X-Scope": "read"})
    assert readonly.status == 403


async def test_dead_letters_are_paged_and_replayed(client: Client, notifier: Notifier) -> None:
    ids = await bury(notifier, 5)
    url = "/api/webhooks/ops/dead"
    first = await (await client.get(url, params={"limit": "3"}, headers=WRITE)).json()
    assert [i["id"] for i in first["items"]] == ids[:3] and first["next"] == ids[2]
    assert first["items"][0]["reason"] == "HTTP 404"
    assert first["items"][0]["event"]["data"] == {"code": "c0"}
    rest = await (await client.get(url, params={"after": ids[2]}, headers=WRITE)).json()
    assert [i["id"] for i in rest["items"]] == ids[3:] and rest["next"] is None
    assert (await client.get(url, params={"limit": "0"}, headers=WRITE)).status == 400
    replay = await client.post(
        "/api/webhooks/ops/dead:replay", json={"ids": ids[:2]}, headers=WRITE
    )
    assert await replay.json() == {"replayed": 2}
    bad = await client.post("/api/webhooks/ops/dead:replay", json={"ids": "all"}, headers=WRITE)
    assert bad.status == 400
    everything = await client.post("/api/webhooks/ops/dead:replay", headers=WRITE)
    assert await everything.json() == {"replayed": 3}
    status = await (await client.get("/api/webhooks/ops", headers=WRITE)).json()
    assert status["dead_letters"] == 0 and status["depth"] == 5


async def test_disable_enable_and_ping(client: Client) -> None:
    off = await client.post(
        "/api/webhooks/ops/disable", json={"reason": "maintenance"}, headers=WRITE
    )
    body = await off.json()
    assert body["disabled"] is True and body["disabled_reason"] == "maintenance"
    on = await (await client.post("/api/webhooks/ops/enable", headers=WRITE)).json()
    assert on["disabled"] is False
    ping = await client.post("/api/webhooks/ops/ping", headers=WRITE)
    assert ping.status == 202 and (await ping.json())["id"].startswith("evt_")
    status = await (await client.get("/api/webhooks/ops", headers=WRITE)).json()
    assert status["depth"] == 1
