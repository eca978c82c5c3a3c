"""Pure tests of destination, variant, tag and request validation."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.links.errors import LinkError
from proxy.links.model import Link, Variant
from proxy.links.validate import (
    MAX_URL_BYTES,
    DestinationPolicy,
    HostRules,
    check_link,
    host_pattern,
    parse_link_patch,
    parse_link_request,
    validate_destination,
    validate_tags,
    validate_variants,
)

OWN = DestinationPolicy(own_hosts=("sho.rt", "127.0.0.1:8000"), prefix="/s/")
NOW = 1_700_000_000.0


def refusal(call: Any, *args: Any, **kwargs: Any) -> LinkError:
    with pytest.raises(LinkError) as info:
        call(*args, **kwargs)
    return info.value


@pytest.mark.parametrize(
    ("url", "normalised"),
    [
        ("https://example.com", "https://example.com/"),
        ("  HTTP://Example.COM:80/a  ", "http://example.com/a"),
        ("https://example.com:443/x?y=1#z", "https://example.com/x?y=1#z"),
        ("https://example.com:8443/", "https://example.com:8443/"),
        ("http://example.com/%7euser/a%2fb", "http://example.com/~user/a%2Fb"),
        ("http://example.com/100%", "http://example.com/100%25"),
        ('http://example.com/a b"<>', "http://example.com/a%20b%22%3C%3E"),
        (
            "https://b\u00fccher.example/\u00e4?q=\u00fc",
            "https://xn--bcher-kva.example/%C3%A4?q=%C3%BC",
        ),
        ("http://[::FFFF:1.2.3.4]:8080/", "http://[::ffff:102:304]:8080/"),
        ("http://example.com/?", "http://example.com/?"),
        ("http://my_host.example.com./p", "http://my_host.example.com/p"),
    ],
)
def test_destinations_are_normalised(url: str, normalised: str) -> None:
    assert validate_destination(url) == normalised


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        (None, "non-empty string"),
        ("   ", "non-empty string"),
        (
            "javascript:alert(1)",
            "only absolute http:// and https:// URLs can be shortened (got 'javascript:')",
        ),
        ("data:text/html,<script>x</script>", "(got 'data:')"),
        ("file:///etc/passwd", "(got 'file:')"),
        ("ftp://example.com/f", "(got 'ftp:')"),
        ("/relative/path", "(got a relative URL)"),
        ("//example.com/x", "(got a relative URL)"),
        ("example.com/x", "(got a relative URL)"),
        ("http:///nohost", "has no host"),
        ("https://user:pass@example.com/", "must not carry credentials"),
        ("https://user@example.com/", "must not carry credentials"),
        ("https://exa mple.com/", "destination host is invalid"),
        ("https://xn--zz.com/", "invalid IDNA label"),
        ("https://-bad-.com/", "destination host is invalid"),
        ("https://example.com:99999/", "is not a port number"),
        ("https://example.com:http/", "is not a port number"),
        ("https://[::1/", "cannot be parsed: Invalid IPv6 URL"),
        ("https://a:1:2/", "an IPv6 address needs []"),
        ("https://example.com/a\nb", "control characters"),
        ("https://example.com/" + "a" * MAX_URL_BYTES, f"the limit is {MAX_URL_BYTES}"),
        ("https://example.com/" + "\u00e9" * 700, "once normalised; the limit is"),
    ],
)
def test_destinations_refused(url: Any, reason: str) -> None:
    error = refusal(validate_destination, url)
    assert error.status == 400
    assert reason in error.reason


@pytest.mark.parametrize(
    "url",
    [
        "https://sho.rt/s/abc",
        "https://SHO.RT:8443/%73/abc",  # same host (any port), same prefix once normalised
        "http://127.0.0.1/s/x",
    ],
)
def test_a_destination_back_into_the_redirect_prefix_is_a_loop(url: str) -> None:
    assert "a loop" in refusal(validate_destination, url, OWN).reason


def test_own_host_outside_the_prefix_is_fine_unless_redirects_are_host_based() -> None:
    assert validate_destination("https://sho.rt/docs", OWN) == "https://sho.rt/docs"
    host_based = DestinationPolicy(own_hosts=("sho.rt",), prefix=None)
    assert "a loop" in refusal(validate_destination, "https://sho.rt/docs", host_based).reason
    request_host = DestinationPolicy().with_own_hosts(["edge.example:8000"])
    assert "a loop" in refusal(validate_destination, "http://edge.example/s/x", request_host).reason


def test_host_allow_and_deny_lists() -> None:
    rules = HostRules(
        allow=(
            host_pattern("example.com"),
            host_pattern("*.example.com"),
            host_pattern("*.EVIL.example.com"),
        ),
        deny=(host_pattern("*.evil.example.com"), host_pattern("b\u00fccher.example")),
    )
    policy = DestinationPolicy(hosts=rules)
    assert validate_destination("https://example.com/", policy)
    assert validate_destination("https://a.b.example.com/", policy)
    denied = refusal(validate_destination, "https://x.evil.example.com/", policy)
    assert (denied.status, denied.reason) == (
        403,
        "destination host 'x.evil.example.com' is refused by the operator (deny_hosts)",
    )
    assert (
        "deny_hosts"
        in refusal(validate_destination, "https://xn--bcher-kva.example/", policy).reason
    )
    other = refusal(validate_destination, "https://example.org/", policy)
    assert other.status == 403 and "allow list (allow_hosts)" in other.reason
    # A wildcard covers subdomains only.
    apex = DestinationPolicy(hosts=HostRules(deny=(host_pattern("*.evil.com"),)))
    assert validate_destination("https://evil.com/", apex) == "https://evil.com/"


@pytest.mark.parametrize("pattern", ["*", "a.*.com", "ex ample.com", "*."])
def test_bad_host_patterns(pattern: str) -> None:
    with pytest.raises(ValueError):
        host_pattern(pattern)


def test_variants() -> None:
    raw = [{"url": "https://a.example/", "weight": 1}, {"url": "HTTPS://B.example", "weight": 3}]
    assert validate_variants(raw) == (
        Variant("https://a.example/", 1),
        Variant("https://b.example/", 3),
    )


@pytest.mark.parametrize(
    ("raw", "status", "reason"),
    [
        ("https://a/", 400, "variants must be a list"),
        ([{"url": "https://a.example/", "weight": 1}], 400, "2 to 10 items, got 1"),
        ([{"url": "https://a.example/", "weight": 1}] * 11, 400, "2 to 10 items, got 11"),
        (["https://a.example/", "https://b.example/"], 400, "variants[0] must be an object"),
        (
            [{"url": "https://a.example/", "weight": 0}] * 2,
            400,
            "variants[0].weight must be an integer from 1",
        ),
        ([{"url": "https://a.example/", "weight": -2}] * 2, 400, "weight must be an integer"),
        ([{"url": "https://a.example/", "weight": True}] * 2, 400, "weight must be an integer"),
        ([{"url": "https://a.example/", "weight": "2"}] * 2, 400, "weight must be an integer"),
        ([{"url": "https://a.example/", "weight": 10_001}] * 2, 400, "from 1 to 10000"),
        (
            [{"url": "https://a.example/", "weight": 1}, {"url": "javascript:x", "weight": 1}],
            400,
            "variants[1].url: only absolute http",
        ),
        (
            [
                {"url": "https://a.example/", "weight": 1},
                {"url": "https://x.evil.com/", "weight": 1},
            ],
            403,
            "variants[1].url: destination host 'x.evil.com' is refused",
        ),
        (
            [{"url": "https://a.example/", "weight": 1, "name": "a"}] * 2,
            400,
            "unknown field(s): name",
        ),
    ],
)
def test_variants_refused(raw: Any, status: int, reason: str) -> None:
    policy = DestinationPolicy(hosts=HostRules(deny=("*.evil.com",)))
    error = refusal(validate_variants, raw, policy)
    assert error.status == status
    assert reason in error.reason


def test_tags() -> None:
    assert validate_tags(["Launch", "q3:emea", "launch", " x-1 "]) == ("launch", "q3:emea", "x-1")
    assert "list of strings" in refusal(validate_tags, "launch").reason
    assert "at most 16 tags" in refusal(validate_tags, [f"t{i}" for i in range(17)]).reason
    assert "tag 'a b'" in refusal(validate_tags, ["a b"]).reason
    assert "not leading" in refusal(validate_tags, ["-x"]).reason


def test_parse_link_request() -> None:
    body = {
        "url": "https://Example.com",
        "code": "spring-sale",
        "expires_in": "1d",
        "max_clicks": 100,
        "status": 308,
        "tags": ["Promo"],
    }
    link = parse_link_request(body, now=NOW, created_by="alice", policy=OWN)
    assert link == Link(
        code="spring-sale",
        url="https://example.com/",
        created_at=NOW,
        created_by="alice",
        expires_at=NOW + 86400,
        max_clicks=100,
        status=308,
        tags=("promo",),
    )
    ab = parse_link_request(
        {
            "variants": [
                {"url": "https://a.example", "weight": 1},
                {"url": "https://b.example", "weight": 1},
            ]
        },
        now=NOW,
        created_by=None,
        policy=OWN,
    )
    assert ab.code == "" and ab.url == "https://a.example/" and len(ab.variants) == 2


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ([], "must be a JSON object"),
        ({}, "url is required"),
        ({"url": "https://a.example/", "clicks": 3}, "unknown field(s): clicks"),
        ({"url": "https://a.example/", "code": "admin"}, "is reserved"),
        ({"url": "https://a.example/", "code": 7}, "code must be a string"),
        ({"url": "https://a.example/", "expires_at": NOW - 1}, "expires_at is in the past"),
        ({"url": "https://a.example/", "expires_at": "soon"}, "expires_at must be a number"),
        ({"url": "https://a.example/", "expires_in": "soon"}, "expires_in: bad duration"),
        ({"url": "https://a.example/", "expires_in": 0}, "longer than zero"),
        ({"url": "https://a.example/", "expires_in": 5, "expires_at": NOW + 9}, "not both"),
        ({"url": "https://a.example/", "max_clicks": 0}, "max_clicks must be a positive integer"),
        ({"url": "https://a.example/", "status": 303}, "status must be 301, 302, 307, 308"),
        ({"url": "https://sho.rt/s/x"}, "a loop"),
    ],
)
def test_parse_link_request_refusals(body: Any, reason: str) -> None:
    error = refusal(parse_link_request, body, now=NOW, created_by=None, policy=OWN)
    assert reason in error.reason


def test_parse_link_patch() -> None:
    changes = parse_link_patch(
        {"url": "https://b.example", "expires_at": None, "tags": [], "variants": None},
        now=NOW,
        policy=OWN,
    )
    assert changes == {"url": "https://b.example/", "expires_at": None, "tags": (), "variants": ()}
    assert (
        "cannot be changed: code"
        in refusal(parse_link_patch, {"code": "x-y"}, now=NOW, policy=OWN).reason
    )
    assert (
        "url cannot be removed"
        in refusal(parse_link_patch, {"url": None}, now=NOW, policy=OWN).reason
    )


def test_check_link_revalidates_imports() -> None:
    link = Link("abcdefg", "HTTPS://A.example", NOW, tags=("X",))
    assert check_link(link, OWN) == Link("abcdefg", "https://a.example/", NOW, tags=("x",))
    assert "reserved" in refusal(check_link, Link("admin", "https://a.example/", NOW), OWN).reason
    assert "only absolute" in refusal(check_link, Link("x-y", "javascript:x", NOW), OWN).reason
