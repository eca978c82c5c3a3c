"""Several processes opening the same fresh SQLite file at once (workers starting on a
new data dir): switching it to WAL must not fail with "database is locked"."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

OPEN = """
import sys, time
from pathlib import Path
from proxy.storage.sqlite import connect
directory, go = Path(sys.argv[1]), Path(sys.argv[2])
while not go.exists():
    time.sleep(0.001)
for i in range(150):
    conn = connect(directory / f"db{i}.sqlite3", busy_timeout=5.0)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.execute("BEGIN IMMEDIATE")  # then set the file up, as each store does
    conn.execute("CREATE TABLE IF NOT EXISTS t (x INTEGER)")
    conn.execute("INSERT INTO t VALUES (1)")
    conn.execute("COMMIT")
    conn.close()
print("ok")
"""


def test_processes_opening_fresh_files_together(tmp_path: Path, repo_root: Path) -> None:
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN, str(tmp_path), str(go)],
            cwd=repo_root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    go.touch()
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert out.strip() == "ok"
