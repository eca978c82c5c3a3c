"""Client identity: trusted-proxy walking, key chains, prefixes (pure)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from multidict import CIMultiDict

from proxy.limits.identity import client_ip, identify
from proxy.limitspec import parse_key

TRUSTED = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))


def headers(*pairs: tuple[str, str]) -> CIMultiDict[str]:
    return CIMultiDict(pairs)


@dataclass
class View:
    method: str = "GET"
    path: str = "/api/x"
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    query: dict[str, str] = field(default_factory=dict)
    cookies: dict[str, str] = field(default_factory=dict)


def test_untrusted_peer_cannot_spoof() -> None:
    h = headers(("X-Forwarded-For", "1.2.3.4"), ("Forwarded", "for=5.6.7.8"))
    assert client_ip("203.0.113.9", h, TRUSTED) == "203.0.113.9"
    assert client_ip("203.0.113.9", h, ()) == "203.0.113.9"


def test_trusted_proxy_is_believed_walking_from_the_right() -> None:
    # client spoofs 1.2.3.4; the real client is 198.51.100.7; two trusted proxies appended
    h = headers(("X-Forwarded-For", "1.2.3.4, 198.51.100.7"), ("X-Forwarded-For", "10.1.1.1"))
    assert client_ip("10.0.0.2", h, TRUSTED) == "198.51.100.7"


def test_all_trusted_hops_give_the_leftmost() -> None:
    assert client_ip("10.0.0.2", headers(("X-Forwarded-For", "10.9.9.9")), TRUSTED) == "10.9.9.9"


def test_garbage_hop_stops_the_walk() -> None:
    h = headers(("X-Forwarded-For", "1.2.3.4, not-an-ip, 10.1.1.1"))
    assert client_ip("10.0.0.2", h, TRUSTED) == "10.1.1.1"


def test_forwarded_header_when_no_xff() -> None:
    h = headers(("Forwarded", 'for="[2001:db8::1]:4711";proto=https, for=10.0.0.5'))
    assert client_ip("10.0.0.2", h, TRUSTED) == "2001:db8::1"
    h = headers(("Forwarded", "for=192.0.2.43:47011"))
    assert client_ip("10.0.0.2", h, TRUSTED) == "192.0.2.43"


def test_key_chain_first_present_wins() -> None:
    spec = parse_key("header:X-API-Key | cookie:sid | ip")
    assert identify(spec, View(headers=headers(("X-API-Key", "k1"))), "1.1.1.1", "r") == (
        "header:X-API-Key=k1"
    )
    assert identify(spec, View(cookies={"sid": "s"}), "1.1.1.1", "r") == "cookie:sid=s"
    assert identify(spec, View(), "1.1.1.1", "r") == "ip=1.1.1.1"


def test_composite_and_missing() -> None:
    spec = parse_key("header:X-API-Key + path + method")
    view = View(headers=headers(("X-API-Key", "k")), path="/a", method="POST")
    assert identify(spec, view, "ip", "r") == "header:X-API-Key=k+path=/a+method=POST"
    assert identify(spec, View(), "ip", "r") is None
    assert identify(parse_key("query:token | route"), View(), "ip", "api") == "route=api"
    assert identify(parse_key("query:token"), View(query={"token": "t"}), "ip", "r") == (
        "query:token=t"
    )


def test_a_plain_ip_key_is_the_address_as_the_general_form_spells_it() -> None:
    assert identify(parse_key("ip"), View(), "192.0.2.1", "r") == "ip=192.0.2.1"
    assert identify(parse_key("ip + method"), View(), "192.0.2.1", "r") == "ip=192.0.2.1+method=GET"
    assert identify(parse_key("ip"), View(), "unknown", "r") == "ip=unknown"


def test_ipv6_prefix_grouping() -> None:
    spec = parse_key("ip/64")
    a = identify(spec, View(), "2001:db8:1:2:aaaa::1", "r")
    b = identify(spec, View(), "2001:db8:1:2:bbbb::2", "r")
    c = identify(spec, View(), "2001:db8:1:3::1", "r")
    assert a == b == "ip/64=2001:db8:1:2::/64"
    assert c != a
    assert identify(spec, View(), "192.0.2.1", "r") == "ip/64=192.0.2.1"
    assert identify(parse_key("ip/24"), View(), "192.0.2.77", "r") == "ip/24=192.0.2.0/24"


def test_masked_client_keys_hide_secrets_only() -> None:
    from proxy.limits.identity import masked

    assert masked("ip=1.2.3.4") == "ip=1.2.3.4"
    assert masked("ip/64=2001:db8::/64") == "ip/64=2001:db8::/64"
    secret = masked("header:X-API-Key=sk_live_123+path=/a")
    assert secret.startswith("header:X-API-Key=#") and secret.endswith("+path=/a")
    assert "sk_live_123" not in secret
    assert masked("anonymous") == "anonymous"
