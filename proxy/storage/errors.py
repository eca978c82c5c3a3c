"""Storage errors: what callers of the storage layer may catch.

Everything the Redis client raises is a ``StorageError`` (the project-wide
one from ``proxy.errors``, re-exported here). Callers that only decide "fail
open or closed" catch that; the subclasses exist for the client's own retry
logic and for precise metrics.
"""

from __future__ import annotations

from proxy.errors import StorageError

__all__ = [
    "AskError",
    "ClusterDownError",
    "LoadingError",
    "MovedError",
    "NoScriptError",
    "ReadOnlyError",
    "RedirectError",
    "ResponseError",
    "StorageError",
    "StorageTimeout",
    "StorageUnavailable",
    "TransientResponseError",
    "TryAgainError",
    "response_error",
]


class StorageTimeout(StorageError):
    """A call got no reply before its deadline (the store may still execute it)."""


class StorageUnavailable(StorageError):
    """No usable connection: refused, lost, closed, backing off, or no master known."""


class ResponseError(StorageError):
    """Redis answered with an error reply (the message is Redis's, verbatim)."""


class NoScriptError(ResponseError):
    """``NOSCRIPT``: the script SHA is not in the server's script cache."""


class TransientResponseError(ResponseError):
    """An error that says "not now / not here" rather than "wrong command"."""


class LoadingError(TransientResponseError):
    """``LOADING``: the server is loading its dataset."""


class ReadOnlyError(TransientResponseError):
    """``READONLY``: a write reached a replica (e.g. after a failover)."""


class TryAgainError(TransientResponseError):
    """``TRYAGAIN``: multi-key command during a cluster slot migration."""


class ClusterDownError(TransientResponseError):
    """``CLUSTERDOWN`` (or ``MASTERDOWN``): the cluster or the master is not serving."""


class RedirectError(ResponseError):
    """A cluster redirection (``MOVED`` / ``ASK``) to ``host:port`` for ``slot``."""

    def __init__(self, message: str, slot: int, host: str, port: int) -> None:
        super().__init__(message)
        self.slot = slot
        self.host = host
        self.port = port


class MovedError(RedirectError):
    """``MOVED``: the slot now lives on another node; the slot map is stale."""


class AskError(RedirectError):
    """``ASK``: the slot is migrating; retry there once, preceded by ``ASKING``."""


_PREFIXES: dict[str, type[ResponseError]] = {
    "NOSCRIPT": NoScriptError,
    "LOADING": LoadingError,
    "READONLY": ReadOnlyError,
    "TRYAGAIN": TryAgainError,
    "CLUSTERDOWN": ClusterDownError,
    "MASTERDOWN": ClusterDownError,
}


def response_error(message: str) -> ResponseError:
    """The typed error for a Redis error reply ``message`` (without the ``-``)."""
    code, _, rest = message.partition(" ")
    if code in ("MOVED", "ASK"):
        slot, _, address = rest.partition(" ")
        host, _, port = address.rpartition(":")
        if slot.isdigit() and port.isdigit():
            cls = MovedError if code == "MOVED" else AskError
            return cls(message, int(slot), host, int(port))
    return _PREFIXES.get(code, ResponseError)(message)
