"""The source and target conformance suites over AWS Kinesis, against the real kinesis-local."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pytest

from sluice.testing import (
    APPEND_TARGET_CHECKS,
    SOURCE_CHECKS,
    Check,
    SourceHarness,
    TargetHarness,
    unique,
)
from sluice.testing.harness import Row
from tests import kinesis_kit
from tests.conformance.conftest import cases

pytestmark = pytest.mark.integration

#: A stream has no merge.


class KinesisSourceHarness(SourceHarness):
    """A fresh two-shard stream per check; rows spread over both shards by key."""

    name = "kinesis"
    encode = msgspec.json.Encoder().encode

    def __init__(self) -> None:
        self.kin = kinesis_kit.Kinesis()

    def new_stream(self) -> str:
        return self.kin.stream(unique("conf"), shards=2)

    def source(self, stream: str) -> dict[str, Any]:
        return kinesis_kit.connection()

    def _send(self, stream: str, payloads: list[bytes], keys: list[str]) -> list[int]:
        seqs = self.kin.put(stream, payloads, keys)
        arrival = {
            r["SequenceNumber"]: kinesis_kit.micros(r["ApproximateArrivalTimestamp"])
            for _, r in self.kin.read_all(stream)
        }
        return [arrival[s] for s in seqs]

    def produce(self, stream: str, rows: Sequence[Row]) -> list[int]:
        return self._send(
            stream, [self.encode(dict(r)) for r in rows], [f"k{r['id']}" for r in rows]
        )

    def produce_bad(self, stream: str) -> bytes:
        raw = b'{"id": 1, "name": '
        self._send(stream, [raw], ["bad"])
        return raw


class KinesisTargetHarness(TargetHarness):
    """A fresh one-shard stream per check, read back whole from the trim horizon."""

    name = "kinesis"
    has_connection = False  # HTTP requests, no connection to kill; the suite abandons a write

    def __init__(self) -> None:
        self.kin = kinesis_kit.Kinesis()

    def new_table(self) -> str:
        return self.kin.stream(unique("conf"), shards=1)

    def target(
        self, table: str, *, mode: str = "append", key: Sequence[str] = ()
    ) -> dict[str, Any]:
        return {**kinesis_kit.connection(), "stream_name": table}

    def read_back(self, table: str) -> pa.Table | None:
        rows = [msgspec.json.decode(r["Data"]) for _, r in self.kin.read_all(table)]
        if not rows:
            return None
        names = list(dict.fromkeys(k for r in rows for k in r))
        return pa.table({n: [r.get(n) for r in rows] for n in names})


@pytest.fixture(scope="module")
def source_harness() -> Iterator[KinesisSourceHarness]:
    h = KinesisSourceHarness()
    yield h
    h.kin.cleanup()


@pytest.fixture(scope="module")
def target_harness() -> Iterator[KinesisTargetHarness]:
    h = KinesisTargetHarness()
    yield h
    h.kin.cleanup()


@pytest.mark.parametrize("check", cases(SOURCE_CHECKS))
def test_source(
    check: Check[SourceHarness],
    source_harness: KinesisSourceHarness,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SLUICE_STATE_DIR", str(tmp_path))  # the position files
    check(source_harness)


@pytest.mark.parametrize("check", cases(APPEND_TARGET_CHECKS))
def test_target(check: Check[TargetHarness], target_harness: KinesisTargetHarness) -> None:
    check(target_harness)
