"""The Delta source on a local table: each version once, compaction emits
nothing, the change data feed, a vacuumed version is a clear error."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from sluice.connectors import registry
from sluice.connectors.api import Batch
from sluice.connectors.delta.source import DeltaSource
from sluice.errors import ConnectorError
from sluice.testing.harness import load_pipeline


@pytest.fixture(autouse=True)
def _state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_STATE_DIR", str(tmp_path / "state"))


def build(root: Path, query: str = "t") -> DeltaSource:
    spec = load_pipeline(
        {
            "pipeline_name": "p",
            "source_query": query,
            "source": {"kind": "delta_local", "path": str(root)},
            "target": {"kind": "sqlite", "path": "unused.sqlite", "table": {"name": "t"}},
        }
    )
    (source_spec,) = spec.all_sources
    source = registry.build_source(source_spec, registry.Context(spec))
    assert isinstance(source, DeltaSource)
    return source


def drain(source: DeltaSource) -> list[Batch]:
    out = []
    while (b := source.read(0.1)) is not None:
        out.append(b)
        source.commit(b.ack)
    return out


def rows(batches: list[Batch]) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for b in batches:
        if b.num_rows:
            out.extend(b.data.drop_columns(["_event_ts"]).to_pylist())
    return out


def test_each_version_once_across_restarts_and_compaction_emits_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "t")
    write_deltalake(path, pa.table({"id": [1, 2], "p": ["a", "b"]}), partition_by=["p"])
    source = build(tmp_path)
    source.open(None)
    first = drain(source)
    assert sorted(r["id"] for r in rows(first)) == [1, 2]
    assert {r["p"] for r in rows(first)} == {"a", "b"}  # partition values come back
    assert first[-1].position == {"t": 1}
    write_deltalake(path, pa.table({"id": [3], "p": ["a"]}), mode="append")
    DeltaTable(path).optimize.compact()  # version 2: rewrites files, no data change
    later = drain(source)
    assert rows(later) == [{"id": 3, "p": "a"}]
    assert later[-1].position == {"t": 3}
    (commit_ms,) = [h["timestamp"] for h in DeltaTable(path).history() if h["version"] == 1]
    assert later[0].data["_event_ts"].cast(pa.int64()).to_pylist() == [commit_ms * 1000]
    source.close()
    again = build(tmp_path)
    again.open(None)
    assert drain(again) == []  # nothing twice after a restart
    write_deltalake(path, pa.table({"id": [4], "p": ["b"]}), mode="append")
    assert rows(drain(again)) == [{"id": 4, "p": "b"}]


def test_the_change_data_feed_gives_updates_and_deletes(tmp_path: Path) -> None:
    path = str(tmp_path / "t")
    write_deltalake(
        path,
        pa.table({"id": [1, 2], "v": ["a", "b"]}),
        configuration={"delta.enableChangeDataFeed": "true"},
    )
    DeltaTable(path).delete("id = 2")
    (
        DeltaTable(path)
        .merge(pa.table({"id": [1], "v": ["A"]}), "t.id = s.id", source_alias="s", target_alias="t")
        .when_matched_update_all()
        .execute()
    )
    write_deltalake(path, pa.table({"id": [3], "v": ["c"]}), mode="append")
    DeltaTable(path).optimize.compact()
    assert DeltaTable(path).history(1)[0]["operation"] == "OPTIMIZE"
    source = build(tmp_path)
    source.open(None)
    batches = drain(source)
    changes = [(r["_commit_version"], r["_change_type"], r["id"], r["v"]) for r in rows(batches)]
    assert sorted(changes) == [
        (0, "insert", 1, "a"),
        (0, "insert", 2, "b"),
        (1, "delete", 2, "b"),
        (2, "update_postimage", 1, "A"),
        (2, "update_preimage", 1, "a"),
        (3, "insert", 3, "c"),
    ]
    assert [b.num_rows for b in batches] == [2, 1, 2, 1, 0]  # the compaction: nothing


def test_a_vacuumed_version_is_a_clear_error(tmp_path: Path) -> None:
    path = str(tmp_path / "t")
    write_deltalake(path, pa.table({"id": [1]}))
    write_deltalake(path, pa.table({"id": [2]}), mode="overwrite")
    DeltaTable(path).vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
    source = build(tmp_path)
    source.open(None)
    with pytest.raises(ConnectorError, match=r"version 0 .* is gone \(vacuumed\)"):
        source.read(0.1)


def test_a_missing_table_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConnectorError, match="no Delta table"):
        build(tmp_path, "absent").open(None)
