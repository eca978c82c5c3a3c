"""Validation of what clients ask to shorten: destinations, variants, tags, requests.

Every refusal is a ``LinkError(status, reason)``: 400 for a malformed value,
403 for a destination the operator's host policy refuses. Destinations come
out normalised: scheme and host lower-cased, host IDNA-encoded, default port
dropped, empty path made ``/``, percent-escapes of unreserved characters
decoded and the others upper-cased, characters that may not appear raw
(spaces, non-ASCII, ``"<>\\^`{|}``) percent-encoded as UTF-8.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import idna

from proxy.confread import parse_duration
from proxy.links.codes import RESERVED_CODES, check_custom_code
from proxy.links.errors import LinkError
from proxy.links.model import PATCHABLE, REDIRECT_STATUSES, Link, Variant

MAX_URL_BYTES = 2048
MIN_VARIANTS, MAX_VARIANTS = 2, 10
MAX_WEIGHT = 10_000
MAX_TAGS = 16
TAG = re.compile(r"[a-z0-9][a-z0-9_.:-]{0,63}")

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PATH_SAFE = "-._~!$&'()*+,;=:@/"
_QUERY_SAFE = _PATH_SAFE + "?"
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_STRAY_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalise_host(host: str) -> str:
    """Lower-case, IDNA-encoded host (IPv6 literals bracketed); ValueError if invalid."""
    if host.startswith("[") and host.endswith("]"):
        try:
            return f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]"
        except ValueError:
            raise ValueError(f"{host!r} is not a valid IPv6 address") from None
    if not host.isascii():
        try:
            host = idna.encode(host, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise ValueError(f"{host!r} is not a valid domain name ({exc})") from None
    host = host.lower().rstrip(".")
    if not host or len(host) > 253:
        raise ValueError(f"{host!r} is not a valid host name")
    for label in host.split("."):
        if not _LABEL.fullmatch(label):
            raise ValueError(f"{host!r} is not a valid host name")
        if label.startswith("xn--"):
            try:
                idna.decode(label)
            except idna.IDNAError:
                raise ValueError(f"{host!r} has an invalid IDNA label {label!r}") from None
    return host


def host_pattern(pattern: str) -> str:
    """A normalised allow/deny pattern: a host, or ``*.`` + a domain (its subdomains)."""
    if pattern.startswith("*."):
        return "*." + normalise_host(pattern[2:])
    if "*" in pattern:
        raise ValueError(f"{pattern!r}: a wildcard is only allowed as a leading '*.'")
    return normalise_host(pattern)


def _matches(host: str, pattern: str) -> bool:
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern


@dataclass(frozen=True, slots=True)
class HostRules:
    """The operator's destination host policy (patterns already ``host_pattern``-ed).

    ``*.example.com`` matches every subdomain of example.com but not example.com
    itself (list both for both). Deny wins; a non-empty allow list admits only
    the hosts it matches.
    """

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()

    def refusal(self, host: str) -> str | None:
        if any(_matches(host, p) for p in self.deny):
            return f"destination host {host!r} is refused by the operator (deny_hosts)"
        if self.allow and not any(_matches(host, p) for p in self.allow):
            return f"destination host {host!r} is not in the operator's allow list (allow_hosts)"
        return None


@dataclass(frozen=True, slots=True)
class DestinationPolicy:
    """What a destination is checked against: Sluice's own redirect hosts (a
    destination on one of them under ``prefix``, or anywhere on it when
    ``prefix`` is None, i.e. host-based redirects, would loop) and the host rules."""

    own_hosts: tuple[str, ...] = ()
    prefix: str | None = "/s/"
    hosts: HostRules = field(default_factory=HostRules)

    def with_own_hosts(self, extra: Collection[str]) -> DestinationPolicy:
        """The same policy also treating ``extra`` (e.g. the request's Host) as Sluice."""
        return DestinationPolicy((*self.own_hosts, *extra), self.prefix, self.hosts)


def _component(text: str, safe: str) -> str:
    text = quote(text, safe=safe + "%")
    text = _STRAY_PERCENT.sub("%25", text)

    def escape(match: re.Match[str]) -> str:
        byte = int(match.group(1), 16)
        return chr(byte) if byte in _UNRESERVED else "%" + match.group(1).upper()

    return _ESCAPE.sub(escape, text)


def _split_netloc(netloc: str) -> tuple[str, str]:
    if netloc.startswith("["):
        end = netloc.find("]")
        if end == -1:
            raise LinkError(400, "the destination's IPv6 host has no closing ']'")
        host, rest = netloc[: end + 1], netloc[end + 1 :]
        if rest and not rest.startswith(":"):
            raise LinkError(400, "the destination's host is malformed")
        return host, rest[1:]
    host, _, port = netloc.partition(":")
    if ":" in port:
        raise LinkError(400, "the destination's host is malformed (an IPv6 address needs [])")
    return host, port


def validate_destination(url: Any, policy: DestinationPolicy | None = None) -> str:
    """The normalised form of ``url``, or ``LinkError`` saying why it is refused."""
    policy = policy or DestinationPolicy()
    if not isinstance(url, str) or not url.strip():
        raise LinkError(400, "the destination URL must be a non-empty string")
    url = url.strip()
    if len(url) > 4 * MAX_URL_BYTES:
        raise LinkError(400, f"the destination URL is longer than {MAX_URL_BYTES} bytes")
    if _CONTROL.search(url):
        raise LinkError(400, "the destination URL contains control characters")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise LinkError(400, f"the destination URL cannot be parsed: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        got = f" (got {scheme + ':'!r})" if scheme else " (got a relative URL)"
        raise LinkError(400, "only absolute http:// and https:// URLs can be shortened" + got)
    if not parts.netloc:
        raise LinkError(400, "the destination URL has no host")
    if "@" in parts.netloc:
        raise LinkError(400, "the destination URL must not carry credentials (user:password@)")
    raw_host, raw_port = _split_netloc(parts.netloc)
    try:
        host = normalise_host(raw_host)
    except ValueError as exc:
        raise LinkError(400, f"the destination host is invalid: {exc}") from None
    netloc = host
    if raw_port:
        if not raw_port.isdigit() or not 0 < int(raw_port) < 65536:
            raise LinkError(400, f"the destination port {raw_port!r} is not a port number")
        if int(raw_port) != _DEFAULT_PORTS[scheme]:
            netloc = f"{host}:{int(raw_port)}"
    path = _component(parts.path, _PATH_SAFE) or "/"
    out = f"{scheme}://{netloc}{path}"
    if parts.query or "?" in url.partition("#")[0]:
        out += "?" + _component(parts.query, _QUERY_SAFE)
    if parts.fragment:
        out += "#" + _component(parts.fragment, _QUERY_SAFE)
    size = len(out.encode())
    if size > MAX_URL_BYTES:
        raise LinkError(
            400,
            f"the destination URL is {size} bytes once normalised; the limit is {MAX_URL_BYTES}",
        )
    own = set()
    for name in policy.own_hosts:
        try:
            own.add(normalise_host(_split_netloc(name)[0]))
        except (ValueError, LinkError):
            continue
    if host in own and (policy.prefix is None or path.startswith(policy.prefix)):
        raise LinkError(400, "the destination points back into Sluice's own redirects (a loop)")
    refusal = policy.hosts.refusal(host)
    if refusal:
        raise LinkError(403, refusal)
    return out


def validate_variants(raw: Any, policy: DestinationPolicy | None = None) -> tuple[Variant, ...]:
    """``[{url, weight}, ...]`` (2 to 10 items, positive integer weights) → variants."""
    if not isinstance(raw, list):
        raise LinkError(400, "variants must be a list of {url, weight} objects")
    if not MIN_VARIANTS <= len(raw) <= MAX_VARIANTS:
        raise LinkError(
            400, f"variants must have {MIN_VARIANTS} to {MAX_VARIANTS} items, got {len(raw)}"
        )
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise LinkError(400, f"variants[{i}] must be an object with a url and a weight")
        extra = sorted(set(item) - {"url", "weight"})
        if extra:
            raise LinkError(400, f"variants[{i}] has unknown field(s): {', '.join(extra)}")
        weight = item.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 < weight <= MAX_WEIGHT:
            raise LinkError(
                400,
                f"variants[{i}].weight must be an integer from 1 to {MAX_WEIGHT}, got {weight!r}",
            )
        try:
            url = validate_destination(item.get("url"), policy)
        except LinkError as exc:
            raise LinkError(exc.status, f"variants[{i}].url: {exc.reason}") from None
        out.append(Variant(url, weight))
    return tuple(out)


def validate_tags(raw: Any) -> tuple[str, ...]:
    """Tags: lower-cased, de-duplicated, each ``[a-z0-9][a-z0-9_.:-]{0,63}``, at most 16."""
    if not isinstance(raw, list) or not all(isinstance(t, str) for t in raw):
        raise LinkError(400, "tags must be a list of strings")
    tags = tuple(dict.fromkeys(t.strip().lower() for t in raw))
    if len(tags) > MAX_TAGS:
        raise LinkError(400, f"a link may have at most {MAX_TAGS} tags, got {len(tags)}")
    for tag in tags:
        if not TAG.fullmatch(tag):
            raise LinkError(
                400, f"tag {tag!r} must be 1-64 of a-z, 0-9, '_', '.', ':', '-' (not leading)"
            )
    return tags


def _expiry(body: Mapping[str, Any], now: float) -> float | None:
    if "expires_at" in body and "expires_in" in body:
        raise LinkError(400, "give expires_at or expires_in, not both")
    if body.get("expires_in") is not None:
        try:
            seconds = parse_duration(body["expires_in"])
        except ValueError as exc:
            raise LinkError(400, f"expires_in: {exc}") from None
        if seconds <= 0:
            raise LinkError(400, "expires_in must be longer than zero")
        return now + seconds
    value = body.get("expires_at")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LinkError(400, "expires_at must be a number of seconds since the epoch")
    if value <= now:
        raise LinkError(400, "expires_at is in the past")
    return float(value)


def _fields(body: Mapping[str, Any], now: float, policy: DestinationPolicy) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "url" in body:
        out["url"] = validate_destination(body["url"], policy)
    if "expires_at" in body or "expires_in" in body:
        out["expires_at"] = _expiry(body, now)
    if "max_clicks" in body:
        value = body["max_clicks"]
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise LinkError(400, f"max_clicks must be a positive integer or null, got {value!r}")
        out["max_clicks"] = value
    if "status" in body:
        if body["status"] is not None and body["status"] not in REDIRECT_STATUSES:
            raise LinkError(
                400, f"status must be 301, 302, 307, 308 or null, got {body['status']!r}"
            )
        out["status"] = body["status"]
    if "tags" in body:
        out["tags"] = validate_tags(body["tags"] or [])
    if "variants" in body:
        out["variants"] = validate_variants(body["variants"], policy) if body["variants"] else ()
    return out


def parse_link_request(
    body: Any, *, now: float, created_by: str | None, policy: DestinationPolicy
) -> Link:
    """A create request's JSON body → a ``Link`` to hand to ``LinkStore.create``.

    Keys: ``url`` (required unless ``variants`` is given; then the first
    variant's URL), ``code`` (custom; omitted → generated, ``Link.code == ""``),
    ``expires_at`` (Unix seconds) or ``expires_in`` (``"7d"`` or seconds),
    ``max_clicks``, ``status``, ``tags``, ``variants``.
    """
    if not isinstance(body, Mapping):
        raise LinkError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - {"code", "expires_in", *PATCHABLE})
    if unknown:
        raise LinkError(400, f"unknown field(s): {', '.join(unknown)}")
    values = _fields(body, now, policy)
    variants = values.get("variants", ())
    if "url" not in values:
        if not variants:
            raise LinkError(400, "url is required")
        values["url"] = variants[0].url
    code = body.get("code")
    if code is not None and not isinstance(code, str):
        raise LinkError(400, "code must be a string")
    return Link(
        code=check_custom_code(code) if code else "",
        created_at=now,
        created_by=created_by,
        **values,
    )


def parse_link_patch(body: Any, *, now: float, policy: DestinationPolicy) -> dict[str, Any]:
    """A patch request's JSON body → validated changes for ``LinkStore.patch``."""
    if not isinstance(body, Mapping):
        raise LinkError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - {"expires_in", *PATCHABLE})
    if unknown:
        raise LinkError(400, f"these fields cannot be changed: {', '.join(unknown)}")
    if body.get("url", "") is None:
        raise LinkError(400, "url cannot be removed")
    return _fields(body, now, policy)


def check_link(link: Link, policy: DestinationPolicy) -> Link:
    """Re-validate an imported link's destinations and tags under today's policy
    (its code may have the generated form; reserved words are still refused);
    returns the link with normalised URLs and tags."""
    if link.code.lower() in RESERVED_CODES:
        raise LinkError(400, f"the code {link.code!r} is reserved")
    url = validate_destination(link.url, policy)
    variants = (
        validate_variants([{"url": v.url, "weight": v.weight} for v in link.variants], policy)
        if link.variants
        else ()
    )
    return Link(
        code=link.code,
        url=url,
        created_at=link.created_at,
        created_by=link.created_by,
        expires_at=link.expires_at,
        max_clicks=link.max_clicks,
        status=link.status,
        tags=validate_tags(list(link.tags)),
        variants=variants,
    )
