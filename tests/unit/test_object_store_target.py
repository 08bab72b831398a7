"""The object-store target on a local folder: formats, hive partitions, rolling,
and a flush that crashed before its manifest rolled back on restart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.orc as paorc
import pyarrow.parquet as pq
import pytest

from sluice.connectors import registry
from sluice.connectors.object_store.target import ObjectStoreTarget
from sluice.testing.harness import load_pipeline


def build(root: Path, **keys: Any) -> ObjectStoreTarget:
    spec = load_pipeline(
        {
            "pipeline_name": "p",
            "source_query": "t",
            "source": {"kind": "kafka", "bootstrap_servers": "x:1"},
            "target": {"kind": "object_store_local", "path": str(root), "prefix": "out", **keys},
        }
    )
    (target_spec,) = spec.all_targets
    t = registry.build_target(target_spec, registry.Context(spec), 0)
    assert isinstance(t, ObjectStoreTarget)
    return t


def files(root: Path) -> list[str]:
    return sorted(
        p.relative_to(root / "out").as_posix()
        for p in (root / "out").rglob("part-*")
        if p.is_file()
    )


ROWS = pa.table(
    {
        "id": pa.array([1, 2, 3, 4, 5], pa.int64()),
        "kind": ["a", "b", "a", None, "a"],
        "amount": [1.5, None, 2.25, 3.0, 4.0],
    }
)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "json_lines", "orc"])
def test_each_format_reads_back_exact(tmp_path: Path, fmt: str) -> None:
    t = build(tmp_path, format=fmt)
    t.open()
    t.write(ROWS)
    t.flush()
    (name,) = files(tmp_path)
    path = tmp_path / "out" / name
    if fmt == "parquet":
        back = pq.read_table(path)
    elif fmt == "csv":
        # an empty cell is a null string (written as csv_null_value, default "")
        back = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
    elif fmt == "orc":
        back = paorc.read_table(str(path))
    else:
        back = pajson.read_json(path)
    assert back.select(["id", "kind", "amount"]).to_pylist() == ROWS.to_pylist()


def test_hive_partitions_and_parquet_compression(tmp_path: Path) -> None:
    t = build(tmp_path, format="parquet", partition_by=["kind"], parquet_compression="zstd")
    t.open()
    t.write(ROWS)
    t.flush()
    assert files(tmp_path) == [
        "kind=__HIVE_DEFAULT_PARTITION__/part-p-000000000001-00002.parquet",
        "kind=a/part-p-000000000001-00000.parquet",
        "kind=b/part-p-000000000001-00001.parquet",
    ]
    meta = pq.ParquetFile(tmp_path / "out" / files(tmp_path)[1]).metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"
    import pyarrow.dataset as ds

    back = ds.dataset(tmp_path / "out", format="parquet", partitioning="hive").to_table()
    assert sorted(back.column("id").to_pylist()) == [1, 2, 3, 4, 5]


def test_csv_write_options(tmp_path: Path) -> None:
    t = build(tmp_path, format="csv", csv_delimiter=";", csv_header=False, csv_null_value="NA")
    t.open()
    t.write(ROWS)
    t.flush()
    (name,) = files(tmp_path)
    assert (tmp_path / "out" / name).read_text().splitlines()[:2] == ['1;"a";1.5', '2;"b";NA']


def test_files_roll_by_rows_and_bytes(tmp_path: Path) -> None:
    t = build(tmp_path, format="parquet", max_file_rows=2)
    t.open()
    t.write(ROWS)
    t.flush()
    assert len(files(tmp_path)) == 3
    big = pa.table({"id": list(range(1000)), "s": ["x" * 100] * 1000})
    t2 = build(tmp_path / "b", format="parquet", max_file_bytes=20_000)
    t2.open()
    t2.write(big)
    t2.flush()
    parts = files(tmp_path / "b")
    assert len(parts) >= 5
    assert sum(pq.read_table(tmp_path / "b" / "out" / p).num_rows for p in parts) == 1000


def test_a_flush_that_crashed_before_its_manifest_is_rolled_back_and_replayed_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = build(tmp_path, format="parquet", partition_by=["kind"])
    t.open()
    t.stage_positions({"s": {"s:0": 5}})
    t.write(ROWS)
    t.flush()
    real = t._put_bytes

    def crash_on_manifest(path: str, body: Any) -> None:
        if "/_sluice/" in path:
            raise SystemExit("killed before the manifest")
        real(path, body)

    monkeypatch.setattr(t, "_put_bytes", crash_on_manifest)
    t.stage_positions({"s": {"s:0": 8}})
    t.write(pa.table({"id": [6, 7], "kind": ["a", "c"], "amount": [1.0, 2.0]}))
    with pytest.raises(SystemExit):
        t.flush()
    crashed = files(tmp_path)
    assert "kind=c/part-p-000000000002-00001.parquet" in crashed  # written, not committed
    again = build(tmp_path, format="parquet", partition_by=["kind"])
    again.open()
    assert again.held_positions() == {"s": {"s:0": 5}}
    assert all("-000000000002-" not in f for f in files(tmp_path))  # rolled back
    # The replay writes the same rows under the same names.
    again.stage_positions({"s": {"s:0": 8}})
    again.write(pa.table({"id": [6, 7], "kind": ["a", "c"], "amount": [1.0, 2.0]}))
    again.flush()
    assert sorted(files(tmp_path)) == sorted(crashed)
    manifest = json.loads((tmp_path / "out" / "_sluice" / "p" / "000000000002.json").read_text())
    assert manifest["positions"] == {"s": {"s:0": 8}}


def test_flush_rows_rolls_several_batches_into_one_commit(tmp_path: Path) -> None:
    t = build(tmp_path, format="parquet", flush_rows=4, flush_interval_ms=3_600_000)
    t.open()
    for i in range(3):
        t.stage_positions({"s": {"s:0": 2 * (i + 1)}})
        t.write(pa.table({"id": [2 * i, 2 * i + 1]}))
        t.flush()
        assert t.deferred == (i != 1)  # the second flush made 4 rows: written
    assert files(tmp_path) == ["part-p-000000000001-00000.parquet"]
    assert pq.read_table(tmp_path / "out" / files(tmp_path)[0]).num_rows == 4
    t.commit_deferred(force=True)  # the run stops
    assert len(files(tmp_path)) == 2 and not t.deferred
    again = build(tmp_path, format="parquet")
    again.open()
    assert again.held_positions() == {"s": {"s:0": 6}}


TRICKY = pa.table(
    {
        "id": pa.array([1, 2, 3, 4, 5, None], pa.int64()),
        "text": ["it's", "a;b", "back\\slash", "line\nbreak", None, ""],
        "kind": pa.array(["N", "x", "'q'", "x", "y", "N"]).dictionary_encode(),
        "amount": [1.5, None, -2.25, 3.0, 1e20, 0.0],
    }
)


def _written(root: Path) -> bytes:
    (name,) = files(root)
    return (root / "out" / name).read_bytes()


def test_csv_quote_and_escape_round_trip_through_real_readers(tmp_path: Path) -> None:
    """The MySQL dialect of configs/object_store_target.toml: ';', quote ', escape \\, null \\N."""
    t = build(
        tmp_path,
        format="csv",
        csv_delimiter=";",
        csv_quote="'",
        csv_escape="\\",
        csv_null_value="\\N",
    )
    t.open()
    t.write(TRICKY)
    t.flush()
    body = _written(tmp_path)
    assert body.splitlines()[:2] == [b"'id';'text';'kind';'amount'", b"1;'it\\'s';'N';1.5"]
    # pyarrow's reader with the same dialect: exact rows and types (an
    # unquoted \N unescapes to N: it is the null marker, the quoted 'N' a string).
    back = pacsv.read_csv(
        tmp_path / "out" / files(tmp_path)[0],
        parse_options=pacsv.ParseOptions(
            delimiter=";",
            quote_char="'",
            escape_char="\\",
            double_quote=False,
            newlines_in_values=True,
        ),
        convert_options=pacsv.ConvertOptions(
            null_values=["N"],
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
            column_types={"id": pa.int64(), "amount": pa.float64()},
        ),
    )
    want = TRICKY.set_column(2, "kind", TRICKY["kind"].cast(pa.string()))
    assert back.to_pylist() == want.to_pylist()
    assert back.schema.field("amount").type == pa.float64()
    # Python's csv module with the same dialect: every cell's text.
    import csv
    import io

    rows = list(
        csv.reader(
            io.StringIO(body.decode(), newline=""),
            delimiter=";",
            quotechar="'",
            escapechar="\\",
            doublequote=False,
        )
    )
    assert rows[0] == ["id", "text", "kind", "amount"]
    assert [r[1] for r in rows[1:]] == ["it's", "a;b", "back\\slash", "line\nbreak", "N", ""]
    assert [r[2] for r in rows[1:]] == ["N", "x", "'q'", "x", "y", "N"]


