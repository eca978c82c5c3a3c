"""``sluice``: serve, check, links."""

from __future__ import annotations

import argparse
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
    config = load_or_report(args.config)
    if config is None:
        return 1
    from proxy import logs

    logs.setup(config.logging, args.log_level)

    def one_worker(reuse_port: bool) -> int:
        # Imported here, not above: with several workers the supervisor must set
        # PROMETHEUS_MULTIPROC_DIR before prometheus_client is first imported.
        from proxy.worker import serve

        try:
            cfg = load_or_report(args.config) if reuse_port else config
            if cfg is None:
                return 1
            logs.apply(cfg.logging)
            return run_loop(serve(cfg, reuse_port=reuse_port))
        finally:
            if reuse_port:  # a forked worker ends with os._exit: write its last lines now
                logs.flush()

    try:
        if args.workers <= 1:
            return one_worker(False)
        from proxy.supervisor import Supervisor

        return Supervisor(config, args.workers, lambda: one_worker(True)).run()
    finally:
        logs.shutdown()


def cmd_check(args: argparse.Namespace) -> int:
    from proxy.summary import summarize

    if args.diff:
        return check_diff(args.files)
    status = 0
    for path in args.files:
        config = load_or_report(path)
        if config is None:
            status = 1
            continue
        print(summarize(config))
        if config.candidate is not None:  # what-if rules: checked too, shown as a diff
            candidate = load_or_report(config.candidate)
            if candidate is None:
                print(f"candidate {config.candidate}: invalid (serve reports and ignores it)")
                status = 1
                continue
            from proxy.diff import diff

            used = ("limits", "routes", "redirects.limits")  # what of the candidate is used
            changes = [c for c in diff(config, candidate) if c[2:].startswith(used)]
            print(f"candidate {config.candidate} (its limits evaluated in shadow):")
            for line in changes or ["no change to routes or limits"]:
                print(f"  {line}")
    return status


def check_diff(files: Sequence[str]) -> int:
    """``sluice check --diff OLD NEW``: what a reload from OLD to NEW would change."""
    from proxy.diff import diff

    old, new = (load_or_report(path) for path in files)
    if old is None or new is None:
        return 1
    changes = diff(old, new)
    count = f"{len(changes)} change{'s' if len(changes) != 1 else ''}"
    print(f"{files[0]} → {files[1]}: {count if changes else 'no changes'}")
    for line in changes:
        print(f"  {line}")
    return 0


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
    check.add_argument(
        "--diff",
        action="store_true",
        help="with OLD NEW: print what reloading from OLD to NEW would change",
    )
    check.set_defaults(func=cmd_check)
    add_links_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "diff", False) and len(args.files) != 2:
        parser.error("check --diff takes exactly two files: OLD NEW")
    try:
        result: int = args.func(args)
    except BrokenPipeError:  # `sluice check rules.yaml | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return result
