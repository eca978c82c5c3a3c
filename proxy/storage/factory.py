"""The store a ``storage.url`` names."""

from __future__ import annotations

from proxy.config import StorageConfig
from proxy.limits.store import LimitStore, MemoryLimitStore


def open_limit_store(storage: StorageConfig) -> LimitStore:
    if storage.scheme == "memory":
        return MemoryLimitStore()
    from proxy.storage.redis_limits import RedisLimitStore

    return RedisLimitStore.from_config(storage)
