"""What reloading one rules file in place of another would change (``sluice check --diff``).

``diff(old, new)`` is pure: two loaded configs in, change lines out, section by
section in the order of the configuration reference. Lines name config key
paths, entries of ``upstreams``, ``limits``, ``routes``, ``admin.tokens`` and
``notifications.webhooks`` by name rather than position::

    + upstreams.web: http://10.0.0.2:8080
    - limits.burst
    ~ routes.api.limits: [per_minute] → [per_minute, burst]
    ~ storage.url: memory:// → redis://10.0.0.5:6379 (needs restart)

`` (needs restart)`` marks what a reload does not apply (listeners, storage,
the server's socket settings, the log format…: see the ``restart`` sets
below, which mirror ``Runtime.reload``). Secrets are never printed — admin
tokens, webhook secrets, ``code_secret``, passwords in URLs, webhook URL
paths — only that they changed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import fields
from typing import Any, TypeVar

from proxy.config import Config, Route, Upstream
from proxy.events.settings import BatchSettings, RetrySettings, WebhookSettings
from proxy.limitspec import LimitRule
from proxy.match import Match
from proxy.summary import (
    describe_cost,
    describe_limit,
    describe_match,
    describe_quotas,
    describe_route,
    duration_text,
)

RESTART = " (needs restart)"
T = TypeVar("T")
Render = Callable[[Any], str]


def _text(value: object) -> str:
    """A config value as the rules file would write it (floats are durations)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, float):
        return duration_text(value)
    if isinstance(value, Match):
        return describe_match(value)
    if isinstance(value, frozenset):
        return "[" + ", ".join(sorted(map(str, value))) + "]"
    if isinstance(value, tuple):
        return "[" + ", ".join(map(_text, value)) + "]"
    return str(value)


def _safe_url(url: str) -> str:
    return re.sub(r"(://[^/@]*?:)[^/@]*@", r"\1***@", url)


class _Out:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def added(self, path: str, text: str, restart: bool = False) -> None:
        self.lines.append(f"+ {path}: {text}" + (RESTART if restart else ""))

    def removed(self, path: str, restart: bool = False) -> None:
        self.lines.append(f"- {path}" + (RESTART if restart else ""))

    def changed(self, path: str, old: str, new: str, restart: bool = False, note: str = "") -> None:
        """``old → new``; just ``changed`` when the texts agree (what differs is hidden)."""
        what = f"{old} → {new}" if old != new else "changed"
        self.lines.append(f"~ {path}: {what}{note}" + (RESTART if restart else ""))

    def each_field(
        self,
        path: str,
        old: object,
        new: object,
        *,
        restart: bool | Collection[str] = False,
        show: Mapping[str, Render] | None = None,
        skip: Collection[str] = (),
    ) -> None:
        """One line per differing field of two dataclasses of the same type."""
        for f in fields(old):  # type: ignore[arg-type]
            name = f.name
            a, b = getattr(old, name), getattr(new, name)
            if name in skip or a == b:
                continue
            render = (show or {}).get(name, _text)
            needs = restart if isinstance(restart, bool) else name in restart
            self.changed(f"{path}.{name}", render(a), render(b), needs)

    def named(
        self,
        path: str,
        old: Mapping[str, T],
        new: Mapping[str, T],
        describe: Callable[[T], str],
        compare: Callable[[str, T, T], None],
        restart_added: bool = False,
    ) -> None:
        """Entries removed (in the old order), then added or changed (in the new order)."""
        for name in old:
            if name not in new:
                self.removed(f"{path}.{name}")
        for name, item in new.items():
            if name not in old:
                self.added(f"{path}.{name}", describe(item), restart_added)
            else:
                compare(f"{path}.{name}", old[name], item)


# ---------------------------------------------------------------- sections


def _listen(out: _Out, old: Config, new: Config) -> None:
    if old.listen != new.listen:
        out.changed("listen", str(old.listen), str(new.listen), restart=True)


