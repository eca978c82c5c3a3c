"""The pipelined Redis client against real servers: standalone, Sentinel, Cluster."""

from __future__ import annotations

import asyncio
import select
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.crc import key_slot as redis_py_key_slot

from proxy.storage.errors import (
    AskError,
    ClusterDownError,
    LoadingError,
    MovedError,
    NoScriptError,
    ReadOnlyError,
    ResponseError,
    StorageError,
    StorageTimeout,
    StorageUnavailable,
    TryAgainError,
    response_error,
)
from proxy.storage.redis_client import (
    RedisBackend,
    ScriptCall,
    SentinelRedis,
    open_redis,
    script_sha,
)
from proxy.storage.redis_cluster import key_slot
from proxy.storage.redis_url import parse_redis_url
from proxy.storage.resp import ConnectOptions, open_connection
from tests.servers import RedisServer, free_port, redis_cli, redis_server
from tests.topologies import RedisClusterSetup, RedisSentinelSetup

INCR_BY = b"return redis.call('INCRBY', KEYS[1], ARGV[1])"
INCR_BY_SHA = script_sha(INCR_BY)
TWO_KEYS = b"return {redis.call('INCR', KEYS[1]), redis.call('INCR', KEYS[2])}"


async def eventually(probe: Callable[[], Awaitable[Any]], within: float = 8.0) -> Any:
    """``probe()``'s first result that does not raise a StorageError, within ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await probe()
        except StorageError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


@pytest.fixture
async def client(redis: RedisServer) -> AsyncIterator[RedisBackend]:
    backend = open_redis(redis.url, timeout=1.0, connect_timeout=1.0, pool_size=2)
    yield backend
    await backend.close()


# -- pure: error replies, URLs, slots -------------------------------------------------


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("ERR unknown command", ResponseError),
        ("NOSCRIPT No matching script. Please use EVAL.", NoScriptError),
        ("LOADING Redis is loading the dataset in memory", LoadingError),
        ("READONLY You can't write against a read only replica.", ReadOnlyError),
        ("TRYAGAIN Multiple keys request during rehashing of slot", TryAgainError),
        ("CLUSTERDOWN The cluster is down", ClusterDownError),
        ("MASTERDOWN Link with MASTER is down", ClusterDownError),
    ],
)
def test_error_replies_map_to_typed_errors(message: str, kind: type[ResponseError]) -> None:
    error = response_error(message)
    assert type(error) is kind
    assert str(error) == message


def test_redirects_carry_slot_and_address() -> None:
    moved = response_error("MOVED 3999 127.0.0.1:6381")
    assert isinstance(moved, MovedError)
    assert (moved.slot, moved.host, moved.port) == (3999, "127.0.0.1", 6381)
    ask = response_error("ASK 12 ::1:7000")
    assert isinstance(ask, AskError)
    assert (ask.slot, ask.host, ask.port) == (12, "::1", 7000)


def test_urls_parse() -> None:
    u = parse_redis_url("redis://:s%40cret@example.com:7000/3")
    assert (u.kind, u.hosts, u.password, u.username, u.db) == (
        "standalone", (("example.com", 7000),), "s@cret", None, 3,
    )  # fmt: skip
    assert parse_redis_url("redis://localhost").hosts == (("localhost", 6379),)
    assert parse_redis_url("rediss://u:p@[::1]:6380/0?ssl_cert_reqs=none").tls
    s = parse_redis_url("redis+sentinel://a:1,b/mymaster?db=2&password=pw&sentinel_password=sp")
    assert (s.kind, s.hosts, s.service, s.db, s.password, s.sentinel_password) == (
        "sentinel", (("a", 1), ("b", 26379)), "mymaster", 2, "pw", "sp",
    )  # fmt: skip
    c = parse_redis_url("redis+cluster://h1:1,h2:2,h3")
    assert (c.kind, c.hosts) == ("cluster", (("h1", 1), ("h2", 2), ("h3", 6379)))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://x", "scheme must be one of redis, rediss, redis+sentinel, redis+cluster"),
        ("redis://", "no host"),
        ("redis://a:1,b:2", "redis:// takes exactly one host"),
        ("redis://h:port", "bad port in 'h:port'"),
        ("redis://h/x", "db must be a number, got 'x'"),
        ("redis://pw@h", "credentials must be ':password' or 'user:password'"),
        ("redis://h?ssl_ca_certs=x", "unknown parameter(s) ssl_ca_certs"),
        ("redis+sentinel://h:1", "the path must name the sentinel service"),
        ("redis+cluster://h:1/2", "a cluster has only db 0"),
    ],
)
def test_bad_urls_say_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ValueError, match="invalid Redis URL") as info:
        open_redis(url)
    assert str(info.value).endswith(message)


def test_key_slot_follows_hash_tag_rules() -> None:
    keys = ["", "a", "user:1000", "{user1}.following", "{user1}.followers", "foo{}{bar}",
            "foo{{bar}}zap", "foo{bar}{zap}", "{}", "é", "{a"]  # fmt: skip
    for key in keys:
        assert key_slot(key) == redis_py_key_slot(key.encode()), key
    assert key_slot("{user1}.following") == key_slot("user1")
    assert key_slot("foo{}{bar}") != key_slot("bar")  # an empty first tag: the whole key hashes
    assert key_slot("foo{{bar}}zap") == key_slot("{bar")


# -- standalone ----------------------------------------------------------------------


async def test_concurrent_calls_are_pipelined_and_matched(client: RedisBackend) -> None:
    echoes = [client.execute("ECHO", f"value-{i}") for i in range(1000)]
    incrs = [client.execute("INCRBY", f"k{i}", i) for i in range(1000)]
    ids = [client.execute("CLIENT", "ID") for _ in range(100)]
    results = await asyncio.gather(*echoes, *incrs, *ids)
    assert results[:1000] == [f"value-{i}".encode() for i in range(1000)]
    assert results[1000:2000] == list(range(1000))
    assert len(set(results[2000:])) <= 2  # the pool size: 2,100 calls shared <= two sockets


async def test_a_call_on_an_idle_connection_is_written_at_once(redis: RedisServer) -> None:
    """Nothing in flight: the command leaves before the event loop turns again (the
    reply is readable on the socket while this test holds the loop); a call made
    while it is out waits for the turn, batched with the others of that turn."""
    conn = await open_connection("127.0.0.1", redis.port, ConnectOptions(timeout=5.0))
    try:
        sock = conn._transport.get_extra_info("socket")  # type: ignore[union-attr]
        first = conn.send(("ECHO", "first"))
        # Blocking wait, the loop held: only a command already written gets an answer.
        readable, _, _ = select.select([sock.fileno()], [], [], 5.0)
        assert readable, "the call on an idle connection was not written before the loop turned"
        second, third = conn.send(("ECHO", "second")), conn.send(("ECHO", "third"))
        assert conn._wbuf, "calls made while one is in flight are batched"
        assert await asyncio.gather(first, second, third) == [b"first", b"second", b"third"]
        assert await conn.call("ECHO", "again") == b"again"  # idle again: at once, in order
    finally:
        await conn.close()


async def test_error_replies_raise_and_keep_order(client: RedisBackend) -> None:
    await client.execute("SET", "s", "text")
    calls = [client.execute("ECHO", "a"), client.execute("INCR", "s"),
             client.execute("NOSUCHCOMMAND"), client.execute("ECHO", "b")]  # fmt: skip
    a, wrong_type, unknown, b = await asyncio.gather(*calls, return_exceptions=True)
    assert (a, b) == (b"a", b"b")
    assert isinstance(wrong_type, ResponseError) and "not an integer" in str(wrong_type)
    assert isinstance(unknown, ResponseError) and str(unknown).startswith("ERR unknown command")


async def test_cancelled_callers_do_not_shift_replies(client: RedisBackend) -> None:
    tasks = [asyncio.ensure_future(client.execute("ECHO", str(i))) for i in range(20)]
    await asyncio.sleep(0)  # all queued
    for task in tasks[::2]:
        task.cancel()
    results = await asyncio.gather(*tasks[1::2])
    assert results == [str(i).encode() for i in range(1, 20, 2)]
    assert await client.execute("ECHO", "next") == b"next"


async def test_evalsha_loads_the_script_on_noscript(client: RedisBackend) -> None:
    await client.execute("SCRIPT", "FLUSH")
    results = await asyncio.gather(
        *(client.evalsha(INCR_BY, INCR_BY_SHA, ["counter"], [2]) for _ in range(50))
    )
    assert sorted(results) == list(range(2, 101, 2))
    assert await client.execute("SCRIPT", "EXISTS", INCR_BY_SHA) == [1]
    many = await client.evalsha_many(
        [ScriptCall(INCR_BY, INCR_BY_SHA, ["x"], [1]), ScriptCall(INCR_BY, INCR_BY_SHA, ["y"], [5])]
    )
    assert many == [1, 5]


async def test_script_errors_are_response_errors(client: RedisBackend) -> None:
    bad = b"return redis.call('NOSUCHCOMMAND')"
    with pytest.raises(ResponseError, match="Unknown Redis command"):
        await client.evalsha(bad, script_sha(bad), [], [])


async def test_deadline_fails_the_call_and_the_connection_recovers(redis: RedisServer) -> None:
    fast = open_redis(redis.url, timeout=0.1, pool_size=1)
    admin = open_redis(redis.url, timeout=2.0)
    try:
        assert await fast.execute("ECHO", "warm") == b"warm"
        await admin.execute("CLIENT", "PAUSE", 400, "ALL")
        started = time.monotonic()
        results = await asyncio.gather(
            *(fast.execute("ECHO", f"late-{i}") for i in range(50)), return_exceptions=True
        )
        elapsed = time.monotonic() - started
        assert all(isinstance(r, StorageTimeout) for r in results), results[:3]
        assert 0.09 <= elapsed < 0.35
        # A call sent while Redis is still paused gets its own deadline too.
        started = time.monotonic()
        with pytest.raises(StorageTimeout):
            await fast.execute("ECHO", "still-paused")
        assert time.monotonic() - started < 0.2
        await asyncio.sleep(0.45 - (time.monotonic() - started))  # the pause is over
        # Queued behind the late replies on the one connection: they must be dropped.
        assert await fast.execute("ECHO", "fresh") == b"fresh"
        assert await asyncio.gather(*(fast.execute("ECHO", str(i)) for i in range(10))) == [
            str(i).encode() for i in range(10)
        ]
    finally:
        await fast.close()
        await admin.close()


async def test_a_stuck_connection_is_dropped(redis: RedisServer) -> None:
    options = ConnectOptions(timeout=0.05, stuck_after=0.15)
    conn = await open_connection("127.0.0.1", redis.port, options)
    admin = open_redis(redis.url, timeout=2.0)
    try:
        await admin.execute("CLIENT", "PAUSE", 1000, "ALL")
        with pytest.raises(StorageTimeout):
            await conn.call("PING")
        lost = asyncio.Event()
        conn.on_lost = lambda _conn: lost.set()
        async with asyncio.timeout(0.8):
            await lost.wait()  # aborted ~0.15 s after the missed deadline
        assert not conn.is_usable
        with pytest.raises(StorageUnavailable):
            await conn.call("PING")
    finally:
        await conn.close()
        await admin.execute("PING")  # answered once the pause is over
        await admin.close()


async def test_reconnects_after_a_restart_without_busy_looping(tmp_path: Path) -> None:
    with redis_server(tmp_path) as server:
        client = open_redis(server.url, timeout=0.5, connect_timeout=0.5)
        try:
            await client.evalsha(INCR_BY, INCR_BY_SHA, ["n"], [1])
            server.stop()
            with pytest.raises(StorageUnavailable):
                await client.execute("PING")  # the lost connection
            with pytest.raises(StorageUnavailable):
                await client.execute("PING")  # refused: now backing off
            # for 0.3 s, call as fast as possible: the backoff lets only a few connects through
            calls = attempts = 0
            until = time.monotonic() + 0.3
            while time.monotonic() < until:
                with pytest.raises(StorageUnavailable) as info:
                    await client.execute("PING")
                calls += 1
                attempts += "next reconnect in" not in str(info.value)
                await asyncio.sleep(0)
            assert calls > 100 and attempts <= 5, (calls, attempts)
            server.start()
            # the restarted server has an empty script cache: NOSCRIPT, load, retry
            assert await eventually(lambda: client.evalsha(INCR_BY, INCR_BY_SHA, ["n"], [1])) == 1
            stats = redis_cli(server.port, "info", "stats")
            connections = int(stats.split("total_connections_received:")[1].split()[0])
            assert connections <= 3  # our reconnect (+ redis-cli's own)
        finally:
            await client.close()


async def test_nothing_listening_is_unavailable() -> None:
    client = open_redis(f"redis://127.0.0.1:{free_port()}", connect_timeout=0.5)
    try:
        with pytest.raises(StorageUnavailable, match="cannot connect"):
            await client.execute("PING")
    finally:
        await client.close()
    with pytest.raises(StorageUnavailable, match="closed"):
        await client.execute("PING")


async def test_auth_and_db_from_the_url(tmp_path: Path) -> None:
    with redis_server(tmp_path) as server:
        redis_cli(server.port, "config", "set", "requirepass", "pa:ss")
        good = open_redis(f"redis://:pa%3Ass@127.0.0.1:{server.port}/3")
        bad = open_redis(f"redis://:wrong@127.0.0.1:{server.port}/0")
        try:
            await good.execute("SET", "k", "v")
            assert (
                redis_cli(server.port, "-a", "pa:ss", "--no-auth-warning", "-n", "3", "get", "k")
                == "v"
            )
            with pytest.raises(StorageUnavailable, match="refused the connection setup: WRONGPASS"):
                await bad.execute("PING")
        finally:
            await good.close()
            await bad.close()


@pytest.fixture
def tls_cert(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate (and key) for 127.0.0.1."""
    assert shutil.which("openssl"), "the openssl CLI is missing: make test installs it"
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_tls(tmp_path: Path, tls_cert: tuple[Path, Path]) -> None:
    cert, key = tls_cert
    tls_port = free_port()
    tls = ("--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
           "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no")  # fmt: skip
    with redis_server(tmp_path / "redis", *tls):
        client = open_redis(f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}")
        untrusted = open_redis(f"rediss://127.0.0.1:{tls_port}/0")
        try:
            assert await client.evalsha(INCR_BY, INCR_BY_SHA, ["t"], [7]) == 7
            with pytest.raises(StorageUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
                await untrusted.execute("PING")
        finally:
            await client.close()
            await untrusted.close()


# -- sentinel -------------------------------------------------------------------------


async def _port_of(client: RedisBackend) -> int:
    _, port = await client.execute("CONFIG", "GET", "port")
    return int(port)


async def test_sentinel_follows_a_failover(redis_sentinel: RedisSentinelSetup) -> None:
    client = open_redis(redis_sentinel.url, timeout=0.5, connect_timeout=0.5)
    try:
        assert await client.evalsha(INCR_BY, INCR_BY_SHA, ["sentinel:n"], [1]) >= 1
        assert await _port_of(client) == redis_sentinel.master_address()[1]
        _, new_port = await asyncio.to_thread(redis_sentinel.failover)

        async def on_new_master() -> int:
            if await _port_of(client) != new_port:
                raise StorageUnavailable("still on the old master")
            return int(await client.evalsha(INCR_BY, INCR_BY_SHA, ["sentinel:n"], [1]))

        # the old master stays writable until the sentinel demotes it: the client's
        # periodic re-check (every second by default) must move it anyway
        assert await eventually(on_new_master, within=5) >= 1
    finally:
        await client.close()


async def test_sentinel_readonly_makes_the_client_re_resolve(
    redis_sentinel: RedisSentinelSetup,
) -> None:
    client = SentinelRedis(redis_sentinel.url, timeout=0.5, check_interval=3600)  # no re-checks
    try:
        await client.execute("SET", "sentinel:k", "1")
        old_port = await _port_of(client)
        _, new_port = await asyncio.to_thread(redis_sentinel.failover)
        # do by hand what the sentinel does ~10 s later: demote the old master
        await asyncio.to_thread(redis_cli, old_port, "replicaof", "127.0.0.1", str(new_port))
        # READONLY (or the connection drop) sends the client back to the sentinels
        assert await eventually(lambda: client.execute("SET", "sentinel:k", "2")) == b"OK"
        assert await _port_of(client) == new_port
    finally:
        await client.close()


# -- cluster --------------------------------------------------------------------------


@pytest.fixture
async def cluster(redis_cluster: RedisClusterSetup) -> AsyncIterator[RedisBackend]:
    redis_cluster.flushall()
    backend = open_redis(redis_cluster.url, timeout=1.0, connect_timeout=0.5)
    yield backend
    await backend.close()


def _key_on(setup: RedisClusterSetup, node: int, prefix: str) -> str:
    """A key whose slot node ``node`` owns."""
    for i in range(10_000):
        key = f"{prefix}{i}"
        if setup.slot_owner(key_slot(key)) == node:
            return key
    raise AssertionError("no key found")


async def test_cluster_routes_by_slot(
    cluster: RedisBackend, redis_cluster: RedisClusterSetup
) -> None:
    keys = [f"key:{i}" for i in range(300)]
    await asyncio.gather(*(cluster.execute("SET", k, k, key=k) for k in keys))
    sizes = [int(redis_cli(port, "dbsize")) for port in redis_cluster.ports]
    assert sum(sizes) == 300 and all(sizes)  # spread over all three masters
    for k in keys[:10]:  # each key is where its slot says
        owner = redis_cluster.ports[redis_cluster.slot_owner(key_slot(k))]
        assert redis_cli(owner, "get", k) == k
    assert await asyncio.gather(*(cluster.execute("GET", k, key=k) for k in keys)) == [
        k.encode() for k in keys
    ]
    assert await cluster.execute("PING") == b"PONG"  # no key: any master


async def test_cluster_scripts_with_hash_tags(cluster: RedisBackend) -> None:
    tagged = ["{user:7}.minute", "{user:7}.hour"]
    sha = script_sha(TWO_KEYS)
    assert await cluster.evalsha(TWO_KEYS, sha, tagged, []) == [1, 1]
    assert await cluster.evalsha(TWO_KEYS, sha, tagged, []) == [2, 2]
    untagged = ["a", "b"]
    assert key_slot("a") != key_slot("b")
    with pytest.raises(ResponseError, match="CROSSSLOT"):
        await cluster.evalsha(TWO_KEYS, sha, untagged, [])


async def test_cluster_evalsha_many_spans_nodes(
    cluster: RedisBackend, redis_cluster: RedisClusterSetup
) -> None:
    keys = [_key_on(redis_cluster, node, "many:") for node in range(3)]
    calls = [ScriptCall(INCR_BY, INCR_BY_SHA, [k], [n]) for n, k in enumerate(keys, 1)]
    assert await cluster.evalsha_many(calls) == [1, 2, 3]
    assert await cluster.evalsha_many(calls) == [2, 4, 6]


async def test_cluster_follows_moved_and_ask(
    cluster: RedisBackend, redis_cluster: RedisClusterSetup
) -> None:
    key = _key_on(redis_cluster, 0, "moving:")
    slot = key_slot(key)
    await cluster.execute("SET", key, "before", key=key)  # slot map loaded, slot on node 0
    try:
        await asyncio.to_thread(redis_cluster.migrate_slot, slot, 1)
        assert await cluster.execute("GET", key, key=key) == b"before"  # MOVED, followed
        assert await cluster.evalsha(INCR_BY, INCR_BY_SHA, [f"{{{key}}}:n"], [1]) == 1
        # mid-migration: the key already moved, the source answers ASK
        await asyncio.to_thread(redis_cluster.migrate_slot, slot, 2, finish=False)
        assert await cluster.execute("GET", key, key=key) == b"before"
        assert await cluster.evalsha(INCR_BY, INCR_BY_SHA, [f"{{{key}}}:n"], [1]) == 2
        await asyncio.to_thread(redis_cluster.finish_migration, slot, 2)
        assert await cluster.execute("GET", key, key=key) == b"before"
    finally:
        if redis_cluster.slot_owner(slot) != 0:
            await asyncio.to_thread(redis_cluster.migrate_slot, slot, 0)
    assert await cluster.execute("GET", key, key=key) == b"before"


async def test_cluster_survives_a_node_restart(
    cluster: RedisBackend, redis_cluster: RedisClusterSetup
) -> None:
    key = _key_on(redis_cluster, 2, "restart:")
    assert await cluster.evalsha(INCR_BY, INCR_BY_SHA, [key], [5]) == 5
    await asyncio.to_thread(redis_cluster.restart_node, 2)  # data and script cache are gone
    result = await eventually(lambda: cluster.evalsha(INCR_BY, INCR_BY_SHA, [key], [5]))
    assert result == 5
