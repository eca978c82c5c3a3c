"""The few exception types Sluice raises across module boundaries."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Problem:
    """One configuration error, located in its file."""

    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(Exception):
    """A rules file that cannot be used; carries every problem found, not just the first."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class StorageError(Exception):
    """A storage backend failed or missed its deadline (wraps the driver's error).

    ``failed_keys``: set by a call spread over several Redis Cluster masters, the
    keys of the parts that failed (so only their masters' breakers are charged)."""

    failed_keys: list[str] | None = None
