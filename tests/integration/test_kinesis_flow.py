"""Kinesis → Postgres through a real `flow consume` process, against the real kinesis-local.

Crashes are SIGKILLs of the real process; faults the service cannot be asked
for (an expired iterator, throttling, a partial put failure) are injected
in-process through botocore's event hooks on the connector's own boto3
client (``tests.kinesis_kit.inject``): the call never reaches the service
and botocore raises exactly the ``ClientError`` the service's answer would.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from tests import endpoints, kinesis_kit
from tests.integration.conftest import (
    events,
    kill_after_reading,
    pg_count,
    unique,
    wait_for_count,
    wait_until,
)

from sluice.config import load_text
from sluice.connectors import registry
from sluice.connectors.kinesis.source import KinesisSource
from sluice.connectors.kinesis.target import KinesisTarget
from sluice.testing.targets import table as rows_table

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def kin() -> Iterator[kinesis_kit.Kinesis]:
    k = kinesis_kit.Kinesis()
    yield k
    k.cleanup()


def config(
    stream: str,
    table: str,
    *,
    mode: str = "append",
    batch_rows: int = 1000,
    top: str = "",
    transform: str = "",
) -> str:
    key = 'primary_key = ["id"]' if mode == "merge" else ""
    conn = kinesis_kit.connection()
    return f"""
pipeline_name = "{table}"
source_query = "{stream}"
idle_pause_ms = 100
{top}

[source]
kind = "kinesis"
endpoint = "{conn["endpoint"]}"
region = "{conn["region"]}"
access_key_id = "{conn["access_key_id"]}"
secret_access_key = "{conn["secret_access_key"]}"
max_batch_rows = {batch_rows}
shard_refresh_ms = 1000

[target]
kind = "postgres"
url = "{endpoints.POSTGRES_URL}"
mode = "{mode}"

[target.table]
schema = "public"
name = "{table}"
{key}
{transform}
"""


def keyed(payloads: list[bytes]) -> list[str]:
    return [f"k{i}" for i in range(len(payloads))]


def test_sigkill_mid_stream_restart_loses_and_doubles_nothing(kin: Any, flow: Any, pg: Any) -> None:
    """Positions ride in the Postgres target's transaction: even an append
    target gets every record exactly once across a SIGKILL."""
    stream = kin.stream(unique("kk"), shards=2)
    table = unique("kk")
    # kinesis-local slows down as a stream grows (a put of 500 takes ~0.05 s
    # into an empty stream, ~0.5 s after 2000 records): a few thousand.
    n = 3_000
    payloads = events(n)
    kin.put(stream, payloads, keyed(payloads))
    cfg = config(stream, table, mode="append", batch_rows=200)
    f = flow(cfg)
    kill_after_reading(f, 1_000, random.uniform(0.0, 0.3))
    g = flow(cfg)
    wait_for_count(table, lambda c: c >= n, 90, f"{n} rows")
    assert g.stop() == 0, g.output()
    assert pg_count(table) == n, "a record was written twice"
    assert pg_count(table, "count(DISTINCT id)") == n
    held = pg.execute(
        'SELECT "partition", position_text FROM public._sluice_positions WHERE pipeline = %s',
        (table,),
    ).fetchall()
    assert {p for p, _ in held} == {f"{stream}:{s['ShardId']}" for s in kin.shards(stream)}


def test_split_mid_stream_every_record_once_parent_before_children(
    kin: Any, flow: Any, pg: Any
) -> None:
    stream = kin.stream(unique("ks"), shards=1)
    table = unique("ks")
    # The write order of the rows, to check per-key order in the target.
    pg.execute(
        f"CREATE TABLE public.{table} (ord bigserial, id bigint, k text, seq bigint, "
        "_event_ts timestamptz)"
    )
    enc = msgspec.json.Encoder()
    keys = [f"key{j}" for j in range(16)]
    n_per_key = 150
    payloads, pkeys = [], []
    for seq in range(n_per_key):
        for k in keys:
            payloads.append(enc.encode({"id": len(payloads), "k": k, "seq": seq}))
            pkeys.append(k)
    quarter, half = len(payloads) // 4, len(payloads) // 2
    # The pipeline reads the first quarter and is killed; the parent then gets
    # the second quarter, is split, and the children get the second half: on
    # restart the parent holds unread records while its children hold newer
    # ones of the same keys, which must wait until the parent is read to its end.
    cfg = config(stream, table, batch_rows=100)
    f = flow(cfg)
    kin.put(stream, payloads[:quarter], pkeys[:quarter])
    wait_for_count(table, lambda c: c >= quarter, 60, "the first quarter")
    f.kill()
    kin.put(stream, payloads[quarter:half], pkeys[quarter:half])
    (parent,) = kin.shards(stream)
    kin.split(stream, parent["ShardId"])
    kin.put(stream, payloads[half:], pkeys[half:])
    shards = kin.shards(stream)
    assert len(shards) == 3, shards
    # kinesis-local routes the new records to the children, as AWS does.
    per_shard = {s: 0 for s in (x["ShardId"] for x in shards)}
    for shard, _ in kin.read_all(stream):
        per_shard[shard] += 1
    assert per_shard[parent["ShardId"]] == half, per_shard
    f = flow(cfg)
    total = len(payloads)
    wait_for_count(table, lambda c: c >= total, 60, f"{total} rows")
    assert f.stop() == 0, f.output()
    assert pg_count(table) == total
    assert pg_count(table, "count(DISTINCT id)") == total
    for k, seqs in pg.execute(
        f"SELECT k, array_agg(seq ORDER BY ord) FROM public.{table} GROUP BY k"
    ).fetchall():
        assert seqs == list(range(n_per_key)), f"key {k} out of order: {seqs[:20]}..."


def _source(stream: str, batch_rows: int = 500) -> KinesisSource:
    conn = kinesis_kit.connection()
    spec = load_text(
        f"""
