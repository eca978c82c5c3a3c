"""rules.yaml → frozen dataclasses.

Stages: compose with line numbers (``yamlsrc``) → read every section with
typed, located getters (``confread``) → cross-check references (routes name
existing upstreams and limits) → freeze. Every problem of a file is collected
and raised together as one ``ConfigError``. No I/O happens after ``load``.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from proxy.confread import Problems, Section, did_you_mean
from proxy.errors import ConfigError, Problem
from proxy.events.settings import NotificationsSettings, read_notifications
from proxy.limitspec import LimitRule, read_limit
from proxy.links.settings import LinksSettings, read_links_settings
from proxy.links.validate import normalise_host
from proxy.match import Match, read_match
from proxy.yamlsrc import Node, parse

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
STORAGE_SCHEMES = ("memory", "redis", "rediss", "redis+sentinel", "redis+cluster")
HEADER_FAMILIES = ("x-ratelimit", "ietf")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def bind_error(self, exc: OSError) -> str:
        """The one message for a listener that cannot be bound."""
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        return f"cannot listen on {self}: {reason}"


@dataclass(frozen=True, slots=True)
class AdminToken:
    name: str
    token: str
    scope: str  # "read" | "write"


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: Listen = Listen("127.0.0.1", 8001)
    tokens: tuple[AdminToken, ...] = ()


@dataclass(frozen=True, slots=True)
class StorageConfig:
    url: str = "memory://"
    timeout: float = 0.05
    connect_timeout: float = 1.0
    pool_size: int = 2
    expected_instances: int = 1
    breaker_failures: int = 5
    breaker_reset: float = 1.0
    data_dir: str = "var"

    @property
    def scheme(self) -> str:
        return self.url.split("://", 1)[0]

    @property
    def safe_url(self) -> str:
        """The URL with any password masked, for logs, pages and summaries."""
        return re.sub(r"(://[^/@]*?:)[^/@]*@", r"\1***@", self.url)


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    url: str  # scheme://host:port[/base], no trailing slash
    connect_timeout: float = 2.0
    read_timeout: float = 30.0
    max_connections: int = 256
    preserve_host: bool = False


@dataclass(frozen=True, slots=True)
class ClientsConfig:
    trusted_proxies: tuple[IPNetwork, ...] = ()
    on_missing_key: str = "anonymous"  # deny | allow | anonymous


@dataclass(frozen=True, slots=True)
class HeaderPolicy:
    families: tuple[str, ...] = HEADER_FAMILIES
    on_allowed: bool = True


@dataclass(frozen=True, slots=True)
class DecideConfig:
    """How a decision route reads the request it decides on."""

    source: str = "auto"  # auto | nginx (X-Original-URI) | envoy (the request itself)
    strip_prefix: bool = False  # drop the route's path_prefix (Envoy's ext_authz path_prefix)
    deny_status: int = 429  # NGINX auth_request understands only 401/403 as a denial


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    match: Match
    upstream: str | None
    limits: tuple[str, ...] = ()
    kind: str = "proxy"  # proxy | decide
    headers: HeaderPolicy = HeaderPolicy()
    decide: DecideConfig = DecideConfig()
    line: int = 0


@dataclass(frozen=True, slots=True)
class MissLimit:
    """The built-in guard against code enumeration: ``limit`` unknown codes per
    ``window`` seconds per client IP, per worker (see ``proxy.missguard``)."""

    limit: int = 20
    window: float = 60.0


@dataclass(frozen=True, slots=True)
class RedirectsConfig:
    prefix: str | None = "/s/"
    host: str | None = None  # normalised host name, with ":port" only when one was given
    status: int = 302
    limits: tuple[str, ...] = ()
    query_passthrough: bool = False
    miss_limit: MissLimit | None = MissLimit()
    analytics_queue: int = 10_000
    links: LinksSettings = field(default_factory=LinksSettings)

    def code_path(self, code: str) -> str:
        """The path a code is followed at (the sticky cookie's Path)."""
        return (self.prefix or "/") + code


@dataclass(frozen=True, slots=True)
class ServerConfig:
    max_header_size: int = 8190
    max_body_size: int = 100 * 1024 * 1024
    shutdown_grace: float = 10.0
    keepalive_timeout: float = 75.0


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    """``logging:``. Level, access and show_keys apply on reload; format and buffer on
    restart (the writer thread is set up once per process, see ``proxy.logs``)."""

    level: str = "info"  # SLUICE_LOG_LEVEL and --log-level override it
    format: str = "text"  # text | json (one object per line)
    access: float = 0.0  # share of main-listener requests given an access line (0: off)
    show_keys: bool = False  # raw client keys in access lines (default: masked)
    buffer: int = 10_000  # records waiting for the writer thread; beyond: dropped, counted


@dataclass(frozen=True, slots=True)
class ConfigSource:
    path: str
    sha256: str
    loaded_at: float


@dataclass(frozen=True, slots=True)
class Config:
    source: ConfigSource
    listen: Listen = Listen("0.0.0.0", 8000)
    mode: str = "proxy"  # proxy | decide (every request on the main listener is a decision)
    decide: DecideConfig = DecideConfig()  # how a `mode: decide` listener reads and answers
    admin: AdminConfig = AdminConfig()
    storage: StorageConfig = StorageConfig()
    upstreams: Mapping[str, Upstream] = field(default_factory=dict)
    clients: ClientsConfig = ClientsConfig()
    limits: Mapping[str, LimitRule] = field(default_factory=dict)
    routes: tuple[Route, ...] = ()
    redirects: RedirectsConfig | None = None
    notifications: NotificationsSettings = field(default_factory=NotificationsSettings)
    server: ServerConfig = ServerConfig()
    logging: LoggingConfig = LoggingConfig()
    # A rules file whose limits are evaluated in shadow beside these (what-if);
    # an absolute path (a relative one in the file is taken from the file's folder).
    candidate: str | None = None


def load(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read, validate and freeze a rules file; raise ``ConfigError`` with every problem."""
    file = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([Problem(file, 0, "", f"cannot read: {exc.strerror or exc}")]) from exc
    return loads(data, file, env)


def loads(
    data: bytes | str, file: str = "<string>", env: Mapping[str, str] | None = None
) -> Config:
    raw = data.encode() if isinstance(data, str) else data
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem(file, 0, "", f"not UTF-8 text: {exc}")]) from exc
    root, early = parse(text, file, env)
    problems = Problems(file)
    problems.items.extend(early)
    if early and root.value is None:
        raise ConfigError(problems.items)
    source = ConfigSource(file, hashlib.sha256(raw).hexdigest(), time.time())
    config = _build(Section(root, "", problems), source)
    if problems.items:
        raise ConfigError(sorted(problems.items, key=lambda p: p.line))
    return config


def _listen(sec: Section, key: str, default: Listen) -> Listen:
    def check(v: object) -> Listen:
        text = str(v)
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected host:port, got {text!r}")
        host = host.strip("[]") or "0.0.0.0"
        return Listen(host, int(port))

    return sec.convert(key, default, check)


def _url(value: object, schemes: tuple[str, ...]) -> str:
    text = str(value)
    parts = urlsplit(text)
    if parts.scheme not in schemes or not parts.hostname:
        raise ValueError(
            f"expected an absolute URL with scheme {' or '.join(schemes)}, got {text!r}"
        )
    try:
        parts.port  # noqa: B018  (validates the port)
    except ValueError as exc:
        raise ValueError(f"bad port in {text!r}") from exc
    return text.rstrip("/")


def _build(top: Section, source: ConfigSource) -> Config:
    problems = top.problems
    listen = _listen(top, "listen", Listen("0.0.0.0", 8000))
    mode = top.choice("mode", ("proxy", "decide"), "proxy")
    decide = _decide(top.section("decide")) if top.has("decide") else DecideConfig()
    if top.has("decide") and mode != "decide":
        top.error("decide", "top-level decide settings need mode: decide")
    admin = _admin(top.section("admin"))
    storage = _storage(top.section("storage"))
    upstreams = {
        name: _upstream(name, sec)
        for name, sec in top.mapping_of_sections("upstreams", scalar_ok=True)
    }
    clients = _clients(top.section("clients"))
    limits: dict[str, LimitRule] = {}
    for sec in top.list_of_sections("limits"):
        rule = read_limit(sec)
        if rule is None:
            continue
        if rule.name in limits:
            sec.error("name", f"duplicate limit name {rule.name!r}")
        limits[rule.name] = rule
    server = _server(top.section("server"))
    logging_ = _logging(top.section("logging"))
    routes = tuple(
        _route(i, sec, upstreams, limits, mode)
        for i, sec in enumerate(top.list_of_sections("routes"))
    )
    redirects = _redirects(top.section("redirects"), limits) if top.has("redirects") else None
    notifications = read_notifications(
        top.section("notifications"), limits=limits.keys(), routes=[r.name for r in routes]
    )
    candidate = _candidate(top, source)
    top.finish()
    if admin.listen == listen:
        problems.add(top.line_of("admin"), "admin.listen", "must differ from listen")
    return Config(
        source=source,
        listen=listen,
        mode=mode,
        decide=decide,
        admin=admin,
        storage=storage,
        upstreams=upstreams,
        clients=clients,
        limits=limits,
        routes=routes,
        redirects=redirects,
        notifications=notifications,
        server=server,
        logging=logging_,
        candidate=candidate,
    )


def _candidate(top: Section, source: ConfigSource) -> str | None:
    """``candidate: FILE``: only the name is checked here; the file itself is loaded
    (and, when bad, reported and ignored) by whoever evaluates it."""
    name = top.string("candidate")
    if not name:
        return None
    path = Path(name)
    if not path.is_absolute():
        path = Path(source.path).parent / path
    if path.resolve() == Path(source.path).resolve():
        top.error("candidate", "must name another file than the rules file itself")
        return None
    return str(path)


def _admin(sec: Section) -> AdminConfig:
    listen = _listen(sec, "listen", AdminConfig().listen)
    tokens: list[AdminToken] = []
    single = sec.string("token")
    if single:
        tokens.append(AdminToken("admin", single, "write"))
    for item in sec.list_of_sections("tokens"):
        name = item.string("name", required=True)
        token = item.string("token", required=True)
        scope = item.choice("scope", ("read", "write"), "read")
        item.finish()
        if name and token:
            if len(token) < 16:
                item.error("token", "too short: use at least 16 characters")
            tokens.append(AdminToken(name, token, scope))
    sec.finish()
    return AdminConfig(listen, tuple(tokens))


def _storage(sec: Section) -> StorageConfig:
    def check_url(v: object) -> str:
        text = str(v)
        scheme = text.split("://", 1)[0] if "://" in text else ""
        if scheme not in STORAGE_SCHEMES:
            raise ValueError(
                f"unsupported storage URL {text!r} (schemes: {', '.join(STORAGE_SCHEMES)})"
                + did_you_mean(scheme, STORAGE_SCHEMES)
            )
        return text

    d = StorageConfig()
    out = StorageConfig(
        url=sec.convert("url", d.url, check_url),
        timeout=sec.duration("timeout", d.timeout),
        connect_timeout=sec.duration("connect_timeout", d.connect_timeout),
        pool_size=sec.integer("pool_size", d.pool_size, minimum=1),
        expected_instances=sec.integer("expected_instances", d.expected_instances, minimum=1),
        breaker_failures=sec.integer("breaker_failures", d.breaker_failures, minimum=1),
        breaker_reset=sec.duration("breaker_reset", d.breaker_reset),
        data_dir=sec.string("data_dir", d.data_dir),
    )
    sec.finish()
    return out


def _upstream(name: str, sec: Section) -> Upstream:
    if isinstance(sec.node.value, str):  # shorthand: `api: http://127.0.0.1:9000`
        try:
            return Upstream(name, _url(sec.node.value, ("http", "https")))
        except ValueError as exc:
            sec.problems.add(sec.node, sec.path, str(exc))
            return Upstream(name, "http://invalid")
    d = Upstream(name, "")
    out = Upstream(
        name=name,
        url=sec.convert(
            "url", "http://invalid", lambda v: _url(v, ("http", "https")), required=True
        ),
        connect_timeout=sec.duration("connect_timeout", d.connect_timeout),
        read_timeout=sec.duration("read_timeout", d.read_timeout),
        max_connections=sec.integer("max_connections", d.max_connections, minimum=1),
        preserve_host=sec.boolean("preserve_host", d.preserve_host),
    )
    sec.finish()
    return out


def _clients(sec: Section) -> ClientsConfig:
    nets: list[IPNetwork] = []
    for i, text in enumerate(sec.str_list("trusted_proxies")):
        try:
            nets.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            sec.problems.add(
                sec.line_of("trusted_proxies"),
                f"{sec.path}.trusted_proxies[{i}]",
                f"not an IP address or CIDR: {text!r}",
            )
    out = ClientsConfig(
        trusted_proxies=tuple(nets),
        on_missing_key=sec.choice("on_missing_key", ("deny", "allow", "anonymous"), "anonymous"),
    )
    sec.finish()
    return out


def _names(sec: Section, key: str, known: Mapping[str, object], what: str) -> tuple[str, ...]:
    names = sec.str_list(key)
    for i, name in enumerate(names):
        if name not in known:
            listing = ", ".join(sorted(known)) or "none defined"
            sec.problems.add(
                sec.line_of(key),
                f"{sec.key_path(key)}[{i}]" if len(names) > 1 else sec.key_path(key),
                f"unknown {what} {name!r} (known: {listing})" + did_you_mean(name, known),
            )
    return names


def _route(
    i: int,
    sec: Section,
    upstreams: Mapping[str, Upstream],
    limits: Mapping[str, LimitRule],
    mode: str,
) -> Route:
    kind = sec.choice("kind", ("proxy", "decide"), "proxy")
    upstream = sec.string("upstream")
    if upstream is not None and upstream not in upstreams:
        listing = ", ".join(sorted(upstreams)) or "none defined"
        sec.error(
            "upstream",
            f"unknown upstream {upstream!r} (known: {listing})" + did_you_mean(upstream, upstreams),
        )
    if kind == "proxy" and mode == "proxy" and upstream is None and sec.ok:
        sec.problems.add(sec.node, sec.key_path("upstream"), "required key is missing")
    hsec = sec.section("rate_limit_headers")
    headers = HeaderPolicy()
    if hsec.ok:
        families = hsec.str_list("families", HEADER_FAMILIES)
        for fam in families:
            if fam not in HEADER_FAMILIES:
                hsec.error(
                    "families", f"unknown header family {fam!r} (expected: x-ratelimit, ietf)"
                )
        headers = HeaderPolicy(families, hsec.boolean("on_allowed", True))
        hsec.finish()
    match = read_match(sec.section("match")) if sec.has("match") else Match()
    decide = _decide(sec.section("decide")) if sec.has("decide") else DecideConfig()
    if sec.has("decide") and kind != "decide":
        sec.error("decide", "only routes with kind: decide take decide settings")
    route = Route(
        name=sec.string("name", f"route{i}"),
        match=match,
        upstream=upstream,
        limits=_names(sec, "limits", limits, "limit"),
        kind=kind,
        headers=headers,
        decide=decide,
        line=sec.node.line,
    )
    sec.finish()
    return route


def _decide(sec: Section) -> DecideConfig:
    def status(v: object) -> int:
        if v not in (429, 403, 401):
            raise ValueError(f"expected 429, 403 or 401, got {v!r}")
        return int(v)  # type: ignore[call-overload,unused-ignore]

    out = DecideConfig(
        source=sec.choice("source", ("auto", "nginx", "envoy"), "auto"),
        strip_prefix=sec.boolean("strip_prefix", False),
        deny_status=sec.convert("deny_status", 429, status),
    )
    sec.finish()
    return out


def _redirects(sec: Section, limits: Mapping[str, LimitRule]) -> RedirectsConfig:
    prefix = sec.string("prefix", None if sec.has("host") else "/s/")
    if prefix is not None and not (prefix.startswith("/") and prefix.endswith("/")):
        sec.error("prefix", f"must start and end with '/', got {prefix!r}")
    out = RedirectsConfig(
        prefix=prefix,
        host=sec.convert("host", None, _redirect_host),
        status=sec.convert("status", 302, _redirect_status),
        limits=_names(sec, "limits", limits, "limit"),
        query_passthrough=sec.boolean("query_passthrough", False),
        miss_limit=_miss_limit(sec),
        analytics_queue=sec.integer("analytics_queue", 10_000, minimum=1),
        links=read_links_settings(sec),
    )
    sec.finish()
    return out


def _redirect_host(v: object) -> str:
    if not isinstance(v, str) or not v:
        raise TypeError(f"expected a host name, got {v!r}")
    host, sep, port = v.rpartition(":") if not v.endswith("]") else (v, "", "")
    if not sep:
        host, port = v, ""
    elif not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected a host name, optionally with :port, got {v!r}")
    name = normalise_host(host)
    return f"{name}:{int(port)}" if port else name


def _miss_limit(sec: Section) -> MissLimit | None:
    node = sec.node_of("miss_limit")
    if node is None or node.value is None:
        return MissLimit()
    if node.value is False:
        return None
    sub = sec.section("miss_limit")
    d = MissLimit()
    out = MissLimit(
        limit=sub.integer("limit", d.limit, minimum=1),
        window=sub.duration("window", d.window),
    )
    sub.finish()
    return out


def _redirect_status(v: object) -> int:
    if v not in (301, 302, 307, 308):
        raise ValueError(f"expected 301, 302, 307 or 308, got {v!r}")
    return int(v)  # type: ignore[call-overload,unused-ignore]


def _server(sec: Section) -> ServerConfig:
    d = ServerConfig()
    out = ServerConfig(
        max_header_size=sec.size("max_header_size", d.max_header_size),
        max_body_size=sec.size("max_body_size", d.max_body_size),
        shutdown_grace=sec.duration("shutdown_grace", d.shutdown_grace),
        keepalive_timeout=sec.duration("keepalive_timeout", d.keepalive_timeout),
    )
    sec.finish()
    return out


def _logging(sec: Section) -> LoggingConfig:
    d = LoggingConfig()
    out = LoggingConfig(
        level=sec.choice("level", LOG_LEVELS, d.level),
        format=sec.choice("format", LOG_FORMATS, d.format),
        access=sec.convert("access", d.access, _access_share),
        show_keys=sec.boolean("show_keys", d.show_keys),
        buffer=sec.integer("buffer", d.buffer, minimum=1),
    )
    sec.finish()
    return out


def _access_share(v: object) -> float:
    """``true`` (every request), ``false`` (none) or ``sample:RATE`` (that share, 0 to 1)."""
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    kind, sep, rate = str(v).partition(":")
    if isinstance(v, str) and sep and kind.strip() == "sample":
        try:
            share = float(rate)
        except ValueError:
            share = -1.0
        if 0.0 <= share <= 1.0:
            return share
    raise ValueError(f"expected true, false or sample:RATE with RATE from 0 to 1, got {v!r}")


__all__ = ["Config", "ConfigError", "Node", "load", "loads"]
