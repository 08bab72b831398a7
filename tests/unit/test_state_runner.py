"""The run loop with a durable state store (an InMemoryStore shared across
"processes"): checkpoints, crash recovery from stored positions, store
failures and rebalances, with in-memory sources and targets.

The expected windows come from DuckDB SQL over the same events.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pyarrow as pa
import pytest
from tests.unit.test_window_runner import (
    LogSource,
    MergeTarget,
    _events,
    _expected,
    _got,
    _spec,
)

from sluice.config import load_text
from sluice.connectors.api import Position
from sluice.engine.commit import Checkpointing
from sluice.engine.retry import Retry
from sluice.engine.runner import Runner, RunOptions
from sluice.engine.stages.join import JoinStage
from sluice.engine.watermark import Watermarks
from sluice.errors import ConnectorError, TransientError
from sluice.state import InMemoryStore

END = 10**18  # after every event: every window is closed


class ResumingLog(LogSource):
    """A log that, like Kafka with a store, starts at the position it is given."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opened_at: int | None = None
        self.read_rows = 0
        self.rewound_to: list[int] = []

    def open(self, resume: Position | None) -> None:
        offset = (resume or {}).get("log:0", self.committed)
        assert isinstance(offset, int)
        self.next = self.opened_at = offset

    def read(self, timeout_s: float) -> Any:
        batch = super().read(timeout_s)
        if batch is not None:
            self.read_rows += batch.num_rows
        return batch

    def rewind(self, positions: Position | None = None) -> None:
        self.rewinds += 1
        offset = (positions or {}).get("log:0", self.committed)
        assert isinstance(offset, int)
        self.rewound_to.append(offset)
        self.next = offset


class FlakyStore(InMemoryStore):
    """Fails the commits numbered in ``failing`` (1-based) with a transient error."""

    def __init__(self, failing: set[int] | None = None) -> None:
        super().__init__()
        self.failing = failing or set()
        self.calls = 0
        self.opens = 0

    def open(self) -> None:
        self.opens += 1

    def commit(self, *args: Any, **kwargs: Any) -> int:
        self.calls += 1
        if self.calls in self.failing:
            raise TransientError("state store: connection lost")
        return super().commit(*args, **kwargs)


def _run(spec: Any, source: LogSource, target: MergeTarget, store: InMemoryStore) -> None:
    runner = Runner(
        spec,
        asyncio.Event(),
        # A stop that resumes: windows the watermark did not close stay open.
        RunOptions(stop_after_idle_ms=0, drain=False),
        sources=[source],
        targets=[target],
        store=store,
    )
    asyncio.run(runner.run())


SPEC = _spec("stored", watermark="[watermark]\nlateness_ms = 5000\n")


def test_a_checkpoint_holds_state_positions_and_watermark_and_the_broker_follows() -> None:
    events = _events(400)
    store = InMemoryStore()
    source, target = ResumingLog(events, batch=50), MergeTarget()
    _run(SPEC, source, target, store)
    cp = store.load("stored")
    assert cp.positions == {"log": {"log:0": 400}}
    assert set(cp.state) == {"window", "mark"} and cp.state["window"]
    assert cp.watermark_us == max(e["ts"] for e in events) - 5_000_000
    # The event time the source reached, so a restart starts from there.
    assert json.loads(cp.state["mark"]) == {"log": max(e["ts"] for e in events)}
    assert source.committed == 400  # the broker commit follows the store commit
    # Every window the watermark closed is out; the open ones are in the state.
    assert _got(target) == _expected(events, cp.watermark_us)


@pytest.mark.parametrize("crash_at_write", [2, 3, 5, 8])
def test_a_crash_resumes_at_the_stored_positions_with_the_stored_state(
    crash_at_write: int,
) -> None:
    events = _events(600, seed=crash_at_write)
    closing = {"user": "end", "amount": 0, "ts": END}
    store = InMemoryStore()
    target = MergeTarget(fail_on_write=crash_at_write)
    first = ResumingLog(events, batch=40)
    with pytest.raises(KeyboardInterrupt):
        _run(SPEC, first, target, store)
    stored = store.load("stored")
    at = stored.positions["log"]["log:0"] if stored.positions else 0
    assert isinstance(at, int)
    assert 0 < at < len(events) and at < first.next  # it read on past the checkpoint
    # The broker was told no more than the store holds; a restart ignores it.
    assert first.committed <= at
    target.fail_on_write = None
    second = ResumingLog([*events, closing], batch=40, committed=0)
    _run(SPEC, second, target, store)
    assert second.opened_at == at
    assert second.read_rows == len(events) + 1 - at  # nothing before the checkpoint again
    assert _got(target) == _expected(events, END)


