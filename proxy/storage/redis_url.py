"""Storage URLs for Redis.

    redis://[[user]:password@]host[:port][/db][?ssl_...]      (port 6379, db 0)
    rediss://...                                              same, over TLS
    redis+sentinel://[[user]:password@]h1[:p1],h2[:p2]/SERVICE[?db=N&password=...&sentinel_password=...]
    redis+cluster://[[user]:password@]h1[:p1],h2[:p2]

Sentinel ports default to 26379. The userinfo (or ``password=``) is the
password of the Redis servers; ``sentinel_password`` that of the sentinels.
``rediss://`` accepts ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``,
``ssl_cert_reqs`` (``none|optional|required``, default ``required``) and
``ssl_check_hostname`` (``true|false``). Unknown parameters are errors.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qsl, unquote

from proxy.storage.resp import ConnectOptions


@dataclass(frozen=True)
class RedisURL:
    """A parsed storage URL (see the module docstring for the forms)."""

    kind: Literal["standalone", "sentinel", "cluster"]
    hosts: tuple[tuple[str, int], ...]
    tls: bool = False
    username: str | None = None
    password: str | None = None
    db: int = 0
    service: str = ""
    sentinel_password: str | None = None
    ssl_options: tuple[tuple[str, str], ...] = ()


_SCHEMES: dict[str, Literal["standalone", "sentinel", "cluster"]] = {
    "redis": "standalone",
    "rediss": "standalone",
    "redis+sentinel": "sentinel",
    "redis+cluster": "cluster",
}
_SSL_PARAMS = {"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname"}
_PARAMS = {
    "standalone": set(),
    "sentinel": {"db", "password", "sentinel_password"},
    "cluster": set(),
}


def _parse_host(spec: str, default_port: int, url: str) -> tuple[str, int]:
    if spec.startswith("["):  # [IPv6]:port
        host, _, rest = spec[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = spec.partition(":")
    if not host:
        raise ValueError(f"invalid Redis URL {url!r}: empty host in {spec!r}")
    if port and not port.isdigit():
        raise ValueError(f"invalid Redis URL {url!r}: bad port in {spec!r}")
    return host, int(port) if port else default_port


def parse_redis_url(url: str) -> RedisURL:
    """Parse a storage URL; raise ``ValueError`` naming what is wrong."""
    scheme, sep, rest = url.partition("://")
    kind = _SCHEMES.get(scheme.lower()) if sep else None
    if kind is None:
        raise ValueError(f"invalid Redis URL {url!r}: scheme must be one of {', '.join(_SCHEMES)}")
    netloc, _, query = rest.partition("?")
    netloc, _, path = netloc.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        if not colon:
            raise ValueError(
                f"invalid Redis URL {url!r}: credentials must be ':password' or 'user:password'"
            )
        username, password = (unquote(user) or None), unquote(secret)
    if not hostlist:
        raise ValueError(f"invalid Redis URL {url!r}: no host")
    default_port = 26379 if kind == "sentinel" else 6379
    hosts = tuple(_parse_host(h, default_port, url) for h in hostlist.split(","))
    params = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=False))
    tls = scheme.lower() == "rediss"
    unknown = set(params) - _PARAMS[kind] - (_SSL_PARAMS if tls else set())
    if unknown:
        raise ValueError(
            f"invalid Redis URL {url!r}: unknown parameter(s) {', '.join(sorted(unknown))}"
        )
    if kind == "standalone" and len(hosts) != 1:
        raise ValueError(f"invalid Redis URL {url!r}: {scheme}:// takes exactly one host")
    service, db_text = "", path
    if kind == "sentinel":
        service, db_text = unquote(path), params.get("db", "")
        if not service:
            raise ValueError(f"invalid Redis URL {url!r}: the path must name the sentinel service")
        password = params.get("password", password)
    elif kind == "cluster" and path not in ("", "0"):
        raise ValueError(f"invalid Redis URL {url!r}: a cluster has only db 0")
    if db_text and not db_text.isdigit():
        raise ValueError(f"invalid Redis URL {url!r}: db must be a number, got {db_text!r}")
    return RedisURL(
        kind=kind,
        hosts=hosts,
        tls=tls,
        username=username,
        password=password,
        db=int(db_text or 0),
        service=service,
        sentinel_password=params.get("sentinel_password"),
        ssl_options=tuple(sorted((k, v) for k, v in params.items() if k in _SSL_PARAMS)),
    )


def _ssl_context(parsed: RedisURL) -> ssl.SSLContext | None:
    if not parsed.tls:
        return None
    opts = dict(parsed.ssl_options)
    ctx = ssl.create_default_context(cafile=opts.get("ssl_ca_certs"))
    if "ssl_certfile" in opts:
        ctx.load_cert_chain(opts["ssl_certfile"], opts.get("ssl_keyfile"))
    reqs = opts.get("ssl_cert_reqs", "required")
    modes = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
    if reqs not in modes:
        raise ValueError(f"ssl_cert_reqs must be none, optional or required, got {reqs!r}")
    check = opts.get("ssl_check_hostname", "true" if reqs != "none" else "false").lower()
    if check not in ("true", "false"):
        raise ValueError(f"ssl_check_hostname must be true or false, got {check!r}")
    ctx.check_hostname = check == "true"
    ctx.verify_mode = modes[reqs]
    return ctx


def connect_options(parsed: RedisURL, timeout: float, connect_timeout: float) -> ConnectOptions:
    return ConnectOptions(
        timeout=timeout,
        connect_timeout=connect_timeout,
        ssl=_ssl_context(parsed),
        username=parsed.username,
        password=parsed.password,
        db=parsed.db,
    )
