"""Where the Redis link store keeps things: key names, hash encoding, Lua scripts.

Key layout (``lk`` is the namespace)::

    lk:{<code>}              hash: the link's fields (JSON values), seq, dedupe,
                             clicks (the counter), last_click
    lk:{<code>}:d:<day>      hash: that UTC day's counters n, u:<ua family>,
                             v:<variant>, r:<referrer host>   (TTL 400 days)
    lk:{<code>}:v:<day>      HyperLogLog of that day's visitors (TTL 400 days)
    lk:{<code>}:days         set of the days that have the two keys above
    lk:counter               INCR: the code counter (and the creation sequence)
    lk:index                 sorted set: code by sequence (listing, export)
    lk:tag:<tag>             sorted set: code by sequence, one per tag
    lk:dd:<sha256>           dedupe: (owner, url) -> code; ...:lock while creating
    lk:top:{top}:<hour>      sorted set: clicks per code in that hour (TTL 26 h)
    lk:secret, lk:secret:fp  the generated code secret; the secret's fingerprint

Every key of one link carries the hash tag ``{<code>}`` (codes never contain
braces), so scripts touching several of them run on one Cluster slot; the hour
buckets share the tag ``{top}`` so the leaderboard is one ``ZUNIONSTORE``. The
indexes are single keys, each on one slot: on a Cluster that node holds every
index entry, which is fine for listing (the redirect path never reads them).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib.resources import files
from typing import NamedTuple

from proxy.links.model import Link, link_from_json, link_to_json
from proxy.storage.redis_client import script_sha


class Script(NamedTuple):
    body: bytes
    sha: str


def _script(name: str) -> Script:
    body = (files("proxy.links") / "lua" / f"{name}.lua").read_bytes()
    return Script(body, script_sha(body))


CREATE = _script("create")
PATCH = _script("patch")
TAKE_CLICK = _script("take_click")
RECORD_CLICK = _script("record_click")
TOP_ADD = _script("top_add")
TOP = _script("top")
SET_FLOOR = _script("set_floor")
RELEASE = _script("release")


class Keys:
    """The key names of one namespace."""

    def __init__(self, namespace: str = "lk") -> None:
        self.ns = namespace
        self.counter = f"{namespace}:counter"
        self.index = f"{namespace}:index"
        self.secret = f"{namespace}:secret"
        self.fingerprint = f"{namespace}:secret:fp"
        self.scratch = f"{namespace}:top:{{top}}:scratch"

    def link(self, code: str) -> str:
        return f"{self.ns}:{{{code}}}"

    def day(self, code: str, day: str) -> str:
        return f"{self.ns}:{{{code}}}:d:{day}"

    def visitors(self, code: str, day: str) -> str:
        return f"{self.ns}:{{{code}}}:v:{day}"

    def days(self, code: str) -> str:
        return f"{self.ns}:{{{code}}}:days"

    def tag(self, tag: str) -> str:
        return f"{self.ns}:tag:{tag}"

    def dedupe(self, digest: str) -> str:
        return f"{self.ns}:dd:{digest}"

    def top(self, hour: int) -> str:
        return f"{self.ns}:top:{{top}}:{hour}"


def link_fields(link: Link) -> list[str]:
    """The link hash's field/value pairs (values JSON-encoded), flattened."""
    values = link_to_json(link)
    del values["code"]
    return [item for name, value in values.items() for item in (name, json.dumps(value))]


def decode_link(code: str, fields: dict[str, bytes]) -> Link:
    names = ("url", "created_at", "created_by", "expires_at", "max_clicks", "status")
    raw = {name: json.loads(fields[name]) for name in (*names, "tags", "variants")}
    return link_from_json({"code": code, **raw})


def pairs(reply: Sequence[bytes] | None) -> dict[str, bytes]:
    """A flat ``HGETALL`` reply as a dict."""
    items = reply or []
    return {items[i].decode(): items[i + 1] for i in range(0, len(items), 2)}