def test_a_failing_store_is_retried_and_nothing_is_committed_meanwhile() -> None:
    events = _events(300)
    store = FlakyStore(failing={2, 3})
    source, target = ResumingLog(events, batch=50), MergeTarget()
    commits: list[int] = []
    original = source.commit

    def commit(position: Position) -> None:
        # The store's latest checkpoint is always ahead of or at the broker.
        stored = store.load("stored").positions["log"]["log:0"]
        assert isinstance(stored, int) and position["log:0"] == stored
        commits.append(stored)
        original(position)

    source.commit = commit  # type: ignore[method-assign]
    _run(SPEC, source, target, store)
    assert store.calls >= 4 and store.opens >= 3  # reconnected after each failure
    assert commits == sorted(commits) and commits[-1] == 300
    cp = store.load("stored")
    assert cp.version == store.calls - 2  # the two failed commits wrote nothing


def test_a_rebalance_restores_the_checkpoint_and_seeks_to_its_positions() -> None:
    events = _events(400)
    closing = {"user": "end", "amount": 0, "ts": END}
    store = InMemoryStore()
    target = MergeTarget()

    class Rebalancing(ResumingLog):
        def read(self, timeout_s: float) -> Any:
            if self.reads == 5:
                self.epoch += 1  # partitions were reassigned before this read
            return super().read(timeout_s)

    source = Rebalancing([*events, closing], batch=40)
    _run(SPEC, source, target, store)
    assert source.rewinds == 1
    assert source.rewound_to and 0 < source.rewound_to[0] <= 5 * 40
    assert _got(target) == _expected(events, END)


def test_a_commit_fenced_by_another_writer_stops_the_run() -> None:
    class Raced(InMemoryStore):
        def commit(self, pipeline: str, *args: Any, **kwargs: Any) -> int:
            # Another process of the same pipeline commits first.
            super().commit(pipeline, {}, (), {}, None, expected_version=None)
            return super().commit(pipeline, *args, **kwargs)

    store = Raced()
    with pytest.raises(ConnectorError, match="committed by another writer"):
        _run(SPEC, ResumingLog(_events(200), batch=50), MergeTarget(), store)
    assert store.load("stored").positions == {}  # the fenced delta wrote nothing


def test_a_bounded_run_drains_and_checkpoints_the_real_watermark_with_no_state() -> None:
    events = _events(400, seed=31)
    store = InMemoryStore()
    source, target = ResumingLog(events, batch=50), MergeTarget()
    runner = Runner(
        SPEC,
        asyncio.Event(),
        RunOptions(stop_after_idle_ms=0),  # a bounded run drains by default
        sources=[source],
        targets=[target],
        store=store,
    )
    asyncio.run(runner.run())
    assert _got(target) == _expected(events, END)
    cp = store.load("stored")
    assert cp.positions == {"log": {"log:0": 400}}
    assert cp.watermark_us == max(e["ts"] for e in events) - 5_000_000  # not +inf
    # Nothing is open: a restart emits nothing again and reads nothing again.
    before = dict(target.rows)
    again = ResumingLog(events, batch=50)
    _run(SPEC, again, target, store)
    assert again.read_rows == 0
    assert target.rows == before


@pytest.mark.parametrize("stored_us", [None, 1_000_000])
def test_a_restore_measures_the_watermark_again_from_the_rows_read_again(
    stored_us: int | None,
) -> None:
    # A rebalance reads again from the checkpoint: the watermark the discarded
    # rounds reached goes with them, or the rows read again (a join judges
    # each row) would be late against it and dropped.
    store = InMemoryStore()
    store.commit("p", {}, (), {}, stored_us, expected_version=None)
    marks = Watermarks(["log"], lateness_ms=0)
    transform = load_text(JOIN).transform
    assert transform is not None and transform.join is not None
    stage = JoinStage(transform.join, "p")
    policy = Checkpointing("p", [], stage, marks, Retry("p", asyncio.Event()), store, 3600)
    for top in (5_000_000, 9_000_000):
        marks.observe("log", pa.array([top], pa.int64()))
    assert marks.global_us() == 9_000_000
    asyncio.run(policy.restore())
    assert marks.global_us() == stored_us
    assert stage.watermark_us == stored_us
    marks.observe("log", pa.array([2_000_000], pa.int64()))  # read again
    assert marks.global_us() == max(2_000_000, stored_us or 0)


JOIN = """
pipeline_name = "p"
[[sources]]
query = "l"
kind = "kafka"
bootstrap_servers = "x:1"
[[sources]]
query = "r"
kind = "kafka"
bootstrap_servers = "x:1"
[target]
kind = "sqlite"
path = ":memory:"
[target.table]
name = "t"
[state_store]
kind = "in_memory"
[transform.join]
kind = "inner"
left_source = "l"
right_source = "r"
left_keys = ["k"]
right_keys = ["k"]
time_window_ms = 1000
"""
