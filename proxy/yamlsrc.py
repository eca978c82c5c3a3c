"""YAML with line numbers and ${VAR} substitution.

The rules file is composed (not loaded) with PyYAML so that every value keeps
the line it came from; errors later name ``file:line``. ``${VAR}`` and
``${VAR:-default}`` are swapped for inert placeholders before parsing (so they
work inside flow mappings like ``{token: ${TOKEN}}``, where ``{`` would end a
plain scalar) and substituted into each scalar afterwards; plain scalars are
then re-resolved, so ``port: ${PORT:-8000}`` is an int. Values never become
YAML syntax.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from proxy.errors import Problem

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_PLACEHOLDER = re.compile(r"__sluice_env_(\d+)__")


@dataclass(frozen=True, slots=True)
class Node:
    """A YAML value and the 1-based line it starts on.

    ``value`` is a ``dict[str, Node]``, a ``list[Node]`` or a scalar
    (str, int, float, bool, None).
    """

    value: Any
    line: int


class _Composer:
    def __init__(
        self,
        file: str,
        env: Mapping[str, str],
        problems: list[Problem],
        refs: list[tuple[str, str | None]],
    ) -> None:
        self.refs = refs
        self.file = file
        self.env = env
        self.problems = problems
        self.loader = yaml.SafeLoader("")

    def convert(self, node: yaml.Node, path: str) -> Node:
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Node] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    merged = self.convert(value_node, path)
                    if isinstance(merged.value, dict):
                        for k, v in merged.value.items():
                            out.setdefault(k, v)
                    continue
                key = self.scalar(key_node, path)
                if not isinstance(key, str | int | float | bool):
                    self.problems.append(
                        Problem(self.file, line, path, "mapping keys must be scalars")
                    )
                    continue
                key = str(key)
                child = f"{path}.{key}" if path else key
                if key in out:
                    self.problems.append(
                        Problem(self.file, key_node.start_mark.line + 1, child, "duplicate key")
                    )
                value = self.convert(value_node, child)
                if isinstance(value.value, dict | list):  # errors point at the key's line
                    value = Node(value.value, key_node.start_mark.line + 1)
                out[key] = value
            return Node(out, line)
        if isinstance(node, yaml.SequenceNode):
            return Node([self.convert(v, f"{path}[{i}]") for i, v in enumerate(node.value)], line)
        return Node(self.scalar(node, path), line)

    def scalar(self, node: yaml.Node, path: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            return None
        value = node.value
        if "__sluice_env_" in value:
            value = self.substitute(value, node.start_mark.line + 1, path)
            if node.style is None:  # plain scalar: re-resolve, so ${PORT} can be an int
                tag = self.loader.resolve(yaml.ScalarNode, value, (True, False))
                node = yaml.ScalarNode(tag, value, node.start_mark, node.end_mark)
            else:
                return value
        return self.loader.construct_object(node, deep=True)

    def substitute(self, text: str, line: int, path: str) -> str:
        def repl(match: re.Match[str]) -> str:
            name, default = self.refs[int(match.group(1))]
            if name in self.env and (self.env[name] != "" or default is None):
                return self.env[name]
            if default is not None:
                return default
            self.problems.append(
                Problem(self.file, line, path, f"environment variable {name} is not set")
            )
            return ""

        return _PLACEHOLDER.sub(repl, text)


def parse(text: str, file: str, env: Mapping[str, str] | None = None) -> tuple[Node, list[Problem]]:
    """Compose ``text`` into a located tree; syntax errors come back as problems."""
    problems: list[Problem] = []
    refs: list[tuple[str, str | None]] = []

    def hide(match: re.Match[str]) -> str:
        refs.append((match.group(1), match.group(2)))
        return f"__sluice_env_{len(refs) - 1}__"

    text = _ENV.sub(hide, text)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 0
        message = f"invalid YAML: {exc.problem or exc.context}"
        if exc.context and exc.context_mark and exc.problem:
            message += f" ({exc.context} from line {exc.context_mark.line + 1})"
        return Node(None, line), [Problem(file, line, "", message)]
    except yaml.YAMLError as exc:
        return Node(None, 0), [Problem(file, 0, "", f"invalid YAML: {exc}")]
    if root is None:
        return Node({}, 1), problems
    composer = _Composer(file, os.environ if env is None else env, problems, refs)
    return composer.convert(root, ""), problems
