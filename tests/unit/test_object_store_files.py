"""The object-store source over a local folder: streaming, positions, and every
bad input of issue 16 (reported with file and line, never skipped silently)."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.orc as paorc
import pyarrow.parquet as pq
import pytest

from sluice.connectors import registry
from sluice.connectors.api import Batch, Position
from sluice.connectors.object_store.source import FINISHED, ObjectStoreSource, state_root
from sluice.errors import ConnectorError
from sluice.testing.harness import load_pipeline

enc = msgspec.json.Encoder().encode


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(enc(r) + b"\n" for r in rows)


def ids(start: int, n: int) -> list[dict[str, Any]]:
    return [{"id": i, "name": f"n{i}"} for i in range(start, start + n)]


@pytest.fixture(autouse=True)
def _state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_STATE_DIR", str(tmp_path / "state"))


def build(root: Path, prefix: str = "in", name: str = "p", **keys: Any) -> ObjectStoreSource:
    spec = load_pipeline(
        {
            "pipeline_name": name,
            "source_query": prefix,
            "source": {"kind": "object_store_local", "path": str(root), **keys},
            "target": {"kind": "sqlite", "path": "unused.sqlite", "table": {"name": "t"}},
        }
    )
    (source_spec,) = spec.all_sources
    source = registry.build_source(source_spec, registry.Context(spec))
    assert isinstance(source, ObjectStoreSource)
    return source


def drain(source: ObjectStoreSource, commit: bool = True) -> list[Batch]:
    """Read until the source has nothing more; commit each batch."""
    out: list[Batch] = []
    while (b := source.read(0.1)) is not None:
        out.append(b)
        if commit:
            source.commit(b.ack)
    return out


def got_ids(batches: list[Batch]) -> list[int]:
    return [int(v) for b in batches if b.num_rows for v in b.data["id"].to_pylist()]


def bad(batches: list[Batch]) -> list[tuple[str, str, bytes | None]]:
    """(where, reason, raw payload) of every bad record."""
    out = []
    for b in batches:
        for i, why in b.bad:
            assert b.raw is not None
            out.append((b.raw.where(i), why, b.raw.record(i).payload))
    return out


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "files" / "in").mkdir(parents=True)
    return tmp_path / "files"


def test_a_file_streams_in_batches_bounded_by_bytes_and_rows(root: Path) -> None:
    (root / "in" / "a.jsonl").write_bytes(jsonl(ids(0, 5000)))
    source = build(root, max_batch_bytes=4096, max_batch_rows=300)
    source.open(None)
    batches = drain(source)
    assert got_ids(batches) == list(range(5000))
    assert max(b.num_rows for b in batches) <= 300
    assert len(batches) > 5000 * 20 // 4096  # many batches, none the whole file
    # the position is a byte offset; the last one is the file's size
    assert batches[-1].position == {"in/a.jsonl": (root / "in" / "a.jsonl").stat().st_size}


def test_a_restart_mid_file_resumes_mid_file(root: Path) -> None:
    (root / "in" / "a.jsonl").write_bytes(jsonl(ids(0, 1000)))
    source = build(root, max_batch_rows=100)
    source.open(None)
    first = [source.read(0.1) for _ in range(3)]
    for b in first:
        assert b is not None
        source.commit(b.ack)
    done = first[-1].position  # type: ignore[union-attr]
    assert done is not None and 0 < int(done["in/a.jsonl"]) < (root / "in/a.jsonl").stat().st_size
    source.read(0.1)  # read, never committed: read again after the restart
    source.close()
    again = build(root, max_batch_rows=100)
    again.open(None)
    assert got_ids(drain(again)) == list(range(300, 1000))


def test_resume_from_engine_positions_wins_over_the_own_file(root: Path) -> None:
    (root / "in" / "a.jsonl").write_bytes(jsonl(ids(0, 50)))
    source = build(root, max_batch_rows=10)
    source.open(None)
    drain(source)
    source.close()
    # a target holds the position after the first 10 rows: resume there
    offset = len(jsonl(ids(0, 10)))
    again = build(root, max_batch_rows=10)
    again.open({"in/a.jsonl": offset})
    assert got_ids(drain(again)) == list(range(10, 50))


def _own_positions(tmp_path: Path) -> set[str]:
    (own,) = (tmp_path / "state").rglob("*.json")
    return set(json.loads(own.read_text())["positions"])


def test_positions_are_kept_for_the_files_present_only_and_nothing_is_read_twice(
    root: Path, tmp_path: Path
) -> None:
    """Positions do not grow with every file ever read: a whole listing drops
    those of files gone; across restarts nothing finished is read again."""
    for i in range(20):
        (root / "in" / f"f{i:02d}.jsonl").write_bytes(jsonl(ids(i * 10, 10)))
    source = build(root)
    source.open(None)
    assert len(got_ids(drain(source))) == 200
    assert len(_own_positions(tmp_path)) == 20
    for i in range(18):  # processed files archived away: 2 remain
        (root / "in" / f"f{i:02d}.jsonl").unlink()
    (root / "in" / "g.jsonl").write_bytes(jsonl(ids(500, 3)))
    assert got_ids(drain(source)) == [500, 501, 502]
    assert _own_positions(tmp_path) == {"in/f18.jsonl", "in/f19.jsonl", "in/g.jsonl"}
    assert set(source._read) == _own_positions(tmp_path)  # and in memory
    source.close()

    # Restart from the own file: nothing read twice.
    again = build(root)
    again.open(None)
    assert drain(again) == []
    again.close()
    # Restart from a target's positions that still name every file ever read
    # (the engine keeps them): the gone ones are dropped, nothing read twice.
    held = {f"in/f{i:02d}.jsonl": FINISHED + len(jsonl(ids(i * 10, 10))) for i in range(20)}
    held["in/g.jsonl"] = len(jsonl(ids(500, 3)))
    third = build(root)
    third.open(held)
    assert drain(third) == []
    assert set(third._read) == {"in/f18.jsonl", "in/f19.jsonl", "in/g.jsonl"}
    # A file written again under a forgotten name is a new file: read.
    (root / "in" / "f00.jsonl").write_bytes(jsonl(ids(900, 2)))
    assert got_ids(drain(third)) == [900, 901]


def test_a_watched_folder_that_disappears_is_an_error_not_an_empty_listing(root: Path) -> None:
    (root / "in" / "a.jsonl").write_bytes(jsonl(ids(0, 2)))
    source = build(root)
    source.open(None)
    drain(source)
    (root / "in" / "a.jsonl").unlink()
    (root / "in").rmdir()
    with pytest.raises(ConnectorError, match="does not exist"):
        source.read(0.1)


def test_appended_lines_and_earlier_names_are_read(root: Path) -> None:
    path = root / "in" / "b.jsonl"
    path.write_bytes(jsonl(ids(0, 3)))
    source = build(root)
    source.open(None)
    assert got_ids(drain(source)) == [0, 1, 2]
    with path.open("ab") as fh:
        fh.write(jsonl(ids(3, 2)))
    (root / "in" / "a.jsonl").write_bytes(jsonl(ids(10, 2)))  # sorts before b.jsonl
    assert sorted(got_ids(drain(source))) == [3, 4, 10, 11]
    source.close()
    again = build(root)
    again.open(None)
    assert drain(again) == []  # all committed, nothing twice


def test_an_unterminated_line_of_a_growing_file_waits_for_its_end(root: Path) -> None:
    path = root / "in" / "a.jsonl"
    path.write_bytes(jsonl(ids(0, 2)))
    source = build(root)
    source.open(None)
    assert got_ids(drain(source)) == [0, 1]
    with path.open("ab") as fh:
        fh.write(b'{"id": 2, "na')
        fh.flush()
        # listed now with the partial line; the writer goes on before it is read
        source._poll()
        fh.write(b'me": "n2"}\n')
    assert got_ids(drain(source)) + got_ids(drain(source)) == [2]


def test_a_file_that_shrank_or_was_rewritten_is_reported(root: Path) -> None:
    text = root / "in" / "a.jsonl"
    text.write_bytes(jsonl(ids(0, 3)))
    table = root / "in" / "b.parquet"
    pq.write_table(pa.table({"id": [7, 8]}), table)
    source = build(root)
    source.open(None)
    assert sorted(got_ids(drain(source))) == [0, 1, 2, 7, 8]
    text.write_bytes(jsonl(ids(0, 1)))
    pq.write_table(pa.table({"id": [7, 8, 9]}), table)
    reports = bad(drain(source))
    assert len(reports) == 2
    assert all("changed after it was read" in why for _, why, _ in reports)
    assert drain(source) == []  # reported once


def test_format_from_extension_and_compression(root: Path) -> None:
    folder = root / "in"
    (folder / "a.jsonl.gz").write_bytes(gzip.compress(jsonl(ids(0, 3))))
    (folder / "b.ndjson").write_bytes(jsonl(ids(3, 2)))
    (folder / "c.csv").write_text("id,name\n5,n5\n6,n6\n")
    (folder / "d.csv.gz").write_bytes(gzip.compress(b"id,name\n7,n7\n"))
    pq.write_table(pa.table({"id": [8, 9], "name": ["n8", "n9"]}), folder / "e.parquet")
    paorc.write_table(pa.table({"id": [10], "name": ["n10"]}), str(folder / "f.orc"))
    (folder / "notes.txt").write_text("not data\n")  # no format: warned, not read
    (folder / ".g.jsonl").write_bytes(jsonl(ids(99, 1)))  # hidden: a file being written
    source = build(root)
    source.open(None)
    batches = drain(source)
    assert sorted(got_ids(batches)) == list(range(11))
    assert not bad(batches)
    positions: Position = {}
    for b in batches:
        positions.update(b.position or {})
    assert positions["in/a.jsonl.gz"] == FINISHED + (folder / "a.jsonl.gz").stat().st_size
    assert positions["in/e.parquet"] == FINISHED + (folder / "e.parquet").stat().st_size
    assert positions["in/c.csv"] == (folder / "c.csv").stat().st_size


def test_parquet_and_gzip_resume_mid_file_by_record(root: Path) -> None:
    folder = root / "in"
    pq.write_table(pa.table({"id": list(range(100))}), folder / "a.parquet", row_group_size=30)
    (folder / "b.jsonl.gz").write_bytes(gzip.compress(jsonl(ids(100, 100))))
    source = build(root, max_batch_rows=25)
    source.open(None)
    got = [source.read(0.1) for _ in range(2)]
    for b in got:
        assert b is not None
        source.commit(b.ack)
    assert got[-1] is not None and got[-1].position == {"in/a.parquet": 50}
    source.close()
    again = build(root, max_batch_rows=25)
    again.open(None)
    rest = drain(again)
    assert got_ids(rest) == list(range(50, 200))
    pos = {k: v for b in rest for k, v in (b.position or {}).items()}
    source = build(root, max_batch_rows=25)
    source.open({**pos, "in/b.jsonl.gz": len(jsonl(ids(100, 60)))})
    assert got_ids(drain(source)) == list(range(160, 200))


def test_csv_read_options(root: Path) -> None:
    (root / "in" / "a.csv").write_text(
        "# exported\nid;name;score\n1;a;NA\n# middle\n2;b;2.5\n3;c\n"
    )
    source = build(
        root,
        read_options={
            "csv": {
                "delimiter": ";",
                "comment": "#",
                "null_regex": "^(NA|)$",
                "truncated_rows_ok": True,
            }
        },
    )
    source.open(None)
    batches = drain(source)
    assert not bad(batches)
    rows = pa.concat_tables([b.data for b in batches if b.num_rows]).select(["id", "name", "score"])
    assert rows.to_pylist() == [
        {"id": 1, "name": "a", "score": None},
        {"id": 2, "name": "b", "score": 2.5},
        {"id": 3, "name": "c", "score": None},
    ]


@pytest.mark.parametrize("infer", [None, 3])
def test_schema_infer_max_records_limits_the_lines_types_come_from(
    root: Path, infer: int | None
) -> None:
    """With 3, the first 3 lines make code an integer column and "x" (line 5)
    a bad record; without, the whole first batch is seen: code is a string."""
    (root / "in" / "a.csv").write_text("id,code\n1,10\n2,20\n3,30\n4,x\n5,50\n")
    options = {} if infer is None else {"schema_infer_max_records": infer}
    source = build(root, read_options={"csv": options})
    source.open(None)
    batches = drain(source)
    data = pa.concat_tables([b.data for b in batches if b.num_rows])
    if infer is None:
        assert not bad(batches)
        assert data["code"].type == pa.string()
        assert data["code"].to_pylist() == ["10", "20", "30", "x", "50"]
    else:
        assert data["code"].type == pa.int64()
        assert data["id"].to_pylist() == [1, 2, 3, 5]
        ((where, _, payload),) = bad(batches)
        assert "a.csv line 5" in where and payload == b"4,x"


def test_schema_infer_max_records_for_json_lines_keeps_lines_and_rows_aligned(
    root: Path,
) -> None:
    (root / "in" / "a.jsonl").write_bytes(
        b'{"id": 1, "v": 1}\n{"id": 2, "v": 2}\nnot json\n{"id": 4, "v": 2.5, "w": "n"}\n'
    )
    source = build(root, read_options={"json": {"schema_infer_max_records": 2}})
    source.open(None)
    batches = drain(source)
    data = pa.concat_tables([b.data for b in batches if b.num_rows])
    assert data.select(["id", "v", "w"]).to_pylist() == [
        {"id": 1, "v": 1.0, "w": None},
        {"id": 2, "v": 2.0, "w": None},
        {"id": 4, "v": 2.5, "w": "n"},
    ]
    ((where, _, payload),) = bad(batches)
    assert "a.jsonl line 3" in where and payload == b"not json"


def test_csv_without_header(root: Path) -> None:
    (root / "in" / "a.csv").write_text("1,a\n2,b\n")
    source = build(root, read_options={"csv": {"has_header": False}})
    source.open(None)
    data = pa.concat_tables([b.data for b in drain(source) if b.num_rows])
    assert data["f0"].to_pylist() == [1, 2]


# -- bad input: each case of issue 16 ---------------------------------------------------------


def test_a_malformed_line_is_one_bad_record_naming_file_and_line(root: Path) -> None:
    (root / "in" / "a.jsonl").write_bytes(
        jsonl(ids(0, 3)) + b'{"id": 3, "name": \n' + jsonl(ids(4, 2))
    )
    source = build(root)
    source.open(None)
    batches = drain(source)
    assert got_ids(batches) == [0, 1, 2, 4, 5]
    ((where, why, raw),) = bad(batches)
    assert raw == b'{"id": 3, "name": '
    assert "in/a.jsonl line 4 (byte " in where
    assert why.startswith("line 4: invalid JSON")
    (b,) = [b for b in batches if b.bad]
    assert b.raw is not None
    record = b.raw.record(b.bad[0][0])
    assert record.partition == "in/a.jsonl"
    assert record.offset == len(jsonl(ids(0, 3)))  # its byte offset: the position unit


def test_line_numbers_are_right_after_a_resume_mid_file(root: Path) -> None:
    good = jsonl(ids(0, 10))
    (root / "in" / "a.jsonl").write_bytes(good + b"42\n")
    source = build(root)
    source.open({"in/a.jsonl": len(jsonl(ids(0, 4)))})
    ((where, why, raw),) = bad(drain(source))
    assert "line 11" in where and why.startswith("line 11: expected a JSON object")
    assert raw == b"42"


def test_an_empty_file_reads_as_no_rows(root: Path) -> None:
    (root / "in" / "a.jsonl").write_bytes(b"")
    (root / "in" / "b.csv").write_bytes(b"")
    (root / "in" / "c.jsonl").write_bytes(jsonl(ids(0, 1)))
    source = build(root)
    source.open(None)
    batches = drain(source)
    assert got_ids(batches) == [0] and not bad(batches)


def test_an_empty_or_corrupt_parquet_file_is_reported(root: Path) -> None:
    (root / "in" / "a.parquet").write_bytes(b"")
    (root / "in" / "b.parquet").write_bytes(b"PAR1 not really")
    source = build(root)
    source.open(None)
    reports = bad(drain(source))
    assert [w.split(" (")[0] for w, _, _ in reports] == [
        f"file {(root / 'in' / 'a.parquet').as_uri()}",
        f"file {(root / 'in' / 'b.parquet').as_uri()}",
    ]
    assert all(why.startswith("cannot read") for _, why, _ in reports)


def test_a_bare_value_is_a_bad_record(root: Path) -> None:
    (root / "in" / "a.jsonl").write_bytes(b"42\n" + jsonl(ids(0, 1)))
    source = build(root)
    source.open(None)
    batches = drain(source)
    assert got_ids(batches) == [0]
    ((_, why, raw),) = bad(batches)
    assert raw == b"42" and "expected a JSON object" in why


def test_a_10_mb_line_is_read_and_a_longer_than_allowed_one_is_reported(root: Path) -> None:
    big = enc({"id": 1, "name": "x" * (10 << 20)})
    (root / "in" / "a.jsonl").write_bytes(jsonl(ids(0, 1)) + big + b"\n" + jsonl(ids(2, 1)))
    source = build(root, max_batch_bytes=1 << 20)
    source.open(None)
    batches = drain(source)
    assert got_ids(batches) == [0, 1, 2] and not bad(batches)

    (root / "in" / "b.jsonl").write_bytes(jsonl(ids(3, 1)) + big + b"\n" + jsonl(ids(5, 1)))
    small = build(root, name="q", max_batch_bytes=1 << 20, max_record_bytes=4 << 20)
    small.open({"in/a.jsonl": (root / "in" / "a.jsonl").stat().st_size})
    batches = drain(small)
    assert got_ids(batches) == [3, 5]
    ((where, why, raw),) = bad(batches)
    assert "in/b.jsonl line 2" in where and "longer than" in why
    assert raw is not None and len(raw) == 64 << 10


def test_a_field_that_changes_type_across_files_is_a_bad_record(root: Path) -> None:
    (root / "in" / "a.jsonl").write_bytes(enc({"id": 1, "amount": 2.5}) + b"\n")
    (root / "in" / "b.jsonl").write_bytes(
        enc({"id": 2, "amount": "lots"}) + b"\n" + enc({"id": 3, "amount": 4}) + b"\n"
    )
    (root / "in" / "c.csv").write_text("id,amount\n4,1.5\n")
    (root / "in" / "d.csv").write_text("id,amount\n5,many\n6,2\n")
    source = build(root)
    source.open(None)
    batches = drain(source)
    assert sorted(got_ids(batches)) == [1, 3, 4, 6]
    reports = bad(batches)
    assert [(w.split(" (")[0].rsplit("/", 1)[1], why.split(":")[0]) for w, why, _ in reports] == [
        ("b.jsonl line 1", "line 1"),
        ("d.csv line 2", "line 2"),
    ]
    for b in batches:
        if b.num_rows and "amount" in b.data.column_names:
            assert b.data.schema.field("amount").type == pa.float64()


def test_a_parquet_column_of_another_type_is_reported(root: Path) -> None:
    pq.write_table(pa.table({"id": [1], "amount": [2.5]}), root / "in" / "a.parquet")
    pq.write_table(pa.table({"id": [2], "amount": ["lots"]}), root / "in" / "b.parquet")
    pq.write_table(pa.table({"id": [3], "amount": [4]}), root / "in" / "c.parquet")
    source = build(root)
    source.open(None)
    batches = drain(source)
    assert sorted(got_ids(batches)) == [1, 3]
    ((where, why, _),) = bad(batches)
    assert "b.parquet" in where and "'amount' is string" in why


def test_a_missing_folder_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    source = build(Path("relative/root"))
    with pytest.raises(ConnectorError, match=r"does not exist.*working directory"):
        source.open(None)


def test_positions_live_in_an_absolute_state_dir_not_the_working_directory(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (root / "in" / "a.jsonl").write_bytes(jsonl(ids(0, 2)))
    for cwd in ("one", "two"):  # the same pipeline started from two folders
        (tmp_path / cwd).mkdir()
        monkeypatch.chdir(tmp_path / cwd)
        source = build(root)
        source.open(None)
        got = got_ids(drain(source))
        assert got == ([0, 1] if cwd == "one" else [])
        source.close()
        assert not any((tmp_path / cwd).iterdir())
    assert list((tmp_path / "state" / "p").glob("in-*.json"))


def test_a_test_run_keeps_source_positions_out_of_the_home_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """tests/conftest.py points XDG_STATE_HOME at the session's temporary folder."""
    monkeypatch.delenv("SLUICE_STATE_DIR")
    assert not state_root(None).is_relative_to(Path.home())
    assert state_root(None) == Path(os.environ["XDG_STATE_HOME"]) / "sluice"


def test_the_state_dir_default_is_absolute(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SLUICE_STATE_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert state_root(None) == tmp_path / "xdg" / "sluice"
    monkeypatch.setenv("SLUICE_STATE_DIR", "rel")
    assert state_root(None) == Path(os.getcwd()) / "rel"
    with pytest.raises(ConnectorError, match="absolute"):
        state_root("rel")


def test_csv_resumed_mid_file_keeps_its_header(root: Path) -> None:
    head = "# made by hand\nid,name\n"
    body = "".join(f"{i},n{i}\n" for i in range(20))
    (root / "in" / "a.csv").write_text(head + body)
    offset = len(head) + len("".join(f"{i},n{i}\n" for i in range(12)))
    source = build(root, read_options={"csv": {"comment": "#"}})
    source.open({"in/a.csv": offset})
    batches = drain(source)
    assert got_ids(batches) == list(range(12, 20))
    assert batches[0].data.column_names[:2] == ["id", "name"]
