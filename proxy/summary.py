"""The one-screen summary ``sluice check`` prints for a valid rules file."""

from __future__ import annotations

from proxy.config import Config, Route
from proxy.limitspec import LimitRule
from proxy.match import Match


def duration_text(value: float) -> str:
    """Seconds as the config writes them: ``50ms``, ``30s``, ``1m``, ``1d``."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if value >= size and value % size == 0:
            return f"{int(value // size)}{unit}"
    return f"{value * 1000:g}ms" if value < 1 else f"{value:g}s"


def describe_match(match: Match) -> str:
    parts = []
    if match.methods:
        parts.append(",".join(sorted(match.methods)))
    if match.host:
        parts.append(f"host={match.host}")
    if match.path is not None:
        parts.append(f"path={match.path}")
    if match.path_prefix is not None:
        parts.append(f"prefix={match.path_prefix}")
    if match.path_regex is not None:
        parts.append(f"regex={match.path_regex.pattern}")
    parts.extend(f"header {n}" + (f"={v}" if v is not None else "") for n, v in match.headers)
    return " ".join(parts) or "everything"


def describe_quotas(rule: LimitRule) -> str:
    if rule.algorithm == "token_bucket":
        q = rule.quotas[0] if rule.quotas else None
        return f"capacity {q.limit}, refill {q.limit / q.window:g}/s" if q else "?"
    amount = ", ".join(f"{q.limit}/{duration_text(q.window)}" for q in rule.quotas)
    return amount + (f" burst {rule.burst}" if rule.burst else "")


def describe_cost(rule: LimitRule) -> str:
    return f"header:{rule.cost_header}" if rule.cost_header else str(rule.cost)


def describe_limit(rule: LimitRule) -> str:
    cost = f" cost {describe_cost(rule)}"
    flags = " shadow" if rule.shadow else ""
    return (
        f"{rule.name}: {rule.algorithm} {describe_quotas(rule)} by [{rule.key}]"
        f"{cost if cost != ' cost 1' else ''}{flags}, storage down → {rule.on_storage_error}"
    )


def describe_route(route: Route) -> str:
    target = f"→ {route.upstream}" if route.kind == "proxy" else "→ decide"
    rules = ", ".join(route.limits) or "no limits"
    return f"{route.name}: {describe_match(route.match)} {target} [{rules}]"


def summarize(config: Config) -> str:
    lines = [f"{config.source.path}: OK (sha256 {config.source.sha256[:12]})"]
    lines.append(
        f"  listen {config.listen}, admin {config.admin.listen} "
        f"({len(config.admin.tokens)} token(s)), storage {config.storage.safe_url}"
    )
    lines.append(f"  upstreams ({len(config.upstreams)}):")
    lines += [f"    {u.name}: {u.url}" for u in config.upstreams.values()]
    lines.append(f"  limits ({len(config.limits)}):")
    lines += [f"    {describe_limit(rule)}" for rule in config.limits.values()]
    lines.append(f"  routes ({len(config.routes)}, first match wins):")
    lines += [f"    {describe_route(route)}" for route in config.routes]
    if config.redirects:
        r = config.redirects
        where = f"host {r.host}" if r.host else f"prefix {r.prefix}"
        lines.append(f"  redirects: {where}, status {r.status}, limits [{', '.join(r.limits)}]")
    hooks = config.notifications.webhooks
    lines.append(f"  webhooks ({len(hooks)}):")
    lines += [
        f"    {h.name}: {h.safe_url} events {', '.join(sorted(h.events))}"
        + ("" if h.enabled else " (disabled)")
        for h in hooks
    ]
    return "\n".join(lines)
