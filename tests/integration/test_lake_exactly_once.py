"""Kafka → Delta exactly once under real `flow consume` processes SIGKILLed:
right after a Delta commit and before the broker commit (a test hook), and
at random points; then delta_s3 on moto, and 200k rows read back exact with
their types and partitions."""

from __future__ import annotations

import collections
import json
import random
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable
from tests import endpoints
from tests.integration.conftest import (
    Flow,
    committed,
    events,
    produce,
    unique,
    wait_until,
)

from sluice.connectors.delta.target import app_id

pytestmark = pytest.mark.integration

PARTITIONS = 3


def config(topic: str, name: str, target: str, batch_rows: int = 500) -> str:
    return f"""
pipeline_name = "{name}"
source_query = "{topic}"
idle_pause_ms = 100

[source]
kind = "kafka"
bootstrap_servers = "{endpoints.KAFKA_BOOTSTRAP}"
group_id = "{name}"
session_timeout_ms = 2000
max_batch_rows = {batch_rows}

{target}
"""


def run_to_the_end(flow: Callable[..., Flow], toml: str, done: Callable[[], bool]) -> None:
    """Run until ``done()`` (the target's positions are past every row), then
    SIGTERM. Not --stop-after-idle-ms: after a kill the group waits out the
    dead member's session, and a partition assigned late must not be cut
    off. Not the broker's commits: a partition whose rows all reached the
    target before a kill has nothing left to read, so its broker commit stays
    behind (the target's positions are the ones that count)."""
    f = flow(toml)
    wait_until(lambda: f.proc.poll() is not None or done(), 120, "the target to hold every row")
    assert f.stop() == 0, f.output()


def delta_held(uri: str, name: str, topic: str, options: dict[str, str] | None = None) -> int:
    """The sum of the positions a Delta table holds for ``name`` on ``topic``."""
    try:
        table = DeltaTable(uri, storage_options=options)
    except Exception:  # not created yet
        return 0
    return sum(
        table.transaction_version(app_id(name, topic, f"{topic}:{p}")) or 0
        for p in range(PARTITIONS)
    )


def files_held(folder: Path, name: str) -> int:
    """The sum of the positions in a file target's newest manifest."""
    manifests = sorted((folder / "_sluice" / name).glob("*.json"))
    if not manifests:
        return 0
    positions = json.loads(manifests[-1].read_text())["positions"]
    return sum(int(v) for parts in positions.values() for v in parts.values())


def local_target(path: Path, extra: str = "") -> str:
    return f"""
[target]
kind = "delta_local"
path = "{path}"
{extra}
"""


def delta_ids(path: str, options: dict[str, str] | None = None) -> collections.Counter[int]:
    table = pa.table(DeltaTable(path, storage_options=options).scan())
    return collections.Counter(int(i) for i in table["id"].to_pylist())


