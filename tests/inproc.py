"""Sluice running inside the test's event loop, on real loopback sockets."""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from proxy.config import Config, load
from proxy.runtime import Runtime
from proxy.worker import Listeners, start_listeners
from tests.servers import free_port


@dataclass
class Sluice:
    runtime: Runtime
    listeners: Listeners
    path: Path

    @property
    def config(self) -> Config:
        return self.runtime.snapshot.config

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.config.listen.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.config.admin.listen.port}"


def write_rules(directory: Path, body: str, **values: object) -> Path:
    """Write a rules file; ``{listen}`` / ``{admin}`` get free ports unless given."""
    values.setdefault("listen", f"127.0.0.1:{free_port()}")
    values.setdefault("admin", f"127.0.0.1:{free_port()}")
    path = directory / "rules.yaml"
    path.write_text(textwrap.dedent(body).format(**values))
    return path


@asynccontextmanager
async def running(path: Path) -> AsyncIterator[Sluice]:
    runtime = Runtime(load(path))
    listeners = await start_listeners(runtime, reuse_port=False)
    try:
        yield Sluice(runtime, listeners, path)
    finally:
        await listeners.main.cleanup()
        await listeners.admin.cleanup()
        await runtime.close()
