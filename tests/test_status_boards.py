"""The clients leaderboard stores on SQLite, standalone Redis and a 3-node Cluster."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.status import clients
from proxy.status.boards import ClientBoard, RedisClientBoard, SQLiteClientBoard
from proxy.status.clients import TopClient
from proxy.storage.redis_client import open_redis


def _redis_board(request: pytest.FixtureRequest, kind: str, tag: str) -> RedisClientBoard:
    server = request.getfixturevalue("redis" if kind == "redis" else "redis_cluster")
    return RedisClientBoard(open_redis(server.url), server.url, prefix=f"t:{{{tag}}}")


@pytest.fixture(params=["sqlite", "redis", "cluster"])
async def board(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ClientBoard]:
    store: ClientBoard
    if request.param == "sqlite":
        store = SQLiteClientBoard(tmp_path / "status.sqlite3")
    else:
        store = _redis_board(request, request.param, tmp_path.name)
    yield store
    await store.close()


async def test_minutes_add_up_per_window_and_board(board: ClientBoard) -> None:
    await board.add("live", 100, {("r", "a"): 3, ("r", "b"): 1})
    await board.add("live", 100, {("r", "a"): 2})
    await board.add("live", 98, {("r", "b"): 10, ("q", "a"): 1})
    await board.add("live", 40, {("r", "c"): 99})  # outside both windows below
    await board.add("candidate", 100, {("r", "z"): 50})
    assert await board.top("live", [100, 99, 98], 10) == [
        TopClient("r", "b", 11),
        TopClient("r", "a", 5),
        TopClient("q", "a", 1),
    ]
    assert await board.top("live", [100], 1) == [TopClient("r", "a", 5)]
    assert await board.top("live", [7, 6], 10) == []
    assert await board.top("candidate", [100], 10) == [TopClient("r", "z", 50)]
    assert await board.add("live", 101, {}) is None


async def test_a_bucket_keeps_its_largest_members(
    board: ClientBoard, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("proxy.status.boards.BUCKET_CAP", 3)
    await board.add("live", 5, {("r", f"c{i}"): i + 1 for i in range(6)})
    top = await board.top("live", [5], 10)
    assert top == [TopClient("r", "c5", 6), TopClient("r", "c4", 5), TopClient("r", "c3", 4)]


async def test_sqlite_prunes_minutes_older_than_the_longest_window(tmp_path: Path) -> None:
    board = SQLiteClientBoard(tmp_path / "s.sqlite3")
    try:
        await board.add("live", 1000, {("r", "old"): 5})
        await board.add("live", 1000 + max(clients.WINDOWS.values()) + 2, {("r", "new"): 1})
        assert await board.top("live", list(range(900, 1100)), 10) == [TopClient("r", "new", 1)]
    finally:
        await board.close()
