"""Message templates: ``{placeholder}`` names only, checked when the config loads.

A template may name the common fields (``id``, ``type``, ``timestamp``) and the
``data`` fields of its event type (``model.TYPE_FIELDS``). ``{{`` and ``}}``
are literal braces. No format specs, conversions, indexing or attributes, so
rendering can never fail or reach into objects.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

from proxy.events.model import COMMON_FIELDS, TYPE_FIELDS, Event

DEFAULT_TEMPLATES: Mapping[str, str] = {
    "rate_limit.rejected": (
        "Rate limit {rule}: client {client} was rejected {count} times "
        "between {first_seen} and {last_seen} (route {route})"
    ),
    "redirect.followed": "Short link {code} followed to {destination}",
    "link.created": "Short link {code} created for {destination}",
    "link.deleted": "Short link {code} deleted",
    "storage.degraded": "Storage {backend} degraded: {error}",
    "storage.recovered": "Storage {backend} recovered after {down_seconds}s",
    "ping": "Ping from Sluice: {message}",
}

_FORMATTER = string.Formatter()


def placeholders(template: str) -> list[str]:
    """The names a template uses; ``ValueError`` for anything but plain ``{name}``."""
    try:
        parts = list(_FORMATTER.parse(template))
    except ValueError as exc:
        raise ValueError(f"bad template {template!r}: {exc}") from exc
    names = []
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if not name or spec or conversion or not name.replace("_", "a").isalnum():
            shown = (
                "{"
                + name
                + (f"!{conversion}" if conversion else "")
                + (f":{spec}" if spec else "")
                + "}"
            )
            raise ValueError(f"placeholder {shown} is not a plain {{name}}")
        names.append(name)
    return names


def allowed_fields(event_type: str) -> tuple[str, ...]:
    return (*COMMON_FIELDS, *TYPE_FIELDS[event_type])


def check(template: str, event_type: str) -> list[str]:
    """Problems with ``template`` for ``event_type`` (empty when it is fine)."""
    try:
        names = placeholders(template)
    except ValueError as exc:
        return [str(exc)]
    allowed = allowed_fields(event_type)
    return [
        f"unknown placeholder {{{name}}} for {event_type} (fields: {', '.join(allowed)})"
        for name in names
        if name not in allowed
    ]


def render(template: str, event: Event) -> str:
    values: Mapping[str, Any] = event.fields()
    out = []
    for literal, name, _, _ in _FORMATTER.parse(template):
        out.append(literal)
        if name is not None:
            value = values.get(name, "")
            out.append("" if value is None else str(value))
    return "".join(out)
