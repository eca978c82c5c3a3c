"""Typed, located reading of a composed YAML tree.

``Section`` wraps one mapping: each getter checks the type, records a
``Problem`` (file, line, key path, message) instead of raising, and remembers
which keys were read so that ``finish()`` can reject the unknown ones with a
"did you mean". Builders read everything, then call ``finish()``; all problems
of a file are reported together.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from proxy.errors import Problem
from proxy.yamlsrc import Node

T = TypeVar("T")
MISSING: Any = object()

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|kib|mb|mib|gb|gib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "kib": 1024,
    "mb": 1000**2,
    "mib": 1024**2,
    "gb": 1000**3,
    "gib": 1024**3,
}


def parse_duration(value: Any) -> float:
    """``500ms``, ``10s``, ``1m``, ``1h``, ``1d`` (or a bare number of seconds) → seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 500ms, 10s, 1m, 1h or 1d, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"bad duration {value!r} (use 500ms, 10s, 1m, 1h or 1d)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_size(value: Any) -> int:
    """``1024``, ``64KiB``, ``10MB`` → bytes."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 64KiB or 10MB, got {value!r}")
    if isinstance(value, int):
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"bad size {value!r} (use e.g. 8192, 64KiB, 10MB)")
    return int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()])


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Problems:
    """Collects the problems of one file."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.items: list[Problem] = []

    def add(self, node: Node | int, path: str, message: str) -> None:
        line = node if isinstance(node, int) else node.line
        self.items.append(Problem(self.file, line, path, message))


def _type_name(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


class Section:
    """One YAML mapping being read into a dataclass."""

    def __init__(self, node: Node, path: str, problems: Problems, scalar_ok: bool = False) -> None:
        self.node = node
        self.path = path
        self.problems = problems
        self.ok = isinstance(node.value, dict)
        self.items: dict[str, Node] = node.value if self.ok else {}
        scalar = not isinstance(node.value, list | dict)
        if not self.ok and node.value is not None and not (scalar_ok and scalar):
            problems.add(
                node, path or "(top level)", f"expected a mapping, got {_type_name(node.value)}"
            )
        self.seen: set[str] = set()

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        self.seen.add(key)  # a known key, present or not: finish() suggests it for typos
        return key in self.items

    def node_of(self, key: str) -> Node | None:
        self.seen.add(key)
        return self.items.get(key)

    def line_of(self, key: str) -> int:
        node = self.items.get(key)
        return node.line if node else self.node.line

    def error(self, key: str, message: str) -> None:
        self.problems.add(self.line_of(key), self.key_path(key), message)

    def convert(self, key: str, default: T, fn: Callable[[Any], T], required: bool = False) -> T:
        node = self.node_of(key)
        if node is None or node.value is None:
            if required:
                self.problems.add(self.node, self.key_path(key), "required key is missing")
            return default
        try:
            return fn(node.value)
        except (ValueError, TypeError) as exc:
            self.problems.add(node, self.key_path(key), str(exc))
            return default

    def string(self, key: str, default: Any = None, required: bool = False) -> Any:
        def check(v: Any) -> str:
            if not isinstance(v, str):
                raise TypeError(f"expected a string, got {_type_name(v)} {v!r}")
            return v

        return self.convert(key, default, check, required)

    def integer(
        self, key: str, default: Any = None, *, minimum: int | None = None, required: bool = False
    ) -> Any:
        def check(v: Any) -> int:
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"expected an integer, got {_type_name(v)} {v!r}")
            if minimum is not None and v < minimum:
                raise ValueError(f"must be at least {minimum}, got {v}")
            return v

        return self.convert(key, default, check, required)

    def boolean(self, key: str, default: bool) -> bool:
        def check(v: Any) -> bool:
            if not isinstance(v, bool):
                raise TypeError(f"expected true or false, got {v!r}")
            return v

        return self.convert(key, default, check)

    def duration(
        self, key: str, default: Any = None, *, positive: bool = True, required: bool = False
    ) -> Any:
        def check(v: Any) -> float:
            seconds = parse_duration(v)
            if positive and seconds <= 0:
                raise ValueError(f"must be longer than zero, got {v!r}")
            return seconds

        return self.convert(key, default, check, required)

    def size(self, key: str, default: int) -> int:
        def check(v: Any) -> int:
            size = parse_size(v)
            if size <= 0:
                raise ValueError(f"must be larger than zero, got {v!r}")
            return size

        return self.convert(key, default, check)

    def choice(self, key: str, choices: Iterable[str], default: str) -> str:
        options = tuple(choices)

        def check(v: Any) -> str:
            if v not in options:
                raise ValueError(
                    f"unknown value {v!r} (expected one of: {', '.join(options)})"
                    + did_you_mean(str(v), options)
                )
            return str(v)

        return self.convert(key, default, check)

    def str_list(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        node = self.node_of(key)
        if node is None or node.value is None:
            return default
        if isinstance(node.value, str):
            return (node.value,)
        if not isinstance(node.value, list):
            self.problems.add(
                node, self.key_path(key), f"expected a list, got {_type_name(node.value)}"
            )
            return default
        out = []
        for i, item in enumerate(node.value):
            if not isinstance(item.value, str | int) or isinstance(item.value, bool):
                self.problems.add(item, f"{self.key_path(key)}[{i}]", "expected a string")
                continue
            out.append(str(item.value))
        return tuple(out)

    def section(self, key: str) -> Section:
        node = self.node_of(key)
        return Section(
            node if node is not None else Node(None, self.node.line),
            self.key_path(key),
            self.problems,
        )

    def list_of_sections(self, key: str) -> list[Section]:
        node = self.node_of(key)
        if node is None or node.value is None:
            return []
        if not isinstance(node.value, list):
            self.problems.add(
                node, self.key_path(key), f"expected a list, got {_type_name(node.value)}"
            )
            return []
        return [
            Section(item, f"{self.key_path(key)}[{i}]", self.problems)
            for i, item in enumerate(node.value)
        ]

    def mapping_of_sections(self, key: str, scalar_ok: bool = False) -> list[tuple[str, Section]]:
        node = self.node_of(key)
        if node is None or node.value is None:
            return []
        if not isinstance(node.value, dict):
            self.problems.add(
                node, self.key_path(key), f"expected a mapping, got {_type_name(node.value)}"
            )
            return []
        return [
            (name, Section(item, f"{self.key_path(key)}.{name}", self.problems, scalar_ok))
            for name, item in node.value.items()
        ]

    def finish(self, *also_known: str) -> None:
        """Reject keys nobody read, suggesting the closest known one."""
        known = self.seen | set(also_known)
        for key, node in self.items.items():
            if key not in known:
                self.problems.add(
                    node.line, self.key_path(key), "unknown key" + did_you_mean(key, sorted(known))
                )
