"""A real headless Chromium driven over the Chrome DevTools Protocol, for tests.

Dependency-free apart from aiohttp (its websocket client speaks CDP). The
browser is Debian's ``chromium`` (``make test`` installs it as root through
``scripts/ensure-binaries.sh``); it runs with a fresh temporary profile and is
stopped by its PID (and its process group, whose id is that PID) on exit, even
when the test fails.

Own browser, one page::

    async with launch() as page:
        await page.goto("http://127.0.0.1:8001/status")
        assert await page.evaluate("document.title") == "Sluice"
        await page.wait_for("document.querySelectorAll('tr').length > 2")
        await page.screenshot(artifacts_dir / "status.png")
        assert page.errors == []

In pytest, the session-scoped ``browser`` fixture starts one Chromium lazily
(only for tests that ask for it); the ``page`` fixture gives each test a new tab
in it; ``artifacts_dir`` is where screenshots go (``tests/artifacts/``, or
``$SLUICE_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import ctypes
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

CHROMIUM = "chromium"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
WINDOW_SIZE = (1280, 1000)
START_TIMEOUT = 30.0  # two shared cores: a cold first start can take several seconds
COMMAND_TIMEOUT = 30.0
ARTIFACTS_ENV = "SLUICE_TEST_ARTIFACTS"
DEFAULT_ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
MISSING = (
    "chromium not found on PATH: run 'bash scripts/ensure-binaries.sh chromium' "
    "(as root it installs Debian's chromium package; 'make test' does this)"
)

_PR_SET_PDEATHSIG = 1
_running: set[Browser] = set()  # started and not yet stopped: stopped at exit


class BrowserError(RuntimeError):
    """Chromium did not start, went away, or a CDP command failed."""


class JavaScriptError(BrowserError):
    """The page threw while evaluating an expression; the message is the exception text."""


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"(no log at {path}: {exc})"


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGKILL the child if the test process dies
    (strictly: if the thread that started it ends -- start browsers from the main
    thread, as the fixtures and ``launch`` do)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    return preexec


class Browser:
    """One Chromium process with remote debugging on a loopback port.

    Use as ``with Browser() as b`` or ``async with Browser() as b``; then
    ``async with b.new_page() as page`` for a fresh tab.
    """

    def __init__(
        self,
        executable: str = CHROMIUM,
        *,
        start_timeout: float = START_TIMEOUT,
        window_size: tuple[int, int] = WINDOW_SIZE,
    ) -> None:
        self.executable = executable
        self.start_timeout = start_timeout
        self.window_size = window_size
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self.browser_ws_url: str | None = None
        self._tmp: Path | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def user_data_dir(self) -> Path:
        assert self._tmp is not None, "browser not started"
        return self._tmp / "profile"

    @property
    def log_path(self) -> Path:
        assert self._tmp is not None, "browser not started"
        return self._tmp / "chromium.log"

    @property
    def http_url(self) -> str:
        assert self.port is not None, "browser not started"
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        exe = shutil.which(self.executable)
        if exe is None:
            raise BrowserError(MISSING)
        width, height = self.window_size
        return [
            exe,
            *FLAGS,
            f"--user-data-dir={self.user_data_dir}",
            "--remote-debugging-port=0",
            f"--window-size={width},{height}",
            "about:blank",
        ]

    # -- process lifecycle -------------------------------------------------

    def _spawn(self) -> None:
        if self.proc is not None:
            raise BrowserError("browser already started")
        if shutil.which(self.executable) is None:
            raise BrowserError(MISSING)
        self._tmp = Path(tempfile.mkdtemp(prefix="sluice-chromium-"))
        self.user_data_dir.mkdir()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, id == its PID
                preexec_fn=_die_with_parent(),
            )
        _running.add(self)

    def _leader_exited(self) -> bool:
        """Has the process we started exited? Leaves it unreaped (WNOWAIT), so its
        PID -- and so its process group id -- stays ours until ``stop`` reaps it."""
        assert self.proc is not None
        if self.proc.returncode is not None:
            return True
        try:
            info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return info is not None and info.si_pid == self.proc.pid

    def _check_started(self) -> bool:
        """True once DevToolsActivePort names the port; raise if chromium died."""
        assert self.proc is not None
        active = self.user_data_dir / "DevToolsActivePort"
        try:
            lines = active.read_text().split("\n")
        except FileNotFoundError:
            lines = []
        if len(lines) >= 2 and lines[0].strip().isdigit() and lines[1].strip():
            self.port = int(lines[0])
            self.browser_ws_url = f"ws://127.0.0.1:{self.port}{lines[1].strip()}"
            return True
        if self._leader_exited():
            log = _tail(self.log_path)
            proc = self.proc
            self.stop()
            raise BrowserError(
                f"chromium exited with status {proc.returncode} before it was ready;"
                f" log tail:\n{log}"
            )
        return False

    def _start_failed(self) -> BrowserError:
        return BrowserError(
            f"chromium did not write DevToolsActivePort within {self.start_timeout}s;"
            f" log tail:\n{_tail(self.log_path)}"
        )

    def start(self) -> Browser:
        """Launch and wait (bounded) until the DevTools port is known."""
        self._spawn()
        try:
            deadline = time.monotonic() + self.start_timeout
            while not self._check_started():
                if time.monotonic() > deadline:
                    raise self._start_failed()
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        return self

    async def astart(self) -> Browser:
        """``start`` without blocking the event loop while waiting."""
        self._spawn()
        try:
            deadline = time.monotonic() + self.start_timeout
            while not self._check_started():
                if time.monotonic() > deadline:
                    raise self._start_failed()
                await asyncio.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        return self

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def stop(self, grace: float = 5.0) -> None:
        """End what we started, by its PID: SIGTERM the browser (it shuts its children
        down), wait up to ``grace`` for it to exit, then SIGKILL its process group (id ==
        its PID: stragglers too) and reap it."""
        if self.proc is not None and not self._leader_exited():
            self.proc.send_signal(signal.SIGTERM)  # the browser shuts its children down
            deadline = time.monotonic() + grace
            while not self._leader_exited() and time.monotonic() < deadline:
                time.sleep(0.02)
        self._finish()

    async def astop(self, grace: float = 5.0) -> None:
        """``stop`` without blocking the event loop during the grace period."""
        if self.proc is not None and not self._leader_exited():
            self.proc.send_signal(signal.SIGTERM)  # the browser shuts its children down
            deadline = time.monotonic() + grace
            # A Popen child has no awaitable exit: poll it.
            while not self._leader_exited() and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        self._finish()

    def _finish(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            # The leader is alive or an unreaped zombie: the group id is still ours.
            self._signal_group(signal.SIGKILL)
            self.proc.wait()
        self.proc = None
        _running.discard(self)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        self.port = None
        self.browser_ws_url = None

    def __enter__(self) -> Browser:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> Browser:
        return await self.astart()

    async def __aexit__(self, *exc: object) -> None:
        await self.astop()

    # -- pages -------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def new_page(self, *, timeout: float = COMMAND_TIMEOUT) -> AsyncIterator[Page]:  # noqa: ASYNC109
        """A new tab (target) connected over its own websocket; closed on exit."""
        if self.port is None:
            raise BrowserError("browser not started")
        client_timeout = aiohttp.ClientTimeout(total=timeout)
        async with aiohttp.ClientSession(timeout=client_timeout) as http:
            async with http.put(f"{self.http_url}/json/new?about:blank") as resp:
                if resp.status != 200:
                    raise BrowserError(f"/json/new answered {resp.status}: {await resp.text()}")
                target = await resp.json(content_type=None)
            try:
                ws = await http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
                page = Page(ws, target["id"], command_timeout=timeout)
                try:
                    await page._open()
                    yield page
                finally:
                    await page._close()
            finally:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get(f"{self.http_url}/json/close/{target['id']}") as r:
                        await r.read()


class Page:
    """One tab, driven over its CDP websocket. Make it with ``Browser.new_page``."""

    def __init__(
        self, ws: aiohttp.ClientWebSocketResponse, target_id: str, *, command_timeout: float
    ) -> None:
        self.ws = ws
        self.target_id = target_id
        self.command_timeout = command_timeout
        self.errors: list[str] = []
        """Console errors and uncaught exceptions, in the order the page produced them."""
        self.console: list[tuple[str, str]] = []
        """Every console call as (type, text), errors included."""
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self._reader: asyncio.Task[None] | None = None
        self._closed_reason: str | None = None

    async def _open(self) -> None:
        self._reader = asyncio.create_task(self._read())
        await self.send("Page.enable")
        await self.send("Page.setLifecycleEventsEnabled", {"enabled": True})
        await self.send("Runtime.enable")

    async def _close(self) -> None:
        await self.ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._fail_pending("page closed")

    def _fail_pending(self, reason: str) -> None:
        self._closed_reason = self._closed_reason or reason
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(BrowserError(f"CDP connection lost: {reason}"))
        self._pending.clear()

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                if "id" in data:
                    fut = self._pending.pop(data["id"], None)
                    if fut is not None and not fut.done():
                        if "error" in data:
                            fut.set_exception(BrowserError(f"CDP error: {data['error']}"))
                        else:
                            fut.set_result(data.get("result", {}))
                else:
                    self._on_event(data.get("method", ""), data.get("params", {}))
        finally:
            self._fail_pending("websocket closed")

    def _on_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.consoleAPICalled":
            text = " ".join(_remote_text(arg) for arg in params.get("args", []))
            self.console.append((params.get("type", ""), text))
            if params.get("type") == "error":
                self.errors.append(f"console.error: {text}")
        elif method == "Runtime.exceptionThrown":
            self.errors.append(f"uncaught: {_exception_text(params.get('exceptionDetails', {}))}")
        for listener in list(self._listeners):
            listener(method, params)

    async def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> dict[str, Any]:
        """Send one raw CDP command and return its result (bounded by a timeout)."""
        if self._closed_reason is not None:
            raise BrowserError(f"CDP connection lost: {self._closed_reason}")
        msg_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        try:
            await self.ws.send_str(
                json.dumps({"id": msg_id, "method": method, "params": params or {}})
            )
            async with asyncio.timeout(timeout or self.command_timeout):
                return await fut
        except TimeoutError:
            raise BrowserError(
                f"no answer to {method} within {timeout or self.command_timeout}s"
            ) from None
        finally:
            self._pending.pop(msg_id, None)

    async def goto(self, url: str, *, timeout: float = COMMAND_TIMEOUT) -> None:  # noqa: ASYNC109
        """Navigate and wait for the new document's load event."""
        loop = asyncio.get_running_loop()
        events: list[dict[str, Any]] = []
        changed = asyncio.Event()

        def listener(method: str, params: dict[str, Any]) -> None:
            if method == "Page.lifecycleEvent" and params.get("name") == "load":
                events.append(params)
                changed.set()

        self._listeners.append(listener)
        try:
            deadline = loop.time() + timeout
            result = await self.send("Page.navigate", {"url": url}, timeout=timeout)
            if result.get("errorText"):
                raise BrowserError(f"navigation to {url} failed: {result['errorText']}")
            loader = result.get("loaderId")
            if not loader:  # same-document navigation (#fragment): no new load
                return
            frame = result.get("frameId")
            while not any(
                e.get("loaderId") == loader and e.get("frameId") == frame for e in events
            ):
                changed.clear()
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise BrowserError(f"{url} did not finish loading within {timeout}s")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await changed.wait()
        finally:
            self._listeners.remove(listener)

    async def evaluate(self, expression: str, *, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        """Evaluate a JS expression (promises awaited); return its JSON value.

        Raises ``JavaScriptError`` with the exception text if the page throws.
        ``undefined`` comes back as None.
        """
        result = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            timeout=timeout,
        )
        if "exceptionDetails" in result:
            raise JavaScriptError(_exception_text(result["exceptionDetails"]))
        return result.get("result", {}).get("value")

    async def wait_for(
        self,
        predicate: str,
        *,
        timeout: float = 5.0,  # noqa: ASYNC109
        interval: float = 0.05,
    ) -> Any:
        """Evaluate ``predicate`` until it is truthy (in JavaScript's sense); return
        its value as JSON (a DOM node or other object that is not plain data comes
        back as its ``String()``, e.g. "[object HTMLDivElement]").

        A predicate that throws counts as not yet true (the last error is in the
        timeout message). Promises are awaited.
        """
        wrapped = (
            "(async () => { const v = await (" + predicate + "\n);"
            " if (!v) return [false, String(v)];"
            " if (typeof v !== 'object' || [Object.prototype, Array.prototype, null]"
            ".includes(Object.getPrototypeOf(v))) {"
            " try { return [true, JSON.parse(JSON.stringify(v))]; } catch {} }"
            " return [true, String(v)]; })()"
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: str = "never evaluated"
        while True:
            try:
                remaining = max(deadline - loop.time(), 0.5)
                ok, value = await self.evaluate(wrapped, timeout=remaining)
                if ok:
                    return value
                last = f"last value {value}"
            except JavaScriptError as exc:
                last = f"last error {exc}"
            if loop.time() >= deadline:
                raise TimeoutError(f"{predicate!r} not truthy within {timeout}s ({last})")
            await asyncio.sleep(interval)

    async def screenshot(self, path: str | os.PathLike[str]) -> Path:
        """Save a PNG of the viewport to ``path`` (parents created); return the path."""
        result = await self.send("Page.captureScreenshot", {"format": "png"})
        out = Path(path)
        await asyncio.to_thread(_write_file, out, base64.b64decode(result["data"]))
        return out


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _remote_text(obj: dict[str, Any]) -> str:
    if "value" in obj:
        value = obj["value"]
        return value if isinstance(value, str) else json.dumps(value)
    return str(obj.get("description") or obj.get("unserializableValue") or obj.get("type", ""))


def _exception_text(details: dict[str, Any]) -> str:
    exc = details.get("exception") or {}
    text = exc.get("description") or exc.get("value") or details.get("text") or "exception"
    return str(text)


@contextlib.asynccontextmanager
async def launch(**browser_kwargs: Any) -> AsyncIterator[Page]:
    """Start a Chromium of its own and yield one page; stop the browser on exit."""
    async with Browser(**browser_kwargs) as browser, browser.new_page() as page:
        yield page


@atexit.register
def _stop_leftovers() -> None:
    for leftover in list(_running):
        leftover.stop(grace=2.0)


# -- pytest fixtures (registered through conftest.py's pytest_plugins) -------


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    """One headless Chromium for the session, started when a test first asks."""
    if shutil.which(CHROMIUM) is None:
        pytest.fail(MISSING, pytrace=False)
    with Browser() as b:
        yield b


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    """A new tab in the session's browser, closed after the test."""
    async with browser.new_page() as p:
        yield p


def artifacts_path() -> Path:
    """Where tests leave screenshots: $SLUICE_TEST_ARTIFACTS or tests/artifacts/ (created)."""
    path = Path(os.environ.get(ARTIFACTS_ENV) or DEFAULT_ARTIFACTS)
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where tests leave screenshots: $SLUICE_TEST_ARTIFACTS or tests/artifacts/."""
    return artifacts_path()
