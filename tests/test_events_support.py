"""Helpers for the events tests: a real webhook receiver, a driven clock, settings.

The receiver is a real aiohttp server on a loopback port that verifies every
request with the ``standardwebhooks`` reference library and records it. It
can be stopped and started again on the same port (a receiver that is down
for a while).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from proxy.events.settings import (
    BatchSettings,
    NotificationsSettings,
    RetrySettings,
    WebhookSettings,
)
from proxy.events.signing import decode_secret
from tests.servers import free_port

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()

Behaviour = Callable[[int, str], web.StreamResponse | Awaitable[web.StreamResponse]]


def test_support_module_has_no_tests() -> None:
    """(Collected as a test module only because of its name.)"""


@dataclass
class Received:
    msg_id: str
    body: Any
    at: float  # the receiver's clock (see Receiver.clock)
    headers: dict[str, str]


@dataclass
class Receiver:
    """A webhook endpoint. ``behaviour(n, msg_id)`` answers the n-th request (0-based);
    by default 204. Only requests whose signature verifies are recorded in ``ok``."""

    secret: str = SECRET
    behaviour: Behaviour | None = None
    clock: Callable[[], float] = time.monotonic
    port: int = field(default_factory=free_port)
    requests: list[Received] = field(default_factory=list)
    bad_signatures: int = 0
    _runner: web.AppRunner | None = None
    _verifier: Webhook = field(init=False)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._verifier = Webhook(self.secret)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        headers = dict(request.headers)
        try:
            self._verifier.verify(raw, headers)
        except WebhookVerificationError:
            self.bad_signatures += 1
            self._changed.set()
            return web.Response(status=401)
        n = len(self.requests)
        msg_id = headers["webhook-id"]
        self.requests.append(Received(msg_id, json.loads(raw), self.clock(), headers))
        self._changed.set()
        if self.behaviour is None:
            return web.Response(status=204)
        answer = self.behaviour(n, msg_id)
        if not isinstance(answer, web.StreamResponse):
            answer = await answer
        return answer

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def events(self) -> list[dict[str, Any]]:
        """Every event received (batches flattened, Slack bodies skipped)."""
        out: list[dict[str, Any]] = []
        for r in self.requests:
            out.extend(r.body if isinstance(r.body, list) else [r.body])
        return out

    async def wait_for(self, check: Callable[[], bool], within: float = 10.0) -> None:
        deadline = time.monotonic() + within
        while not check():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out; {len(self.requests)} request(s) received")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.1))
            except TimeoutError:
                pass


class FakeClock:
    """Virtual time: ``sleep`` moves it forward at once (then yields briefly)."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now
        self.slept: list[float] = []

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += max(0.0, seconds)
        await asyncio.sleep(0.002)


def hook(
    url: str,
    *,
    name: str = "hook",
    secret: str = SECRET,
    events: frozenset[str] | None = None,
    schedule: tuple[float, ...] = (0.05, 0.05, 0.05),
    jitter: float = 0.0,
    timeout: float = 2.0,
    max_events: int = 1,
    max_wait: float = 0.0,
    **extra: Any,
) -> WebhookSettings:
    kwargs: dict[str, Any] = {
        "name": name,
        "url": url,
        "keys": (decode_secret(secret),),
        "retry": RetrySettings(schedule, jitter),
        "timeout": timeout,
        "batch": BatchSettings(max_events, max_wait),
        **extra,
    }
    if events is not None:
        kwargs["events"] = events
    return WebhookSettings(**kwargs)


def notifications(*hooks: WebhookSettings, **extra: Any) -> NotificationsSettings:
    return NotificationsSettings(webhooks=hooks, **extra)
