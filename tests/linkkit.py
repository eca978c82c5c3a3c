"""Shared pieces of the short-link functional tests: rules, stores, an API client."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.inproc import Sluice, running, write_rules
from tests.servers import RedisServer, free_port

WRITER = "writer-token-0123456789"
READER = "reader-token-0123456789"
SECRET = "functional-test-code-secret-0123"
WRITE_AUTH = {"Authorization": f"Bearer {WRITER}"}
READ_AUTH = {"Authorization": f"Bearer {READER}"}

RULES = """
listen: {listen}
admin:
  listen: "{admin}"
  tokens:
    - name: writer
      token: {writer}
      scope: write
    - name: reader
      token: {reader}
      scope: read
storage:
  url: "{storage_url}"
  data_dir: "{data_dir}"
clients:
  trusted_proxies: [127.0.0.0/8]
upstreams:
  app: "http://127.0.0.1:{down_port}"
limits:
  - name: per_ip_redirects
    key: ip
    algorithm: fixed_window
    limit: {redirect_limit}
    window: 1h
routes:
  - name: all
    match:
      path_prefix: /
    upstream: app
redirects:
{prefix}
  status: 302
  limits: [per_ip_redirects]
  code_secret: "{secret}"
  cache_ttl: 1h
  deny_hosts: [blocked.example]
  miss_limit:
    limit: {miss_limit}
    window: 1h
{extra}
"""


@dataclass
class Storage:
    """Where a test's Sluice keeps its links."""

    kind: str  # sqlite | redis
    url: str
    data_dir: Path

    def other(self) -> Storage:
        """An empty store of the same kind (another directory, another Redis db)."""
        if self.kind == "sqlite":
            return Storage("sqlite", "memory://", self.data_dir.parent / "other-data")
        return Storage("redis", self.url.rsplit("/", 1)[0] + "/1", self.data_dir)


def storage_for(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "sqlite":
        return Storage("sqlite", "memory://", tmp_path / "data")
    server: RedisServer = request.getfixturevalue("redis")
    return Storage("redis", server.url, tmp_path / "data")


def rules_file(
    directory: Path,
    storage: Storage,
    *,
    extra: str = "",
    redirect_limit: int = 10_000,
    miss_limit: int = 1000,
    prefix: str | None = "/s/",
    **values: Any,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return write_rules(
        directory,
        RULES,
        writer=WRITER,
        reader=READER,
        storage_url=storage.url,
        data_dir=storage.data_dir,
        down_port=free_port(),  # nothing listens there: the upstream is down
        redirect_limit=redirect_limit,
        miss_limit=miss_limit,
        secret=SECRET,
        extra=extra,
        prefix=f"  prefix: {prefix}" if prefix else "",
        **values,
    )


@asynccontextmanager
async def sluice_on(directory: Path, storage: Storage, **kw: Any) -> AsyncIterator[Sluice]:
    async with running(rules_file(directory, storage, **kw)) as s:
        yield s


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


class Client:
    """Plain HTTP against one Sluice: redirects are never followed."""

    def __init__(self, session: aiohttp.ClientSession, sluice: Sluice) -> None:
        self.session = session
        self.sluice = sluice

    async def call(self, method: str, url: str, **kw: Any) -> Reply:
        kw.setdefault("allow_redirects", False)
        async with self.session.request(method, url, **kw) as r:
            return Reply(r.status, dict(r.headers), await r.text())

    async def follow(self, code: str, method: str = "GET", **kw: Any) -> Reply:
        return await self.call(method, f"{self.sluice.url}/s/{code}", **kw)

    async def api(
        self, method: str, path: str, body: Any = None, auth: dict[str, str] = WRITE_AUTH, **kw: Any
    ) -> Reply:
        if body is not None:
            kw["json"] = body
        return await self.call(method, self.sluice.admin_url + path, headers=auth, **kw)

    async def create(self, **body: Any) -> dict[str, Any]:
        reply = await self.api("POST", "/api/links", body)
        assert reply.status == 201, reply.text
        created: dict[str, Any] = reply.json()
        return created

    async def drain(self) -> None:
        """Wait until this worker's click recorder has stored every queued click."""
        links = self.sluice.runtime.links
        assert links is not None
        assert await links.recorder.drain(10)


@asynccontextmanager
async def client_for(sluice: Sluice) -> AsyncIterator[Client]:
    async with aiohttp.ClientSession() as session:
        yield Client(session, sluice)
