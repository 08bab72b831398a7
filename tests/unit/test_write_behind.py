"""What the commit policies take from the stage for a round written behind.

While a round is written and committed, the run loop already runs the next
round through the stage (``Runner._iteration``). Whatever that round's
commit reads must be taken from the stage before: the hold-back policy's
watermark and open floor, the joined checkpoint's delta. And a checkpoint
that lands meanwhile must not mark the stage's changes durable while the
stage is changing.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pyarrow as pa
from tests.unit.test_commit_drain import _JoinableStore, _JoinedTarget, _policy, _Stage

from sluice.connectors.api import Batch
from sluice.engine.commit import HoldBack
from sluice.engine.watermark import WatermarkFile, Watermarks


class _Window:
    """A stage whose watermark and open floor the test moves."""

    def __init__(self) -> None:
        self.watermark_us: int | None = 100
        self.floor: int | None = 50

    def open_floor_us(self) -> int | None:
        return self.floor


class _Log:
    id = "log"

    def __init__(self) -> None:
        self.commits: list[Any] = []

    def commit(self, ack: Any) -> None:
        self.commits.append(ack)


def _batch(ack: int) -> Batch:
    return Batch("log", pa.table({"x": [ack]}), ack)


def test_a_hold_back_commit_written_behind_uses_the_stage_as_the_round_left_it(
    tmp_path: Path,
) -> None:
    source, stage = _Log(), _Window()
    file = WatermarkFile("p", directory=tmp_path)
    policy = HoldBack("p", [source], stage, Watermarks(["log"]), file)  # type: ignore[arg-type]
    policy.before_write([_batch(1), _batch(2)], True)
    assert policy.write_behind(True)
    # the next round runs: its rows move the watermark and close the windows
    # that held rows of batch 2
    stage.watermark_us, stage.floor = 200, 90
    policy.on_batch([_batch(1), _batch(2)], [40, 60])
    asyncio.run(policy.commit(emitted=True))
    assert source.commits == [1]  # batch 2's rows were in windows open after the round
    assert file.load() == 100
    # a commit of its own (an idle round) reads the stage as it is
    asyncio.run(policy.commit())
    assert source.commits == [1, 2]
    assert file.load() == 200


class _Counting(_Stage):
    def __init__(self) -> None:
        self.watermark_us = 1_000_000
        self.durable: list[int] = []
        self.changes = 0

    def snapshot_delta(self) -> tuple[dict[str, bytes], set[str], Any]:
        return {"window": b"state"}, {"window"}, self.changes

    def checkpointed(self, token: Any) -> None:
        self.durable.append(token)


def test_a_joined_checkpoint_landing_behind_marks_the_stage_once_it_is_still() -> None:
    stage, target, store = _Counting(), _JoinedTarget(), _JoinableStore()
    policy = _policy(stage, target, store)
    policy.before_write((), True)
    assert policy.write_behind(True)
    asyncio.run(policy.stage_free())  # the delta is encoded: the stage may change
    stage.changes = 1  # the next round runs while this one is written
    assert target.also is not None
    target.also(object())  # the round's flush: its checkpoint lands
    asyncio.run(policy.commit(emitted=True))
    assert stage.durable == []  # not while the next round may be changing the stage
    stage.changes = 2
    policy.before_write((), True)  # the next round is written: the stage is still
    assert stage.durable == [0]


def test_a_round_without_rows_is_not_written_behind() -> None:
    """Its checkpoint, if one is due, would read the stage at commit time."""
    stage, target, store = _Counting(), _JoinedTarget(), _JoinableStore()
    policy = _policy(stage, target, store)
    policy.before_write((), False)
    assert not policy.write_behind(False)
