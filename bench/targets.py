"""What is measured: one ``Target`` per row, started on demand by a ``Lab``.

Adding a target is one entry in ``TARGETS``: a name, a line saying what it
is, and a function that starts it in the lab and returns the URL to load.
Extra Sluice variants are ``sluice_target(Variant(...))`` (see ``sluice.py``).
A Redis-backed variant's endpoint names the lab's redis-server, so the runner
counts the commands it sent there during each measurement, and its admin
``/metrics``, for the storage calls that failed; a target that is meant to
answer 429 (``denies``) counts its 2xx answers as the errors, and one meant
to answer redirects (``redirects``) counts as errors the answers Sluice did
not count as redirects (wrk tells only status >= 400 apart, not 2xx from 3xx).

A target may run only some of the loads (``Target.loads``): the short-link and
webhook targets (``links``) run "loaded" only, for ``--links-duration`` seconds
(``sluice-redirect`` also "paced", for the redirect's p99 at a moderate rate),
to keep the default run short. Those
targets also ``settle``: after each run the harness waits until the target is
idle again (the clicks it queued for analytics are recorded after the answer)
so that work is charged to it and not to the next target measured on the same
CPU; a target with ``webhooks`` has its deliveries paused outside its own runs
(``sluice.set_webhook``) for the same reason: they fall behind under load.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import nginx, sluice
from bench.procs import Service, binary, free_port, pinned, start, wait_ready, wait_redis
from bench.redis_stats import RedisProbe

HERE = Path(__file__).resolve().parent
PATH = "/bench/item?id=1"
REDIRECT_PATH = sluice.REDIRECT_PREFIX + sluice.HOT_CODE
LOADED_ONLY = ("loaded",)


@dataclass
class Redis:
    """A redis-server the lab started, and the harness's own connection to it."""

    url: str
    service: Service
    _probe: RedisProbe | None = None

    @property
    def probe(self) -> RedisProbe:
        if self._probe is None:
            self._probe = RedisProbe(self.url)
        return self._probe

    def close(self) -> None:
        if self._probe is not None:
            self._probe.close()
            self._probe = None


@dataclass(frozen=True)
class Endpoint:
    """A started target: the URL wrk loads and the service whose CPU it spends."""

    url: str
    service: Service
    redis: Redis | None = None  # the storage whose commands are counted per request
    denies: bool = False  # every answer should be a 429
    metrics_url: str | None = None  # Sluice's admin /metrics: storage errors, unchecked, ...
    redirects: bool = False  # every answer should be a redirect (3xx)
    admin_url: str | None = None  # Sluice's admin listener (the links and webhooks API)
    webhooks: bool = False  # deliveries paused outside this target's own runs
    settles: bool = False  # after each run, wait until its processes are idle
    mix: tuple[str, ...] = ()  # paths requested in turn (wrk's mixed.lua) instead of url's


@dataclass
class Lab:
    """The run's processes: one upstream, the targets, Redis if a variant asks for it."""

    workdir: Path
    layout: Mapping[str, str]
    upstream_kind: str = "nginx"
    services: list[Service] = field(default_factory=list)
    _upstream: Endpoint | None = None
    _redis: Redis | None = None
    _servers: list[Redis] = field(default_factory=list)

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

    def start_redis(self, name: str) -> Redis:
        """A redis-server of its own (no persistence), on the upstream's CPU."""
        port = free_port()
        directory = self.workdir / name
        cmd = [binary("redis-server"), "--port", str(port), "--bind", "127.0.0.1"]
        cmd += ["--save", "", "--appendonly", "no", "--dir", str(directory)]
        service = self.spawn(name, "upstream", cmd, None)
        wait_redis(service, port)
        server = Redis(f"redis://127.0.0.1:{port}/0", service)
        self._servers.append(server)
        return server

    @property
    def redis(self) -> Redis:
        """One redis-server for every Redis-backed variant, started on first use."""
        if self._redis is None:
            self._redis = self.start_redis("redis")
        return self._redis

    def pids(self) -> list[int]:
        """Every process the lab started, workers included."""
        return [pid for service in self.services for pid in service.pids()]

    def stop_all(self) -> None:
        while self._servers:
            self._servers.pop().close()
        while self.services:
            self.services.pop().stop()


Starter = Callable[[Lab, str], Endpoint]


@dataclass(frozen=True)
class Target:
    name: str
    about: str
    start: Starter  # (lab, target name) -> Endpoint
    is_proxy: bool = True
    loads: tuple[str, ...] | None = None  # the loads it runs (None: every load)
    links: bool = False  # a short-link or webhook target: "loaded" for --links-duration


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