pipeline_name = "{unique("p")}"
source_query = "{stream}"
[source]
kind = "kinesis"
endpoint = "{conn["endpoint"]}"
region = "{conn["region"]}"
access_key_id = "test"
secret_access_key = "test"
max_batch_rows = {batch_rows}
[target]
kind = "sqlite"
path = "unused.sqlite"
table = {{ name = "t" }}
""",
        "<test>",
    )
    source = registry.build_source(spec.all_sources[0], registry.Context(spec))
    assert isinstance(source, KinesisSource)
    return source


def test_expired_iterators_and_throttling_lose_nothing(
    kin: Any, tmp_path: Any, monkeypatch: Any
) -> None:
    monkeypatch.setenv("SLUICE_STATE_DIR", str(tmp_path))
    stream = kin.stream(unique("kx"), shards=2)
    n = 3_000
    payloads = events(n)
    kin.put(stream, payloads, keyed(payloads))
    source = _source(stream, batch_rows=200)
    source.open(None)
    faults = {"ExpiredIteratorException": 0, "ProvisionedThroughputExceededException": 0}

    def fail(call: int) -> str | None:
        code = (
            "ExpiredIteratorException"
            if call % 4 == 0
            else "ProvisionedThroughputExceededException"
            if call % 7 == 0
            else None
        )
        if code:
            faults[code] += 1
        return code

    calls = kinesis_kit.inject(source.client, "GetRecords", fail)
    seen: list[int] = []
    try:
        wait_until(lambda: _read_some(source, seen) >= n, 120, f"{n} records", 0.0)
    finally:
        source.close()
    assert sorted(seen) == list(range(n)), "records lost or read twice"
    assert calls() > 20 and all(faults.values()), faults


def _read_some(source: KinesisSource, seen: list[int]) -> int:
    batch = source.read(0.5)
    if batch is not None:
        seen.extend(batch.data["id"].to_pylist())
        source.commit(batch.ack)
    return len(seen)


def test_target_retries_only_the_failed_records_of_a_partial_failure(kin: Any) -> None:
    stream = kin.stream(unique("kt"), shards=2)
    spec = load_text(
        f"""
