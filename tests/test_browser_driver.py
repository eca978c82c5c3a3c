"""The headless-Chromium driver (tests/browser.py) against tiny aiohttp pages."""

from __future__ import annotations

import os
import stat
import struct
import time
from pathlib import Path

import pytest
from aiohttp import web

from tests.browser import (
    ARTIFACTS_ENV,
    Browser,
    BrowserError,
    JavaScriptError,
    Page,
    artifacts_path,
    launch,
)
from tests.servers import free_port

PAGES = {
    "/": """<!doctype html><title>Driver test</title>
<h1 id="head">Hello, <b>Sluice</b></h1>
<ul><li>one</li><li>two</li><li>three</li></ul>""",
    "/later": """<!doctype html><title>later</title><div id="out">pending</div>
<script>
setTimeout(() => {
  window.readyAfter = performance.now();
  document.getElementById("out").textContent = "done";
}, 200);
</script>""",
    "/throws": """<!doctype html><title>throws</title>
<script>console.error("bad thing", 42);</script>
<script>throw new Error("boom at load");</script>
<script>setTimeout(() => { null.later; }, 10);</script>
<p id="after">still rendered</p>""",
    "/clean": """<!doctype html><title>clean</title><script>console.log("fine")</script>
<p>ok</p>""",
    "/big": """<!doctype html><title>big</title>
<style>body { margin: 0; background: linear-gradient(90deg, #036, #fc0); }
h1 { font: 48px sans-serif; color: white; padding: 40px; }</style>
<h1>Screenshot</h1>""",
}


def _handler(html: str) -> web.RequestHandler:
    async def handle(request: web.Request) -> web.Response:
        return web.Response(text=html, content_type="text/html")

    return handle


@pytest.fixture
async def site(aiohttp_server) -> str:  # type: ignore[no-untyped-def]
    app = web.Application()
    for path, html in PAGES.items():
        app.router.add_get(path, _handler(html))
    server = await aiohttp_server(app, host="127.0.0.1")
    return str(server.make_url("")).rstrip("/")


async def test_goto_and_evaluate_dom(page: Page, site: str) -> None:
    await page.goto(f"{site}/")
    assert await page.evaluate("document.title") == "Driver test"
    assert await page.evaluate("document.getElementById('head').textContent") == "Hello, Sluice"
    items = await page.evaluate("[...document.querySelectorAll('li')].map(li => li.textContent)")
    assert items == ["one", "two", "three"]
    assert await page.evaluate("({n: 1, ok: true, s: null})") == {"n": 1, "ok": True, "s": None}
    assert await page.evaluate("undefined") is None
    assert await page.evaluate("new Promise(r => setTimeout(() => r(7), 50))") == 7
    assert await page.evaluate("[innerWidth, location.pathname]") == [1280, "/"]
    assert page.errors == []


async def test_wait_for_value_set_after_200ms(page: Page, site: str) -> None:
    await page.goto(f"{site}/later")
    ready_after = await page.wait_for("window.readyAfter", timeout=10)
    assert isinstance(ready_after, float | int) and ready_after >= 200
    assert await page.wait_for("({a: [1, 2]})") == {"a": [1, 2]}
    assert await page.evaluate("document.getElementById('out').textContent") == "done"


async def test_wait_for_times_out_with_last_value(page: Page, site: str) -> None:
    await page.goto(f"{site}/")
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"never.*last value false"):
        await page.wait_for("window.never === true", timeout=0.3)
    assert time.monotonic() - started < 5
    with pytest.raises(TimeoutError, match="last error TypeError"):
        await page.wait_for("document.querySelector('#missing').textContent", timeout=0.2)


async def test_page_errors_collect_console_errors_and_uncaught_exceptions(
    page: Page, site: str
) -> None:
    await page.goto(f"{site}/throws")
    assert (
        await page.wait_for("document.getElementById('after')") == "[object HTMLParagraphElement]"
    )
    # The timer's TypeError comes 10 ms after load.
    await page.evaluate("new Promise(r => setTimeout(r, 100))")
    assert len(page.errors) == 3, page.errors
    assert page.errors[0] == "console.error: bad thing 42"
    assert "Error: boom at load" in page.errors[1]
    assert "TypeError" in page.errors[2] and "later" in page.errors[2]
    assert ("error", "bad thing 42") in page.console

    # An exception while evaluating raises with its text (and is not a page error).
    with pytest.raises(JavaScriptError, match="Error: nope"):
        await page.evaluate("(() => { throw new Error('nope') })()")
    with pytest.raises(JavaScriptError, match="rejected"):
        await page.evaluate("Promise.reject(new Error('rejected'))")
    assert len(page.errors) == 3


async def test_a_clean_page_has_no_errors(page: Page, site: str) -> None:
    await page.goto(f"{site}/clean")
    assert page.errors == []
    assert ("log", "fine") in page.console


async def test_goto_a_closed_port_raises(page: Page) -> None:
    with pytest.raises(BrowserError, match="ERR_CONNECTION_REFUSED"):
        await page.goto(f"http://127.0.0.1:{free_port()}/")


async def test_screenshot_is_a_png(page: Page, site: str, artifacts_dir: Path) -> None:
    await page.goto(f"{site}/big")
    path = await page.screenshot(artifacts_dir / "test_browser_driver.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width == 1280 and height > 500, (width, height)
    assert len(data) > 5_000
    assert data.endswith(b"IEND\xaeB`\x82")


def test_artifacts_dir_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ARTIFACTS_ENV, str(tmp_path / "shots"))
    assert artifacts_path() == tmp_path / "shots"
    assert (tmp_path / "shots").is_dir()
    monkeypatch.delenv(ARTIFACTS_ENV)
    assert artifacts_path() == Path(__file__).resolve().parent / "artifacts"


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_own_browser_is_ended_when_the_body_fails(site: str) -> None:
    with pytest.raises(RuntimeError, match="test failed"):
        async with Browser() as browser:
            pid = browser.pid
            profile = browser.user_data_dir
            assert pid is not None and profile.is_dir()
            async with browser.new_page() as page:
                await page.goto(f"{site}/")
                raise RuntimeError("test failed")
    assert _gone(pid)
    assert not profile.exists()
    assert browser.proc is None


async def test_launch_gives_one_page(site: str) -> None:
    async with launch() as page:
        await page.goto(f"{site}/")
        assert await page.evaluate("document.querySelectorAll('li').length") == 3


def _fake_chromium(tmp_path: Path, body: str) -> str:
    exe = tmp_path / "fake-chromium"
    exe.write_text(f"#!/bin/sh\n{body}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return str(exe)


def test_a_browser_that_never_gets_ready_times_out_and_is_ended(tmp_path: Path) -> None:
    browser = Browser(_fake_chromium(tmp_path, "echo starting up; exec sleep 60"), start_timeout=1)
    started = time.monotonic()
    with pytest.raises(BrowserError, match=r"DevToolsActivePort within 1s(.|\n)*starting up"):
        browser.start()
    assert time.monotonic() - started < 10
    assert browser.proc is None


async def test_a_browser_that_exits_at_once_is_reported(tmp_path: Path) -> None:
    browser = Browser(_fake_chromium(tmp_path, "echo no display >&2; exit 3"), start_timeout=10)
    with pytest.raises(BrowserError, match=r"exited with status 3(.|\n)*no display"):
        await browser.astart()
    assert browser.proc is None


def test_missing_chromium_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(BrowserError, match=r"ensure-binaries\.sh chromium"):
        Browser(str(tmp_path / "no-such-chromium")).start()
