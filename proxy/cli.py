"""``sluice``: serve, check, links."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from proxy import __version__
from proxy.linkcli import add_parser as add_links_parser

if TYPE_CHECKING:
    from proxy.config import Config

# aiohttp and the config loader are imported where they are used: `sluice links`
# needs neither, and a shell command should start quickly.


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


def setup_logging(level: str | None) -> None:
    name = (level or os.environ.get("SLUICE_LOG_LEVEL") or "info").upper()
    logging.basicConfig(
        level=getattr(logging, name, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp.server").addFilter(_DropBadRequests())


def run_loop(coro: Coroutine[Any, Any, int]) -> int:
    """Run with uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        import asyncio

        return asyncio.run(coro)
    result: int = uvloop.run(coro)
    return result


def load_or_report(path: str) -> Config | None:
    from proxy.config import load
    from proxy.errors import ConfigError

    try:
        return load(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None


def cmd_serve(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    config = load_or_report(args.config)
    if config is None:
        return 1

    def one_worker(reuse_port: bool) -> int:
        # Imported here, not above: with several workers the supervisor must set
        # PROMETHEUS_MULTIPROC_DIR before prometheus_client is first imported.
        from proxy.worker import serve

        cfg = load_or_report(args.config) if reuse_port else config
        if cfg is None:
            return 1
        return run_loop(serve(cfg, reuse_port=reuse_port))

    if args.workers <= 1:
        return one_worker(False)
    from proxy.supervisor import Supervisor

    return Supervisor(config, args.workers, lambda: one_worker(True)).run()


def cmd_check(args: argparse.Namespace) -> int:
    from proxy.summary import summarize

    status = 0
    for path in args.files:
        config = load_or_report(path)
        if config is None:
            status = 1
            continue
        print(summarize(config))
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sluice", description="Rate-limit and short-link edge proxy."
    )
    parser.add_argument("--version", action="version", version=f"sluice {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument(
        "-c", "--config", default="rules.yaml", help="rules file (default rules.yaml)"
    )
    serve.add_argument(
        "-w", "--workers", type=int, default=1, help="worker processes (SO_REUSEPORT)"
    )
    serve.add_argument("--log-level", default=None, help="debug, info, warning, error")
    serve.set_defaults(func=cmd_serve)
    check = sub.add_parser("check", help="validate rules files and print a summary")
    check.add_argument("files", nargs="+")
    check.set_defaults(func=cmd_check)
    add_links_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except BrokenPipeError:  # `sluice check rules.yaml | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return result
