"""Real Redis Sentinel and Cluster topologies for tests, plus their pytest fixtures.

Each setup starts the real binaries (``redis-server``, ``redis-sentinel``) on
free loopback ports in its own temp dir, waits (bounded) until the topology is
usable, and stops every process by PID. A start-up that times out raises a
``RuntimeError`` carrying the tail of the relevant log file.

URL forms (as parsed by ``proxy.storage.redis_client.open_redis``)::

    redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE_NAME[?db=N&password=...]
    redis+cluster://HOST:PORT[,HOST:PORT...]

The fixtures ``redis_sentinel`` and ``redis_cluster`` are session-scoped and
start lazily, only when a test requests them.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.servers import RedisServer, binary, free_port, redis_cli

START_TIMEOUT = 20.0


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"(no log at {path}: {exc})"


def _wait(what: str, check: Callable[[], bool], timeout: float, logs: list[Path]) -> None:
    """Poll ``check`` until true; on timeout raise with the tail of every log."""
    deadline = time.monotonic() + timeout
    last_error = ""
    while True:
        try:
            if check():
                return
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            last_error = f" (last error: {exc})"
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {log} ---\n{_tail(log)}" for log in logs)
            raise RuntimeError(
                f"timed out after {timeout}s waiting for {what}{last_error}\n{tails}"
            )
        time.sleep(0.05)


def _info(port: int, section: str) -> dict[str, str]:
    out = redis_cli(port, "info", section, timeout=2)
    pairs = (line.split(":", 1) for line in out.splitlines() if ":" in line)
    return {k: v.strip() for k, v in pairs}


@dataclass
class RedisSentinelSetup:
    """A master, one replica and one ``redis-sentinel`` monitoring them."""

    workdir: Path
    service_name: str = "sluice"
    master: RedisServer = field(init=False)
    replica: RedisServer = field(init=False)
    sentinel_port: int = field(default_factory=free_port)
    sentinel_proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        # No diskless-sync delay: the initial full sync would otherwise wait 5 s.
        fast_sync = ("--repl-diskless-sync-delay", "0")
        self.master = RedisServer(self.workdir / "master", fast_sync)
        self.replica = RedisServer(
            self.workdir / "replica",
            (*fast_sync, "--replicaof", "127.0.0.1", str(self.master.port)),
        )

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{self.service_name}"

    @property
    def _sentinel_log(self) -> Path:
        return self.workdir / "sentinel" / "sentinel.log"

    def _logs(self) -> list[Path]:
        return [
            self._sentinel_log,
            self.master.workdir / "redis.log",
            self.replica.workdir / "redis.log",
        ]

    def start(self) -> RedisSentinelSetup:
        try:
            self.master.start()
            self.replica.start()
            _wait(
                "the replica's link to its master",
                lambda: _info(self.replica.port, "replication").get("master_link_status") == "up",
                START_TIMEOUT,
                self._logs(),
            )
            self._start_sentinel()
            _wait(
                "the sentinel to see master and replica",
                self._sentinel_ready,
                START_TIMEOUT,
                self._logs(),
            )
        except BaseException:
            self.stop()
            raise
        return self

    def _start_sentinel(self) -> None:
        sdir = self.workdir / "sentinel"
        sdir.mkdir(parents=True, exist_ok=True)
        conf = sdir / "sentinel.conf"  # redis-sentinel rewrites this file: it must be writable
        name = self.service_name
        conf.write_text(
            f"port {self.sentinel_port}\n"
            "bind 127.0.0.1\n"
            f"dir {sdir}\n"
            f"logfile {self._sentinel_log}\n"
            f"sentinel monitor {name} 127.0.0.1 {self.master.port} 1\n"
            f"sentinel down-after-milliseconds {name} 2000\n"
            f"sentinel failover-timeout {name} 10000\n"
        )
        self.sentinel_proc = subprocess.Popen(
            [binary("redis-sentinel"), str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def _sentinel_ready(self) -> bool:
        if self.sentinel_proc is None or self.sentinel_proc.poll() is not None:
            raise RuntimeError(f"redis-sentinel exited early:\n{_tail(self._sentinel_log)}")
        replicas = redis_cli(
            self.sentinel_port, "sentinel", "replicas", self.service_name, timeout=2
        )
        lines = replicas.splitlines()
        # Raw output: flat "field\nvalue" pairs per replica; we want one healthy replica.
        healthy = any(
            lines[i] == "flags" and lines[i + 1] == "slave" for i in range(len(lines) - 1)
        )
        return healthy and self.master_address() == ("127.0.0.1", self.master.port)

    def master_address(self) -> tuple[str, int]:
        """The master's address as the sentinel reports it now."""
        out = redis_cli(
            self.sentinel_port, "sentinel", "get-master-addr-by-name", self.service_name, timeout=2
        )
        host, port = out.split()
        return host, int(port)

    def failover(
        self, *, wait_demoted: bool = False, timeout: float = START_TIMEOUT
    ) -> tuple[str, int]:
        """Promote the replica and return once the sentinel names the new master.

        The sentinel reconfigures the old master as a replica only ~10 s later
        (until then it is still a writable master); ``wait_demoted=True`` waits
        for that too. A failover requested too soon after the previous one is
        retried until the sentinel accepts it.
        """
        old = self.master_address()

        def requested() -> bool:
            out = redis_cli(self.sentinel_port, "sentinel", "failover", self.service_name)
            if out == "OK":
                return True
            if "NOGOODSLAVE" in out or "INPROG" in out:
                return False
            raise RuntimeError(f"SENTINEL FAILOVER refused: {out}")

        _wait("the sentinel to accept SENTINEL FAILOVER", requested, timeout, self._logs())
        _wait(
            "the sentinel to report a new master",
            lambda: self.master_address() != old,
            timeout,
            self._logs(),
        )
        if wait_demoted:
            old_server = self.master if old[1] == self.master.port else self.replica

            def demoted() -> bool:
                info = _info(old_server.port, "replication")
                return info.get("role") == "slave" and info.get("master_link_status") == "up"

            _wait("the old master to replicate from the new one", demoted, timeout, self._logs())
        return self.master_address()

    def stop(self) -> None:
        if self.sentinel_proc is not None and self.sentinel_proc.poll() is None:
            self.sentinel_proc.terminate()
            try:
                self.sentinel_proc.wait(5)
            except subprocess.TimeoutExpired:
                self.sentinel_proc.kill()
                self.sentinel_proc.wait(5)
        self.sentinel_proc = None
        self.replica.stop()
        self.master.stop()


