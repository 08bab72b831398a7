"""Source positions in the Delta commit: app transactions, read back on start."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
from deltalake import DeltaTable

from sluice.config import load_text
from sluice.connectors.delta.target import DeltaTarget, app_id
from sluice.connectors.registry import Context, build_target
from sluice.connectors.sql.positions import RecordsPositions


def target(path: Path, mode: str = "append", pipeline: str = "p") -> DeltaTarget:
    key = 'primary_key = ["id"]' if mode == "merge" else ""
    spec = load_text(
        f"""
pipeline_name = "{pipeline}"
source_query = "t"
[source]
kind = "kafka"
bootstrap_servers = "127.0.0.1:1"
[target]
kind = "delta_local"
path = "{path}"
mode = "{mode}"
[target.table]
{key}
"""
    )
    assert spec.target is not None
    t = build_target(spec.target, Context(spec), 0)
    assert isinstance(t, DeltaTarget)
    assert isinstance(t, RecordsPositions)
    return t


def test_positions_commit_with_the_rows_and_are_read_back(tmp_path: Path) -> None:
    t = target(tmp_path / "t")
    t.open()
    assert t.held_positions() == {}
    t.stage_positions({"events": {"events:0": 5, "events:1": 3}})
    t.write(pa.table({"id": [1, 2]}))
    t.flush()
    t.stage_positions({"events": {"events:0": 9}})
    t.write(pa.table({"id": [3]}))
    t.flush()
    table = DeltaTable(str(tmp_path / "t"))
    assert table.version() == 1  # one commit per flush, rows and positions together
    assert table.transaction_version(app_id("p", "events", "events:0")) == 9
    again = target(tmp_path / "t")
    again.open()
    assert again.held_positions() == {"events": {"events:0": 9, "events:1": 3}}
    other = target(tmp_path / "t", pipeline="q")  # another pipeline holds nothing here
    assert other.held_positions() == {}


def test_a_round_without_rows_commits_its_positions_alone(tmp_path: Path) -> None:
    t = target(tmp_path / "t")
    t.open()
    t.stage_positions({"s": {"s:0": 1}})
    t.write(pa.table({"id": [1]}))
    t.flush()
    t.stage_positions({"s": {"s:0": 7}})
    t.flush()
    table = DeltaTable(str(tmp_path / "t"))
    assert table.version() == 1
    assert table.transaction_version(app_id("p", "s", "s:0")) == 7
    assert pa.table(table.scan()).num_rows == 1


def test_a_replayed_batch_at_or_below_the_stored_version_is_skipped(tmp_path: Path) -> None:
    t = target(tmp_path / "t")
    t.open()
    t.stage_positions({"s": {"s:0": 10}})
    t.write(pa.table({"id": [1, 2]}))
    t.flush()
    again = target(tmp_path / "t")
    again.open()
    again.held_positions()
    again.stage_positions({"s": {"s:0": 10}})  # the same batch, delivered again
    again.write(pa.table({"id": [1, 2]}))
    again.flush()
    table = DeltaTable(str(tmp_path / "t"))
    assert table.version() == 0 and pa.table(table.scan()).num_rows == 2
    again.stage_positions({"s": {"s:0": 11}})
    again.write(pa.table({"id": [3]}))
    again.flush()
    assert pa.table(DeltaTable(str(tmp_path / "t")).scan()).num_rows == 3


def test_merge_commits_positions_in_its_one_commit(tmp_path: Path) -> None:
    t = target(tmp_path / "t", mode="merge")
    t.open()
    t.stage_positions({"s": {"s:0": 2}})
    t.write(pa.table({"id": [1, 2], "v": ["a", "b"]}))
    t.flush()
    t.stage_positions({"s": {"s:0": 4}})
    t.write(pa.table({"id": [2, 3], "v": ["B", "c"]}))
    t.flush()
    table = DeltaTable(str(tmp_path / "t"))
    assert table.version() == 1
    assert table.transaction_version(app_id("p", "s", "s:0")) == 4
    assert sorted(pa.table(table.scan()).to_pylist(), key=lambda r: r["id"]) == [
        {"id": 1, "v": "a"},
        {"id": 2, "v": "B"},
        {"id": 3, "v": "c"},
    ]


def deferring(path: Path, extra: str) -> DeltaTarget:
    spec = load_text(
        f"""
pipeline_name = "p"
source_query = "t"
[source]
kind = "kafka"
bootstrap_servers = "127.0.0.1:1"
[target]
kind = "delta_local"
path = "{path}"
{extra}
"""
    )
    assert spec.target is not None
    t = build_target(spec.target, Context(spec), 0)
    assert isinstance(t, DeltaTarget)
    return t


def test_flush_rows_defers_commits_that_carry_positions(tmp_path: Path) -> None:
    from sluice.connectors.sql.positions import DefersCommits

    t = deferring(tmp_path / "t", "flush_rows = 3")
    assert isinstance(t, DefersCommits)
    t.open()
    t.stage_positions({"s": {"s:0": 2}})
    t.write(pa.table({"id": [1, 2]}))
    t.flush()
    assert t.deferred and not (tmp_path / "t" / "_delta_log").exists()
    t.close()  # a failed commit's retry closes and reopens: what was taken stays
    t.open()
    t.stage_positions({"s": {"s:0": 4}})
    t.write(pa.table({"id": [3, 4]}))
    t.flush()  # 4 rows wait: due
    assert not t.deferred
    table = DeltaTable(str(tmp_path / "t"))
    assert table.version() == 0 and table.transaction_version(app_id("p", "s", "s:0")) == 4
    t.stage_positions({"s": {"s:0": 5}})
    t.write(pa.table({"id": [5]}))
    t.flush()
    assert t.deferred
    t.commit_deferred(force=False)
    assert t.deferred  # not due yet
    t.commit_deferred(force=True)  # the run stops
    assert pa.table(DeltaTable(str(tmp_path / "t")).scan()).num_rows == 5


def test_without_positions_every_flush_commits(tmp_path: Path) -> None:
    t = deferring(tmp_path / "t", "flush_interval_ms = 3600000")
    t.open()
    t.write(pa.table({"id": [1]}))
    t.flush()  # no positions staged (a window pipeline's hold-back): commit now
    assert not t.deferred and DeltaTable(str(tmp_path / "t")).version() == 0
