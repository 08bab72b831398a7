"""kinesis-local helpers for tests: streams, puts, reading a whole stream back,
and fault injection through botocore event hooks.

Everything goes to the real kinesis-local (``tests.endpoints.KINESIS_ENDPOINT``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3

from tests import endpoints

ENDPOINT = endpoints.KINESIS_ENDPOINT
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def client() -> Any:
    return boto3.session.Session().client(
        "kinesis",
        endpoint_url=ENDPOINT,
        region_name=endpoints.AWS_REGION,
        aws_access_key_id=endpoints.AWS_ACCESS_KEY_ID,
        aws_secret_access_key=endpoints.AWS_SECRET_ACCESS_KEY,
    )


def connection() -> dict[str, Any]:
    """The connection keys of a ``kind = "kinesis"`` source or target."""
    return {
        "kind": "kinesis",
        "endpoint": ENDPOINT,
        "region": endpoints.AWS_REGION,
        "access_key_id": endpoints.AWS_ACCESS_KEY_ID,
        "secret_access_key": endpoints.AWS_SECRET_ACCESS_KEY,
    }


def micros(ts: datetime) -> int:
    return (ts - EPOCH) // timedelta(microseconds=1)


class Kinesis:
    """One client on kinesis-local."""

    def __init__(self) -> None:
        self.k = client()
        self.created: list[str] = []

    def cleanup(self) -> None:
        """Delete the streams this object created (shards count against a limit)."""
        for name in self.created:
            with contextlib.suppress(self.k.exceptions.ResourceNotFoundException):
                self.k.delete_stream(StreamName=name, EnforceConsumerDeletion=True)
        self.created = []

    def wait_active(self, name: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.k.describe_stream_summary(StreamName=name)["StreamDescriptionSummary"]
            if status["StreamStatus"] == "ACTIVE":
                return
            assert time.monotonic() < deadline, f"stream {name} not active in {timeout_s} s"
            time.sleep(0.1)

    def stream(self, name: str, shards: int = 1) -> str:
        self.k.create_stream(StreamName=name, ShardCount=shards)
        self.created.append(name)
        self.wait_active(name)
        return name

    def shards(self, name: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self.k.list_shards(StreamName=name)["Shards"]
        return out

    def put(self, name: str, payloads: Sequence[bytes], keys: Sequence[str]) -> list[str]:
        """Put records (500 a request, failed ones again); their sequence numbers."""
        seqs: list[str] = []
        for start in range(0, len(payloads), 500):
            part = list(range(start, min(start + 500, len(payloads))))
            results: dict[int, str] = {}
            while len(results) < len(part):
                todo = [i for i in part if i not in results]
                resp = self.k.put_records(
                    StreamName=name,
                    Records=[{"Data": payloads[i], "PartitionKey": keys[i]} for i in todo],
                )
                for i, r in zip(todo, resp["Records"], strict=True):
                    if "SequenceNumber" in r:
                        results[i] = r["SequenceNumber"]
            seqs.extend(results[i] for i in part)
        return seqs

    def split(self, name: str, shard_id: str) -> None:
        """Split ``shard_id`` at the middle of its hash range; wait until active."""
        (shard,) = [s for s in self.shards(name) if s["ShardId"] == shard_id]
        lo = int(shard["HashKeyRange"]["StartingHashKey"])
        hi = int(shard["HashKeyRange"]["EndingHashKey"])
        self.k.split_shard(
            StreamName=name, ShardToSplit=shard_id, NewStartingHashKey=str((lo + hi) // 2)
        )
        self.wait_active(name)

    def read_all(self, name: str) -> list[tuple[str, dict[str, Any]]]:
        """Every record of every shard, from the trim horizon: (shard id, record)."""
        out: list[tuple[str, dict[str, Any]]] = []
        for s in self.shards(name):
            it = self.k.get_shard_iterator(
                StreamName=name, ShardId=s["ShardId"], ShardIteratorType="TRIM_HORIZON"
            )["ShardIterator"]
            while it:
                resp = self.k.get_records(ShardIterator=it, Limit=10_000)
                out.extend((s["ShardId"], r) for r in resp["Records"])
                if not resp["Records"]:
                    break  # an open shard read to its end
                it = resp.get("NextShardIterator")
        return out


def inject(
    boto_client: Any, operation: str, fail: Callable[[int], str | None]
) -> Callable[[], int]:
    """Make calls of ``operation`` on ``boto_client`` fail as the service would.

    ``fail(n)`` is asked before the n-th call (from 1); when it returns an AWS
    error code, the call does not reach the service and botocore raises the
    ``ClientError`` the service's error response would give (a ``before-call``
    event handler that short-circuits with a parsed error response, botocore's
    own hook). Returns a function giving the number of calls so far.
    """
    calls = [0]

    def before_call(**kwargs: Any) -> Any:
        calls[0] += 1
        code = fail(calls[0])
        if code is None:
            return None
        http = _Http()
        parsed = {
            "Error": {"Code": code, "Message": f"injected by the test (call {calls[0]})"},
            "ResponseMetadata": {"HTTPStatusCode": 400},
        }
        return http, parsed

    boto_client.meta.events.register(f"before-call.kinesis.{operation}", before_call)
    return lambda: calls[0]


class _Http:
    """The HTTP response botocore expects beside a short-circuited parsed response."""

    status_code = 400
    headers: dict[str, str] = {}  # noqa: RUF012 - read only by botocore
    content = b""