def _mode(out: _Out, old: Config, new: Config) -> None:
    if old.mode != new.mode:
        out.changed("mode", old.mode, new.mode)


def _decide(out: _Out, old: Config, new: Config) -> None:
    out.each_field("decide", old.decide, new.decide)


def _admin(out: _Out, old: Config, new: Config) -> None:
    out.each_field("admin", old.admin, new.admin, restart=True, skip=("tokens",))

    def compare(path: str, a: Any, b: Any) -> None:
        out.each_field(path, a, b, show={"token": lambda _: "hidden"}, skip=("name",))

    out.named(
        "admin.tokens",
        {t.name: t for t in old.admin.tokens},
        {t.name: t for t in new.admin.tokens},
        lambda t: f"scope {t.scope}",
        compare,
    )


def _storage(out: _Out, old: Config, new: Config) -> None:
    # storage.url: passwords masked (an unchanged mask over a changed URL prints "changed")
    out.each_field("storage", old.storage, new.storage, restart=True, show={"url": _safe_url})


def _upstreams(out: _Out, old: Config, new: Config) -> None:
    def compare(path: str, a: Upstream, b: Upstream) -> None:
        out.each_field(path, a, b, show={"url": _safe_url}, skip=("name",))

    out.named("upstreams", old.upstreams, new.upstreams, lambda u: _safe_url(u.url), compare)


def _clients(out: _Out, old: Config, new: Config) -> None:
    out.each_field("clients", old.clients, new.clients)


def _limits(out: _Out, old: Config, new: Config) -> None:
    def compare(path: str, a: LimitRule, b: LimitRule) -> None:
        if a.algorithm != b.algorithm:
            out.changed(f"{path}.algorithm", a.algorithm, b.algorithm, note=" (counts afresh)")
        if (a.quotas, a.burst) != (b.quotas, b.burst):
            note = " (changed quotas count afresh)"
            out.changed(f"{path}.quotas", describe_quotas(a), describe_quotas(b), note=note)
        if (a.cost, a.cost_header) != (b.cost, b.cost_header):
            out.changed(f"{path}.cost", describe_cost(a), describe_cost(b))
        out.each_field(path, a, b, skip=_RULE_DONE)

    out.named(
        "limits",
        old.limits,
        new.limits,
        lambda rule: describe_limit(rule)[len(rule.name) + 2 :],
        compare,
    )


_RULE_DONE = ("name", "line", "algorithm", "quotas", "burst", "cost", "cost_header")


def _routes(out: _Out, old: Config, new: Config) -> None:
    def compare(path: str, a: Route, b: Route) -> None:
        out.each_field(
            path,
            a,
            b,
            show={
                "headers": lambda h: (
                    f"families {_text(h.families)}, on_allowed " + _text(h.on_allowed)
                ),
                "decide": lambda d: ", ".join(
                    f"{f.name} {_text(getattr(d, f.name))}" for f in fields(d)
                ),
            },
            skip=("name", "line"),
        )

    before = {r.name: r for r in old.routes}
    after = {r.name: r for r in new.routes}
    out.named("routes", before, after, lambda r: describe_route(r)[len(r.name) + 2 :], compare)
    kept_old = [name for name in before if name in after]
    kept_new = [name for name in after if name in before]
    if kept_old != kept_new:
        out.changed(
            "routes order", ", ".join(kept_old), ", ".join(kept_new), note=" (first match wins)"
        )


