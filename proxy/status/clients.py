"""The rate-limited clients leaderboard: counting in memory, in minute buckets (pure).

Every rejection adds one to a per-worker ``Tally`` keyed by (board, rule,
client): a dict increment, nothing on the wire. Every couple of seconds the
tally is drained into the shared store (Redis sorted sets or the embedded
SQLite file) under the current minute, so "the last 5 minutes" and "the last
hour" are the sums of the last 5 and 60 minute buckets, across workers and
instances sharing the store.

Boards: ``live`` counts the rules in force; ``candidate`` counts requests the
what-if candidate rules would reject that the live rules let through.

Bounds, so an attack from a million addresses cannot grow memory or the
store without limit: a tally holds at most ``max_entries`` keys between two
drains (further new keys are counted in ``overflow`` only), a drain hands the
store the ``keep`` largest counts per board, and each stored minute bucket
keeps its ``BUCKET_CAP`` largest members. The leaderboard is a heavy-hitters
view: a client rejected a few times among very many may be left out, and
under an attack from more than ``max_entries`` clients per drain interval
even a heavy one may miss the counts of the intervals it arrived late in.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

BOARDS = ("live", "candidate")
WINDOWS = {"5m": 5, "1h": 60}  # minutes
BUCKET_TTL = 3 * 3600  # a minute bucket outlives the longest window
BUCKET_CAP = 2000
TOP_LIMIT = 10
TallyKey = tuple[str, str, str]  # board, rule, client


@dataclass(frozen=True, slots=True)
class TopClient:
    rule: str
    client: str
    rejections: int


def minute_of(at: float) -> int:
    return int(at // 60)


def window_minutes(window: str, now: float) -> list[int]:
    """The minute buckets of ``window`` at ``now``, newest first (the current, partial,
    minute counts; so "5m" covers between four and five minutes of history)."""
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {', '.join(WINDOWS)}, got {window!r}")
    current = minute_of(now)
    return [current - i for i in range(WINDOWS[window])]


def member(rule: str, client: str) -> str:
    """How an entry is stored: the rule name (never holds a tab) then the client."""
    return f"{rule}\t{client}"


def split_member(value: str) -> tuple[str, str]:
    rule, _, client = value.partition("\t")
    return rule, client


def ranked(counts: Mapping[tuple[str, str], float], limit: int = TOP_LIMIT) -> list[TopClient]:
    """The ``limit`` largest (rule, client) counts, largest first, ties by name."""
    best = heapq.nsmallest(limit, counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [TopClient(rule, client, round(n)) for (rule, client), n in best if n > 0]


class Tally:
    def __init__(self, *, max_entries: int = 10_000, keep: int = 200) -> None:
        self.max_entries = max_entries
        self.keep = keep
        self.overflow = 0
        self._counts: dict[TallyKey, int] = {}

    def __len__(self) -> int:
        return len(self._counts)

    def add(self, board: str, rule: str, client: str, n: int = 1) -> None:
        key = (board, rule, client)
        counts = self._counts
        if key in counts:
            counts[key] += n
        elif len(counts) < self.max_entries:
            counts[key] = n
        else:
            self.overflow += n

    def merge(self, counts: Iterable[tuple[TallyKey, int]]) -> None:
        """Put back what a failed drain took (bounded like ``add``)."""
        for (board, rule, client), n in counts:
            self.add(board, rule, client, n)

    def drain(self) -> dict[str, dict[tuple[str, str], int]]:
        """Per board, the ``keep`` largest (rule, client) counts; the tally starts over."""
        counts, self._counts = self._counts, {}
        boards: dict[str, dict[tuple[str, str], int]] = {}
        for (board, rule, client), n in counts.items():
            boards.setdefault(board, {})[(rule, client)] = n
        for board, entries in boards.items():
            if len(entries) > self.keep:
                best = heapq.nlargest(self.keep, entries.items(), key=lambda kv: kv[1])
                boards[board] = dict(best)
        return boards
