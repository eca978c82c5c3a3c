"""``sluice links …``: the links API from a shell.

The admin API is found at ``--admin URL``, else ``$SLUICE_ADMIN_URL``, else
the ``admin.listen`` of the rules file (``-c``, default ``rules.yaml``), else
``http://127.0.0.1:8001``. The token is ``--token``, else
``$SLUICE_ADMIN_TOKEN``, else the rules file's first write-scoped token.
Exit status: 0 done, 1 the API refused (its message is printed) or could
not be reached, 2 bad usage.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import IO, Any

DEFAULT_ADMIN = "http://127.0.0.1:8001"
TIMEOUT = 30.0


class CliError(Exception):
    pass


class Api:
    def __init__(self, base: str, token: str | None) -> None:
        self.base = base.rstrip("/")
        self.token = token

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str = "application/json",
        query: dict[str, str] | None = None,
    ) -> http.client.HTTPResponse:
        url = self.base + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        req = urllib.request.Request(url, data=body, method=method)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        if body is not None:
            req.add_header("Content-Type", content_type)
        req.add_header("Accept", "application/json")
        try:
            response: http.client.HTTPResponse = urllib.request.urlopen(req, timeout=TIMEOUT)
        except urllib.error.HTTPError as exc:
            raise CliError(_api_message(exc)) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CliError(f"cannot reach the admin API at {self.base}: {reason}") from None
        return response

    def json(self, method: str, path: str, payload: Any = None, **query: str) -> Any:
        body = None if payload is None else json.dumps(payload).encode()
        with self.request(method, path, body, query=query or None) as response:
            raw = response.read()
        return json.loads(raw) if raw else None


def _api_message(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read() or b"{}")
    except ValueError:
        body = {}
    message = body.get("message") or exc.reason
    text = f"{message} (HTTP {exc.code}{' ' + body['error'] if body.get('error') else ''})"
    for extra in body.get("errors", [])[1:]:
        text += f"\n  {extra}"
    return text


def _from_rules(path: str) -> tuple[str | None, str | None]:
    """(admin URL, token) from a rules file, or Nones when it cannot be read."""
    if not Path(path).is_file():
        return None, None
    from proxy.config import load
    from proxy.errors import ConfigError

    try:
        config = load(path)
    except ConfigError:
        return None, None
    host = config.admin.listen.host
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    tokens = sorted(config.admin.tokens, key=lambda t: t.scope != "write")
    return f"http://{host}:{config.admin.listen.port}", tokens[0].token if tokens else None


def _api(args: argparse.Namespace) -> Api:
    url = args.admin or os.environ.get("SLUICE_ADMIN_URL")
    token = args.token or os.environ.get("SLUICE_ADMIN_TOKEN")
    if not url or not token:
        rules_url, rules_token = _from_rules(args.config)
        url = url or rules_url or DEFAULT_ADMIN
        token = token or rules_token
    return Api(url, token)


def _print_json(obj: Any, out: IO[str]) -> None:
    out.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _code_path(code: str) -> str:
    return "/api/links/" + urllib.parse.quote(code, safe="")


def _variant(text: str) -> dict[str, Any]:
    url, sep, weight = text.rpartition("=")
    if not sep or not weight.isdigit():
        raise argparse.ArgumentTypeError(f"expected URL=WEIGHT, got {text!r}")
    return {"url": url, "weight": int(weight)}


def cmd_create(args: argparse.Namespace, api: Api, out: IO[str]) -> None:
    body: dict[str, Any] = {"url": args.url}
    if args.code:
        body["code"] = args.code
    if args.expires_in:
        body["expires_in"] = args.expires_in
    if args.max_clicks is not None:
        body["max_clicks"] = args.max_clicks
    if args.status is not None:
        body["status"] = args.status
    if args.tag:
        body["tags"] = args.tag
    if args.variant:
        body["variants"] = args.variant
    query = {} if args.dedupe else {"dedupe": "false"}
    link = api.json("POST", "/api/links", body, **query)
    if args.quiet:
        out.write(link["code"] + "\n")
    else:
        _print_json(link, out)


def cmd_list(args: argparse.Namespace, api: Api, out: IO[str]) -> None:
    query = {"limit": str(args.limit)}
    if args.tag:
        query["tag"] = args.tag
    while True:
        page = api.json("GET", "/api/links", **query)
        for link in page["links"]:
            if args.json:
                out.write(json.dumps(link, ensure_ascii=False) + "\n")
            else:
                tags = ",".join(link["tags"])
                out.write(f"{link['code']}\t{link['url']}\t{tags}\n")
        if not args.all or not page["next_cursor"]:
            return
        query["cursor"] = page["next_cursor"]


def cmd_show(args: argparse.Namespace, api: Api, out: IO[str]) -> None:
    link = api.json("GET", _code_path(args.code))
    if args.stats:
        query = {k: v for k, v in (("since", args.since), ("until", args.until)) if v}
        link["stats"] = api.json("GET", _code_path(args.code) + "/stats", **query)
    _print_json(link, out)


def cmd_delete(args: argparse.Namespace, api: Api, out: IO[str]) -> None:
    api.json("DELETE", _code_path(args.code))
    out.write(f"deleted {args.code}\n")


def cmd_export(args: argparse.Namespace, api: Api, out: IO[str]) -> None:
    target = Path(args.output) if args.output and args.output != "-" else None
    partial = target.with_name(target.name + ".partial") if target else None
    count = 0
    with api.request("GET", "/api/links:export") as response:
        sink = partial.open("wb") if partial else sys.stdout.buffer
        try:
            for line in response:
                sink.write(line)
                count += 1
        except (http.client.HTTPException, OSError) as exc:
            raise CliError(f"the export was cut short after {count} links: {exc}") from None
        finally:
            if partial:
                sink.close()
            else:
                sink.flush()
    if target and partial:
        partial.replace(target)  # only a complete export gets the name asked for
        print(f"exported {count} links to {target}", file=sys.stderr)


def cmd_import(args: argparse.Namespace, api: Api, out: IO[str]) -> None:
    data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    with api.request(
        "POST", "/api/links:import", data, content_type="application/x-ndjson"
    ) as response:
        result = json.loads(response.read())
    out.write(f"imported {result['imported']}, skipped {len(result['skipped'])} existing\n")
    for code in result["skipped"]:
        out.write(f"  skipped {code}\n")


def add_parser(sub: Any) -> None:
    """The ``links`` command and its subcommands, under ``sluice``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--admin", metavar="URL", help="admin API base URL")
    common.add_argument("--token", help="admin bearer token")
    common.add_argument("-c", "--config", default="rules.yaml", help="rules file for the defaults")
    links = sub.add_parser(
        "links", help="create / list / show / delete / export / import short links"
    )
    cmds = links.add_subparsers(dest="links_command", required=True)

    create = cmds.add_parser("create", parents=[common], help="shorten a URL")
    create.add_argument("url")
    create.add_argument("--code", help="a custom code instead of a generated one")
    create.add_argument("--expires-in", metavar="DURATION", help="e.g. 7d, 12h")
    create.add_argument("--max-clicks", type=int, metavar="N")
    create.add_argument("--status", type=int, choices=(301, 302, 307, 308))
    create.add_argument("--tag", action="append", default=[])
    create.add_argument("--variant", action="append", type=_variant, metavar="URL=WEIGHT")
    create.add_argument(
        "--no-dedupe", dest="dedupe", action="store_false", help="always a new link"
    )
    create.add_argument("-q", "--quiet", action="store_true", help="print only the code")
    create.set_defaults(links_func=cmd_create)

    listing = cmds.add_parser("list", parents=[common], help="list links, newest first")
    listing.add_argument("--tag")
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--all", action="store_true", help="follow every page")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(links_func=cmd_list)

    show = cmds.add_parser("show", parents=[common], help="one link (and its analytics)")
    show.add_argument("code")
    show.add_argument("--stats", action="store_true")
    show.add_argument("--since", metavar="YYYY-MM-DD")
    show.add_argument("--until", metavar="YYYY-MM-DD")
    show.set_defaults(links_func=cmd_show)

    delete = cmds.add_parser("delete", parents=[common], help="delete a link")
    delete.add_argument("code")
    delete.set_defaults(links_func=cmd_delete)

    export = cmds.add_parser("export", parents=[common], help="every link as JSON Lines")
    export.add_argument("-o", "--output", help="file (default: standard output)")
    export.set_defaults(links_func=cmd_export)

    imp = cmds.add_parser("import", parents=[common], help="import JSON Lines ('-': stdin)")
    imp.add_argument("file")
    imp.set_defaults(links_func=cmd_import)

    links.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        args.links_func(args, _api(args), sys.stdout)
    except CliError as exc:
        print(f"sluice links: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a file to import or export to
        print(f"sluice links: {exc}", file=sys.stderr)
        return 1
    return 0
