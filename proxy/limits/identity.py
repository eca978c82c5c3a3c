"""Who is the caller: client IP behind trusted proxies, and rule keys.

Pure functions over a request view. ``X-Forwarded-For`` and ``Forwarded`` are
believed only from trusted proxies, walking from the right: each hop a trusted
proxy appended is peeled off until the first address not in
``trusted_proxies``; that is the client. A client talking to Sluice directly
cannot choose its own key by sending those headers.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Protocol

from proxy.limitspec import KeySource, KeySpec

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Headers(Protocol):
    def get(self, key: str, /) -> str | None: ...
    def getall(self, key: str, default: Sequence[str], /) -> Sequence[str]: ...


class RequestView(Protocol):
    """What identity needs of a request (aiohttp's BaseRequest fits)."""

    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def headers(self) -> Headers: ...
    @property
    def query(self) -> Mapping[str, str]: ...
    @property
    def cookies(self) -> Mapping[str, str]: ...


@lru_cache(maxsize=4096)
def _parse_ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def _is_trusted(address: IPAddress, trusted: Sequence[IPNetwork]) -> bool:
    return any(address.version == net.version and address in net for net in trusted)


def _forwarded_for(headers: Headers) -> list[str]:
    """The ``for=`` values of RFC 7239 ``Forwarded`` headers, in order."""
    out = []
    for value in headers.getall("Forwarded", ()):
        for element in value.split(","):
            for pair in element.split(";"):
                name, _, raw = pair.strip().partition("=")
                if name.lower() != "for":
                    continue
                raw = raw.strip().strip('"')
                if raw.startswith("["):  # "[2001:db8::1]:4711"
                    raw = raw[1 : raw.find("]")] if "]" in raw else raw[1:]
                elif raw.count(":") == 1:  # "192.0.2.43:47011"
                    raw = raw.split(":", 1)[0]
                out.append(raw)
    return out


def client_ip(peer: str | None, headers: Headers, trusted: Sequence[IPNetwork]) -> str:
    """The caller's address: the peer, or what trusted proxies say it forwarded."""
    if not trusted:  # the common case: the peer, as the socket reported it
        return peer or "unknown"
    address = _parse_ip(peer or "")
    if address is None:
        return peer or "unknown"
    if not _is_trusted(address, trusted):
        return str(address)
    xff = headers.getall("X-Forwarded-For", ())
    hops = (
        [h.strip() for value in xff for h in value.split(",")] if xff else _forwarded_for(headers)
    )
    for hop in reversed(hops):
        hop_address = _parse_ip(hop)
        if hop_address is None:  # garbage: nothing to its left can be believed
            break
        address = hop_address
        if not _is_trusted(address, trusted):
            break
    return str(address)


def _mask(ip: str, prefix: int) -> str:
    address = _parse_ip(ip)
    if address is None:
        return ip
    if address.version == 4 and prefix > 32:  # ip/64 groups IPv6; IPv4 stays whole
        return str(address)
    network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    return str(network)


def _source_value(source: KeySource, request: RequestView, ip: str, route: str) -> str | None:
    kind = source.kind
    if kind == "ip":
        return ip if source.prefix is None else _mask(ip, source.prefix)
    if kind == "header":
        return request.headers.get(source.name) or None
    if kind == "query":
        return request.query.get(source.name) or None
    if kind == "cookie":
        return request.cookies.get(source.name) or None
    if kind == "route":
        return route
    if kind == "path":
        return request.path
    return request.method


def identify(spec: KeySpec, request: RequestView, ip: str, route: str) -> str | None:
    """The first alternative whose sources are all present, as ``src=value+src=value``."""
    alternatives = spec.alternatives
    if len(alternatives) == 1 and len(alternatives[0]) == 1:  # one source: the usual rule
        source = alternatives[0][0]
        if source.kind == "ip" and source.prefix is None:
            return "ip=" + ip
    for alternative in alternatives:
        parts = []
        for source in alternative:
            value = _source_value(source, request, ip, route)
            if value is None:
                break
            parts.append(f"{source}={value}")
        else:
            return "+".join(parts)
    return None


_PUBLIC_SOURCES = ("ip=", "ip/", "route=", "path=", "method=")


def masked(client: str) -> str:
    """A client key fit for events and logs: addresses, routes, paths and methods as they
    are; header, query and cookie values (API keys, sessions) replaced by a short hash."""
    parts = []
    for part in client.split("+"):
        if part.startswith(_PUBLIC_SOURCES) or "=" not in part:
            parts.append(part)
            continue
        name, _, value = part.partition("=")
        digest = hashlib.blake2b(value.encode(), digest_size=6).hexdigest()
        parts.append(f"{name}=#{digest}")
    return "+".join(parts)
