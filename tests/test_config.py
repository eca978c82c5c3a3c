"""Config loading: every bad-config fixture gives its exact messages; good files freeze."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from proxy.config import ConfigError, load, loads
from proxy.confread import parse_duration, parse_size
from proxy.limitspec import KeySource, parse_key, parse_rate

FIXTURES = Path(__file__).parent / "fixtures" / "config"
BAD = sorted(FIXTURES.glob("*.yaml"))


def expected(path: Path) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^# expect: (.*)$", path.read_text(), re.M)]


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_config_reports_exact_messages(path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(path)
    # Messages name the file as it was given; compare by basename.
    got = [str(p).replace(str(FIXTURES) + "/", "") for p in info.value.problems]
    assert got == expected(path)


def test_every_fixture_states_what_it_expects() -> None:
    assert len(BAD) >= 15
    for path in BAD:
        assert expected(path), f"{path.name} has no '# expect:' line"


def test_shipped_rules_file_loads(repo_root: Path) -> None:
    config = load(repo_root / "rules.yaml")
    assert config.routes and config.upstreams
    assert all(r.upstream in config.upstreams for r in config.routes if r.upstream)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("10s", 10), ("1m", 60), ("1h", 3600), ("1d", 86400), ("90s", 90), (3, 3.0)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["10", "1 sec", "-1s", "", "1w", True])
def test_bad_durations(text: object) -> None:
    if text == "10":  # a bare string number is ambiguous; only YAML numbers are seconds
        with pytest.raises(ValueError):
            parse_duration(text)
        return
    with pytest.raises(ValueError):
        parse_duration(text)


def test_sizes() -> None:
    assert parse_size("64KiB") == 65536
    assert parse_size("10MB") == 10_000_000
    assert parse_size(8192) == 8192
    with pytest.raises(ValueError):
        parse_size("lots")


def test_env_substitution_with_defaults_and_types() -> None:
    text = """
listen: 127.0.0.1:${PORT:-8100}
admin: {listen: "127.0.0.1:8101", token: ${TOKEN}}
server: {max_body_size: ${BODY:-1024}}
"""
    config = loads(text, "x.yaml", env={"TOKEN": "0123456789abcdef0123"})
    assert config.listen.port == 8100
    assert config.admin.tokens[0].token == "0123456789abcdef0123"
    assert config.server.max_body_size == 1024
    # an env value is a value, never YAML syntax
    config = loads(text, "x.yaml", env={"TOKEN": "a: [b, {c}] # not a comment", "PORT": "8200"})
    assert config.admin.tokens[0].token == "a: [b, {c}] # not a comment"
    assert config.listen.port == 8200


def test_all_problems_are_reported_together() -> None:
    text = "listen: nope\nupstreams:\n  a: {url: ftp://x}\nbogus: 1\n"
    with pytest.raises(ConfigError) as info:
        loads(text, "r.yaml", env={})
    lines = [str(p) for p in info.value.problems]
    assert lines == [
        "r.yaml:1: listen: expected host:port, got 'nope'",
        "r.yaml:3: upstreams.a.url: expected an absolute URL with scheme http or https, "
        "got 'ftp://x'",
        "r.yaml:4: bogus: unknown key",
    ]


def test_key_chains_and_composites() -> None:
    spec = parse_key("header:X-API-Key + path | ip/64")
    assert spec.alternatives == (
        (KeySource("header", "X-API-Key"), KeySource("path")),
        (KeySource("ip", prefix=64),),
    )
    assert str(spec) == "header:X-API-Key + path | ip/64"
    for bad in ("header", "ip:x", "ip/0", "", "cookie: "):
        with pytest.raises(ValueError):
            parse_key(bad)


def test_rates() -> None:
    assert parse_rate("10/s") == (10.0, 1.0)
    assert parse_rate("100/m") == (100.0, 60.0)
    assert parse_rate("5/10s") == (5.0, 10.0)


def test_limit_rules_parse_every_algorithm() -> None:
    text = """
limits:
  - {name: fw, algorithm: fixed_window, limit: 10, window: 90s}
  - name: multi
    algorithm: sliding_window_log
    windows: [{limit: 10, window: 1s}, {limit: 1000, window: 1d}]
  - {name: tb, algorithm: token_bucket, capacity: 20, refill: 10/s, cost: "header:X-Cost"}
  - {name: g, algorithm: gcra, limit: 60, window: 1m, burst: 5, shadow: true,
     on_storage_error: local, match: {methods: [post]}}
"""
    limits = loads(text, "l.yaml", env={}).limits
    assert limits["fw"].quotas[0].window == 90
    assert [(q.limit, q.window) for q in limits["multi"].quotas] == [(10, 1.0), (1000, 86400.0)]
    tb = limits["tb"]
    assert (tb.quotas[0].limit, tb.quotas[0].window, tb.cost_header) == (20, 2.0, "X-Cost")
    g = limits["g"]
    assert (g.burst, g.shadow, g.on_storage_error) == (5, True, "local")
    assert g.match is not None and g.match.methods == frozenset({"POST"})


def test_route_match_fields() -> None:
    text = """
upstreams: {api: "http://127.0.0.1:9000"}
routes:
  - name: r
    match:
      path_regex: "^/v[0-9]+/"
      host: API.example.com
      headers: {X-Tenant: blue, X-Debug: null}
      methods: [get, POST]
    upstream: api
"""
    route = loads(text, "m.yaml", env={}).routes[0]
    m = route.match
    assert m.matches("GET", "/v2/x", "api.example.com:8000", {"X-Tenant": "blue", "X-Debug": "1"})
    assert not m.matches("GET", "/v2/x", "api.example.com", {"X-Tenant": "red", "X-Debug": "1"})
    assert not m.matches("GET", "/x", "api.example.com", {"X-Tenant": "blue", "X-Debug": "1"})
    assert not m.matches("PUT", "/v2/x", "api.example.com", {"X-Tenant": "blue", "X-Debug": "1"})
    assert not m.matches("GET", "/v2/x", "other.com", {"X-Tenant": "blue", "X-Debug": "1"})