def test_kafka_to_delta_killed_between_the_delta_and_the_broker_commit_and_at_random(
    kafka_topic: Callable[..., str],
    flow: Callable[..., Flow],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topic = kafka_topic(PARTITIONS, "deo")
    name = unique("deo")
    path = tmp_path / "delta"
    # flush_rows: a Delta commit per two batches of 500; the broker commit waits for it
    toml = config(topic, name, local_target(path, "flush_rows = 1000\nflush_interval_ms = 1000"))
    n = 6000
    produce(topic, events(n))

    # 1. The process kills itself right after its 3rd Delta commit, before
    #    the broker commit of that round (SLUICE_TEST_KILL_AFTER_DELTA_COMMITS).
    monkeypatch.setenv("SLUICE_TEST_KILL_AFTER_DELTA_COMMITS", "3")
    f = flow(toml)
    assert f.proc.wait(timeout=60) == -9, f.output()
    monkeypatch.delenv("SLUICE_TEST_KILL_AFTER_DELTA_COMMITS")
    in_delta = delta_held(str(path), name, topic)
    assert sum(delta_ids(str(path)).values()) == in_delta  # positions and rows agree
    assert committed(name, topic, PARTITIONS) < in_delta  # the broker is behind: the gap

    # 2. Random kills mid-stream.
    rng = random.Random(16)
    for kill in range(1):
        produce(topic, events(2000, n))
        n += 2000
        f = flow(toml)
        upto = rng.randint(1, 1500)
        wait_until(
            lambda f=f, t=upto: (
                f.proc.poll() is not None or f.metric("sluice_rows_written_total") >= t
            ),
            60,
            f"run {kill + 1} to write {upto} rows",
            0.01,
        )
        assert f.proc.poll() is None, f.output()
        f.kill()

    # 3. To the end.
    run_to_the_end(flow, toml, lambda: delta_held(str(path), name, topic) == n)
    got = delta_ids(str(path))
    doubled = sorted(i for i, c in got.items() if c > 1)
    assert not doubled, f"ids written twice: {doubled[:20]}"
    assert sorted(got) == list(range(n))
    assert delta_held(str(path), name, topic) == n
    writes = [h for h in DeltaTable(str(path)).history() if h["operation"] == "WRITE"]
    assert len(writes) <= n // 1000 + 6  # about one commit per 1000 rows, not per batch


S3_OPTIONS = {
    "AWS_ENDPOINT_URL": endpoints.AWS_ENDPOINT,
    "AWS_ACCESS_KEY_ID": endpoints.AWS_ACCESS_KEY_ID,
    "AWS_SECRET_ACCESS_KEY": endpoints.AWS_SECRET_ACCESS_KEY,
    "AWS_REGION": endpoints.AWS_REGION,
    "AWS_ALLOW_HTTP": "true",
}


@pytest.fixture(scope="module")
def bucket() -> str:
    import boto3

    name = unique("delta").replace("_", "-")
    boto3.client(
        "s3",
        endpoint_url=endpoints.AWS_ENDPOINT,
        aws_access_key_id=endpoints.AWS_ACCESS_KEY_ID,
        aws_secret_access_key=endpoints.AWS_SECRET_ACCESS_KEY,
        region_name=endpoints.AWS_REGION,
    ).create_bucket(Bucket=name)
    return name


def test_delta_s3_merge_with_partitions_exactly_once_after_a_kill(
    kafka_topic: Callable[..., str],
    flow: Callable[..., Flow],
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topic = kafka_topic(PARTITIONS, "ds3")
    name = unique("ds3")
    target = f"""
[target]
kind = "delta_s3"
bucket = "{bucket}"
prefix = "{name}"
endpoint = "{endpoints.AWS_ENDPOINT}"
region = "{endpoints.AWS_REGION}"
access_key_id = "{endpoints.AWS_ACCESS_KEY_ID}"
secret_access_key = "{endpoints.AWS_SECRET_ACCESS_KEY}"
mode = "merge"
partition_by = ["event_type"]

[target.table]
primary_key = ["id"]
"""
    toml = config(topic, name, target)
    produce(topic, events(3000))
    monkeypatch.setenv("SLUICE_TEST_KILL_AFTER_DELTA_COMMITS", "2")
    f = flow(toml)
    assert f.proc.wait(timeout=60) == -9, f.output()
    monkeypatch.delenv("SLUICE_TEST_KILL_AFTER_DELTA_COMMITS")
    uri = f"s3://{bucket}/{name}"
    run_to_the_end(flow, toml, lambda: delta_held(uri, name, topic, S3_OPTIONS) == 3000)
    table = DeltaTable(uri, storage_options=S3_OPTIONS)
    assert table.metadata().partition_columns == ["event_type"]
    got = delta_ids(uri, S3_OPTIONS)
    assert sorted(got) == list(range(3000)) and max(got.values()) == 1


def test_200k_rows_read_back_exact_with_types_and_partitions(
    kafka_topic: Callable[..., str], flow: Callable[..., Flow], tmp_path: Path
) -> None:
    """One run, two targets: Delta and Parquet files, both partitioned by event_type."""
    topic = kafka_topic(PARTITIONS, "d200")
    name = unique("d200")
    path = tmp_path / "delta"
    folder = tmp_path / "files"
    n = 200_000
    produce(topic, events(n))
    targets = f"""
[[targets]]
kind = "delta_local"
path = "{path}"
partition_by = ["event_type"]

[[targets]]
kind = "object_store_local"
path = "{folder}"
format = "parquet"
partition_by = ["event_type"]
"""
    toml = config(topic, name, targets, batch_rows=50_000)
    run_to_the_end(
        flow,
        toml,
        lambda: delta_held(str(path), name, topic) == n and files_held(folder, name) == n,
    )
    table = DeltaTable(str(path))
    assert table.metadata().partition_columns == ["event_type"]
    delta = pa.table(table.scan())
    import pyarrow.dataset as ds

    files = ds.dataset(folder, format="parquet", partitioning="hive").to_table()
    kinds = ("click", "view", "purchase")
    for data in (delta, files):
        data = data.cast(
            pa.schema(
                pa.field(f.name, pa.string())
                if f.type in (pa.string_view(), pa.large_string())
                else f
                for f in data.schema
            )
        ).sort_by("id")
        assert data.num_rows == n
        schema = data.schema
        assert schema.field("id").type == pa.int64()
        assert schema.field("user_id").type == pa.int64()
        assert schema.field("amount").type == pa.float64()
        assert schema.field("_event_ts").type == pa.timestamp("us", tz="UTC")
        assert data["id"].to_pylist() == list(range(n))
        assert data["event_type"].to_pylist() == [kinds[i % 3] for i in range(n)]
        assert data["amount"].to_pylist() == [(i % 1000) / 4 for i in range(n)]
        assert data["note"].to_pylist() == [f"n{i}" for i in range(n)]
    actions = pa.table(table.get_add_actions(flatten=True)).to_pylist()
    assert {a["partition.event_type"] for a in actions} == set(kinds)
    assert all(f"event_type={a['partition.event_type']}/" in a["path"] for a in actions)
    assert {p.parent.name for p in folder.rglob("part-*.parquet")} == {
        f"event_type={k}" for k in kinds
    }


def parquet_ids(folder: Path) -> collections.Counter[int]:
    import pyarrow.parquet as pq

    out: collections.Counter[int] = collections.Counter()
    for path in folder.rglob("part-*.parquet"):
        out.update(int(i) for i in pq.read_table(path)["id"].to_pylist())
    return out


def test_kafka_to_parquet_killed_between_files_and_manifest_and_after_the_manifest(
    kafka_topic: Callable[..., str],
    flow: Callable[..., Flow],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topic = kafka_topic(PARTITIONS, "peo")
    name = unique("peo")
    folder = tmp_path / "files"
    target = f"""
[target]
kind = "object_store_local"
path = "{folder}"
prefix = "events"
format = "parquet"
partition_by = ["event_type"]
flush_rows = 1000
flush_interval_ms = 1000
"""
    toml = config(topic, name, target)
    n = 5000
    produce(topic, events(n))
    # files of a flush written, its manifest not: the restart deletes them
    monkeypatch.setenv("SLUICE_TEST_KILL_AFTER_FILE_PARTS", "2")
    f = flow(toml)
    assert f.proc.wait(timeout=60) == -9, f.output()
    monkeypatch.delenv("SLUICE_TEST_KILL_AFTER_FILE_PARTS")
    newest = max(int(m.stem) for m in (folder / "events" / "_sluice" / name).glob("*.json"))
    orphans = [p for p in folder.rglob("part-*") if int(p.name.split("-")[2]) > newest]
    assert orphans  # the crashed flush's files are there, without their manifest
    # the manifest committed, the broker not
    monkeypatch.setenv("SLUICE_TEST_KILL_AFTER_FILE_COMMITS", "2")
    f = flow(toml)
    assert f.proc.wait(timeout=60) == -9, f.output()
    monkeypatch.delenv("SLUICE_TEST_KILL_AFTER_FILE_COMMITS")
    assert committed(name, topic, PARTITIONS) < sum(parquet_ids(folder).values())
    run_to_the_end(flow, toml, lambda: files_held(folder / "events", name) == n)
    got = parquet_ids(folder)
    doubled = sorted(i for i, c in got.items() if c > 1)
    assert not doubled, f"ids written twice: {doubled[:20]}"
    assert sorted(got) == list(range(n))
    assert {p.parent.name for p in folder.rglob("part-*.parquet")} == {
        "event_type=click",
        "event_type=view",
        "event_type=purchase",
    }