def _redirects(out: _Out, old: Config, new: Config) -> None:
    a, b = old.redirects, new.redirects
    if a is None and b is None:
        return
    if a is None:
        assert b is not None
        where = f"host {b.host}" if b.host else f"prefix {b.prefix}"
        out.added("redirects", f"{where}, status {b.status}, limits {_text(b.limits)}", True)
        return
    if b is None:
        out.removed("redirects", restart=True)
        return
    out.each_field(
        "redirects",
        a,
        b,
        restart=("analytics_queue",),
        show={"miss_limit": lambda m: f"{m.limit}/{duration_text(m.window)}" if m else "off"},
        skip=("links",),
    )
    out.each_field(
        "redirects",
        a.links,
        b.links,
        restart=("code_secret", "min_length"),
        show={"code_secret": lambda s: "set" if s else "none"},
        skip=("hosts",),
    )
    for key, mine, theirs in (
        ("allow_hosts", a.links.hosts.allow, b.links.hosts.allow),
        ("deny_hosts", a.links.hosts.deny, b.links.hosts.deny),
    ):
        if mine != theirs:
            out.changed(f"redirects.{key}", _text(mine), _text(theirs))


def _webhook(hook: WebhookSettings) -> str:
    return f"{hook.safe_url} events {_text(hook.events)}" + ("" if hook.enabled else " (disabled)")


def _notifications(out: _Out, old: Config, new: Config) -> None:
    a, b = old.notifications, new.notifications
    out.each_field("notifications", a, b, skip=("webhooks",))

    def compare(path: str, x: WebhookSettings, y: WebhookSettings) -> None:
        if x.url != y.url:
            out.changed(f"{path}.url", x.safe_url, y.safe_url)
        if x.keys != y.keys:
            count = len(x.keys), len(y.keys)
            note = f" ({count[0]} → {count[1]} secrets)" if count[0] != count[1] else ""
            out.lines.append(f"~ {path}.secret: changed{note}")
        out.each_field(
            path,
            x,
            y,
            show={
                "rate": lambda r: f"{r:g}/s" if r else "none",
                "templates": lambda t: _text(frozenset(t)),
                "batch": _batch,
                "retry": _retry,
            },
            skip=("name", "url", "keys"),
        )

    out.named(
        "notifications.webhooks",
        {h.name: h for h in a.webhooks},
        {h.name: h for h in b.webhooks},
        _webhook,
        compare,
        # no webhooks at start: no delivery worker runs, a reload does not start one
        restart_added=not a.webhooks,
    )


def _batch(batch: BatchSettings) -> str:
    return f"max_events {batch.max_events}, max_wait {duration_text(batch.max_wait)}"


def _retry(retry: RetrySettings) -> str:
    return f"{_text(retry.schedule)}, jitter {retry.jitter:g}"


def _server(out: _Out, old: Config, new: Config) -> None:
    restart = ("max_header_size", "shutdown_grace", "keepalive_timeout")
    out.each_field("server", old.server, new.server, restart=restart)


def access_text(share: float) -> str:
    return "false" if share <= 0 else "true" if share >= 1 else f"sample:{share:g}"


def _logging(out: _Out, old: Config, new: Config) -> None:
    out.each_field(
        "logging",
        old.logging,
        new.logging,
        restart=("format", "buffer"),
        show={"access": access_text},
    )


def _candidate(out: _Out, old: Config, new: Config) -> None:
    if old.candidate == new.candidate:
        return
    if old.candidate is None:
        out.added("candidate", f"{new.candidate} (its limits evaluated in shadow)")
    elif new.candidate is None:
        out.removed("candidate")
    else:
        out.changed("candidate", old.candidate, new.candidate)


Section = Callable[[_Out, Config, Config], None]
# Every field of Config but ``source``, in the reference's order (a test checks the set).
SECTIONS: dict[str, Section] = {
    "listen": _listen,
    "mode": _mode,
    "decide": _decide,
    "admin": _admin,
    "storage": _storage,
    "server": _server,
    "upstreams": _upstreams,
    "clients": _clients,
    "limits": _limits,
    "routes": _routes,
    "redirects": _redirects,
    "notifications": _notifications,
    "logging": _logging,
    "candidate": _candidate,
}


def diff(old: Config, new: Config) -> list[str]:
    """The changes a reload from ``old`` to ``new`` makes, one line each (empty: none)."""
    out = _Out()
    for compare in SECTIONS.values():
        compare(out, old, new)
    return out.lines


__all__ = ["RESTART", "SECTIONS", "access_text", "diff"]
