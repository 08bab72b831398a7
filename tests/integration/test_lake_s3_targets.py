"""The lake targets on moto S3 (issue 16's acceptance, S3 half): 200k rows into
delta_s3 and object_store_s3 (and a CSV file target with another quote and
escape) read back exact with their types and partitions, and an
object_store_s3 target SIGKILLed between a flush's files and its manifest."""

from __future__ import annotations

import collections
import io
import json
from collections.abc import Callable
from typing import Any

import boto3
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from tests import endpoints
from tests.integration.conftest import Flow, events, produce, unique
from tests.integration.test_lake_exactly_once import (
    PARTITIONS,
    S3_OPTIONS,
    config,
    delta_held,
    run_to_the_end,
)

pytestmark = pytest.mark.integration

S3_KEYS = f"""
endpoint = "{endpoints.AWS_ENDPOINT}"
region = "{endpoints.AWS_REGION}"
access_key_id = "{endpoints.AWS_ACCESS_KEY_ID}"
secret_access_key = "{endpoints.AWS_SECRET_ACCESS_KEY}"
"""


def s3() -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoints.AWS_ENDPOINT,
        aws_access_key_id=endpoints.AWS_ACCESS_KEY_ID,
        aws_secret_access_key=endpoints.AWS_SECRET_ACCESS_KEY,
        region_name=endpoints.AWS_REGION,
    )


@pytest.fixture(scope="module")
def bucket() -> str:
    name = unique("lakes3").replace("_", "-")
    s3().create_bucket(Bucket=name)
    return name


def keys(bucket: str, prefix: str) -> list[str]:
    out: list[str] = []
    for page in s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out.extend(str(o["Key"]) for o in page.get("Contents", ()))
    return out


def s3_files_held(bucket: str, prefix: str, name: str) -> int:
    """The sum of the positions in an S3 file target's newest manifest (listed
    again when the target removed the one listed before it was read)."""
    client = s3()
    for _ in range(5):
        manifests = sorted(
            k for k in keys(bucket, f"{prefix}/_sluice/{name}/") if k.endswith(".json")
        )
        if not manifests:
            return 0
        try:
            body = client.get_object(Bucket=bucket, Key=manifests[-1])["Body"].read()
            break
        except client.exceptions.NoSuchKey:
            continue  # superseded between the listing and the read
    else:
        raise AssertionError(f"no manifest of {name} stayed long enough to be read")
    positions = json.loads(body)["positions"]
    return sum(int(v) for parts in positions.values() for v in parts.values())


def s3fs() -> pafs.S3FileSystem:
    return pafs.S3FileSystem(
        endpoint_override=endpoints.AWS_ENDPOINT,
        region=endpoints.AWS_REGION,
        access_key=endpoints.AWS_ACCESS_KEY_ID,
        secret_key=endpoints.AWS_SECRET_ACCESS_KEY,
    )


def plain(data: pa.Table) -> pa.Table:
    return data.cast(
        pa.schema(
            pa.field(f.name, pa.string()) if f.type in (pa.string_view(), pa.large_string()) else f
            for f in data.schema
        )
    ).sort_by("id")


KINDS = ("click", "view", "purchase")


def check_exact(data: pa.Table, n: int) -> None:
    data = plain(data)
    assert data.num_rows == n
    schema = data.schema
    assert schema.field("id").type == pa.int64()
    assert schema.field("user_id").type == pa.int64()
    assert schema.field("amount").type == pa.float64()
    assert data["id"].to_pylist() == list(range(n))
    assert data["user_id"].to_pylist() == [i % 997 for i in range(n)]
    assert data["event_type"].to_pylist() == [KINDS[i % 3] for i in range(n)]
    assert data["amount"].to_pylist() == [(i % 1000) / 4 for i in range(n)]
    assert data["note"].to_pylist() == [f"n{i}" for i in range(n)]


