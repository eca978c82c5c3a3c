"""Events: the JSON object every subscriber receives, and its id.

An event is ``{"id", "type", "timestamp", "data"}``. The id is ``evt_`` plus a
ULID (48-bit millisecond time, 80 random bits from ``os.urandom``, Crockford
base32): sortable by creation time, unique across processes, free of ``.``
(Standard Webhooks signs ``id.timestamp.body``). The JSON bytes are made once
and kept (``Event.raw``), so every retry sends exactly the same body.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

EVENT_TYPES = (
    "rate_limit.rejected",
    "redirect.followed",
    "link.created",
    "link.deleted",
    "storage.degraded",
    "storage.recovered",
    "ping",
)
DEFAULT_CRITICAL = ("storage.degraded", "storage.recovered")
COMMON_FIELDS = ("id", "type", "timestamp")
# The ``data`` fields each type carries: what templates may name and emitters should send.
TYPE_FIELDS: Mapping[str, tuple[str, ...]] = {
    "rate_limit.rejected": ("rule", "route", "client", "count", "first_seen", "last_seen"),
    "redirect.followed": ("code", "destination", "variant", "status"),
    "link.created": ("code", "destination", "expires_at"),
    "link.deleted": ("code",),
    "storage.degraded": ("backend", "error"),
    "storage.recovered": ("backend", "down_seconds"),
    "ping": ("message",),
}

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _base32(value: int, length: int) -> str:
    out = []
    for _ in range(length):
        out.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(out))


class UlidSource:
    """Monotonic ULIDs: within one millisecond the random part counts up.

    Thread-safe; the state is dropped in a forked child (its counter would
    otherwise continue the parent's).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._last_ms = -1
        self._last_rand = 0

    def new(self, now: float) -> str:
        ms = max(0, int(now * 1000)) & ((1 << 48) - 1)
        with self._lock:
            if self._pid != os.getpid():
                self._pid, self._last_ms = os.getpid(), -1
            if ms <= self._last_ms and self._last_rand < (1 << 80) - 1:
                ms, rand = self._last_ms, self._last_rand + 1
            else:
                rand = int.from_bytes(os.urandom(10), "big")
            self._last_ms, self._last_rand = ms, rand
        return _base32((ms << 80) | rand, 26)


ULIDS = UlidSource()


def new_event_id(now: float) -> str:
    return "evt_" + ULIDS.new(now)


def batch_id(event_ids: Sequence[str]) -> str:
    """The ``webhook-id`` of a batch: a digest of its sorted event ids, so the
    same batch retried keeps its id."""
    digest = hashlib.sha256(",".join(sorted(event_ids)).encode()).digest()
    return "batch_" + _base32(int.from_bytes(digest[:16], "big"), 26)


def iso(ts: float) -> str:
    """``2024-05-01T12:00:00.123Z``: UTC, milliseconds."""
    moment = datetime.fromtimestamp(ts, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_iso(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str).encode()


@dataclass(frozen=True, slots=True)
class Event:
    """One event. ``timestamp`` is epoch seconds (sent as ISO 8601 UTC)."""

    id: str
    type: str
    timestamp: float
    data: Mapping[str, Any]
    raw: bytes = field(default=b"", compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.raw:
            body = {"id": self.id, "type": self.type, "timestamp": iso(self.timestamp)}
            object.__setattr__(self, "raw", _dumps({**body, "data": dict(self.data)}))

    @classmethod
    def create(cls, type: str, data: Mapping[str, Any], now: float) -> Event:
        if type not in TYPE_FIELDS:
            raise ValueError(f"unknown event type {type!r}")
        return cls(new_event_id(now), type, now, data)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Event:
        """Parse stored JSON, keeping its exact bytes. ``ValueError`` if malformed."""
        blob = raw.encode() if isinstance(raw, str) else bytes(raw)
        try:
            obj = json.loads(blob)
            data = obj["data"]
            if not isinstance(data, dict):
                raise TypeError("data is not an object")
            return cls(str(obj["id"]), str(obj["type"]), parse_iso(obj["timestamp"]), data, blob)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not an event: {exc}") from exc

    def fields(self) -> dict[str, Any]:
        """What a template may name: the common fields, then the data fields."""
        values: dict[str, Any] = {name: "" for name in TYPE_FIELDS.get(self.type, ())}
        values.update(self.data)
        values.update(id=self.id, type=self.type, timestamp=iso(self.timestamp))
        return values

    @property
    def text(self) -> str:
        return self.raw.decode()
