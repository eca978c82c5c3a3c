"""The Redis outbox: one stream and one consumer group per subscription.

Keys of subscription S share the hash tag ``{S}`` (one cluster slot)::

    PREFIX:{S}:stream    stream, field e = event JSON; group "delivery"
    PREFIX:{S}:retry     hash  unit → {"attempts", "error", "events": [JSON, ...]}
    PREFIX:{S}:due       zset  unit → next attempt (epoch s; a lease pushes it on)
    PREFIX:{S}:born      zset  unit → creation time of its oldest event
    PREFIX:{S}:dead      hash  event id → "<info JSON>\\n<event JSON>"
    PREFIX:{S}:deadidx   zset  event id, score 0 (paged lexically = by creation)
    PREFIX:{S}:state     hash  depth, disabled, disabled_reason, last_success,
                               last_error, last_error_at, failures

Fresh events are read with ``XREADGROUP`` (instances share the group, so each
entry goes to one of them); entries left pending by a crashed consumer are
taken over with ``XAUTOCLAIM`` once idle for the lease time. A failed delivery
leaves the group (``XACK``) and becomes a retry unit in the same Lua step.
The stream is trimmed with ``XTRIM MINID`` to the oldest entry the group still
needs (its oldest pending entry, or its last-delivered id) — never by length.
Durability across a Redis restart is Redis's own (enable AOF).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from proxy.events.model import Event
from proxy.events.outbox import DeadLetter, Delivery, QueueStats, SubscriptionState
from proxy.storage.errors import ResponseError
from proxy.storage.redis_client import RedisBackend, script_sha

GROUP = "delivery"
IDLE_CONSUMER_MS = 3_600_000  # consumers of departed instances, with nothing pending
_LUA = files("proxy.events") / "lua"


@dataclass(frozen=True, slots=True)
class _Script:
    body: bytes
    sha: str


def _script(name: str) -> _Script:
    body = (_LUA / f"{name}.lua").read_bytes()
    return _Script(body, script_sha(body))


APPEND, LEASE, ACK, RETRY, BURY, REPLAY = map(
    _script, ("append", "lease", "ack", "retry", "bury", "replay")
)


@dataclass(frozen=True, slots=True)
class Keys:
    stream: str
    retry: str
    due: str
    born: str
    dead: str
    deadidx: str
    state: str


def keys_for(prefix: str, subscription: str) -> Keys:
    base = f"{prefix}:{{{subscription}}}"
    return Keys(*(f"{base}:{part}" for part in Keys.__slots__))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(reply: Any) -> dict[str, Any]:
    items = list(reply or [])
    return {_text(items[i]): items[i + 1] for i in range(0, len(items) - 1, 2)}


def _stream_id(text: str) -> tuple[int, int]:
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _num(value: Any) -> float | None:
    return None if value in (None, b"") else float(value)


def _s(value: float) -> str:
    return repr(round(value, 3))


class RedisOutbox:
    def __init__(self, backend: RedisBackend, *, prefix: str = "sluice:events") -> None:
        self.backend = backend
        self.prefix = prefix
        self._cursors: dict[str, str] = {}

    def keys(self, subscription: str) -> Keys:
        return keys_for(self.prefix, subscription)

    async def _eval(self, script: _Script, keys: Sequence[str], args: Sequence[str]) -> Any:
        return await self.backend.evalsha(script.body, script.sha, keys, args)

    async def _ensure_group(self, k: Keys) -> None:
        try:
            await self.backend.execute(
                "XGROUP", "CREATE", k.stream, GROUP, "0", "MKSTREAM", key=k.stream
            )
        except ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise

    async def append(self, subscription: str, events: Sequence[Event], *, batch: int = 1) -> None:
        if events:
            k = self.keys(subscription)
            await self._eval(APPEND, (k.stream, k.state), (GROUP, *(e.text for e in events)))

    def _entries(self, subscription: str, entries: Any, out: list[Delivery]) -> list[str]:
        """Parse stream entries into ``out``; the ids of unreadable ones are returned."""
        bad = []
        for entry in entries or []:
            if not entry or entry[1] is None:
                continue
            stream_id, fields = _text(entry[0]), _pairs(entry[1])
            try:
                event = Event.from_json(fields["e"])
            except (KeyError, ValueError):
                bad.append(stream_id)
                continue
            out.append(Delivery((event,), 0, None, (stream_id,)))
        return bad

    async def claim_new(
        self, subscription: str, consumer: str, now: float, lease: float, limit: int
    ) -> list[Delivery]:
        k = self.keys(subscription)
        out: list[Delivery] = []
        bad: list[str] = []
        try:
            cursor = self._cursors.get(subscription, "0-0")
            reply = await self.backend.execute(
                "XAUTOCLAIM", k.stream, GROUP, consumer, int(lease * 1000), cursor,
                "COUNT", limit, key=k.stream,
            )  # fmt: skip
            self._cursors[subscription] = _text(reply[0])
            bad += self._entries(subscription, reply[1], out)
            if len(out) < limit:
                reply = await self.backend.execute(
                    "XREADGROUP", "GROUP", GROUP, consumer, "COUNT", limit - len(out),
                    "STREAMS", k.stream, ">", key=k.stream,
                )  # fmt: skip
                for _, entries in reply or []:
                    bad += self._entries(subscription, entries, out)
        except ResponseError as exc:
            if not str(exc).startswith("NOGROUP"):
                raise
            await self._ensure_group(k)  # the stream or group vanished (e.g. Redis lost data)
        for stream_id in bad:
            reason = "unreadable stream entry"
            delivery = Delivery((), 0, None, (stream_id,))
            await self.bury(subscription, delivery, attempts=0, reason=reason, now=now)
        return out

    async def claim_due(
        self, subscription: str, consumer: str, now: float, lease: float
    ) -> Delivery | None:
        k = self.keys(subscription)
        reply = await self._eval(LEASE, (k.due, k.retry, k.born), (_s(now), _s(now + lease)))
        if not reply:
            return None
        unit, payload = _text(reply[0]), json.loads(reply[1])
        events = tuple(Event.from_json(text) for text in payload["events"])
        return Delivery(events, int(payload["attempts"]), unit, ())

    async def ack(self, subscription: str, delivery: Delivery, now: float) -> None:
        k = self.keys(subscription)
        await self._eval(
            ACK,
            (k.stream, k.retry, k.due, k.born, k.state),
            (GROUP, _s(now), delivery.unit or "", str(len(delivery.events)), *delivery.handles),
        )

    async def retry(
        self,
        subscription: str,
        delivery: Delivery,
        *,
        unit: str,
        attempts: int,
        at: float,
        error: str,
        now: float,
    ) -> None:
        k = self.keys(subscription)
        payload = json.dumps(
            {"attempts": attempts, "error": error, "events": [e.text for e in delivery.events]},
            separators=(",", ":"),
        )
        born = min(e.timestamp for e in delivery.events)
        await self._eval(
            RETRY,
            (k.stream, k.retry, k.due, k.born, k.state),
            (
                GROUP, _s(now), delivery.unit or "", unit, _s(at), _s(born), payload, error,
                *delivery.handles,
            ),
        )  # fmt: skip

    async def bury(
        self, subscription: str, delivery: Delivery, *, attempts: int, reason: str, now: float
    ) -> None:
        k = self.keys(subscription)
        info = json.dumps({"attempts": attempts, "reason": reason, "dead_at": now})
        records = [x for e in delivery.events for x in (e.id, f"{info}\n{e.text}")]
        await self._eval(
            BURY,
            (k.stream, k.retry, k.due, k.born, k.state, k.dead, k.deadidx),
            (
                GROUP, _s(now), delivery.unit or "", str(len(delivery.events)), reason,
                str(len(delivery.handles)), *delivery.handles, *records,
            ),
        )  # fmt: skip

    async def dead_letters(
        self, subscription: str, after: str | None = None, limit: int = 100
    ) -> list[DeadLetter]:
        k = self.keys(subscription)
        start = f"({after}" if after else "-"
        ids = await self.backend.execute(
            "ZRANGEBYLEX", k.deadidx, start, "+", "LIMIT", 0, limit, key=k.deadidx
        )
        if not ids:
            return []
        records = await self.backend.execute("HMGET", k.dead, *ids, key=k.dead)
        out = []
        for record in records:
            if record is None:
                continue
            info_text, _, event_text = bytes(record).partition(b"\n")
            info = json.loads(info_text)
            event = Event.from_json(event_text)
            out.append(DeadLetter(event, int(info["attempts"]), info["reason"], info["dead_at"]))
        return out

    async def replay(self, subscription: str, ids: Sequence[str] | None, now: float) -> int:
        k = self.keys(subscription)
        keys = (k.stream, k.state, k.dead, k.deadidx)
        if ids is not None:
            chosen = list(ids)
            moved = 0
            for i in range(0, len(chosen), 500):
                moved += int(await self._eval(REPLAY, keys, (GROUP, *chosen[i : i + 500])))
            return moved
        moved = 0
        while True:
            page = await self.backend.execute(
                "ZRANGEBYLEX", k.deadidx, "-", "+", "LIMIT", 0, 500, key=k.deadidx
            )
            if not page:
                return moved
            moved += int(await self._eval(REPLAY, keys, (GROUP, *map(_text, page))))

    async def state(self, subscription: str) -> SubscriptionState:
        k = self.keys(subscription)
        h = _pairs(await self.backend.execute("HGETALL", k.state, key=k.state))
        reason, error = h.get("disabled_reason"), h.get("last_error")
        return SubscriptionState(
            disabled=h.get("disabled") == b"1",
            disabled_reason=_text(reason) if reason else None,
            last_success=_num(h.get("last_success")),
            last_error=_text(error) if error else None,
            last_error_at=_num(h.get("last_error_at")),
            failures=int(h.get("failures") or 0),
        )

    async def set_disabled(
        self, subscription: str, disabled: bool, reason: str | None, now: float
    ) -> None:
        k = self.keys(subscription)
        if disabled:
            await self.backend.execute(
                "HSET", k.state, "disabled", 1, "disabled_reason", reason or "", key=k.state
            )
        else:
            await self.backend.execute(
                "HSET", k.state, "disabled", 0, "disabled_reason", "", "failures", 0, key=k.state
            )

    async def _group(self, k: Keys) -> tuple[str | None, str | None]:
        """(last-delivered id, oldest pending id) of the group, if it exists."""
        try:
            groups = await self.backend.execute("XINFO", "GROUPS", k.stream, key=k.stream)
            summary = await self.backend.execute("XPENDING", k.stream, GROUP, key=k.stream)
        except ResponseError:
            return None, None  # no stream yet
        info = next(
            (_pairs(g) for g in groups or [] if _pairs(g).get("name") == GROUP.encode()), {}
        )
        last = info.get("last-delivered-id")
        oldest = summary[1] if summary and summary[0] else None
        return (_text(last) if last else None), (_text(oldest) if oldest else None)

    async def stats(self, subscription: str) -> QueueStats:
        k = self.keys(subscription)
        depth = await self.backend.execute("HGET", k.state, "depth", key=k.state)
        dead = await self.backend.execute("ZCARD", k.deadidx, key=k.deadidx)
        candidates: list[float] = []
        last, oldest = await self._group(k)
        if oldest:
            candidates.append(_stream_id(oldest)[0] / 1000)
        first = await self.backend.execute(
            "XRANGE", k.stream, f"({last}" if last else "-", "+", "COUNT", 1, key=k.stream
        )
        if first:
            candidates.append(_stream_id(_text(first[0][0]))[0] / 1000)
        born = await self.backend.execute("ZRANGE", k.born, 0, 0, "WITHSCORES", key=k.born)
        if born:
            candidates.append(float(born[1]))
        return QueueStats(max(0, int(depth or 0)), min(candidates, default=None), int(dead))

    async def maintain(self, subscription: str) -> None:
        """Trim the stream below the oldest entry the group still needs."""
        k = self.keys(subscription)
        last, oldest = await self._group(k)
        if last is None:
            return
        keep = min((last, oldest) if oldest else (last,), key=_stream_id)
        await self.backend.execute("XTRIM", k.stream, "MINID", keep, key=k.stream)
        consumers = await self.backend.execute("XINFO", "CONSUMERS", k.stream, GROUP, key=k.stream)
        for consumer in map(_pairs, consumers or []):
            if consumer.get("pending") == 0 and int(consumer.get("idle") or 0) > IDLE_CONSUMER_MS:
                await self.backend.execute(
                    "XGROUP", "DELCONSUMER", k.stream, GROUP, consumer["name"], key=k.stream
                )

    async def close(self) -> None:
        await self.backend.close()