def test_200k_rows_on_s3_read_back_exact_with_types_and_partitions(
    kafka_topic: Callable[..., str], flow: Callable[..., Flow], bucket: str, tmp_path: Any
) -> None:
    topic = kafka_topic(PARTITIONS, "s3200")
    name = unique("s3200")
    n = 200_000
    produce(topic, events(n))
    csv_folder = tmp_path / "csv"
    targets = f"""
[[targets]]
kind = "delta_s3"
bucket = "{bucket}"
prefix = "{name}/delta"
partition_by = ["event_type"]
{S3_KEYS}

[[targets]]
kind = "object_store_s3"
bucket = "{bucket}"
prefix = "{name}/files"
format = "parquet"
partition_by = ["event_type"]
{S3_KEYS}

[[targets]]
kind = "object_store_local"
path = "{csv_folder}"
format = "csv"
csv_delimiter = ";"
csv_quote = "'"
csv_escape = "\\\\"
csv_null_value = "NULL"
"""
    toml = config(topic, name, targets, batch_rows=50_000)
    uri = f"s3://{bucket}/{name}/delta"
    run_to_the_end(
        flow,
        toml,
        lambda: (
            delta_held(uri, name, topic, S3_OPTIONS) == n
            and s3_files_held(bucket, f"{name}/files", name) == n
        ),
    )
    table = DeltaTable(uri, storage_options=S3_OPTIONS)
    assert table.metadata().partition_columns == ["event_type"]
    delta = pa.table(table.scan())
    check_exact(delta, n)
    assert delta.schema.field("_event_ts").type == pa.timestamp("us", tz="UTC")
    actions = pa.table(table.get_add_actions(flatten=True)).to_pylist()
    assert {a["partition.event_type"] for a in actions} == set(KINDS)

    files = ds.dataset(
        f"{bucket}/{name}/files",
        filesystem=s3fs(),
        format="parquet",
        partitioning="hive",
        exclude_invalid_files=True,
    ).to_table()
    check_exact(files, n)
    assert files.schema.field("_event_ts").type == pa.timestamp("us", tz="UTC")
    parts = {k.split("/")[2] for k in keys(bucket, f"{name}/files/") if "/part-" in k}
    assert parts == {f"event_type={k}" for k in KINDS}

    csvs = [
        pacsv.read_csv(
            io.BytesIO(p.read_bytes()),
            parse_options=pacsv.ParseOptions(
                delimiter=";", quote_char="'", escape_char="\\", double_quote=False
            ),
            convert_options=pacsv.ConvertOptions(
                # A file of one Kafka partition's rows may hold only whole
                # amounts: the reader must not guess int64 for it.
                column_types={"amount": pa.float64()},
                null_values=["NULL"],
                strings_can_be_null=True,
                quoted_strings_can_be_null=False,
            ),
        )
        for p in sorted(csv_folder.rglob("part-*.csv"))
    ]
    check_exact(pa.concat_tables(csvs), n)


def test_object_store_s3_killed_between_files_and_manifest_writes_every_row_once(
    kafka_topic: Callable[..., str],
    flow: Callable[..., Flow],
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topic = kafka_topic(PARTITIONS, "s3kill")
    name = unique("s3kill")
    target = f"""
[target]
kind = "object_store_s3"
bucket = "{bucket}"
prefix = "{name}"
format = "parquet"
partition_by = ["event_type"]
flush_rows = 1000
flush_interval_ms = 1000
{S3_KEYS}
"""
    toml = config(topic, name, target)
    n = 4000
    produce(topic, events(n))
    monkeypatch.setenv("SLUICE_TEST_KILL_AFTER_FILE_PARTS", "2")
    f = flow(toml)
    assert f.proc.wait(timeout=60) == -9, f.output()
    monkeypatch.delenv("SLUICE_TEST_KILL_AFTER_FILE_PARTS")
    listed = keys(bucket, f"{name}/")
    newest = max(int(k.rsplit("/", 1)[1][:-5]) for k in listed if f"/_sluice/{name}/" in k)
    orphans = [
        k for k in listed if "/part-" in k and int(k.split("/part-")[1].split("-")[1]) > newest
    ]
    assert orphans  # the crashed flush's objects are there, without their manifest
    run_to_the_end(flow, toml, lambda: s3_files_held(bucket, name, name) == n)
    got: collections.Counter[int] = collections.Counter()
    fs = s3fs()
    for key in keys(bucket, f"{name}/"):
        if "/part-" in key:
            got.update(pq.read_table(f"{bucket}/{key}", filesystem=fs)["id"].to_pylist())
    doubled = sorted(i for i, c in got.items() if c > 1)
    assert not doubled, f"ids written twice: {doubled[:20]}"
    assert sorted(got) == list(range(n))
