"""The Delta source inside real `flow consume` runs: a big version streamed in
bounded batches, a SIGKILL mid-version resumes mid-version with every row once,
and a new version arrives once."""

from __future__ import annotations

import random
import sqlite3
import textwrap
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import write_deltalake
from tests.integration.conftest import Flow, kill_after_reading

from sluice.connectors.delta.source import decode

pytestmark = pytest.mark.integration


def delta_sqlite(root: Path, db: Path) -> str:
    return textwrap.dedent(
        f"""
        pipeline_name = "delta_kill"
        source_query = "t"
        idle_pause_ms = 50

        [source]
        kind = "delta_local"
        path = "{root}"
        max_batch_rows = 1000

        [target]
        kind = "sqlite"
        path = "{db}"

        [target.table]
        name = "events"
        """
    )


def ids_in(db: Path) -> list[int]:
    with sqlite3.connect(db) as c:
        return sorted(r[0] for r in c.execute("SELECT id FROM events"))


def version(first: int, n: int) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(range(first, first + n), pa.int64()),
            "p": pa.array(["a", "b", "c", "d"] * (n // 4)),
            "name": pa.array([f"row {i}" for i in range(first, first + n)]),
        }
    )


def test_a_sigkill_mid_version_resumes_mid_version_with_every_row_once(
    tmp_path: Path, flow: Callable[..., Flow]
) -> None:
    table = str(tmp_path / "lake" / "t")
    # version 0: 4 files, 100 batches: a kill a few batches in lands mid-version
    write_deltalake(table, version(0, 100_000), partition_by=["p"])
    write_deltalake(table, version(100_000, 4_000), mode="append")
    db = tmp_path / "o.db"
    config = delta_sqlite(tmp_path / "lake", db)
    f = flow(config)
    kill_after_reading(f, 4_000, random.uniform(0, 0.1))
    with sqlite3.connect(db) as c:
        ((pos,),) = c.execute("SELECT position_int FROM _sluice_positions").fetchall()
    at_version, at_row = decode(pos)
    assert at_version == 0 and 0 < at_row < 100_000, (at_version, at_row)  # mid-version
    again = flow(config, "--stop-after-idle-ms", "300")
    assert again.proc.wait(timeout=120) == 0, again.output()
    assert ids_in(db) == list(range(104_000))
    # A new version after the restart: read once, nothing before it again.
    write_deltalake(table, version(104_000, 400), mode="append")
    third = flow(config, "--stop-after-idle-ms", "300")
    assert third.proc.wait(timeout=120) == 0, third.output()
    assert ids_in(db) == list(range(104_400))
