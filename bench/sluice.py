"""Rules files for the Sluice targets.

A Sluice target is a ``Variant``: the limits its one catch-all route carries
and whether storage is Redis (one redis-server shared by the run) or the
embedded ``memory://``. Everything else is fixed so variants differ only in
what they are meant to measure. A Redis-backed variant, for instance::

    Variant(redis=True, limits=(big_limit("a"),))

with limits high enough never to deny, so every request pays the check and
is then forwarded.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class Variant:
    limits: tuple[Mapping[str, object], ...] = ()
    redis: bool = False


def big_limit(name: str, algorithm: str = "fixed_window") -> dict[str, object]:
    """A per-IP limit no bench run can reach."""
    return {
        "name": name,
        "key": "ip",
        "algorithm": algorithm,
        "limit": 1_000_000_000,
        "window": "1m",
    }


def rules(
    variant: Variant, *, port: int, admin_port: int, upstream: str, storage: str, data_dir: Path
) -> dict[str, object]:
    return {
        "listen": f"127.0.0.1:{port}",
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "storage": {"url": storage, "data_dir": str(data_dir)},
        "upstreams": {"origin": {"url": upstream}},
        "limits": [dict(limit) for limit in variant.limits],
        "routes": [
            {
                "name": "all",
                "match": {"path_prefix": "/"},
                "upstream": "origin",
                "limits": [str(limit["name"]) for limit in variant.limits],
            }
        ],
        "server": {"shutdown_grace": "1s"},
    }


def write_rules(path: Path, data: Mapping[str, object]) -> Path:
    path.write_text(yaml.safe_dump(dict(data), sort_keys=False))
    return path


def command(rules_file: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "-c",
        str(rules_file),
        "--log-level",
        "warning",
    ]
