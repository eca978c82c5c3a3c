"""Opening the embedded store's SQLite files, shared by every process of an instance.

``PRAGMA journal_mode=WAL`` needs an exclusive lock for a moment on a file
that is not in WAL mode yet, and SQLite may answer "database is locked" at
once rather than wait for the busy timeout (two workers opening a fresh data
dir together do). ``connect`` retries that step until the busy timeout has
passed; every later statement waits through the busy timeout as usual.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

RETRY_STEP = 0.02


def connect(path: Path, *, busy_timeout: float, synchronous: str = "NORMAL") -> sqlite3.Connection:
    """A connection in autocommit mode (callers issue BEGIN themselves), in WAL mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                conn.close()
                raise
            time.sleep(RETRY_STEP)
    conn.execute(f"PRAGMA synchronous={synchronous}")
    return conn
