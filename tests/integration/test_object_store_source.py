"""The object-store source against moto S3 and inside real `flow consume` runs:
S3 listing, on_error per record, a SIGKILL mid-file, memory bounded by the batch."""

from __future__ import annotations

import json
import random
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tests import endpoints
from tests.integration.conftest import Flow, kill_after_reading, unique

from sluice.connectors import registry
from sluice.connectors.api import Batch
from sluice.connectors.object_store.source import ObjectStoreSource
from sluice.errors import ConnectorError
from sluice.testing.harness import load_pipeline

pytestmark = pytest.mark.integration

enc = msgspec.json.Encoder().encode


def jsonl(start: int, n: int) -> bytes:
    return b"".join(enc({"id": i, "name": f"n{i}"}) + b"\n" for i in range(start, start + n))


@pytest.fixture(scope="module")
def s3() -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoints.AWS_ENDPOINT,
        aws_access_key_id=endpoints.AWS_ACCESS_KEY_ID,
        aws_secret_access_key=endpoints.AWS_SECRET_ACCESS_KEY,
        region_name=endpoints.AWS_REGION,
    )


@pytest.fixture(scope="module")
def bucket(s3: Any) -> str:
    name = unique("lake").replace("_", "-")
    s3.create_bucket(Bucket=name)
    return name


S3_KEYS = {
    "kind": "object_store_s3",
    "endpoint": endpoints.AWS_ENDPOINT,
    "region": endpoints.AWS_REGION,
    "access_key_id": endpoints.AWS_ACCESS_KEY_ID,
    "secret_access_key": endpoints.AWS_SECRET_ACCESS_KEY,
}


def s3_source(bucket: str, prefix: str, tmp_path: Path, **keys: Any) -> ObjectStoreSource:
    spec = load_pipeline(
        {
            "pipeline_name": "p",
            "source_query": prefix,
            "source": {**S3_KEYS, "bucket": bucket, "state_dir": str(tmp_path / "st"), **keys},
            "target": {"kind": "sqlite", "path": "unused.sqlite", "table": {"name": "t"}},
        }
    )
    (source_spec,) = spec.all_sources
    source = registry.build_source(source_spec, registry.Context(spec))
    assert isinstance(source, ObjectStoreSource)
    return source


def drain(source: ObjectStoreSource) -> list[Batch]:
    out: list[Batch] = []
    while (b := source.read(0.1)) is not None:
        out.append(b)
        source.commit(b.ack)
    return out


def got_ids(batches: list[Batch]) -> list[int]:
    return [int(v) for b in batches if b.num_rows for v in b.data["id"].to_pylist()]


def test_s3_lists_after_the_last_key_and_finds_earlier_names_at_the_rescan(
    s3: Any, bucket: str, tmp_path: Path
) -> None:
    prefix = unique("in") + "/"
    s3.put_object(Bucket=bucket, Key=f"{prefix}b.jsonl", Body=jsonl(0, 2))
    source = s3_source(bucket, prefix, tmp_path, rescan_interval_ms=3_600_000)
    calls: list[str | None] = []
    real = source.store.list

    def spy(p: str, after: str | None) -> Any:
        calls.append(after)
        return real(p, after)

    source.store.list = spy  # type: ignore[method-assign]
    source.open(None)
    assert got_ids(drain(source)) == [0, 1]
    s3.put_object(Bucket=bucket, Key=f"{prefix}c.jsonl", Body=jsonl(2, 1))
    s3.put_object(Bucket=bucket, Key=f"{prefix}a.jsonl", Body=jsonl(10, 1))  # earlier name
    assert got_ids(drain(source)) == [2]
    assert calls[0] is None and calls[-1] == f"{prefix}c.jsonl"  # StartAfter, no re-list
    listed = len(calls)
    source._full_at = -1.0  # the rescan is due (as after rescan_interval_ms)
    assert got_ids(drain(source)) == [10]
    assert calls[listed] is None  # the whole prefix, once
    # Deleted objects: an incremental listing keeps their positions, the
    # next whole listing drops them.
    s3.delete_object(Bucket=bucket, Key=f"{prefix}b.jsonl")
    assert drain(source) == []
    assert f"{prefix}b.jsonl" in source._read
    source._full_at = -1.0
    assert drain(source) == []
    assert set(source._read) == {f"{prefix}a.jsonl", f"{prefix}c.jsonl"}
    source.close()
    # Across a restart: nothing twice, a new object once.
    again = s3_source(bucket, prefix, tmp_path, rescan_interval_ms=3_600_000)
    again.open(None)
    assert drain(again) == []
    s3.put_object(Bucket=bucket, Key=f"{prefix}d.jsonl", Body=jsonl(20, 2))
    assert got_ids(drain(again)) == [20, 21]
    again.close()


