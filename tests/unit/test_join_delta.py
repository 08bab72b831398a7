"""Join checkpoints by delta (``JoinStage.snapshot_delta``): a checkpoint
writes only the ``join/<partition>/<bucket>`` keys whose rows changed since
the last durable one, plus each partition's head, and deletes the keys the
state no longer has. Applied in order to a store, the deltas must restore
exactly what the whole snapshot restores, for every join kind, whatever
rows arrive, match or are evicted in between.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from tests.unit.test_join import KINDS, at, join_spec, pairs, side_table, stage

from sluice.engine.stages.join import JoinStage
from sluice.engine.stages.partitioned import PartitionedJoin

MINUTE = 60_000  # ms


def apply(store: dict[str, bytes], s: JoinStage | PartitionedJoin, *, durable: bool = True) -> int:
    """One checkpoint of ``s`` into ``store`` (lost when not ``durable``); bytes written."""
    upserts, live, token = s.snapshot_delta()
    if durable:
        for key in [k for k in store if k not in live]:
            del store[key]
        store.update(upserts)
        s.checkpointed(token)
    return sum(len(v) for v in upserts.values())


def state_of(s: JoinStage) -> tuple[Any, ...]:
    """Everything a restore brings back: each side's rows (with their flags)
    in a canonical order, and the watermark."""
    snap = s.snapshot_blob()
    fresh = stage(s.spec)
    fresh.restore_blob(snap)
    sides = []
    for buf in fresh._bufs:
        if buf is None or not buf.rows:
            sides.append([])
            continue
        table = buf.table.append_column("matched", pa.array(buf.matched))
        sides.append(sorted(table.to_pylist(), key=lambda r: (r["id"], r["__partition"])))
    return (sides[0], sides[1], fresh.watermark_us)


def restored(spec: Any, store: dict[str, bytes]) -> JoinStage:
    s = stage(spec)
    s.restore(store)
    return s


def random_batch(rng: random.Random, t: int, right: bool, first_id: int) -> pa.Table | None:
    n = rng.randint(0, 25)
    if not n:
        return None
    names = ["p:0", "p:1"] if right else ["o:0", "o:1"]
    return side_table(
        [t + rng.randint(-30_000, 150_000) for _ in range(n)],
        [rng.choice("abcd") for _ in range(n)],
        right=right,
        ids=list(range(first_id, first_id + n)),
        partition=[rng.choice(names) for _ in range(n)],
    )


@pytest.mark.parametrize("kind", KINDS)
def test_deltas_applied_in_order_restore_what_the_whole_snapshot_restores(kind: str) -> None:
    rng = random.Random(kind)
    spec = join_spec(kind, time_window_ms=90_000)  # keeps rows 90 s: buckets of a minute
    s = stage(spec)
    store: dict[str, bytes] = {}
    t, next_id = 0, 0
    for step in range(60):
        left = random_batch(rng, t, False, next_id)
        next_id += 100
        right = random_batch(rng, t, True, next_id)
        next_id += 100
        t += rng.randint(0, 2 * MINUTE)
        s.process(left, right, at(t - 3 * MINUTE))
        if rng.random() < 0.2:
            apply(store, s, durable=False)  # a checkpoint that failed: its changes stay due
        if rng.random() < 0.5:
            apply(store, s)
            back = restored(spec, store)
            assert state_of(back) == state_of(s), step
            assert set(store) == set(s.snapshot())
    assert next_id and s.buffer_rows() != (0, 0)


def test_a_restored_stage_goes_on_as_the_one_that_never_stopped() -> None:
    rng = random.Random(7)
    spec = join_spec("full_outer", time_window_ms=90_000)
    a, store = stage(spec), {}
    b: JoinStage | None = None
    t, next_id = 0, 0
    for step in range(40):
        left = random_batch(rng, t, False, next_id)
        right = random_batch(rng, t, True, next_id + 100)
        next_id += 200
        t += rng.randint(0, 2 * MINUTE)
        out_a = a.process(left, right, at(t - 3 * MINUTE))
        if b is not None:
            out_b = b.process(left, right, at(t - 3 * MINUTE))
            assert sorted(pairs(out_b.emitted), key=str) == sorted(pairs(out_a.emitted), key=str)
        apply(store, a)
        if step % 5 == 4:
            b = restored(spec, store)  # a restart from the checkpoint just made
            apply(store, b)


def test_a_checkpoint_writes_the_changed_buckets_and_the_heads_only() -> None:
    spec = join_spec("inner", time_window_ms=90_000)
    s, store = stage(spec), {}
    minutes = [m * MINUTE for m in range(10)]
    s.process(side_table(minutes, ["a"] * 10, partition=["o:0"] * 10), None, None)
    apply(store, s)
    assert len([k for k in store if k.startswith("join/o:0/")]) == 11  # ten buckets and a head
    # One row in the last minute: its bucket and the head, nothing else.
    upserts, live, _ = s.snapshot_delta()
    assert set(upserts) == {"join/o:0/head"} and live == set(store)
    s.process(side_table([9 * MINUTE + 1], ["a"], partition=["o:0"]), None, None)
    upserts, _, _ = s.snapshot_delta()
    last = f"join/o:0/{at(9 * MINUTE) // 60_000_000}"
    assert set(upserts) == {"join/o:0/head", last}
    # The watermark evicts the first minutes: their keys go, the head moves on.
    s.process(None, None, at(5 * MINUTE))
    apply(store, s)
    left = sorted(int(k.rsplit("/", 1)[1]) for k in store if not k.endswith("head"))
    assert left[0] == at(4 * MINUTE) // 60_000_000  # kept while wm <= t + 90 s: minute 4 on
    assert restored(spec, store).watermark_us == at(5 * MINUTE)


def test_keys_of_the_format_before_buckets_are_restored_and_rewritten() -> None:
    spec = join_spec("left_outer", time_window_ms=90_000)
    s = stage(spec)
    s.process(side_table([0, MINUTE, 2 * MINUTE], ["a", "b", "c"], partition=["o:0"] * 3), None, 0)
    legacy = {"join/o:0": s.snapshot_blob(["o:0"])}  # what a checkpoint stored before
    back = restored(spec, legacy)
    upserts, live, _ = back.snapshot_delta()
    assert "join/o:0" not in live  # deleted by the next checkpoint
    assert set(upserts) == live and len(live) == 4  # three buckets and the head
    store = dict(legacy)
    apply(store, back)
    assert state_of(restored(spec, store)) == state_of(s)


def test_a_partitioned_join_checkpoints_each_group_by_delta() -> None:
    spec = join_spec("inner", time_window_ms=90_000)
    s = PartitionedJoin(spec, "test", 10_000_000)
    s.open()
    store: dict[str, bytes] = {}
    left = side_table([0, MINUTE], ["a", "b"], partition=["o:0", "o:1"])
    right = side_table([10, MINUTE + 10], ["a", "b"], right=True, partition=["p:0", "p:1"])
    s.process(left, right, None)
    apply(store, s)
    assert {k.split("/")[1] for k in store} == {"o:0", "o:1", "p:0", "p:1"}
    back = PartitionedJoin(spec, "test", 10_000_000)
    back.open()
    back.restore({k: v for k, v in store.items() if k.split("/")[1].endswith(":1")})
    assert back.buffer_rows() == (1, 1)
    assert np.array_equal(sorted(back.partitions()), ["o:1", "p:1"])
