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


def test_the_second_quickstart_windows_the_same_files_into_duckdb(tmp_path: Path) -> None:
    """SQL + a tumbling window over the bundled files, checked against DuckDB SQL
    over the same files (an independent oracle), run from another folder."""
    import duckdb

    shutil.copytree(REPO / "examples", tmp_path / "examples")
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    (tmp_path / "elsewhere").mkdir()
    cmd = [
        sys.executable,
        "-m",
        "sluice",
        "consume",
        str(tmp_path / "configs" / "quickstart_window.toml"),
        "--stop-after-idle-ms",
        "500",
    ]
    done = subprocess.run(
        cmd, cwd=tmp_path / "elsewhere", capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "read 1200 rows; wrote 9 rows to duckdb:" in done.stderr.splitlines()[-1]
    with duckdb.connect(str(tmp_path / "quickstart.duckdb"), read_only=True) as db:
        got = db.execute(
            "SELECT window_start, event_type, events, round(amount_sum, 6) "
            "FROM events_per_minute ORDER BY 1, 2"
        ).fetchall()
        files = str(tmp_path / "examples" / "quickstart" / "events" / "*.jsonl")
        want = db.execute(
            "SELECT time_bucket(INTERVAL 1 minute, CAST(ts AS TIMESTAMPTZ) AT TIME ZONE 'UTC') AS w,"
            " event_type, count(*), round(sum(amount), 6) "
            f"FROM read_json_auto('{files}') WHERE amount > 0 GROUP BY ALL ORDER BY 1, 2"
        ).fetchall()
    assert len(want) == 9
    assert got == want
