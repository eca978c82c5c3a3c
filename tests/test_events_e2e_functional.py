"""Events end to end: real requests through Sluice produce signed webhook deliveries."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.inproc import Sluice, running, write_rules
from tests.test_events_support import SECRET, Receiver

TOKEN = "an-admin-token-of-some-length"
RULES = """
listen: {listen}
admin: {{listen: "{admin}", token: {token}}}
storage: {{url: "memory://", data_dir: "{data}"}}
limits:
  - {{name: tight, key: "header:X-API-Key | ip", algorithm: fixed_window, limit: 1, window: 1h}}
routes:
  - {{name: api, kind: decide, match: {{path_prefix: /}}, limits: [tight]}}
redirects: {{prefix: /s/}}
notifications:
  aggregate: 300ms
  webhooks:
    - name: ops
      url: {hook}
      secret: {secret}
      events: ["*"]
      retry: [200ms, 200ms]
"""


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    yield r
    await r.stop()


@pytest.fixture
async def sluice(tmp_path: Path, receiver: Receiver) -> AsyncIterator[Sluice]:
    path = write_rules(
        tmp_path, RULES, token=TOKEN, data=tmp_path / "data", hook=receiver.url, secret=SECRET
    )
    async with running(path) as s:
        yield s


async def test_rejections_arrive_aggregated_signed_and_masked(
    sluice: Sluice, receiver: Receiver
) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(25):
            async with http.get(sluice.url + "/x", headers={"X-API-Key": "sk_live_9"}) as r:
                await r.read()
    rejected = lambda: [e for e in receiver.events() if e["type"] == "rate_limit.rejected"]  # noqa: E731
    await receiver.wait_for(lambda: sum(e["data"]["count"] for e in rejected()) == 24, 10)
    assert receiver.bad_signatures == 0  # every request verified with standardwebhooks
    for event in rejected():
        assert event["data"]["rule"] == "tight"
        assert "sk_live_9" not in str(event)  # API keys never leave in events
        assert event["data"]["client"].startswith("header:X-API-Key=#")
    assert len(rejected()) <= 3  # aggregated: not one webhook call per rejection


async def test_link_events_and_webhook_status(sluice: Sluice, receiver: Receiver) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(
            sluice.admin_url + "/api/links",
            json={"url": "https://example.com/a", "code": "promo"},
            headers=auth,
        ) as r:
            assert r.status == 201
        async with http.get(sluice.url + "/s/promo", allow_redirects=False) as r:
            assert r.status == 302
        await receiver.wait_for(
            lambda: {"link.created", "redirect.followed"} <= {e["type"] for e in receiver.events()}
        )
        async with http.get(sluice.admin_url + "/api/webhooks", headers=auth) as r:
            assert r.status == 200
            (status,) = (await r.json())["webhooks"]
        assert status["name"] == "ops" and status["last_success"] is not None
        async with http.get(sluice.admin_url + "/api/webhooks") as r:
            assert r.status == 401
        async with http.get(sluice.admin_url + "/readyz") as r:
            assert (await r.json())["webhooks"][0]["name"] == "ops"
    ids = [e["id"] for e in receiver.events()]
    assert len(ids) == len(set(ids))


async def test_events_survive_a_restart_while_the_receiver_is_down(
    tmp_path: Path, receiver: Receiver
) -> None:
    await receiver.stop()
    path = write_rules(
        tmp_path, RULES, token=TOKEN, data=tmp_path / "data", hook=receiver.url, secret=SECRET
    )
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with running(path) as s, aiohttp.ClientSession() as http:
        for code in ("one", "two", "three"):
            async with http.post(
                s.admin_url + "/api/links",
                json={"url": f"https://example.com/{code}", "code": code},
                headers=auth,
            ) as r:
                assert r.status == 201
    # Sluice stopped with the events undelivered (receiver down): they are in the outbox.
    await receiver.start()
    async with running(path):
        await receiver.wait_for(
            lambda: (
                {e["data"]["code"] for e in receiver.events() if e["type"] == "link.created"}
                == {"one", "two", "three"}
            ),
            within=15,
        )


async def test_test_sends_a_ping_now_and_returns_the_answer(
    sluice: Sluice, receiver: Receiver
) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(sluice.admin_url + "/api/webhooks/ops:test", headers=auth) as r:
            assert r.status == 200
            answer = await r.json()
        assert answer["delivered"] is True and answer["status"] == 204
        assert answer["outcome"] == "delivered" and answer["error"] is None
        assert answer["url"] == receiver.url and answer["elapsed_ms"] > 0
        (got,) = receiver.requests  # arrived at once, signed (the receiver verifies)
        assert got.msg_id == answer["id"] and got.body["type"] == "ping"
        assert receiver.bad_signatures == 0

        receiver.behaviour = lambda n, msg_id: web.Response(status=503, text="down for a bit")
        async with http.post(sluice.admin_url + "/api/webhooks/ops:test", headers=auth) as r:
            failed = await r.json()
        assert failed["delivered"] is False and failed["status"] == 503
        assert "down for a bit" in failed["error"]
        async with http.get(sluice.admin_url + "/api/webhooks/ops", headers=auth) as r:
            status = await r.json()
        assert status["depth"] == 0 and status["consecutive_failures"] == 0  # nothing queued

        async with http.post(sluice.admin_url + "/api/webhooks/nope:test", headers=auth) as r:
            assert r.status == 404
        async with http.post(sluice.admin_url + "/api/webhooks/ops:test") as r:
            assert r.status == 401
