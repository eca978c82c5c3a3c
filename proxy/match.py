"""Request predicates: the ``match:`` block shared by routes and limit rules."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from proxy.confread import Section


class HeaderLookup(Protocol):
    def get(self, key: str, /) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Match:
    """Every given field must hold; an empty Match matches everything."""

    path_prefix: str | None = None
    path: str | None = None
    path_regex: re.Pattern[str] | None = None
    methods: frozenset[str] = frozenset()
    host: str | None = None
    headers: tuple[tuple[str, str | None], ...] = ()  # (name, required value or None = present)

    def matches(self, method: str, path: str, host: str, headers: HeaderLookup) -> bool:
        if self.path_prefix is not None and not path.startswith(self.path_prefix):
            return False
        if self.path is not None and path != self.path:
            return False
        if self.methods and method not in self.methods:
            return False
        if self.host is not None and host.rsplit(":", 1)[0].lower() != self.host:
            return False
        for name, value in self.headers:
            got = headers.get(name)
            if got is None or (value is not None and got != value):
                return False
        return self.path_regex is None or self.path_regex.search(path) is not None


def read_match(sec: Section) -> Match:
    regex = None
    pattern = sec.string("path_regex")
    if pattern is not None:
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            sec.error("path_regex", f"invalid regular expression: {exc}")
    headers: list[tuple[str, str | None]] = []
    hnode = sec.node_of("headers")
    if hnode is not None and hnode.value is not None:
        if isinstance(hnode.value, dict):
            for name, value in hnode.value.items():
                v = value.value
                headers.append((name, None if v is None or v is True else str(v)))
        elif isinstance(hnode.value, list):
            headers.extend((str(item.value), None) for item in hnode.value)
        else:
            sec.error("headers", "expected a list of header names or a mapping name: value")
    for key in ("path_prefix", "path"):
        node = sec.items.get(key)
        if node is not None and isinstance(node.value, str) and not node.value.startswith("/"):
            sec.error(key, f"must start with '/', got {node.value!r}")
    host = sec.string("host")
    out = Match(
        path_prefix=sec.string("path_prefix"),
        path=sec.string("path"),
        path_regex=regex,
        methods=frozenset(m.upper() for m in sec.str_list("methods")),
        host=host.lower() if host else None,
        headers=tuple(headers),
    )
    sec.finish()
    return out