def sluice_target(variant: sluice.Variant, path: str = PATH) -> Starter:
    """A starter for ``python -m proxy serve`` with a rules file generated from ``variant``;
    wrk loads ``path`` (``REDIRECT_PATH``: the hot short link, created once it is up)."""

    def start_sluice(lab: Lab, name: str) -> Endpoint:
        port, admin_port = free_port(), free_port()
        directory = lab.workdir / name
        directory.mkdir(parents=True, exist_ok=True)
        redis = lab.redis if variant.redis else None
        data = sluice.rules(
            variant,
            port=port,
            admin_port=admin_port,
            upstream=lab.upstream.url,
            storage=redis.url if redis else "memory://",
            data_dir=directory / "var",
        )
        rules_file = sluice.write_rules(directory / "rules.yaml", data)
        base = f"http://127.0.0.1:{port}"
        # Readiness wants a 200: for a variant that denies, that is its one admitted request.
        service = lab.spawn(name, "proxy", sluice.command(rules_file), base + PATH)
        admin = f"http://127.0.0.1:{admin_port}"
        if variant.redirects:
            sluice.create_link(admin, base)
        if variant.webhooks:
            sluice.set_webhook(admin, enabled=False)  # until its own runs: see the module doc
        observed = variant.limits or variant.redirects or variant.webhooks
        return Endpoint(
            base + path,
            service,
            redis,
            variant.denies,
            admin + "/metrics" if observed else None,
            redirects=path.startswith(sluice.REDIRECT_PREFIX),
            admin_url=admin,
            webhooks=variant.webhooks,
            settles=variant.redirects or variant.webhooks,
            mix=sluice.MIX if variant.mixed else (),
        )

    return start_sluice


TARGETS: tuple[Target, ...] = (
    Target("upstream", "the upstream directly", _direct, is_proxy=False),
    Target("sluice", "Sluice: one route, no limits, memory://", sluice_target(sluice.Variant())),
    Target(
        "sluice-redis1",
        "the same + 1 Redis rule (fixed_window per IP, never reached): 1 EVALSHA/request",
        sluice_target(sluice.REDIS1),
    ),
    Target(
        "sluice-redis5",
        "the same + 5 Redis rules per IP, one per algorithm: still 1 EVALSHA/request",
        sluice_target(sluice.REDIS5),
    ),
    Target(
        "sluice-denied",
        "the same + 1 Redis rule of 1/h per IP: every request after the first is a 429",
        sluice_target(sluice.DENIED),
    ),
    Target(
        "sluice-redirect",
        "Sluice with redirects: {prefix: /s/}: GET /s/hot, a cached link (302, no store call)",
        sluice_target(sluice.REDIRECT, REDIRECT_PATH),
        loads=("loaded", "paced"),
        links=True,
    ),
    Target(
        "sluice-redirect-hooks",
        "the same + a webhook for every event: one redirect.followed per click,"
        " delivered in batches of up to 100",
        sluice_target(sluice.REDIRECT_HOOKS, REDIRECT_PATH),
        loads=LOADED_ONLY,
        links=True,
    ),
    Target(
        "sluice-reject",
        "Sluice, memory://, redirects on + 1 rule of 1/h per IP: 429s from the deny cache",
        sluice_target(sluice.REJECT),
        loads=LOADED_ONLY,
        links=True,
    ),
    Target(
        "sluice-reject-hooks",
        "the same + a webhook for every event: rejections aggregated per client per 10 s",
        sluice_target(sluice.REJECT_HOOKS),
        loads=LOADED_ONLY,
        links=True,
    ),
    Target(
        "sluice-mixed",
        "Sluice, memory://, mixed traffic in turn: 8 proxied requests, 1 click on /s/hot,"
        " 1 request over a 1/h rule (429)",
        sluice_target(sluice.MIXED),
        loads=LOADED_ONLY,
        links=True,
    ),
    Target(
        "sluice-mixed-hooks",
        "the same + a webhook for every event: each click emits (rejections aggregated)",
        sluice_target(sluice.MIXED_HOOKS),
        loads=LOADED_ONLY,
        links=True,
    ),
    Target("nginx", "nginx proxy_pass, keepalive upstream pool", _nginx_proxy),
    Target("bare", "bare aiohttp forwarder (bench/bare_forwarder.py)", _bare),
)
BY_NAME = {target.name: target for target in TARGETS}
