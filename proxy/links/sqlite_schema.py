"""The links database schema (applied in order, recorded in ``schema_migrations``)
and the row ⇄ ``Link`` mapping of the SQLite store."""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from typing import Any

from proxy.links.model import Link, Variant
from proxy.links.store import SecretMismatch, secret_fingerprint

COLUMNS = "id, code, url, created_at, created_by, expires_at, max_clicks, status, tags, variants"
INSERT = (
    "INSERT INTO links (id, code, url, created_at, created_by, expires_at, max_clicks, status,"
    " tags, variants, dedupe) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        1,
        (
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
            """CREATE TABLE links (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                code TEXT NOT NULL UNIQUE,
                url TEXT NOT NULL,
                created_at REAL NOT NULL,
                created_by TEXT,
                expires_at REAL,
                max_clicks INTEGER,
                status INTEGER,
                tags TEXT NOT NULL,
                variants TEXT NOT NULL,
                dedupe TEXT,
                clicks INTEGER NOT NULL DEFAULT 0,
                last_click_at REAL
            )""",
            "CREATE INDEX links_dedupe ON links (dedupe) WHERE dedupe IS NOT NULL",
            "CREATE TABLE link_tags (tag TEXT NOT NULL, link_id INTEGER NOT NULL,"
            " PRIMARY KEY (tag, link_id)) WITHOUT ROWID",
            "CREATE TABLE daily (code TEXT NOT NULL, day TEXT NOT NULL, field TEXT NOT NULL,"
            " n INTEGER NOT NULL, PRIMARY KEY (code, day, field)) WITHOUT ROWID",
            "CREATE TABLE visitors (code TEXT NOT NULL, day TEXT NOT NULL,"
            " visitor INTEGER NOT NULL, PRIMARY KEY (code, day, visitor)) WITHOUT ROWID",
            "CREATE TABLE hourly (hour INTEGER NOT NULL, code TEXT NOT NULL, n INTEGER NOT NULL,"
            " PRIMARY KEY (hour, code)) WITHOUT ROWID",
            "CREATE INDEX hourly_code ON hourly (code)",
        ),
    ),
)


def row_link(row: tuple[Any, ...]) -> Link:
    _, code, url, created_at, created_by, expires_at, max_clicks, status, tags, variants = row
    return Link(
        code=code,
        url=url,
        created_at=created_at,
        created_by=created_by,
        expires_at=expires_at,
        max_clicks=max_clicks,
        status=status,
        tags=tuple(json.loads(tags)),
        variants=tuple(Variant(v["url"], v["weight"]) for v in json.loads(variants)),
    )


def link_params(link: Link) -> tuple[Any, ...]:
    variants = [{"url": v.url, "weight": v.weight} for v in link.variants]
    return (
        link.url,
        link.created_at,
        link.created_by,
        link.expires_at,
        link.max_clicks,
        link.status,
        json.dumps(list(link.tags)),
        json.dumps(variants),
    )


def raise_sequence(db: sqlite3.Connection, value: int) -> None:
    """Make the links AUTOINCREMENT sequence (the code counter) at least ``value``."""
    cur = db.execute("UPDATE sqlite_sequence SET seq = MAX(seq, ?) WHERE name = 'links'", (value,))
    if cur.rowcount == 0:
        db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('links', ?)", (value,))


def migrate(db: sqlite3.Connection, secret: str | None, where: str) -> str:
    """Apply missing migrations and settle the code secret (inside a write
    transaction, so concurrent openers take turns); returns the secret to use."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations"
        " (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
    )
    done = {v for (v,) in db.execute("SELECT version FROM schema_migrations")}
    for version, statements in MIGRATIONS:
        if version not in done:
            for statement in statements:
                db.execute(statement)
            db.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version, time.time()))
    meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    chosen = secret or meta.get("code_secret")
    if chosen is None:
        chosen = secrets.token_urlsafe(32)
        db.execute("INSERT INTO meta VALUES ('code_secret', ?)", (chosen,))
    fingerprint = secret_fingerprint(chosen)
    if "secret_fingerprint" not in meta:
        db.execute("INSERT INTO meta VALUES ('secret_fingerprint', ?)", (fingerprint,))
    elif meta["secret_fingerprint"] != fingerprint:
        raise SecretMismatch(where)
    return chosen


def find_row(db: sqlite3.Connection, code: str) -> tuple[Any, ...] | None:
    row: tuple[Any, ...] | None = db.execute(
        f"SELECT {COLUMNS} FROM links WHERE code = ?", (code,)
    ).fetchone()
    return row


def insert_link(db: sqlite3.Connection, row_id: int | None, link: Link, dedupe: str | None) -> None:
    """Insert ``link`` and its tags (``row_id`` None: the next AUTOINCREMENT id);
    ``sqlite3.IntegrityError`` when the code exists."""
    cur = db.execute(INSERT, (row_id, link.code, *link_params(link), dedupe))
    rows = [(t, cur.lastrowid) for t in link.tags]
    db.executemany("INSERT OR IGNORE INTO link_tags VALUES (?, ?)", rows)
