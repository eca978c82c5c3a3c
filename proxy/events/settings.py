"""The ``notifications:`` section of rules.yaml → frozen settings.

```yaml
notifications:
  aggregate: 10s            # rate_limit.rejected: one event per (rule, client) per interval
  buffer: 10000             # events in memory awaiting the outbox; beyond: counted as dropped
  critical: [storage.degraded, storage.recovered]   # skip aggregation and batching waits
  webhooks:
    - name: ops             # [A-Za-z0-9_.-], unique; names the outbox (keep it stable)
      url: https://hooks.example.com/sluice
      secret: ${SLUICE_WEBHOOK_SECRET}      # or secrets: [new, old] while rotating
      events: [rate_limit.rejected, storage.degraded]   # or ["*"]
      rules: [per_key_minute]   # optional filters; each applies to events carrying that field
      routes: [api]
      codes: [promo]
      format: standard          # standard | slack
      templates: {rate_limit.rejected: "{client} hit {rule} {count} times"}
      batch: {max_events: 1, max_wait: 0s}
      rate: 10                  # requests per second (per Sluice process)
      timeout: 15s
      retry: [5s, 30s, 2m]      # or {schedule: [...], jitter: 1.0}
      enabled: true
```
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from proxy.confread import Section, did_you_mean, parse_duration
from proxy.events.model import DEFAULT_CRITICAL, EVENT_TYPES, Event
from proxy.events.signing import decode_secret
from proxy.events.template import check as check_template

NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
FORMATS = ("standard", "slack")
MAX_BATCH = 1000


def _default_schedule() -> tuple[float, ...]:
    """5s, 30s, 2m, 10m, 30m, 1h, then hourly while the total stays within 24h."""
    steps = [5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0]
    while sum(steps) + 3600.0 <= 86400.0:
        steps.append(3600.0)
    return tuple(steps)


DEFAULT_SCHEDULE = _default_schedule()


@dataclass(frozen=True, slots=True)
class BatchSettings:
    max_events: int = 1
    max_wait: float = 0.0


@dataclass(frozen=True, slots=True)
class RetrySettings:
    """``schedule[k]`` is the delay before retry k+1; after the last, dead letter.

    Full jitter (``jitter=1``) draws each delay uniformly from (0, schedule[k]];
    ``jitter=0`` waits exactly the schedule. ``Retry-After`` is a floor.
    """

    schedule: tuple[float, ...] = DEFAULT_SCHEDULE
    jitter: float = 1.0


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    name: str
    url: str
    keys: tuple[bytes, ...] = field(repr=False)
    events: frozenset[str] = frozenset(EVENT_TYPES)
    rules: frozenset[str] = frozenset()
    routes: frozenset[str] = frozenset()
    codes: frozenset[str] = frozenset()
    format: str = "standard"
    templates: Mapping[str, str] = field(default_factory=dict)
    batch: BatchSettings = BatchSettings()
    rate: float | None = None
    timeout: float = 15.0
    retry: RetrySettings = RetrySettings()
    enabled: bool = True

    @property
    def batched(self) -> bool:
        return self.batch.max_events > 1

    @property
    def safe_url(self) -> str:
        """The URL for pages and logs: scheme, host and first path segment only
        (paths like Slack's carry the secret; so may user info and queries)."""
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        port = f":{parts.port}" if parts.port else ""
        first, _, rest = parts.path.lstrip("/").partition("/")
        tail = "/…" if rest or parts.query else ""
        return f"{parts.scheme}://{host}{port}/{first}{tail}"

    def wants(self, event: Event) -> bool:
        """Whether this subscription receives ``event`` (type, then filters)."""
        if event.type not in self.events:
            return False
        data = event.data
        for values, key in ((self.rules, "rule"), (self.routes, "route"), (self.codes, "code")):
            if values and key in data and str(data[key]) not in values:
                return False
        return True


@dataclass(frozen=True, slots=True)
class NotificationsSettings:
    webhooks: tuple[WebhookSettings, ...] = ()
    aggregate: float = 10.0
    buffer: int = 10000
    critical: frozenset[str] = frozenset(DEFAULT_CRITICAL)

    @property
    def active(self) -> tuple[WebhookSettings, ...]:
        return tuple(w for w in self.webhooks if w.enabled)

    def subscribed_types(self) -> frozenset[str]:
        return frozenset().union(*(w.events for w in self.active))

    def webhook(self, name: str) -> WebhookSettings | None:
        return next((w for w in self.webhooks if w.name == name), None)


def _event_types(
    sec: Section, key: str, default: tuple[str, ...], allow_empty: bool = False
) -> frozenset[str]:
    names = sec.str_list(key, default)
    out: set[str] = set()
    for name in names:
        if name == "*":
            out.update(EVENT_TYPES)
        elif name in EVENT_TYPES:
            out.add(name)
        else:
            sec.error(key, f"unknown event type {name!r}" + did_you_mean(name, EVENT_TYPES))
    if not names and sec.has(key) and not allow_empty:
        sec.error(key, "name at least one event type (or '*')")
    return frozenset(out)


def _url(value: Any) -> str:
    text = str(value)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {text!r}")
    try:
        parts.port  # noqa: B018  (validates the port)
    except ValueError as exc:
        raise ValueError(f"bad port in {text!r}") from exc
    return text


def _keys(sec: Section) -> tuple[bytes, ...]:
    if sec.has("secret") and sec.has("secrets"):
        sec.error("secrets", "use either secret or secrets, not both")
    key = "secrets" if sec.has("secrets") else "secret"
    texts = sec.str_list(key)
    if not texts and sec.ok:
        sec.problems.add(sec.node, sec.key_path("secret"), "required key is missing")
    keys = []
    for text in texts:
        try:
            keys.append(decode_secret(text))
        except ValueError as exc:
            sec.error(key, str(exc))
    return tuple(keys)


def _names(sec: Section, key: str, known: Collection[str] | None, what: str) -> frozenset[str]:
    names = sec.str_list(key)
    for name in names:
        if known is not None and name not in known:
            listing = ", ".join(sorted(known)) or "none defined"
            sec.error(
                key, f"unknown {what} {name!r} (known: {listing})" + did_you_mean(name, known)
            )
    return frozenset(names)


def _templates(sec: Section, events: frozenset[str]) -> dict[str, str]:
    node = sec.node_of("templates")
    if node is None or node.value is None:
        return {}
    path = sec.key_path("templates")
    if not isinstance(node.value, dict):
        sec.problems.add(node, path, "expected a mapping of event type to template")
        return {}
    out = {}
    for event_type, item in node.value.items():
        where = f"{path}.{event_type}"
        if event_type not in EVENT_TYPES:
            hint = did_you_mean(event_type, EVENT_TYPES)
            sec.problems.add(item, where, f"unknown event type {event_type!r}" + hint)
            continue
        if not isinstance(item.value, str):
            sec.problems.add(item, where, "expected a template string")
            continue
        for message in check_template(item.value, event_type):
            sec.problems.add(item, where, message)
        if event_type not in events:
            sec.problems.add(item, where, f"this webhook does not subscribe to {event_type}")
        out[event_type] = item.value
    return out


def _batch(sec: Section) -> BatchSettings:
    if not sec.has("batch"):
        return BatchSettings()
    bsec = sec.section("batch")
    out = BatchSettings(
        max_events=bsec.integer("max_events", 1, minimum=1),
        max_wait=bsec.duration("max_wait", 0.0, positive=False),
    )
    if out.max_events > MAX_BATCH:
        bsec.error("max_events", f"at most {MAX_BATCH}, got {out.max_events}")
    bsec.finish()
    return out


def _schedule(sec: Section, key: str) -> tuple[float, ...]:
    node = sec.node_of(key)
    if node is None or node.value is None:
        return DEFAULT_SCHEDULE
    if not isinstance(node.value, list) or not node.value:
        sec.error(key, "expected a non-empty list of durations, e.g. [5s, 1m, 10m]")
        return DEFAULT_SCHEDULE
    out = []
    for i, item in enumerate(node.value):
        try:
            seconds = parse_duration(item.value)
            if seconds <= 0:
                raise ValueError(f"must be longer than zero, got {item.value!r}")
            out.append(seconds)
        except ValueError as exc:
            sec.problems.add(item, f"{sec.key_path(key)}[{i}]", str(exc))
    return tuple(out) or DEFAULT_SCHEDULE


def _retry(sec: Section) -> RetrySettings:
    node = sec.node_of("retry")
    if node is None or not isinstance(node.value, dict):
        return RetrySettings(_schedule(sec, "retry"))
    rsec = sec.section("retry")

    def fraction(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1:
            raise ValueError(f"expected a number from 0 to 1, got {v!r}")
        return float(v)

    out = RetrySettings(_schedule(rsec, "schedule"), rsec.convert("jitter", 1.0, fraction))
    rsec.finish()
    return out


def _rate(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
        raise ValueError(f"expected requests per second (a number above 0), got {v!r}")
    return float(v)


def read_webhook(
    i: int,
    sec: Section,
    limits: Collection[str] | None = None,
    routes: Collection[str] | None = None,
) -> WebhookSettings:
    name = sec.string("name", f"webhook{i}")
    if not NAME.match(name):
        sec.error("name", f"use 1-64 of A-Z a-z 0-9 _ . - in a webhook name, got {name!r}")
    events = _event_types(sec, "events", ("*",))
    out = WebhookSettings(
        name=name,
        url=sec.convert("url", "http://invalid", _url, required=True),
        keys=_keys(sec),
        events=events,
        rules=_names(sec, "rules", limits, "limit"),
        routes=_names(sec, "routes", routes, "route"),
        codes=frozenset(sec.str_list("codes")),
        format=sec.choice("format", FORMATS, "standard"),
        templates=_templates(sec, events),
        batch=_batch(sec),
        rate=sec.convert("rate", None, _rate),
        timeout=sec.duration("timeout", 15.0),
        retry=_retry(sec),
        enabled=sec.boolean("enabled", True),
    )
    sec.finish("secret", "secrets")
    return out


def read_notifications(
    sec: Section,
    *,
    limits: Collection[str] | None = None,
    routes: Collection[str] | None = None,
) -> NotificationsSettings:
    """Read ``notifications:``; problems go to ``sec.problems`` (file:line: path: message).

    ``limits`` and ``routes``, when given, are the names the ``rules`` and
    ``routes`` filters may use; without them those filters are not cross-checked.
    """
    hooks: list[WebhookSettings] = []
    seen: set[str] = set()
    for i, item in enumerate(sec.list_of_sections("webhooks")):
        hook = read_webhook(i, item, limits, routes)
        if hook.name in seen:
            item.error("name", f"duplicate webhook name {hook.name!r}")
        seen.add(hook.name)
        hooks.append(hook)
    out = NotificationsSettings(
        webhooks=tuple(hooks),
        aggregate=sec.duration("aggregate", 10.0),
        buffer=sec.integer("buffer", 10000, minimum=1),
        critical=_event_types(sec, "critical", DEFAULT_CRITICAL, allow_empty=True),
    )
    sec.finish()
    return out
