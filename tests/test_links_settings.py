"""The short-link keys of ``redirects:``, read through the located config reader."""

from __future__ import annotations

import pytest

from proxy.confread import Problems, Section
from proxy.links.settings import KEYS, LinksSettings, read_links_settings
from proxy.links.validate import HostRules
from proxy.yamlsrc import parse


def read(text: str, env: dict[str, str] | None = None) -> tuple[LinksSettings, list[str], Section]:
    root, early = parse(text, "rules.yaml", env or {})
    assert not early
    problems = Problems("rules.yaml")
    sec = Section(root, "", problems).section("redirects")
    settings = read_links_settings(sec)
    return settings, [str(p) for p in problems.items], sec


def test_defaults() -> None:
    settings, problems, sec = read("redirects: {prefix: /s/}\n")
    assert settings == LinksSettings()
    assert settings.code_secret is None and settings.min_length == 7
    assert settings.sticky_cookie == "sluice_ab"
    assert problems == []
    assert set(KEYS) <= sec.seen  # known to the section, so finish() accepts them


def test_every_key() -> None:
    text = """\
redirects:
  code_secret: ${CODE_SECRET}
  min_length: 8
  allow_hosts: ["*.Example.com", "b\u00fccher.example"]
  deny_hosts: bad.example.com
  sticky_cookie: ab_test
  cache_size: 0
  cache_ttl: 1500ms
"""
    settings, problems, _ = read(text, {"CODE_SECRET": "s" * 32})
    assert problems == []
    assert settings == LinksSettings(
        code_secret="s" * 32,
        min_length=8,
        hosts=HostRules(
            allow=("*.example.com", "xn--bcher-kva.example"), deny=("bad.example.com",)
        ),
        sticky_cookie="ab_test",
        cache_size=0,
        cache_ttl=1.5,
    )


def test_sticky_cookie_can_be_turned_off() -> None:
    assert read("redirects: {sticky_cookie: false}\n")[0].sticky_cookie is None
    assert read("redirects: {sticky_cookie: true}\n")[0].sticky_cookie == "sluice_ab"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("code_secret: short", "rules.yaml:2: redirects.code_secret: must be at least 16 bytes"),
        ("code_secret: 12345", "redirects.code_secret: expected a string"),
        ("min_length: 6", "rules.yaml:2: redirects.min_length: must be 7 to 10, got 6"),
        ("min_length: seven", "redirects.min_length: expected an integer"),
        ("allow_hosts: ['a.*.com']", "redirects.allow_hosts: 'a.*.com': a wildcard is only"),
        ("deny_hosts: ['ex ample.com']", "redirects.deny_hosts: 'ex ample.com' is not a valid"),
        ("sticky_cookie: 'a b'", "redirects.sticky_cookie: expected a cookie name"),
        ("cache_size: -1", "redirects.cache_size: must be at least 0"),
        ("cache_ttl: soon", "redirects.cache_ttl: bad duration 'soon'"),
    ],
)
def test_problems_are_located(line: str, message: str) -> None:
    _, problems, _ = read(f"redirects:\n  {line}\n")
    assert len(problems) == 1
    assert message in problems[0]
