"""Helpers for the accuracy and degradation tests: request bursts, Redis counters.

Nothing here is mocked: requests go over loopback sockets with aiohttp, Redis
counters are read from the real server with ``redis-cli``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from multidict import CIMultiDict

from proxy.limits.plans import _client_hash
from proxy.storage.redis_cluster import key_slot
from tests.servers import redis_cli

REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=5)


@dataclass(frozen=True)
class Reply:
    """One answer as the client saw it, with the wall time it took."""

    url: str
    status: int
    headers: CIMultiDict[str]  # case-insensitive
    body: bytes
    seconds: float

    def json(self) -> Any:
        return json.loads(self.body)


async def fetch(
    session: aiohttp.ClientSession, url: str, headers: Mapping[str, str] | None = None
) -> Reply:
    started = time.perf_counter()
    async with session.get(url, headers=headers, timeout=REQUEST_TIMEOUT) as r:
        body = await r.read()
        got = CIMultiDict(r.headers)
    return Reply(url, r.status, got, body, time.perf_counter() - started)


async def burst(
    session: aiohttp.ClientSession,
    urls: Sequence[str],
    total: int,
    concurrency: int,
    headers: Mapping[str, str] | None = None,
) -> list[Reply]:
    """``total`` GETs, request i to ``urls[i % len(urls)]``, ``concurrency`` in flight."""
    replies: list[Reply | None] = [None] * total
    next_index = iter(range(total))

    async def worker() -> None:
        for i in next_index:
            replies[i] = await fetch(session, urls[i % len(urls)], headers)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return [r for r in replies if r is not None]


def statuses(replies: Iterable[Reply]) -> Counter[int]:
    return Counter(r.status for r in replies)


def commandstats(port: int) -> dict[str, dict[str, int]]:
    """``INFO commandstats`` as {command: {calls, failed_calls, ...}} (integers only)."""
    out: dict[str, dict[str, int]] = {}
    for line in redis_cli(port, "info", "commandstats", timeout=5).splitlines():
        if not line.startswith("cmdstat_"):
            continue
        name, _, fields = line.partition(":")
        values = {}
        for pair in fields.split(","):
            key, _, value = pair.partition("=")
            if value.isdigit():
                values[key] = int(value)
        out[name.removeprefix("cmdstat_")] = values
    return out


def command_calls(ports: Iterable[int], command: str = "evalsha") -> int:
    """How many times ``command`` ran, added up over ``ports`` (0 if never)."""
    return sum(commandstats(p).get(command, {}).get("calls", 0) for p in ports)


def dbsize(ports: Iterable[int]) -> int:
    """Keys of rate-limit state (the status page's leaderboard buckets not counted)."""
    total = 0
    for p in ports:
        keys = redis_cli(p, "--scan", timeout=5).split()
        total += sum(1 for k in keys if not k.startswith("sl:{sl-status}:"))
    return total


def ietf_remaining(header: str) -> dict[str, int]:
    """``"a";r=4;t=60, "b";r=9;t=3600`` (the IETF ``RateLimit`` field) -> {a: 4, b: 9}."""
    out = {}
    for member in header.split(","):
        name, *params = member.strip().split(";")
        values = dict(p.split("=", 1) for p in params)
        out[name.strip('"')] = int(values["r"])
    return out


def client_slot(client: str) -> int:
    """The Redis Cluster slot of every key of ``client`` (an identity such as
    ``header:X-API-Key=k1`` or ``ip=127.0.0.1``): keys hash-tag the client hash."""
    return key_slot("sl:{" + _client_hash(client) + "}:")


def sockets_to(pid: int, remote_port: int) -> int:
    """How many ESTABLISHED IPv4 TCP sockets ``pid`` holds to ``remote_port`` (loopback)."""
    wanted = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        port = int(cols[2].rsplit(":", 1)[1], 16)
        if port == remote_port and cols[3] == "01":
            wanted.add(cols[9])
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in wanted:
            count += 1
    return count


async def poll(
    what: str, check: Callable[[], Awaitable[bool]], within: float, interval: float = 0.05
) -> float:
    """Await ``check()`` until it is true; return the seconds that took."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > within:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(interval)
    return time.monotonic() - started
