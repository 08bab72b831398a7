"""The conformance suites over the in-memory connectors of :mod:`sluice.testing`,
plus what only they offer (pushing tables, the flaky target). No services."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
import pyarrow as pa
import pytest
from tests.conformance.conftest import cases

from sluice.connectors.api import Source, Target
from sluice.errors import TransientError
from sluice.testing import (
    SOURCE_CHECKS,
    TARGET_CHECKS,
    Check,
    FlakyTarget,
    MemorySource,
    MemoryStream,
    MemoryTarget,
    SourceHarness,
    TargetHarness,
)
from sluice.testing.harness import Row, unique


class MemorySourceHarness(SourceHarness):
    """Streams are MemoryStreams; a consumer group is one MemorySource object."""

    name = "memory"

    def __init__(self) -> None:
        self.streams: dict[str, MemoryStream] = {}
        self.groups: dict[tuple[str, str], MemorySource] = {}
        self.clock_ms = 1_700_000_000_000

    def new_stream(self) -> str:
        name = unique("mem")
        self.streams[name] = MemoryStream(name)
        return name

    def source(self, stream: str) -> dict[str, Any]:
        raise AssertionError("memory sources are built by build()")

    def build(self, stream: str, group: str) -> Source:
        key = (stream, group)
        if key not in self.groups:
            self.groups[key] = MemorySource(self.streams[stream])
        return self.groups[key]

    def produce(self, stream: str, rows: Sequence[Row]) -> list[int]:
        stamps = [self.clock_ms + i for i in range(len(rows))]
        self.clock_ms += len(rows)
        self.streams[stream].push_payloads([msgspec.json.encode(r) for r in rows], stamps)
        return [ms * 1000 for ms in stamps]

    def produce_bad(self, stream: str) -> bytes:
        raw = b'{"id": '
        self.streams[stream].push_payloads([raw])
        return raw


class MemoryTargetHarness(TargetHarness):
    """A table is a MemoryTarget; reading back reads what it flushed."""

    name = "memory"
    has_connection = False

    def __init__(self) -> None:
        self.targets: dict[str, MemoryTarget] = {}

    def target(
        self, table: str, *, mode: str = "append", key: Sequence[str] = ()
    ) -> dict[str, Any]:
        raise AssertionError("memory targets are built by build()")

    def build(self, table: str, *, mode: str = "append", key: Sequence[str] = ()) -> Target:
        if table not in self.targets:
            self.targets[table] = MemoryTarget(table, key if mode == "merge" else ())
        return self.targets[table]

    def read_back(self, table: str) -> pa.Table | None:
        target = self.targets.get(table)
        return None if target is None or target.flushes == 0 else target.table()


@pytest.mark.parametrize("check", cases(SOURCE_CHECKS))
def test_memory_source(check: Check[SourceHarness]) -> None:
    check(MemorySourceHarness())


@pytest.mark.parametrize("check", cases(TARGET_CHECKS))
def test_memory_target(check: Check[TargetHarness]) -> None:
    check(MemoryTargetHarness())


def test_memory_source_reads_pushed_tables_and_resumes_mid_push() -> None:
    source = MemorySource()
    source.push(pa.table({"id": [0, 1, 2]}), event_ts_ms=[10, 20, 30])
    source.open({source.stream.partition: 1})
    batch = source.read(0.1)
    assert batch is not None
    assert batch.data["id"].to_pylist() == [1, 2]
    assert batch.data["_event_ts"].cast(pa.int64()).to_pylist() == [20_000, 30_000]
    assert batch.position == {source.stream.partition: 3}
    assert source.read(0.05) is None
    source.commit(batch.position)
    assert source.commits == [{source.stream.partition: 3}]


def test_memory_target_is_empty_before_a_flush_and_rolls_back_on_close() -> None:
    target = MemoryTarget()
    target.open()
    target.write(pa.table({"id": [1]}))
    assert target.table().num_rows == 0
    target.close()
    target.open()
    target.flush()
    assert target.table().num_rows == 0


def test_flaky_target_fails_the_chosen_calls_then_succeeds() -> None:
    inner = MemoryTarget()
    flaky = FlakyTarget(inner, flush={1}, write={2})
    flaky.open()
    flaky.write(pa.table({"id": [1, 2]}))
    with pytest.raises(TransientError):
        flaky.flush()
    flaky.close()  # the engine's retry: close (rolls back), open, the same batch again
    flaky.open()
    with pytest.raises(TransientError):
        flaky.write(pa.table({"id": [1, 2]}))
    flaky.write(pa.table({"id": [1, 2]}))
    flaky.flush()
    assert inner.table()["id"].to_pylist() == [1, 2]
    assert flaky.failures == 2
    assert flaky.calls == {"open": 2, "write": 3, "flush": 2, "close": 1}
