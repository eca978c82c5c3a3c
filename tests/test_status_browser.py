"""The status page in a real headless Chromium: every panel, read back through the DOM.

Sluice runs in the test's loop on real sockets, after traffic that produced
rejections, redirects and failing webhook deliveries; the page is loaded with
its token in the URL fragment, and screenshots are kept as test artifacts.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.limits.identity import masked
from tests.browser import Page
from tests.inproc import Sluice, running
from tests.servers import RedisServer
from tests.test_events_support import Receiver
from tests.test_status_functional import AUTH, TOKEN, fetch, rules, traffic, until


@pytest.fixture
async def failing_receiver() -> AsyncIterator[Receiver]:
    r = await Receiver(behaviour=lambda n, msg_id: web.Response(status=500)).start()
    yield r
    await r.stop()


async def clicks(s: Sluice, http: aiohttp.ClientSession, code: str, n: int) -> None:
    async with http.post(
        s.admin_url + "/api/links", json={"url": "https://example.com/", "code": code}, headers=AUTH
    ) as r:
        assert r.status == 201
    for _ in range(n):
        async with http.get(s.url + f"/s/{code}", allow_redirects=False) as r:
            assert r.status == 302
    assert s.runtime.links is not None
    assert await s.runtime.links.recorder.drain(5.0)


async def webhook_failing(s: Sluice, http: aiohttp.ClientSession) -> None:
    async def failing() -> bool:
        _, body = await fetch(http, s.admin_url + "/api/status", AUTH)
        subs = body["webhooks"].get("subscriptions") or []
        return bool(subs and subs[0]["consecutive_failures"] >= 1)

    await until(failing)


def texts(selector: str) -> str:
    return f"[...document.querySelectorAll({json.dumps(selector)})].map(n => n.textContent)"


async def test_every_panel_shows_the_traffic(
    tmp_path: Path, page: Page, artifacts_dir: Path, failing_receiver: Receiver
) -> None:
    async with running(rules(tmp_path, "memory://", failing_receiver.url)) as s:
        service = s.runtime.status
        assert service is not None
        async with aiohttp.ClientSession() as http:
            await traffic(s, http)  # alice 4 rejections, bob 1
            await clicks(s, http, "promo", 3)
            await clicks(s, http, "other", 1)
            await service.flush()
            service.sample()
            await webhook_failing(s, http)

        await page.goto(f"{s.admin_url}/#token={TOKEN}")
        await page.wait_for("document.body.dataset.loaded", timeout=15)
        await page.wait_for("document.querySelector('#webhooks tr[data-name=ops]')", timeout=15)

        assert await page.evaluate("location.hash") == ""  # the token left the address bar
        assert await page.evaluate("document.getElementById('login').hidden") is True
        sha = s.config.source.sha256
        assert await page.evaluate("document.getElementById('config-sha').textContent") == sha[:12]
        assert await page.evaluate("document.getElementById('config-path').textContent") == str(
            s.path
        )
        assert await page.evaluate("document.getElementById('config-reload').textContent") == "ok"
        assert await page.evaluate("document.getElementById('storage-state').textContent") == "ok"
        assert await page.evaluate("document.getElementById('storage-breaker').textContent") == (
            "closed"
        )

        charts = await page.evaluate(
            "[...document.querySelectorAll('#charts .chart')].map(c => "
            "({rule: c.dataset.rule, rejected: Number(c.dataset.rejected), "
            "shadow: Number(c.dataset.shadow), lines: c.querySelectorAll('polyline').length}))"
        )
        by_rule = {c["rule"]: c for c in charts}
        assert set(by_rule) == {"small", "watch"}
        assert by_rule["small"]["rejected"] > 0 and by_rule["small"]["lines"] == 3
        assert by_rule["watch"]["shadow"] > 0 and by_rule["watch"]["rejected"] == 0

        rows = await page.evaluate(
            "[...document.querySelectorAll('#clients-5m tbody tr')].map(r => "
            "[...r.cells].map(c => c.textContent))"
        )
        assert rows == [
            ["1", masked("header:X-Key=alice"), "small", "4"],
            ["2", masked("header:X-Key=bob"), "small", "1"],
        ]
        links = await page.evaluate(
            "[...document.querySelectorAll('#links-top tbody tr')].map(r => "
            "[...r.cells].map(c => c.textContent))"
        )
        assert links == [["1", "promo", "3"], ["2", "other", "1"]]
        hook = await page.evaluate(
            "[...document.querySelector('#webhooks tr[data-name=ops]').cells]"
            ".map(c => c.textContent)"
        )
        name, state, queued, _oldest, dead, failures, error = hook
        assert (name, state) == ("ops", "failing")
        assert int(queued) >= 1 and dead == "0" and int(failures) >= 1 and "500" in error
        assert await page.evaluate("document.getElementById('whatif-panel').hidden") is True

        shot = await page.screenshot(artifacts_dir / "status-page.png")
        assert shot.stat().st_size > 10_000

        # a broken edit of rules.yaml: the page shows the reload error, the old config serves
        s.path.write_text(s.path.read_text() + "\nlimits: oops\n")
        assert not s.runtime.reload()
        await page.wait_for(
            "document.getElementById('config-reload').textContent.startsWith('failed')",
            timeout=10,
        )
        reload = await page.evaluate("document.getElementById('config-reload').textContent")
        assert f"{s.path}:" in reload and "limits" in reload
        assert await page.evaluate("document.getElementById('config-sha').textContent") == sha[:12]
        assert page.errors == []


async def test_login_form_then_storage_down(
    tmp_path: Path, page: Page, artifacts_dir: Path, failing_receiver: Receiver
) -> None:
    server = RedisServer(tmp_path / "own-redis").start()
    try:
        async with running(rules(tmp_path, server.url, failing_receiver.url)) as s:
            service = s.runtime.status
            assert service is not None
            await page.goto(s.admin_url + "/")
            await page.wait_for("!document.getElementById('login').hidden")
            assert await page.evaluate("document.getElementById('panels').hidden") is True

            # a wrong token: the form stays, with the server's message
            await page.evaluate(
                "document.getElementById('token').value = 'wrong-token';"
                "document.querySelector('#login button').click()"
            )
            await page.wait_for(
                "document.getElementById('login-message').textContent.includes('Bearer')"
            )
            assert await page.evaluate("document.getElementById('panels').hidden") is True

            async with aiohttp.ClientSession() as http:
                await traffic(s, http)
                server.stop()
                for i in range(4):  # new clients: their checks fail, the breaker opens
                    async with http.get(s.url + "/api/x", headers={"X-Key": f"c{i}"}) as r:
                        await r.read()
            service.sample()

            await page.evaluate(
                f"document.getElementById('token').value = {json.dumps(TOKEN)};"
                "document.querySelector('#login button').click()"
            )
            await page.wait_for("document.body.dataset.loaded", timeout=15)
            state = "document.getElementById('storage-state').textContent"
            assert await page.evaluate(state) == "degraded"
            assert await page.evaluate("document.getElementById('storage-error').textContent")
            assert await page.evaluate("document.getElementById('clients-error').hidden") is False
            assert await page.evaluate("document.getElementById('links-error').hidden") is False
            await page.screenshot(artifacts_dir / "status-page-storage-down.png")
            assert page.errors == []
    finally:
        server.stop()


async def test_the_whatif_panel_compares_the_candidate(
    tmp_path: Path, page: Page, artifacts_dir: Path
) -> None:
    from tests.test_whatif_functional import TOKEN as WHATIF_TOKEN
    from tests.test_whatif_functional import live_rules, send, write_candidate

    write_candidate(tmp_path, limit=1)
    async with running(live_rules(tmp_path, "memory://")) as s:
        assert await send(s, "alice", 4) == [200, 200, 200, 429]
        assert await send(s, "bob", 1) == [200]
        service = s.runtime.status
        assert service is not None
        await service.flush()
        service.sample()
        await page.goto(f"{s.admin_url}/#token={WHATIF_TOKEN}")
        await page.wait_for("!document.getElementById('whatif-panel').hidden", timeout=15)
        summary = await page.evaluate("document.getElementById('whatif-summary').textContent")
        assert summary.startswith("With the candidate, 40.0% more requests would be rejected")
        source = await page.evaluate("document.getElementById('whatif-source').textContent")
        assert source.startswith(f"candidate {tmp_path / 'next.yaml'} (")
        rows = await page.evaluate(
            "[...document.querySelectorAll('#whatif-clients tbody tr')].map(r => "
            "[...r.cells].map(c => c.textContent))"
        )
        assert rows == [["1", masked("header:X-Key=alice"), "per_key", "2"]]
        charts = await page.evaluate(
            "[...document.querySelectorAll('#whatif-charts .chart')].map(c => c.dataset.rule)"
        )
        assert sorted(charts) == ["per_ip (candidate)", "per_key (candidate)"]
        await page.screenshot(artifacts_dir / "status-page-whatif.png")
        assert page.errors == []


async def test_markup_in_client_keys_is_shown_as_text(
    tmp_path: Path, page: Page, failing_receiver: Receiver
) -> None:
    evil = '<img id="pwn" src="x" onerror="window.pwned=1">'
    path = rules(tmp_path, "memory://", failing_receiver.url, show_keys=True)
    async with running(path) as s:
        async with aiohttp.ClientSession() as http:
            for _ in range(5):
                async with http.get(s.url + "/api/x", headers={"X-Key": evil}) as r:
                    await r.read()
        service = s.runtime.status
        assert service is not None
        await service.flush()
        await page.goto(f"{s.admin_url}/#token={TOKEN}")
        await page.wait_for("document.querySelector('#clients-5m tbody code')", timeout=15)
        shown = await page.evaluate("document.querySelector('#clients-5m tbody code').textContent")
        assert shown == f"header:X-Key={evil}"
        assert await page.evaluate("document.getElementById('pwn') === null") is True
        assert await page.evaluate("window.pwned === undefined") is True
        assert page.errors == []