@dataclass
class RedisClusterSetup:
    """Three cluster masters (no replicas), created with ``redis-cli --cluster create``."""

    workdir: Path
    size: int = 3
    node_timeout_ms: int = 2000
    nodes: list[RedisServer] = field(init=False)

    def __post_init__(self) -> None:
        self.nodes = []
        for i in range(self.size):
            port = free_port()
            # An explicit bus port: the default (port + 10000) fails for ports above 55535.
            extra = (
                "--cluster-enabled", "yes",
                "--cluster-port", str(free_port()),
                "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms),
            )  # fmt: skip
            self.nodes.append(RedisServer(self.workdir / f"node{i}", extra, port=port))

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def _logs(self) -> list[Path]:
        return [node.workdir / "redis.log" for node in self.nodes]

    def start(self) -> RedisClusterSetup:
        try:
            for node in self.nodes:
                node.start()
            addrs = [f"127.0.0.1:{p}" for p in self.ports]
            options = ["--cluster-replicas", "0", "--cluster-yes"]
            try:
                subprocess.run(
                    [binary("redis-cli"), "--cluster", "create", *addrs, *options],
                    capture_output=True,
                    text=True,
                    timeout=START_TIMEOUT,
                    check=True,
                )
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
                output = f"{exc.stdout!s}\n{exc.stderr!s}"
                tails = "\n".join(f"--- {log} ---\n{_tail(log)}" for log in self._logs())
                raise RuntimeError(
                    f"redis-cli --cluster create failed: {exc}\n{output}\n{tails}"
                ) from exc
            self.wait_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def _all_ok(self) -> bool:
        return all(_info_cluster(port).get("cluster_state") == "ok" for port in self.ports)

    def wait_ok(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until every node reports ``cluster_state:ok``."""
        _wait("cluster_state:ok on every node", self._all_ok, timeout, self._logs())

    def node_id(self, i: int) -> str:
        return redis_cli(self.ports[i], "cluster", "myid", timeout=2)

    def slot_owner(self, slot: int) -> int:
        """Index of the node that owns ``slot`` according to node 0."""
        out = redis_cli(self.ports[0], "cluster", "nodes", timeout=2)
        for line in out.splitlines():
            parts = line.split()
            for spec in parts[8:]:
                lo, _, hi = spec.partition("-")
                if not lo.isdigit():
                    continue  # an importing/migrating marker, not an owned range
                if int(lo) <= slot <= int(hi or lo):
                    port = int(parts[1].split("@")[0].rsplit(":", 1)[1])
                    return self.ports.index(port)
        raise LookupError(f"slot {slot} has no owner")

    def migrate_slot(self, slot: int, dst: int, *, finish: bool = True) -> None:
        """Move ``slot`` and its keys to node ``dst`` (the documented procedure).

        With ``finish=False`` the slot is left mid-migration (source MIGRATING,
        target IMPORTING, keys already moved), which makes the source answer ASK.
        """
        src = self.slot_owner(slot)
        src_port, dst_port = self.ports[src], self.ports[dst]
        src_id, dst_id = self.node_id(src), self.node_id(dst)
        redis_cli(dst_port, "cluster", "setslot", str(slot), "importing", src_id)
        redis_cli(src_port, "cluster", "setslot", str(slot), "migrating", dst_id)
        while keys := redis_cli(src_port, "cluster", "getkeysinslot", str(slot), "100").split():
            redis_cli(
                src_port, "migrate", "127.0.0.1", str(dst_port), "", "0", "5000", "keys", *keys
            )
        if finish:
            self.finish_migration(slot, dst)

    def finish_migration(self, slot: int, dst: int) -> None:
        dst_id = self.node_id(dst)
        for port in (self.ports[dst], *self.ports):
            redis_cli(port, "cluster", "setslot", str(slot), "node", dst_id)
        self.wait_ok()

    def restart_node(self, i: int) -> None:
        """Stop node ``i`` (if running) and start it on the same port and dir."""
        self.nodes[i].stop()
        self.nodes[i].start()
        self.wait_ok()

    def kill_node(self, i: int) -> None:
        """SIGKILL node ``i``; ``restart_node(i)`` brings it back."""
        self.nodes[i].kill()

    def flushall(self) -> None:
        for node in self.nodes:
            if node.proc is not None:
                node.flushall()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _info_cluster(port: int) -> dict[str, str]:
    out = redis_cli(port, "cluster", "info", timeout=2)
    pairs = (line.split(":", 1) for line in out.splitlines() if ":" in line)
    return {k: v.strip() for k, v in pairs}


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisSentinelSetup]:
    """A master + replica + sentinel for the session (the master moves on failover)."""
    setup = RedisSentinelSetup(tmp_path_factory.mktemp("sentinel"))
    setup.start()
    try:
        yield setup
    finally:
        setup.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterSetup]:
    """A three-master Redis Cluster for the session."""
    setup = RedisClusterSetup(tmp_path_factory.mktemp("cluster"))
    setup.start()
    try:
        yield setup
    finally:
        setup.stop()
