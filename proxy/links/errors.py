"""Errors of the links package, each carrying the HTTP status the API should answer."""

from __future__ import annotations


class LinkError(Exception):
    """A request about a link that cannot be honoured: ``status`` is the HTTP status
    the API answers with, ``reason`` a sentence for the client."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status}, {self.reason!r})"


class CodeTaken(LinkError):
    """A custom code that another link already uses (409)."""

    def __init__(self, code: str) -> None:
        super().__init__(409, f"the code {code!r} is already taken")
        self.code = code


class CodeSpaceExhausted(LinkError):
    """The counter ran past every code length this codec supports (507)."""

    def __init__(self, counter: int) -> None:
        super().__init__(507, f"no generated code left for counter {counter}")
