"""One signed POST to a webhook, turned into an ``Outcome``.

Redirects are not followed. The whole attempt (connect, send, response
headers) is bounded by the subscription's ``timeout``. A 2xx is judged on its
status alone: its body is never read, so a receiver that streams megabytes or
hangs after its headers cannot hold the worker. Other answers have at most
``body_limit`` bytes read, within the same deadline, for the error message.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import aiohttp

from proxy import __version__
from proxy.events.policy import Outcome, Verdict, classify, parse_retry_after
from proxy.events.settings import WebhookSettings
from proxy.events.signing import sign

BODY_LIMIT = 64 * 1024
DETAIL_CHARS = 200
USER_AGENT = f"Sluice-Webhooks/{__version__}"


def new_session(limit: int = 64) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=8)
    return aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False
    )


async def _snippet(resp: aiohttp.ClientResponse, limit: int) -> str:
    """At most ``limit`` bytes of the body, as a short one-line excerpt."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await resp.content.read(min(16384, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    text = " ".join(b"".join(chunks).decode("utf-8", "replace").split())
    return text[:DETAIL_CHARS] + ("…" if len(text) > DETAIL_CHARS else "")


class Sender:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        wall: Callable[[], float] = time.time,
        body_limit: int = BODY_LIMIT,
    ) -> None:
        self.session = session
        self.wall = wall  # the webhook-timestamp header is always real time
        self.body_limit = body_limit

    def headers(self, hook: WebhookSettings, msg_id: str, body: bytes) -> dict[str, str]:
        return {
            **sign(hook.keys, msg_id, int(self.wall()), body),
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
        }

    async def post(self, hook: WebhookSettings, msg_id: str, body: bytes) -> Outcome:
        headers = self.headers(hook, msg_id, body)
        timeout = aiohttp.ClientTimeout(total=hook.timeout)
        try:
            async with self.session.post(
                hook.url, data=body, headers=headers, timeout=timeout, allow_redirects=False
            ) as resp:
                if 200 <= resp.status < 300:
                    return classify(resp.status)
                retry_after = parse_retry_after(resp.headers.get("Retry-After"), self.wall())
                try:
                    detail = await _snippet(resp, self.body_limit)
                except (TimeoutError, aiohttp.ClientError):
                    detail = "(body not read in time)"
                return classify(resp.status, retry_after, detail)
        except TimeoutError:
            return Outcome(Verdict.RETRY, f"no answer within {hook.timeout:g}s")
        except aiohttp.ClientError as exc:
            return Outcome(Verdict.RETRY, f"request failed: {exc or type(exc).__name__}")
        except (OSError, ValueError) as exc:  # e.g. an unresolvable or invalid address
            return Outcome(Verdict.RETRY, f"request failed: {exc}")
