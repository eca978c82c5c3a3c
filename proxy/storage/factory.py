"""The stores a ``storage.url`` names: rate-limit counters and short links."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from proxy.config import StorageConfig
from proxy.limits.store import LimitStore, MemoryLimitStore

if TYPE_CHECKING:
    from proxy.links.settings import LinksSettings
    from proxy.links.store import LinkStore

LINK_CALL_TIMEOUT = 2.0  # a link call may list or import batches: longer than a limit check


def open_limit_store(storage: StorageConfig) -> LimitStore:
    if storage.scheme == "memory":
        return MemoryLimitStore()
    from proxy.storage.redis_limits import RedisLimitStore

    return RedisLimitStore.from_config(storage)


def link_store_location(storage: StorageConfig) -> str:
    """Where links live, for logs and ``/readyz`` (no password)."""
    if storage.scheme == "memory":
        return f"sqlite:{link_db_path(storage)}"
    return storage.safe_url


def link_db_path(storage: StorageConfig) -> Path:
    from proxy.links.sqlite_store import FILENAME

    return Path(storage.data_dir) / FILENAME


async def open_link_store(storage: StorageConfig, settings: LinksSettings) -> LinkStore:
    """``memory://``: the SQLite file ``<data_dir>/links.sqlite3`` (links survive a
    restart without Redis); any Redis URL: the Redis link store on the same server(s).

    Raises ``StorageError`` when the store cannot be reached (worth retrying) and
    ``SecretMismatch`` when ``code_secret`` differs from the store's (not worth it).
    """
    if storage.scheme == "memory":
        from proxy.links.sqlite_store import SQLiteLinkStore

        return await SQLiteLinkStore.open(
            link_db_path(storage), secret=settings.code_secret, min_length=settings.min_length
        )
    from proxy.links.redis_store import RedisLinkStore

    return await RedisLinkStore.open(
        storage.url,
        secret=settings.code_secret,
        min_length=settings.min_length,
        call_timeout=max(LINK_CALL_TIMEOUT, storage.timeout),
    )