def test_csv_quote_without_escape_doubles_the_quote(tmp_path: Path) -> None:
    t = build(tmp_path, format="csv", csv_quote="'", csv_null_value="NULL", csv_header=False)
    t.open()
    t.write(TRICKY)
    t.flush()
    body = _written(tmp_path)
    assert body.splitlines()[0] == b"1,'it''s','N',1.5"
    import csv
    import io

    rows = list(csv.reader(io.StringIO(body.decode(), newline=""), quotechar="'"))
    assert [r[1] for r in rows] == ["it's", "a;b", "back\\slash", "line\nbreak", "NULL", ""]
    back = pacsv.read_csv(
        io.BytesIO(body),
        read_options=pacsv.ReadOptions(column_names=["id", "text", "kind", "amount"]),
        parse_options=pacsv.ParseOptions(quote_char="'", newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(
            null_values=["NULL"], strings_can_be_null=True, quoted_strings_can_be_null=False
        ),
    )
    assert back["text"].to_pylist() == TRICKY["text"].to_pylist()
    assert back["id"].to_pylist() == TRICKY["id"].to_pylist()


def test_csv_written_with_quote_and_escape_is_read_back_by_the_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The target's dialect read by the object-store source with the matching read options."""
    monkeypatch.setenv("SLUICE_STATE_DIR", str(tmp_path / "state"))
    t = build(
        tmp_path,
        format="csv",
        csv_delimiter=";",
        csv_quote="'",
        csv_escape="\\",
        csv_null_value="\\N",
    )
    t.open()
    one_line = TRICKY.filter(pa.array([True, True, True, False, True, True]))
    t.write(one_line)
    t.flush()
    spec = load_pipeline(
        {
            "pipeline_name": "rb",
            "source_query": "out",
            "source": {
                "kind": "object_store_local",
                "path": str(tmp_path),
                "read_options": {
                    "csv": {
                        "delimiter": ";",
                        "quote": "'",
                        "escape": "\\",
                        "null_regex": "^(NA|\\\\N)$",
                    }
                },
            },
            "target": {"kind": "sqlite", "path": "unused.sqlite", "table": {"name": "t"}},
        }
    )
    (source_spec,) = spec.all_sources
    source = registry.build_source(source_spec, registry.Context(spec))
    source.open(None)
    got: list[dict[str, Any]] = []
    while (b := source.read(0.1)) is not None:
        assert not b.bad
        got.extend(b.data.drop_columns(["_event_ts"]).to_pylist())
    source.close()
    want = one_line.set_column(2, "kind", one_line["kind"].cast(pa.string()))
    assert got == want.to_pylist()


@pytest.mark.parametrize(
    ("keys", "where", "says"),
    [
        ({"csv_quote": ";", "csv_delimiter": ";"}, "csv_quote", "already the csv_delimiter"),
        ({"csv_escape": "'", "csv_quote": "'"}, "csv_escape", "already the csv_quote"),
        ({"csv_quote": "ab"}, "csv_quote", "one ASCII character"),
        ({"csv_delimiter": "\n"}, "csv_delimiter", "one ASCII character"),
        ({"csv_null_value": "a,b"}, "csv_null_value", "would split it"),
    ],
)
def test_unreadable_csv_write_options_are_refused_at_config_validation(
    keys: dict[str, str], where: str, says: str
) -> None:
    from sluice.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        load_pipeline(
            {
                "pipeline_name": "p",
                "source_query": "t",
                "source": {"kind": "kafka", "bootstrap_servers": "x:1"},
                "target": {"kind": "object_store_local", "path": "/tmp/x", "format": "csv", **keys},
            }
        )
    (problem,) = info.value.problems
    assert problem.path == f"target.{where}" and says in problem.message


def test_the_column_wise_csv_writer_renders_every_type_as_pyarrow_does() -> None:
    """With pyarrow's dialect, the writer used for other quotes / escapes
    writes byte for byte what pyarrow's CSV writer writes."""
    import datetime
    import decimal

    from sluice.connectors.object_store.encode import csv_bytes

    data = pa.table(
        {
            "ts": pa.array(
                [datetime.datetime(2020, 1, 1, 1, 2, 3, 456789), None], pa.timestamp("us", "UTC")
            ),
            "day": pa.array([datetime.date(2020, 1, 2), None]),
            "dec": pa.array([decimal.Decimal("1.50"), None], pa.decimal128(5, 2)),
            "flag": [True, None],
            "bin": pa.array([b"ab", None]),
            "large": pa.array(['say "hi"', None], pa.large_string()),
            "dict": pa.array(["a,b", None]).dictionary_encode(),
            "time": pa.array([datetime.time(1, 2, 3), None]),
            "f": [float("nan"), float("-inf")],
            "i8": pa.array([1, -2], pa.int8()),
        }
    )
    theirs = pa.BufferOutputStream()
    pacsv.write_csv(data, theirs)
    mine = csv_bytes(data, delimiter=",", quote='"', escape=None, null_value="", header=True)
    assert mine == theirs.getvalue().to_pybytes()
