"""The Delta source on a local table: each version once, compaction emits
nothing, the change data feed, a vacuumed version is a clear error."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from sluice.connectors import registry
from sluice.connectors.api import Batch
from sluice.connectors.delta.source import DeltaSource, decode, encode
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
    assert first[-1].position == {"t": encode(1, 0)}
    write_deltalake(path, pa.table({"id": [3], "p": ["a"]}), mode="append")
    DeltaTable(path).optimize.compact()  # version 2: rewrites files, no data change
    later = drain(source)
    assert rows(later) == [{"id": 3, "p": "a"}]
    assert later[-1].position == {"t": encode(3, 0)}
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


def build_rows(root: Path, rows: int, query: str = "t") -> DeltaSource:
    spec = load_pipeline(
        {
            "pipeline_name": "p",
            "source_query": query,
            "source": {"kind": "delta_local", "path": str(root), "max_batch_rows": rows},
            "target": {"kind": "sqlite", "path": "unused.sqlite", "table": {"name": "t"}},
        }
    )
    (source_spec,) = spec.all_sources
    source = registry.build_source(source_spec, registry.Context(spec))
    assert isinstance(source, DeltaSource)
    return source


def test_a_big_version_streams_in_bounded_batches_and_resumes_mid_version(tmp_path: Path) -> None:
    path = str(tmp_path / "t")
    n = 5_000
    ids = pa.array(range(n), pa.int64())
    write_deltalake(
        path, pa.table({"id": ids, "p": pa.array(["a", "b"] * (n // 2))}), partition_by=["p"]
    )  # version 0: two files
    write_deltalake(
        path,
        pa.table({"id": pa.array(range(n, n + 10), pa.int64()), "p": ["a"] * 10}),
        mode="append",
    )
    source = build_rows(tmp_path, 400)
    source.open(None)
    first = [source.read(0.1) for _ in range(4)]
    assert all(b is not None and 0 < b.num_rows <= 400 for b in first)
    for b in first[:3]:
        assert b is not None
        source.commit(b.ack)  # the 4th is read, not committed: a crash now
    (pos,) = first[2].position.values()  # type: ignore[union-attr]
    assert decode(int(pos)) == (0, 1200)
    source.close()

    again = build_rows(tmp_path, 400)
    again.open(None)
    rest = drain(again)
    assert max(b.num_rows for b in rest) <= 400
    got = [r["id"] for b in [*first[:3], *rest] for r in rows([b])]  # type: ignore[list-item]
    assert sorted(got) == list(range(n + 10))  # every row once
    assert rest[-1].position == {"t": encode(2, 0)}

    # Resumed from the engine's position (a state store), mid-version too.
    third = build_rows(tmp_path, 400)
    third.open({"t": encode(0, 2_600)})
    tail = [r["id"] for r in rows(drain(third))]
    assert len(tail) == n - 2_600 + 10 and len(set(tail)) == len(tail)


def test_a_plain_version_position_from_before_reads_that_version_from_its_start(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "t")
    write_deltalake(path, pa.table({"id": [1]}))
    write_deltalake(path, pa.table({"id": [2]}), mode="append")
    source = build(tmp_path)
    source.open({"t": 1})  # a position written when a version was one batch
    assert rows(drain(source)) == [{"id": 2}]


def test_the_change_rows_match_load_cdf(tmp_path: Path) -> None:
    """The source reads the change data feed from the log itself (a fixed
    order, so it can resume mid-version); its rows are load_cdf's."""
    path = str(tmp_path / "t")
    write_deltalake(
        path,
        pa.table({"id": [1, 2, 3], "v": ["a", "b", "c"], "p": ["x", "y", "x"]}),
        partition_by=["p"],
        configuration={"delta.enableChangeDataFeed": "true"},
    )
    DeltaTable(path).delete("id = 2")
    (
        DeltaTable(path)
        .merge(
            pa.table({"id": [1], "v": ["A"], "p": ["x"]}),
            "t.id = s.id",
            source_alias="s",
            target_alias="t",
        )
        .when_matched_update_all()
        .execute()
    )
    DeltaTable(path).delete("p = 'x'")  # whole files removed: no change files
    source = build_rows(tmp_path, 1)
    source.open(None)
    mine = rows(drain(source))
    theirs = pa.table(DeltaTable(path).load_cdf(starting_version=0).read_all())
    theirs = theirs.cast(
        pa.schema(
            [
                pa.field(f.name, pa.string()) if f.type == pa.string_view() else f
                for f in theirs.schema
            ]
        )
    )

    def key(r: dict[str, object]) -> tuple[str, ...]:
        return tuple(str(r[k]) for k in ("_commit_version", "_change_type", "id", "v", "p"))

    assert sorted(mine, key=key) == sorted(theirs.to_pylist(), key=key)
    assert len(mine) == 8
