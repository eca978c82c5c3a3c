"""Talking to a bench redis-server: command counts, memory, raw pipelines.

``RedisProbe`` is a tiny synchronous RESP client (a plain socket and the
hiredis reader). Unlike redis-py it sends nothing of its own on connect
(redis-py sends ``CLIENT SETINFO``), so the only commands the harness adds to
a server's counts are its own ``INFO`` calls, which are left out by name.

Round trips are counted from ``INFO commandstats``. Redis counts the commands
a Lua script runs (``HMGET``, ``PEXPIRE``, ...) like any other, so the
commands of Sluice's check script, read from the script itself, are told
apart from the ones clients sent: every command a client sent is one round
trip (pipelined or not, each request waits for its reply).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import hiredis

from proxy.limits.scripts import CHECK_SCRIPT

CommandArg = str | bytes | int | float

# Every command the check script can run (redis.call / redis.pcall with a literal name).
SCRIPT_COMMANDS = frozenset(
    name.decode().lower()
    for name in re.findall(rb"redis\.p?call\(\s*['\"]([A-Za-z_]+)['\"]", CHECK_SCRIPT)
)
SCRIPT_CALLS = frozenset({"evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "fcall_ro"})
OWN_COMMANDS = frozenset({"info"})  # what RedisProbe itself sends while counting


class RedisReplyError(Exception):
    """An error reply."""


class RedisProbe:
    """One blocking connection; ``url`` is ``redis://host:port[/db]``."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        parts = urlsplit(url)
        self.url = url
        self._sock = socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or 6379), timeout=timeout
        )
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._reader = hiredis.Reader()

    def _reply(self) -> Any:
        while True:
            reply = self._reader.gets()
            if reply is not False:
                return reply
            data = self._sock.recv(1 << 16)
            if not data:
                raise ConnectionError(f"{self.url} closed the connection")
            self._reader.feed(data)

    def call(self, *args: CommandArg) -> Any:
        self._sock.sendall(hiredis.pack_command(args))
        reply = self._reply()
        if isinstance(reply, hiredis.ReplyError):
            raise RedisReplyError(str(reply))
        return reply

    def pipeline(self, commands: Iterable[Sequence[CommandArg]], depth: int = 1000) -> list[Any]:
        """Send ``commands`` ``depth`` at a time, back to back; every reply, in order
        (error replies as ``hiredis.ReplyError`` values, not raised)."""
        replies: list[Any] = []
        batch: list[bytes] = []

        def flush() -> None:
            self._sock.sendall(b"".join(batch))
            replies.extend(self._reply() for _ in batch)
            batch.clear()

        for command in commands:
            batch.append(hiredis.pack_command(tuple(command)))
            if len(batch) >= depth:
                flush()
        if batch:
            flush()
        return replies

    def info(self, section: str) -> dict[str, str]:
        text = self.call("INFO", section).decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.partition(":")
                out[name] = value
        return out

    def command_stats(self) -> dict[str, tuple[int, int]]:
        """(calls, microseconds) so far per command (``cmdstat_<name>:calls=N,usec=T,...``)."""
        stats = {}
        for name, value in self.info("commandstats").items():
            fields = dict(item.split("=", 1) for item in value.split(","))
            stats[name.removeprefix("cmdstat_")] = (int(fields["calls"]), int(fields["usec"]))
        return stats

    def used_memory(self) -> int:
        return int(self.info("memory")["used_memory"])

    def close(self) -> None:
        self._sock.close()


Stats = Mapping[str, tuple[int, int]]


@dataclass(frozen=True)
class CommandCounts:
    """Commands a Redis server ran between two ``command_stats()`` readings."""

    script_calls: int  # EVALSHA (and EVAL, on NOSCRIPT or otherwise)
    client: int  # every command sent by a client: round trips (the probe's INFO left out)
    total: int  # client commands plus those the check script ran inside them
    script_usec: int  # Redis's time inside those script calls
    by_command: dict[str, int]

    @classmethod
    def between(cls, before: Stats, after: Stats) -> CommandCounts:
        delta = {
            name: (calls - before.get(name, (0, 0))[0], usec - before.get(name, (0, 0))[1])
            for name, (calls, usec) in after.items()
            if name not in OWN_COMMANDS and calls != before.get(name, (0, 0))[0]
        }
        return cls(
            script_calls=sum(n for name, (n, _) in delta.items() if name in SCRIPT_CALLS),
            client=sum(n for name, (n, _) in delta.items() if name not in SCRIPT_COMMANDS),
            total=sum(n for n, _ in delta.values()),
            script_usec=sum(us for name, (_, us) in delta.items() if name in SCRIPT_CALLS),
            by_command={name: n for name, (n, _) in delta.items()},
        )