def test_s3_resumes_a_parquet_object_mid_file(s3: Any, bucket: str, tmp_path: Path) -> None:
    prefix = unique("in") + "/"
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"id": list(range(100))}), buf, row_group_size=40)
    s3.put_object(Bucket=bucket, Key=f"{prefix}a.parquet", Body=buf.getvalue().to_pybytes())
    source = s3_source(bucket, prefix, tmp_path, max_batch_rows=30)
    source.open(None)
    first = source.read(0.1)
    assert first is not None and first.position == {f"{prefix}a.parquet": 30}
    source.commit(first.ack)
    source.close()
    again = s3_source(bucket, prefix, tmp_path, max_batch_rows=30)
    again.open(None)
    assert got_ids(drain(again)) == list(range(30, 100))


def test_a_missing_bucket_is_an_error(tmp_path: Path) -> None:
    source = s3_source(unique("nope").replace("_", "-"), "in/", tmp_path)
    with pytest.raises(ConnectorError, match=r"bucket .* does not exist"):
        source.open(None)


# -- real `flow consume` runs ----------------------------------------------------------


def files_sqlite(folder: Path, db: Path, *, on_error: str = "fail", extra: str = "") -> str:
    return textwrap.dedent(
        f"""
        pipeline_name = "files"
        source_query = "in"
        idle_pause_ms = 50
        {extra}

        [source]
        kind = "object_store_local"
        path = "{folder}"
        max_batch_rows = 2000

        [transform]
        on_error = "{on_error}"

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


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "files" / "in").mkdir(parents=True)
    (tmp_path / "files" / "in" / "a.jsonl").write_bytes(
        jsonl(0, 3) + b'{"id": 3, "name": \n' + jsonl(4, 2)
    )
    (tmp_path / "files" / "in" / "b.jsonl").write_bytes(
        enc({"id": 6, "name": 7}) + b"\n" + jsonl(7, 1)  # name changes type
    )
    return tmp_path / "files"


def test_on_error_fail_names_file_and_line(
    folder: Path, tmp_path: Path, flow: Callable[..., Flow]
) -> None:
    f = flow(files_sqlite(folder, tmp_path / "o.db"), "--stop-after-idle-ms", "300")
    assert f.proc.wait(timeout=60) == 1
    assert f"in/a.jsonl line 4 (byte {len(jsonl(0, 3))})" in f.output(), f.output()


def test_flow_consume_of_a_missing_folder_fails_naming_it(
    tmp_path: Path, flow: Callable[..., Flow]
) -> None:
    missing = tmp_path / "nowhere"
    f = flow(files_sqlite(missing, tmp_path / "o.db"), "--stop-after-idle-ms", "300")
    assert f.proc.wait(timeout=60) != 0, f.output()
    assert f"folder {missing / 'in'} does not exist" in f.output(), f.output()


def test_on_error_drop_counts_and_goes_on(
    folder: Path, tmp_path: Path, flow: Callable[..., Flow]
) -> None:
    f = flow(
        files_sqlite(folder, tmp_path / "o.db", on_error="drop"), "--stop-after-idle-ms", "300"
    )
    assert f.proc.wait(timeout=60) == 0, f.output()
    assert ids_in(tmp_path / "o.db") == [0, 1, 2, 4, 5, 7]
    assert "dropped 1 undecodable" in f.output()


def test_on_error_dlq_keeps_file_line_and_raw_bytes(
    folder: Path, tmp_path: Path, flow: Callable[..., Flow]
) -> None:
    dlq = tmp_path / "dead.jsonl"
    f = flow(
        files_sqlite(folder, tmp_path / "o.db", on_error="dlq", extra=f'dlq_store = "{dlq}"'),
        "--stop-after-idle-ms",
        "300",
    )
    assert f.proc.wait(timeout=60) == 0, f.output()
    assert ids_in(tmp_path / "o.db") == [0, 1, 2, 4, 5, 7]
    letters = [json.loads(line) for line in dlq.read_text().splitlines()]
    assert [(d["partition"], d["offset"], d["payload"]) for d in letters] == [
        ("in/a.jsonl", len(jsonl(0, 3)), '{"id": 3, "name": '),
        ("in/b.jsonl", 0, '{"id":6,"name":7}'),
    ]
    assert letters[0]["error"].startswith("line 4: invalid JSON")
    assert letters[1]["error"].startswith("line 1: value does not fit")


def test_a_sigkill_mid_file_resumes_mid_file_with_every_row_once(
    tmp_path: Path, flow: Callable[..., Flow]
) -> None:
    n = 60_000
    folder = tmp_path / "files"
    (folder / "in").mkdir(parents=True)
    (folder / "in" / "big.jsonl").write_bytes(jsonl(0, n))
    db = tmp_path / "o.db"
    config = files_sqlite(folder, db)
    f = flow(config)
    kill_after_reading(f, 10_000, random.uniform(0, 0.2))
    with sqlite3.connect(db) as c:
        ((pos,),) = c.execute("SELECT position_int FROM _sluice_positions").fetchall()
    assert 0 < pos < (folder / "in" / "big.jsonl").stat().st_size  # mid-file
    again = flow(config, "--stop-after-idle-ms", "300")
    assert again.proc.wait(timeout=120) == 0, again.output()
    assert ids_in(db) == list(range(n))


MEMORY_PROBE = """
import sys
from sluice.connectors import registry
from sluice.testing.harness import load_pipeline
spec = load_pipeline({"pipeline_name": "m", "source_query": "in",
    "source": {"kind": "object_store_local", "path": sys.argv[1], "max_batch_rows": 20000,
               "max_batch_bytes": 2097152},
    "target": {"kind": "sqlite", "path": "unused.sqlite", "table": {"name": "t"}}})
(s,) = spec.all_sources
src = registry.build_source(s, registry.Context(spec))
src.open(None)
rows = 0
while (b := src.read(0.1)) is not None:
    rows += b.num_rows
# VmHWM, not ru_maxrss: the latter keeps the parent's peak across fork + exec
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print(rows, int(hwm) // 1024)
"""


def test_memory_is_bounded_by_the_batch_not_the_file(tmp_path: Path) -> None:
    """Peak RSS reading a 64 MB file is within a few MB of reading a 4 MB one."""
    line = enc({"id": 0, "name": "x" * 100, "amount": 1.5}) + b"\n"
    peaks = []
    for mb in (4, 64):
        folder = tmp_path / f"f{mb}"
        (folder / "in").mkdir(parents=True)
        count = (mb << 20) // len(line)
        with (folder / "in" / "a.jsonl").open("wb") as fh:
            for _ in range(count // 1000):
                fh.write(line * 1000)
        count = count // 1000 * 1000
        done = subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE, str(folder)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
            env={"SLUICE_STATE_DIR": str(tmp_path / "st"), **_env()},
        )
        rows, peak = map(int, done.stdout.split())
        assert rows == count
        peaks.append(peak)
    assert peaks[1] - peaks[0] < 30, f"peak RSS {peaks} MB for 4 MB and 64 MB files"


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "SLUICE_STATE_DIR"}


def _consume_peak_rss(tmp_path: Path, size: int) -> tuple[int, int]:
    """`flow consume` of a JSON-lines file of about ``size`` bytes into Parquet
    files: (rows written, peak RSS in MB of the process)."""
    import os
    import time

    folder = tmp_path / "files"
    (folder / "in").mkdir(parents=True)
    line = enc({"id": 0, "name": "x" * 100, "amount": 1.5}) + b"\n"
    block = line * 10_000
    blocks = max(1, size // len(block))
    with (folder / "in" / "big.jsonl").open("wb") as fh:
        for _ in range(blocks):
            fh.write(block)
    config = tmp_path / "p.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            pipeline_name = "big"
            source_query = "in"
            [source]
            kind = "object_store_local"
            path = "{folder}"
            [target]
            kind = "object_store_local"
            path = "{tmp_path / "out"}"
            format = "parquet"
            """
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "sluice", "consume", str(config), "--stop-after-idle-ms", "300"],
        env={**_env(), "SLUICE_STATE_DIR": str(tmp_path / "st")},
    )
    peak_kb = 0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as status:
                for row in status:
                    if row.startswith("VmHWM:"):
                        peak_kb = max(peak_kb, int(row.split()[1]))
        except FileNotFoundError:
            break
        time.sleep(0.05)
    assert proc.wait() == 0
    assert os.path.exists(tmp_path / "out" / "_sluice" / "big")
    written = sum(pq.ParquetFile(p).metadata.num_rows for p in (tmp_path / "out").glob("*.parquet"))
    assert written == blocks * 10_000
    return written, peak_kb // 1024


def test_flow_consume_peak_rss_does_not_grow_with_the_file(tmp_path: Path) -> None:
    """The default-run stand-in for the 1 GB run: the whole pipeline (source,
    engine, Parquet target) peaks at about the same RSS for a 48 MB and a
    192 MB file (past the first few batches RSS is flat; a file held whole
    would add well over 144 MB), and under 300 MB."""
    small = _consume_peak_rss(tmp_path / "small", 48 << 20)
    large = _consume_peak_rss(tmp_path / "large", 192 << 20)
    assert large[0] == 4 * small[0]
    assert large[1] < 300, f"peak RSS {large[1]} MB for a 192 MB file"
    assert large[1] - small[1] < 70, f"peak RSS {small[1]} MB (48 MB file), {large[1]} MB (192 MB)"


@pytest.mark.slow
def test_a_1_gb_file_streams_through_flow_consume_under_300_mb(tmp_path: Path) -> None:
    """`flow consume` of a 1 GB JSON-lines file into Parquet files: peak RSS < 300 MB."""
    written, peak = _consume_peak_rss(tmp_path, 1 << 30)
    assert peak < 300, f"peak RSS {peak} MB"
    print(f"1 GB file: {written} rows, peak RSS {peak} MB")
