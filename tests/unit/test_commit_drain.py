"""A drain's checkpoint never stores the end-of-input watermark.

During a drain the stage stands at :data:`END_OF_INPUT_US`; a checkpoint taken
then (in the transaction of the drained output, when the store shares the
target's database) must store the pipeline's real watermark, or a crash
before the final commit would leave "+∞" stored and every later row late.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Collection, Mapping
from typing import Any

from sluice.connectors.api import Position
from sluice.engine.commit import Checkpointing
from sluice.engine.retry import Retry
from sluice.engine.watermark import END_OF_INPUT_US, Watermarks
from sluice.state.memory import InMemoryStore


class _Stage:
    watermark_us: int | None = END_OF_INPUT_US

    def snapshot(self) -> dict[str, bytes]:
        return {}

    def snapshot_delta(self) -> tuple[dict[str, bytes], set[str], None]:
        return {}, set(), None

    def checkpointed(self, token: None) -> None:
        pass


class _JoinedTarget:
    """Records what a flush would commit: the positions and the checkpoint callback."""

    id = "target:0"
    database = "postgres://db"

    def __init__(self) -> None:
        self.also: Callable[[Any], None] | None = None

    def stage_positions(
        self, positions: Mapping[str, Position], also: Callable[[Any], None] | None = None
    ) -> None:
        self.also = also


class _JoinableStore(InMemoryStore):
    database = "postgres://db"

    def __init__(self) -> None:
        super().__init__()
        self.watermarks: list[int | None] = []

    def commit_on(
        self,
        connection: object,
        pipeline: str,
        upserts: Mapping[str, bytes],
        deletes: Collection[str],
        positions: Mapping[str, Position],
        watermark_us: int | None,
        *,
        expected_version: int,
    ) -> int:
        self.watermarks.append(watermark_us)
        return expected_version + 1


def _policy(stage: _Stage, target: _JoinedTarget, store: _JoinableStore) -> Checkpointing:
    watermarks = Watermarks(["events"])
    watermarks.restore(1_000_000)
    return Checkpointing(
        "p",
        [],
        stage,  # type: ignore[arg-type]  # the policy reads watermark_us and snapshot() only
        watermarks,
        Retry("p", asyncio.Event()),
        store,
        interval_s=60.0,
        joined=target,  # type: ignore[arg-type]  # a flush-less stand-in for a SQL target
    )


def test_a_drained_stage_checkpoints_the_real_watermark() -> None:
    stage, target, store = _Stage(), _JoinedTarget(), _JoinableStore()
    _policy(stage, target, store).before_write((), True)
    assert target.also is not None
    target.also(object())  # the target's flush runs the checkpoint in its transaction
    assert store.watermarks == [1_000_000]


def test_a_stage_not_draining_checkpoints_its_own_watermark() -> None:
    stage, target, store = _Stage(), _JoinedTarget(), _JoinableStore()
    stage.watermark_us = 2_000_000
    _policy(stage, target, store).before_write((), True)
    assert target.also is not None
    target.also(object())
    assert store.watermarks == [2_000_000]


class _SlowStage(_Stage):
    """Encodes its delta only once the target has started writing the round."""

    def __init__(self, writing: threading.Event) -> None:
        self.writing = writing
        self.encoded_on: str | None = None

    def snapshot_delta(self) -> tuple[dict[str, bytes], set[str], None]:
        assert self.writing.wait(10), "the delta was encoded before the write began"
        self.encoded_on = threading.current_thread().name
        return {"join/p/0": b"rows"}, {"join/p/0"}, None


def test_a_joined_checkpoint_is_encoded_while_the_target_writes() -> None:
    """``before_write`` hands the stage's delta to another thread and returns
    at once; the flush's checkpoint waits for it. Encoding on the loop's
    thread, before the write, would wait here for a write that never starts."""
    writing = threading.Event()
    stage, target, store = _SlowStage(writing), _JoinedTarget(), _JoinableStore()
    _policy(stage, target, store).before_write((), True)  # returns before the delta exists
    writing.set()  # the target writes the round's rows meanwhile
    assert target.also is not None
    target.also(object())  # the flush: waits for the delta, then checkpoints
    assert store.watermarks == [1_000_000]
    assert stage.encoded_on is not None
    assert stage.encoded_on.startswith("sluice-checkpoint")
