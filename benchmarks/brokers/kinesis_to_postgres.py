"""Kinesis (kinesis-local) -> Postgres: sluice beside the reference engine on the same TOML.

    python -m benchmarks.brokers.kinesis_to_postgres [--rows N (default 20000)] [--engines sluice,reference]

Like ``pubsub_to_postgres.py`` (whose runner it uses): one stream of
``KINESIS_SHARDS`` shards, every event put first (partition key = its index),
then each engine reads the whole stream into its own table; the stream is
deleted afterwards.

``--rows`` defaults to ``DEFAULT_ROWS`` (20,000), not 1M: loading
kinesis-local is superlinear. A put into a shard takes time in proportion to
the records already in that shard, so filling the stream takes time in
proportion to rows² / shards. Measured on the 2-core test machine with 4
shards (500 records a put): 2,500 rows in 3.8 s, 5,000 in 11 s, 10,000 in
44 s, 20,000 in 164 s (the last 2,500 took 49 s); 1M would take days. With
16 shards 10,000 rows took 13 s, which is the same law. The figures measure
the engines, not the load; pass ``--rows`` to go further.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import boto3

from benchmarks.brokers.pubsub_to_postgres import HERE, Broker, Settings, run_broker

ENDPOINT = os.environ.get("SLUICE_KINESIS_ENDPOINT", "http://127.0.0.1:4568")
KINESIS_SHARDS = 4
#: ``--rows`` when not given (see above: the load is quadratic in the rows).
DEFAULT_ROWS = 20_000


def client() -> Any:
    return boto3.session.Session().client(
        "kinesis", endpoint_url=ENDPOINT, region_name="us-east-1",
        aws_access_key_id="test", aws_secret_access_key="test",
    )  # fmt: skip


def load_kinesis(
    s: Settings, payloads: list[bytes], engines: Sequence[str]
) -> tuple[dict[str, str], float]:
    """One stream, every payload put (500 a request; failed records again)."""
    k = client()
    name = f"bench{int(time.time())}"
    k.create_stream(StreamName=name, ShardCount=KINESIS_SHARDS)
    while (
        k.describe_stream_summary(StreamName=name)["StreamDescriptionSummary"]["StreamStatus"]
        != "ACTIVE"
    ):
        time.sleep(0.2)
    started = time.monotonic()
    for i in range(0, len(payloads), 500):
        todo = list(range(i, min(i + 500, len(payloads))))
        while todo:
            resp = k.put_records(
                StreamName=name,
                Records=[{"Data": payloads[j], "PartitionKey": str(j)} for j in todo],
            )
            todo = [j for j, r in zip(todo, resp["Records"], strict=True) if "ErrorCode" in r]
    return {e: name for e in engines}, time.monotonic() - started


def cleanup_kinesis(queries: dict[str, str]) -> None:
    """Delete the stream (every engine read the same one)."""
    k = client()
    for name in set(queries.values()):
        k.delete_stream(StreamName=name)


KINESIS = Broker(
    name="kinesis",
    template=HERE / "kinesis_pipeline.toml.tmpl",
    load=load_kinesis,
    values={"endpoint": ENDPOINT},
    env={"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
         "AWS_DEFAULT_REGION": "us-east-1"},
    cleanup=cleanup_kinesis,
    default_rows=DEFAULT_ROWS,
)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    return run_broker(KINESIS, argv)


if __name__ == "__main__":
    sys.exit(main())