pipeline_name = "{unique("p")}"
source_query = "unused"
[source]
kind = "kafka"
bootstrap_servers = "unused:9092"
[target]
kind = "kinesis"
stream_name = "{stream}"
endpoint = "{kinesis_kit.ENDPOINT}"
region = "us-east-1"
access_key_id = "test"
secret_access_key = "test"
partition_key_prefix = "p-"
""",
        "<test>",
    )
    target = registry.build_target(spec.all_targets[0], registry.Context(spec), 0)
    assert isinstance(target, KinesisTarget)
    target.open()
    # The first two calls (the first request and its retry) lose every third
    # record, reported as the service reports a partial failure: the others
    # really land.
    lost: dict[int, list[int]] = {}
    call = [0]

    def drop(params: dict[str, Any], **_: Any) -> None:
        call[0] += 1
        if call[0] in (1, 2):
            records = params["Records"]
            lost[call[0]] = [i for i in range(len(records)) if i % 3 == 0]
            lost[-call[0]] = [len(records)]
            params["Records"] = [r for i, r in enumerate(records) if i % 3 != 0]

    def report(parsed: dict[str, Any], **_: Any) -> None:
        if call[0] not in lost:
            return
        failed, (size,) = set(lost[call[0]]), lost[-call[0]]
        real = iter(parsed["Records"])
        parsed["Records"] = [
            {"ErrorCode": "ProvisionedThroughputExceededException", "ErrorMessage": "injected"}
            if i in failed
            else next(real)
            for i in range(size)
        ]
        parsed["FailedRecordCount"] = len(failed)

    target.client.meta.events.register("provide-client-params.kinesis.PutRecords", drop)
    target.client.meta.events.register("after-call.kinesis.PutRecords", report)
    n = 1_200  # three requests: 500, 500, 200
    try:
        target.write(rows_table({"id": i, "name": f"n{i}"} for i in range(n)))
        target.flush()
    finally:
        target.close()
    landed = [msgspec.json.decode(r["Data"])["id"] for _, r in kin.read_all(stream)]
    assert sorted(landed) == list(range(n)), "a record lost or put twice"
    assert len(lost[1]) == 167 and len(lost[2]) == 56  # the retry carried only the 167
    assert target.retried == 167 + 56
    assert call[0] == 5  # 3 requests + 2 retries of only the failed records


BAD = b'{"id": 7, "note": '


def test_undecodable_record_follows_on_error(kin: Any, flow: Any, pg: Any) -> None:
    # fail: the process stops, naming the stream, the shard and the sequence number.
    stream = kin.stream(unique("kb"), shards=1)
    table = unique("kbad")
    (seq,) = kin.put(stream, [BAD], ["bad"])
    (shard,) = kin.shards(stream)
    f = flow(config(stream, table, transform='[transform]\non_error = "fail"\n'))
    assert f.proc.wait(timeout=60) != 0
    assert f"stream {stream} shard {shard['ShardId']} sequence number {seq}" in f.output()

    # drop: counted, the good rows land.
    stream = kin.stream(unique("kb"), shards=1)
    payloads = [*events(5), BAD, *events(5, 5)]
    kin.put(stream, payloads, keyed(payloads))
    f = flow(config(stream, table + "d", transform='[transform]\non_error = "drop"\n'))
    wait_for_count(table + "d", lambda c: c == 10, 60, "the good rows")
    wait_until(lambda: f.metric("sluice_rows_dropped_total") == 1, 30, "the drop counted")
    assert f.stop() == 0, f.output()

    # dlq: the raw payload lands in the dead-letter table with its shard and sequence number.
    stream = kin.stream(unique("kb"), shards=1)
    seqs = kin.put(stream, [*events(3), BAD], ["a", "b", "c", "d"])
    f = flow(
        config(
            stream,
            table + "q",
            top='dlq_store = "table"',
            transform='[transform]\non_error = "dlq"\n',
        )
    )
    wait_for_count(table + "q", lambda c: c == 3, 60, "the good rows")
    wait_until(lambda: f.metric("sluice_dlq_writes_total") == 1, 30, "the dead letter")
    assert f.stop() == 0, f.output()
    rows = pg.execute(
        'SELECT payload, "partition", "offset" FROM public.sluice_dead_letters WHERE pipeline = %s',
        (table + "q",),
    ).fetchall()
    (shard,) = kin.shards(stream)
    assert [(bytes(p), part, o) for p, part, o in rows] == [
        (BAD, f"{stream}:{shard['ShardId']}", seqs[-1])
    ]


def test_target_partition_key_from_a_column(kin: Any) -> None:
    stream = kin.stream(unique("kp"), shards=2)
    spec = load_text(
        f"""
pipeline_name = "{unique("p")}"
source_query = "unused"
[source]
kind = "kafka"
bootstrap_servers = "unused:9092"
[target]
kind = "kinesis"
stream_name = "{stream}"
endpoint = "{kinesis_kit.ENDPOINT}"
region = "us-east-1"
access_key_id = "test"
secret_access_key = "test"
partition_key_column = "user"
""",
        "<test>",
    )
    target = registry.build_target(spec.all_targets[0], registry.Context(spec), 0)
    target.open()
    try:
        target.write(rows_table({"id": i, "user": f"u{i % 7}"} for i in range(50)))
        target.flush()
    finally:
        target.close()
    landed = {
        msgspec.json.decode(r["Data"])["id"]: r["PartitionKey"] for _, r in kin.read_all(stream)
    }
    assert landed == {i: f"u{i % 7}" for i in range(50)}
