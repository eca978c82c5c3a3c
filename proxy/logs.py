"""Log output: a bounded queue in front of a writer thread; text or JSON lines; access lines.

The event loop never writes to stderr itself. Every record goes through a
``QueueHandler`` onto a bounded ``queue.Queue``; a ``QueueListener`` thread
formats it and writes it with ``os.write`` on the raw file descriptor. When
stderr is slow or blocked (a pipe nobody reads), only that thread waits: once
the queue is full, further records are dropped and counted
(``sluice_log_dropped_total``), and requests go on at full speed.

The writer holds no lock and no Python-level buffer while it writes, so a
write stuck forever cannot hang the event loop, ``logging.shutdown`` or the
interpreter's exit. A forked worker gets its own queue and writer thread.

Access lines (logger ``sluice.access``) are one JSON object per sampled
request on the main listener, in both formats. The decision to log a request
is made when it arrives (``sampled``); the line is built only for requests
that will be logged, so a request pays nothing while ``logging.access`` is off.
"""

from __future__ import annotations

import copy
import json
import logging
import logging.handlers
import os
import queue
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from proxy.config import LoggingConfig
from proxy.limits.identity import masked

if TYPE_CHECKING:  # the engine imports prometheus_client, which the supervisor must import late
    from proxy.limits.engine import RuleDecision

ACCESS_LOGGER = "sluice.access"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FLUSH_TIMEOUT = 2.0
STALLED = 0.5  # a flush gives up once the writer wrote nothing for this long
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

access_log = logging.getLogger(ACCESS_LOGGER)
_random = random.random
_plain = logging.Formatter()


class DropCounter(Protocol):
    def inc(self, amount: float = 1, /) -> None: ...


def timestamp(created: float) -> str:
    """``2026-12-04T10:11:12.345Z`` (UTC, milliseconds)."""
    whole = int(created)
    millis = min(999, int((created - whole) * 1000))
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


def _dumps(fields: dict[str, Any]) -> str:
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":"), default=str)


def _access_line(record: logging.LogRecord, fields: dict[str, Any]) -> str:
    head = {"ts": timestamp(record.created), "level": "info", "logger": record.name}
    return _dumps({**head, **fields})


class TextFormatter(logging.Formatter):
    """``2026-12-04 10:11:12,345 INFO sluice.worker: message``; access lines stay JSON."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "access", None)
        if fields is not None:
            return _access_line(record, fields)
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, message, and exception when present."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "access", None)
        if fields is not None:
            return _access_line(record, fields)
        out: dict[str, Any] = {
            "ts": timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = record.stack_info
        return _dumps(out)


def formatter_for(name: str) -> logging.Formatter:
    return JsonFormatter() if name == "json" else TextFormatter()


class _Enqueue(logging.handlers.QueueHandler):
    """On the caller's thread: merge the message, render a traceback, never wait."""

    def __init__(self, q: queue.Queue[Any], pipeline: LogPipeline) -> None:
        super().__init__(q)
        self.pipeline = pipeline

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # What cannot wait for the writer: arguments may change, tracebacks go away.
        # Formatting (time, JSON) is left to the writer thread.
        message = record.getMessage()
        exc_text = record.exc_text
        if record.exc_info and not exc_text:
            exc_text = _plain.formatException(record.exc_info)
        record = copy.copy(record)  # other handlers (tests' capture) see the original
        record.msg = message
        record.args = None
        record.exc_info = None
        record.exc_text = exc_text
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.pipeline.drop()


class _FdWriter(logging.Handler):
    """Formats and writes records on a file descriptor; called by the writer thread only.

    ``handle`` takes no handler lock and ``os.write`` bypasses ``sys.stderr``'s
    buffer (and its lock): a write blocked on a full pipe holds nothing anyone
    else waits for. A write that fails counts as a dropped record.
    """

    def __init__(self, fd: int, formatter: logging.Formatter, pipeline: LogPipeline) -> None:
        super().__init__()
        self.fd = fd
        self.setFormatter(formatter)
        self.pipeline = pipeline
        self.written = 0  # records handled: a flush watches it move

    def handle(self, record: logging.LogRecord) -> bool:
        if self.filter(record):
            self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = memoryview((self.format(record) + "\n").encode("utf-8", "backslashreplace"))
            while data:
                data = data[os.write(self.fd, data) :]
        except Exception:  # EPIPE, EBADF, a record that cannot be formatted
            self.pipeline.drop()
        self.written += 1


class LogPipeline:
    """The queue, its writer thread and the count of records dropped."""

    def __init__(self, fd: int, fmt: str, capacity: int) -> None:
        self.fd = fd
        self.capacity = capacity
        self.dropped = 0
        self.counter: DropCounter | None = None
        self.writer = _FdWriter(fd, formatter_for(fmt), self)
        self.queue: queue.Queue[Any] = queue.Queue(capacity)
        self.handler = _Enqueue(self.queue, self)
        self.listener = logging.handlers.QueueListener(self.queue, self.writer)
        self.listener.start()

    def drop(self) -> None:
        self.dropped += 1
        if self.counter is not None:
            self.counter.inc()

    def count_drops(self, counter: DropCounter) -> None:
        """Count drops in ``counter`` from now on (and those so far)."""
        if self.dropped and self.counter is None:
            counter.inc(self.dropped)
        self.counter = counter

    def restart_in_child(self) -> None:
        """After ``fork``: the parent's writer thread is gone and its queue's lock may be
        held forever; start afresh."""
        self.dropped = 0
        self.counter = None
        self.queue = queue.Queue(self.capacity)
        self.handler.queue = self.queue
        self.listener = logging.handlers.QueueListener(self.queue, self.writer)
        self.listener.start()

    def flush(self, timeout: float = FLUSH_TIMEOUT) -> bool:
        """Wait until everything queued is written: False after ``timeout``, or as soon
        as the writer has been stuck for ``STALLED`` seconds."""
        now = time.monotonic()
        deadline, progress, seen = now + timeout, now, self.writer.written
        while self.queue.unfinished_tasks:
            now = time.monotonic()
            if self.writer.written != seen:
                progress, seen = now, self.writer.written
            if now >= deadline or now - progress >= STALLED:
                return False
            time.sleep(0.005)
        return True

    def close(self, timeout: float = FLUSH_TIMEOUT) -> None:
        """Write what is queued (waiting at most ``timeout``), then stop the writer."""
        thread = self.listener._thread
        if not self.flush(timeout) or thread is None:
            return  # the writer is stuck: a daemon thread, it goes with the process
        try:
            self.listener.enqueue_sentinel()
        except queue.Full:  # refilled meanwhile by a thread still logging
            return
        thread.join(timeout)


