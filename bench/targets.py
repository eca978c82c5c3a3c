"""What is measured: one ``Target`` per row, started on demand by a ``Lab``.

Adding a target is one entry in ``TARGETS``: a name, a line saying what it
is, and a function that starts it in the lab and returns the URL to load.
Extra Sluice variants are ``sluice_target(Variant(...))`` (see ``sluice.py``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import nginx, sluice
from bench.procs import Service, binary, free_port, pinned, start, wait_ready, wait_redis

HERE = Path(__file__).resolve().parent
PATH = "/bench/item?id=1"


@dataclass(frozen=True)
class Endpoint:
    """A started target: the URL wrk loads and the service whose CPU it spends."""

    url: str
    service: Service


@dataclass
class Lab:
    """The run's processes: one upstream, the targets, Redis if a variant asks for it."""

    workdir: Path
    layout: Mapping[str, str]
    upstream_kind: str = "nginx"
    services: list[Service] = field(default_factory=list)
    _upstream: Endpoint | None = None
    _redis: str | None = None

    def spawn(
        self,
        name: str,
        role: str,
        cmd: Sequence[str],
        ready_url: str | None,
        env: Mapping[str, str] | None = None,
    ) -> Service:
        directory = self.workdir / name
        directory.mkdir(parents=True, exist_ok=True)
        service = start(
            name, pinned(cmd, self.layout.get(role)), directory / "output.log", directory, env
        )
        self.services.append(service)
        if ready_url is not None:
            wait_ready(service, ready_url)
        return service

    @property
    def upstream(self) -> Endpoint:
        """The fast upstream every proxy forwards to, started on first use."""
        if self._upstream is None:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            if self.upstream_kind == "nginx":
                conf = nginx.upstream_conf(self.workdir / "upstream", port)
                cmd = nginx.command(conf)
            else:
                cmd = [sys.executable, str(HERE / "upstream_app.py"), "--port", str(port)]
            service = self.spawn("upstream", "upstream", cmd, url + PATH)
            self._upstream = Endpoint(url, service)
        return self._upstream

    def redis_url(self) -> str:
        """One redis-server for every Redis-backed variant, started on first use."""
        if self._redis is None:
            port = free_port()
            cmd = [binary("redis-server"), "--port", str(port), "--bind", "127.0.0.1"]
            cmd += ["--save", "", "--appendonly", "no", "--dir", str(self.workdir / "redis")]
            service = self.spawn("redis", "upstream", cmd, None)
            wait_redis(service, port)
            self._redis = f"redis://127.0.0.1:{port}/0"
        return self._redis

    def pids(self) -> list[int]:
        """Every process the lab started, workers included."""
        return [pid for service in self.services for pid in service.pids()]

    def stop_all(self) -> None:
        while self.services:
            self.services.pop().stop()


Starter = Callable[[Lab, str], Endpoint]


@dataclass(frozen=True)
class Target:
    name: str
    about: str
    start: Starter  # (lab, target name) -> Endpoint
    is_proxy: bool = True


def _direct(lab: Lab, name: str) -> Endpoint:
    return Endpoint(lab.upstream.url + PATH, lab.upstream.service)


def _nginx_proxy(lab: Lab, name: str) -> Endpoint:
    port = free_port()
    origin = lab.upstream.url.removeprefix("http://")
    conf = nginx.proxy_conf(lab.workdir / name, port, origin)
    url = f"http://127.0.0.1:{port}{PATH}"
    return Endpoint(url, lab.spawn(name, "proxy", nginx.command(conf), url))


def _bare(lab: Lab, name: str) -> Endpoint:
    port = free_port()
    cmd = [sys.executable, str(HERE / "bare_forwarder.py"), "--port", str(port)]
    cmd += ["--upstream", lab.upstream.url]
    url = f"http://127.0.0.1:{port}{PATH}"
    return Endpoint(url, lab.spawn(name, "proxy", cmd, url))


def sluice_target(variant: sluice.Variant) -> Starter:
    """A starter for ``python -m proxy serve`` with a rules file generated from ``variant``."""

    def start_sluice(lab: Lab, name: str) -> Endpoint:
        port = free_port()
        directory = lab.workdir / name
        directory.mkdir(parents=True, exist_ok=True)
        data = sluice.rules(
            variant,
            port=port,
            admin_port=free_port(),
            upstream=lab.upstream.url,
            storage=lab.redis_url() if variant.redis else "memory://",
            data_dir=directory / "var",
        )
        rules_file = sluice.write_rules(directory / "rules.yaml", data)
        url = f"http://127.0.0.1:{port}{PATH}"
        return Endpoint(url, lab.spawn(name, "proxy", sluice.command(rules_file), url))

    return start_sluice


TARGETS: tuple[Target, ...] = (
    Target("upstream", "the upstream directly", _direct, is_proxy=False),
    Target("sluice", "Sluice: one route, no limits, memory://", sluice_target(sluice.Variant())),
    Target("nginx", "nginx proxy_pass, keepalive upstream pool", _nginx_proxy),
    Target("bare", "bare aiohttp forwarder (bench/bare_forwarder.py)", _bare),
)
BY_NAME = {target.name: target for target in TARGETS}
