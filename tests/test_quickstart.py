"""The README's run command works with no services: local files into SQLite."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_readme_example_runs_and_a_second_run_reads_nothing_twice(tmp_path: Path) -> None:
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    cmd = [
        sys.executable,
        "-m",
        "sluice",
        "consume",
        "configs/quickstart.toml",
        "--stop-after-idle-ms",
        "500",
    ]
    for _ in range(2):
        done = subprocess.run(
            cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False
        )
        assert done.returncode == 0, done.stderr
    with sqlite3.connect(tmp_path / "quickstart.db") as db:
        assert db.execute("SELECT count(*), count(DISTINCT event_id) FROM events").fetchone() == (
            1200,
            1200,
        )
        assert db.execute("SELECT sum(event_id) FROM events").fetchone()[0] == sum(range(1200))