class _DropBadRequests(logging.Filter):
    """aiohttp logs a traceback for every malformed request a client sends; a client's
    bad bytes are answered with 400 and are not worth a traceback in the operator's log."""

    def __init__(self) -> None:
        super().__init__()
        from aiohttp.http_exceptions import HttpProcessingError

        self.ignored = HttpProcessingError

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, self.ignored)


_pipeline: LogPipeline | None = None
_override: int | None = None  # --log-level / SLUICE_LOG_LEVEL: beats logging.level
_saved_level = logging.WARNING
_bad_requests: _DropBadRequests | None = None


def setup(settings: LoggingConfig, level: str | None = None, fd: int | None = None) -> LogPipeline:
    """Send every log record of this process through a new pipeline writing to ``fd``
    (stderr by default). ``level`` (the command line's) or ``SLUICE_LOG_LEVEL`` override
    ``settings.level``, on reloads too."""
    global _pipeline, _override, _saved_level, _bad_requests
    shutdown()
    name = (level or os.environ.get("SLUICE_LOG_LEVEL") or "").upper()
    known = logging.getLevelName(name)  # DEBUG … CRITICAL (and WARN) → a number
    _override = (known if isinstance(known, int) else logging.INFO) if name else None
    root = logging.getLogger()
    _saved_level = root.level
    out = sys.stderr.fileno() if fd is None else fd
    _pipeline = LogPipeline(out, settings.format, settings.buffer)
    root.addHandler(_pipeline.handler)
    if _bad_requests is None:
        _bad_requests = _DropBadRequests()
        logging.getLogger("aiohttp.server").addFilter(_bad_requests)
    apply(settings)
    return _pipeline


def apply(settings: LoggingConfig) -> None:
    """Adopt a (reloaded) config's level; nothing unless ``setup`` ran in this process."""
    if _pipeline is None:
        return
    logging.getLogger().setLevel(_override if _override is not None else LEVELS[settings.level])
    access_log.setLevel(logging.INFO)  # access lines follow logging.access, not the level


def count_drops(counter: DropCounter) -> None:
    if _pipeline is not None:
        _pipeline.count_drops(counter)


def flush(timeout: float = FLUSH_TIMEOUT) -> bool:
    return _pipeline.flush(timeout) if _pipeline is not None else True


def shutdown(timeout: float = FLUSH_TIMEOUT) -> None:
    """Write what is queued (at most ``timeout``) and detach the pipeline."""
    global _pipeline
    if _pipeline is None:
        return
    pipeline, _pipeline = _pipeline, None
    root = logging.getLogger()
    root.removeHandler(pipeline.handler)
    root.setLevel(_saved_level)
    access_log.setLevel(logging.NOTSET)
    pipeline.close(timeout)


def _after_fork_in_child() -> None:
    if _pipeline is not None:
        _pipeline.restart_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


# ---------------------------------------------------------------- access lines


def sampled(share: float) -> bool:
    """Whether this request gets an access line (``share`` of requests, at random)."""
    return share >= 1.0 or (share > 0.0 and _random() < share)


@dataclass(slots=True)
class AccessNote:
    """What a sampled request's access line needs besides the response, gathered on its way."""

    started: float
    rules: list[tuple[str, str, str, float]] = field(default_factory=list)
    upstream: str | None = None
    upstream_status: int | None = None
    upstream_ms: float | None = None
    cancelled: bool = False

    def decided(self, decisions: Sequence[RuleDecision]) -> None:
        self.rules.extend(
            (d.rule.name, d.client, d.result, d.retry_after_ms / 1000) for d in decisions
        )

    def guarded(self, rule: str, client: str, retry_after: float) -> None:
        """A denial that did not come from the rate limiter (the redirect miss guard)."""
        self.rules.append((rule, client, "rejected", retry_after))

    def forwarded(self, upstream: str, status: int | None, seconds: float) -> None:
        self.upstream = upstream
        self.upstream_status = status
        self.upstream_ms = round(seconds * 1000, 3)


def access(
    method: str, path: str, route: str, status: int, note: AccessNote, show_keys: bool
) -> None:
    """Write one request's access line (``note`` says it was sampled)."""
    fields: dict[str, Any] = {
        "method": method,
        "path": path,
        "route": route,
        "status": 499 if note.cancelled else status,
        "duration_ms": round((time.perf_counter() - note.started) * 1000, 3),
    }
    if note.upstream is not None:
        fields["upstream"] = note.upstream
        fields["upstream_status"] = note.upstream_status
        fields["upstream_ms"] = note.upstream_ms
    fields["rules"] = [
        {
            "rule": rule,
            "client": client if show_keys else masked(client),
            "result": result,
            "retry_after": round(retry, 3),
        }
        for rule, client, result, retry in note.rules
    ]
    access_log.info("access", extra={"access": fields})
