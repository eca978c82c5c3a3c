"""Events: the JSON object every subscriber receives, and its id.

An event is ``{"id", "type", "timestamp", "data"}``. The id is ``evt_`` plus a
ULID (48-bit millisecond time, 80 bits from ``os.urandom`` counting up, Crockford
base32: see ``UlidSource``): sortable by creation time, unique across processes, free of ``.``
(Standard Webhooks signs ``id.timestamp.body``). The JSON bytes are made once
and kept (``Event.raw``), so every retry sends exactly the same body.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
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
_PAIRS = tuple(a + b for a in _CROCKFORD for b in _CROCKFORD)  # 10 bits → 2 characters


def _base32(value: int, length: int) -> str:
    """The low ``5 * length`` bits of ``value``, most significant first (Crockford)."""
    pairs = _PAIRS
    top = 5 * (length - length % 2) - 10  # the shift of the first pair
    out = [_CROCKFORD[(value >> top + 10) & 31]] if length % 2 else []
    out += [pairs[(value >> shift) & 1023] for shift in range(top, -1, -10)]
    return "".join(out)


class UlidSource:
    """Monotonic ULIDs. The random part is drawn from ``os.urandom`` at most once
    per ``reseed`` seconds and counts up in between (within a millisecond, as
    ULIDs do, and across milliseconds too): ids stay unique across processes
    (each counts from its own random 80-bit start) and cost no system call.

    Thread-safe; the state is dropped in a forked child (its counter would
    otherwise continue the parent's).
    """

    def __init__(self, reseed: float = 1.0) -> None:
        self.reseed_ms = int(reseed * 1000)
        self.reset()

    def reset(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_rand = 0
        self._drawn_ms = -1  # when the random part was last drawn
        self._time: tuple[int, str] = (-1, "")  # ms, its 10 characters
        self._high: tuple[int, str] = (-1, "")  # random bits above the low 20, 12 characters

    def new(self, now: float) -> str:
        ms = max(0, int(now * 1000)) & ((1 << 48) - 1)
        with self._lock:
            if ms < self._last_ms:
                ms = self._last_ms  # the clock stepped back: stay in order
            if ms - self._drawn_ms < self.reseed_ms and self._last_rand < (1 << 80) - 1:
                rand = self._last_rand + 1
            else:
                rand = int.from_bytes(os.urandom(10), "big")
                self._drawn_ms = ms
            self._last_ms, self._last_rand = ms, rand
        # Consecutive ids differ in the low bits: only those are encoded each time.
        cached, time_part = self._time
        if cached != ms:
            time_part = _base32(ms, 10)
            self._time = (ms, time_part)
        high = rand >> 20
        cached, high_part = self._high
        if cached != high:
            high_part = _base32(high, 12)
            self._high = (high, high_part)
        return time_part + high_part + _PAIRS[(rand >> 10) & 1023] + _PAIRS[rand & 1023]


ULIDS = UlidSource()
os.register_at_fork(after_in_child=ULIDS.reset)


def new_event_id(now: float) -> str:
    return "evt_" + ULIDS.new(now)


def batch_id(event_ids: Sequence[str]) -> str:
    """The ``webhook-id`` of a batch: a digest of its sorted event ids, so the
    same batch retried keeps its id."""
    digest = hashlib.sha256(",".join(sorted(event_ids)).encode()).digest()
    return "batch_" + _base32(int.from_bytes(digest[:16], "big"), 26)


_iso_second: tuple[int, str] = (-1, "")


def iso(ts: float) -> str:
    """``2024-05-01T12:00:00.123Z``: UTC, milliseconds (truncated, after rounding
    to the microsecond as ``datetime.fromtimestamp`` does)."""
    global _iso_second
    if ts < 0:
        moment = datetime.fromtimestamp(ts, UTC)
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    frac, whole = math.modf(ts)
    micros = round(frac * 1e6)
    second = int(whole)
    if micros >= 1_000_000:
        micros -= 1_000_000
        second += 1
    cached_second, prefix = _iso_second
    if second != cached_second:
        prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        _iso_second = (second, prefix)
    return f"{prefix}{micros // 1000:03d}Z"


_parsed_second: tuple[str, int] = ("", 0)


def parse_iso(text: str) -> float:
    global _parsed_second
    millis = text[20:23]
    if len(text) != 24 or text[19] != "." or text[23] != "Z" or not millis.isdecimal():
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    head = text[:19]
    cached, second = _parsed_second
    if head != cached:
        second = int(datetime.fromisoformat(head + "+00:00").timestamp())  # validates it
        _parsed_second = (head, second)
    return (second * 1_000_000 + int(millis) * 1000) / 1_000_000  # as datetime.timestamp()


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str)
_PLAIN = re.compile(r'[^"\\\x00-\x1f\x7f-\U0010ffff]*')  # needs no escaping in JSON
# What ``_serialise`` writes; stored events that match are not parsed until asked.
_HEAD = re.compile(
    rb'\{"id":"([!#-\[\]-~]*)","type":"([!#-\[\]-~]*)","timestamp":"([!#-\[\]-~]*)","data":\{'
)


# The C encoder ``_ENCODER.encode`` builds per call, built once (no circular-reference
# check: a self-referencing value ends in RecursionError, then goes the slow way).
_C_ENCODER = (
    c_make_encoder(None, str, encode_basestring, None, ":", ",", False, False, True)
    if c_make_encoder is not None
    else None
)


def _encode(value: dict[str, Any]) -> str:
    if _C_ENCODER is not None:
        try:
            return "".join(_C_ENCODER(value, 0))
        except RecursionError:
            pass
    return _ENCODER.encode(value)


def _dumps(value: Any) -> bytes:
    return _ENCODER.encode(value).encode()


def _serialise(
    id: str, type: str, timestamp: float, data: Mapping[str, Any], *, plain: bool = False
) -> bytes:
    """The event's JSON, as ``json.dumps`` writes it (compact, UTF-8), without
    building the envelope object. ``plain``: ``id`` and ``type`` need no escaping."""
    stamp = iso(timestamp)
    if not isinstance(data, dict):
        data = dict(data)
    if plain or (_PLAIN.fullmatch(id) and _PLAIN.fullmatch(type)):
        body = _encode(data)
        return f'{{"id":"{id}","type":"{type}","timestamp":"{stamp}","data":{body}}}'.encode()
    return _dumps({"id": id, "type": type, "timestamp": stamp, "data": data})


class _StoredData(Mapping[str, Any]):
    """An event's ``data`` parsed from its stored JSON on first use: delivery
    needs only the bytes, so most stored events are never parsed."""

    __slots__ = ("_data", "_raw")

    def __init__(self, raw: bytes) -> None:
        self._raw = raw
        self._data: dict[str, Any] | None = None

    def _load(self) -> dict[str, Any]:
        if self._data is None:
            try:
                data = json.loads(self._raw)["data"]
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"not an event: {exc}") from exc
            if not isinstance(data, dict):
                raise ValueError("not an event: data is not an object")
            self._data = data
        return self._data

    def __getitem__(self, key: str) -> Any:
        return self._load()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())

    def __repr__(self) -> str:
        return repr(self._load())


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
            raw = _serialise(self.id, self.type, self.timestamp, self.data)
            object.__setattr__(self, "raw", raw)

    @classmethod
    def create(cls, type: str, data: Mapping[str, Any], now: float) -> Event:
        if type not in TYPE_FIELDS:
            raise ValueError(f"unknown event type {type!r}")
        id = new_event_id(now)
        return cls(id, type, now, data, _serialise(id, type, now, data, plain=True))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Event:
        """Parse stored JSON, keeping its exact bytes. ``ValueError`` if malformed.

        JSON in the shape this module writes (``{"id":"…","type":"…","timestamp":"…",
        "data":{…}}``) is not decoded: its ``data`` is parsed when first read."""
        blob = raw.encode() if isinstance(raw, str) else bytes(raw)
        head = _HEAD.match(blob)
        if head is not None and blob.endswith(b"}}"):
            id, type, stamp = head.group(1, 2, 3)
            try:
                at = parse_iso(stamp.decode())
            except ValueError:
                pass  # the general path says what is wrong
            else:
                return cls(id.decode(), type.decode(), at, _StoredData(blob), blob)
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
