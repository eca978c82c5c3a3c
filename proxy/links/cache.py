"""A small hot-link cache in front of the store: bounded LRU, short TTL, explicit invalidation.

It also remembers misses (a code that does not exist), so a scan of random
codes does not turn into one store lookup per request. Invalidation is local:
another Sluice instance sharing the store sees a patch or delete only when its
own entry expires, so keep ``ttl`` short (seconds). Pure: the clock is injected.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final, Generic, TypeVar

V = TypeVar("V")


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()


class LinkCache(Generic[V]):
    """Code → cached value (``None`` caches "no such link"), for ``ttl`` seconds.

    ``get`` answers ``MISSING`` when the cache knows nothing. With ``size == 0``
    the cache is disabled (stores nothing).
    """

    def __init__(self, size: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        if size < 0 or ttl < 0:
            raise ValueError("size and ttl must not be negative")
        self.size = size
        self.ttl = ttl
        self._clock = clock
        self._items: OrderedDict[str, tuple[float, V | None]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, code: str) -> V | _Missing | None:
        item = self._items.get(code)
        if item is None:
            return MISSING
        deadline, value = item
        if self._clock() >= deadline:
            del self._items[code]
            return MISSING
        self._items.move_to_end(code)
        return value

    def put(self, code: str, value: V | None) -> None:
        if self.size == 0 or self.ttl == 0:
            return
        self._items[code] = (self._clock() + self.ttl, value)
        self._items.move_to_end(code)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def invalidate(self, code: str) -> None:
        self._items.pop(code, None)

    def clear(self) -> None:
        self._items.clear()
