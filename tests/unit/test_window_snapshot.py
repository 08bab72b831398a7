"""Window snapshots: a stage restored from a snapshot goes on exactly as the
stage that took it, and as a run that was never interrupted.

Each run feeds a few thousand out-of-order events (with late rows) to the
stage in batches, with idle ticks between some of them, and records every
call's emitted table and late indices. A resumed run snapshots after call
``k``, restores into a fresh stage and feeds that one the rest: every
later call must give the same table (values, types and order) and the same
late indices.
"""

from __future__ import annotations

import itertools
import struct
import zlib
from dataclasses import dataclass

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from sluice.config.spec import Aggregation, HoppingWindow, SessionWindow, TumblingWindow, Window
from sluice.engine.stages.window import WindowStage
from sluice.errors import StageError

MS = 1000  # µs per ms
T0 = 1_700_000_040_000  # ms since the epoch, a whole minute
LATENESS_MS = 300  # the watermark trails the largest event time by this

AGGS = [
    Aggregation(agg="count", as_="n"),
    Aggregation(agg="count_col", column="v", as_="nv"),
    Aggregation(agg="sum", column="v", as_="sv"),
    Aggregation(agg="sum", column="x", as_="sx"),
    Aggregation(agg="avg", column="v", as_="av"),
    Aggregation(agg="min", column="v", as_="mn"),
    Aggregation(agg="max", column="p", as_="mx"),
    Aggregation(agg="first", column="p", as_="fp"),
    Aggregation(agg="last", column="p", as_="lp"),
    Aggregation(
        agg="count_distinct", column="p", as_="dp", mode="exact", max_distinct_values_per_group=100
    ),
    Aggregation(agg="count_distinct", column="v", as_="hv"),
]
NO_HLL = [a for a in AGGS if not (a.agg == "count_distinct" and a.mode is None)]

SPECS: dict[str, Window] = {
    "tumbling": TumblingWindow(duration_ms=1000, group_by=["k"], aggregations=AGGS),
    "hopping": HoppingWindow(duration_ms=2000, hop_ms=500, group_by=["k"], aggregations=AGGS),
    "session": SessionWindow(
        gap_ms=400, max_session_duration_ms=3000, group_by=["k"], aggregations=AGGS
    ),
    "tumbling-reopen": TumblingWindow(
        duration_ms=1000,
        group_by=["k"],
        aggregations=AGGS,
        late_data="reopen",
        allowed_lateness_ms=700,
    ),
    "session-reopen": SessionWindow(
        gap_ms=400,
        max_session_duration_ms=3000,
        group_by=["k"],
        aggregations=AGGS,
        late_data="reopen",
        allowed_lateness_ms=500,
    ),
}


def events(seed: int, n: int = 3000, keys: int = 8, span_ms: int = 30_000) -> pa.Table:
    """Arrival-ordered events on a 20 ms grid (many ties on event time, which first
    and last break by arrival order, across batches and across a restore), jittered
    back up to the lateness, 5 % up to 12x that (late for most batches); nulls in
    every column."""
    rng = np.random.default_rng(seed)
    base = np.sort(rng.integers(0, span_ms, n))
    jitter = rng.integers(0, LATENESS_MS + 1, n)
    very = rng.random(n) < 0.05
    jitter[very] = rng.integers(LATENESS_MS, 12 * LATENESS_MS, int(very.sum()))
    ts_ms = T0 + np.maximum(base - jitter, 0) // 20 * 20
    key = rng.integers(0, keys + 1, n)
    p = rng.choice(np.array(["home", "cart", "pay", "faq", "blog", "docs"]), n)
    return pa.table(
        {
            "_event_ts": pa.array(ts_ms * MS, pa.timestamp("us", tz="UTC")),
            "k": pa.array([None if i == keys else f"user{i}" for i in key.tolist()], pa.string()),
            "v": pa.array(rng.integers(-50, 1000, n), mask=rng.random(n) < 0.05),
            "x": pa.array(rng.random(n) * 100),
            "p": pa.array(p, mask=rng.random(n) < 0.05),
        }
    )


@dataclass(frozen=True)
class Op:
    """One call: ``process(data, wm)``, or ``advance(wm)`` when ``data`` is None."""

    data: pa.Table | None
    wm: int


def ops_for(table: pa.Table, seed: int, batches: int = 30) -> list[Op]:
    """Random batch splits with the run loop's watermark, an idle tick after every
    fourth batch, then a final flush."""
    rng = np.random.default_rng(seed)
    n = table.num_rows
    cuts = np.sort(rng.choice(np.arange(1, n), size=batches - 1, replace=False)).tolist()
    ts = np.asarray(table["_event_ts"].cast(pa.int64()).to_numpy())
    ops: list[Op] = []
    top = 0
    for i, (a, b) in enumerate(itertools.pairwise([0, *cuts, n])):
        top = max(top, int(ts[a:b].max()))
        ops.append(Op(table.slice(a, b - a), top - LATENESS_MS * MS))
        if i % 4 == 3:
            ops.append(Op(None, top - LATENESS_MS * MS + 150 * MS))
    ops.append(Op(None, top + 10**12))
    return ops


@dataclass
class Out:
    emitted: pa.Table
    late: np.ndarray


def run(stage: WindowStage, ops: list[Op]) -> list[Out]:
    outs = []
    for op in ops:
        out = stage.process(op.data, op.wm) if op.data is not None else stage.advance(op.wm)
        outs.append(Out(out.emitted, out.late))
    return outs


def same(got: list[Out], want: list[Out], loose: tuple[str, ...] = ()) -> None:
    """Call by call the same tables and late indices; ``loose`` columns (float sums)
    to the last few bits only."""
    assert len(got) == len(want)
    for call, (g, w) in enumerate(zip(got, want, strict=True)):
        assert np.array_equal(g.late, w.late), (call, g.late, w.late)
        assert g.emitted.schema.equals(w.emitted.schema, check_metadata=True), call
        for name in g.emitted.column_names:
            if name in loose:
                gv, wv = g.emitted[name].to_pylist(), w.emitted[name].to_pylist()
                assert [v is None for v in gv] == [v is None for v in wv], (call, name)
                assert np.allclose(
                    [v or 0.0 for v in gv], [v or 0.0 for v in wv], rtol=1e-12, atol=0
                ), (call, name, gv, wv)
            else:
                assert g.emitted[name].equals(w.emitted[name]), (call, name, g.emitted, w.emitted)


def stage(spec: Window) -> WindowStage:
    s = WindowStage(spec, "test")
    s.open()
    return s


def fed(spec: Window, ops: list[Op]) -> WindowStage:
    s = stage(spec)
    run(s, ops)
    return s


def restored(spec: Window, blob: bytes) -> WindowStage:
    s = stage(spec)
    s.restore({"window": blob})
    return s


def same_position(a: WindowStage, b: WindowStage) -> None:
    assert b.watermark_us == a.watermark_us
    assert b.state_size() == a.state_size()
    assert b.open_floor_us() == a.open_floor_us()
    assert b.active_windows() == a.active_windows()


def split_points(ops: list[Op], straight: list[Out]) -> list[int]:
    """Before any row, right after the first emit, right after an idle tick, after
    the first call with late rows, the middle, and before the final flush."""
    first_emit = next(i for i, o in enumerate(straight) if o.emitted.num_rows)
    first_tick = next(i for i, op in enumerate(ops) if op.data is None)
    first_late = next(i for i, o in enumerate(straight) if len(o.late))
    points = {0, first_emit + 1, first_tick + 1, first_late + 1, len(ops) // 2, len(ops) - 1}
    return sorted(points)


# -- resume equals an uninterrupted run ------------------------------------------------


@pytest.mark.parametrize("name", list(SPECS))
def test_a_restored_stage_goes_on_as_the_uninterrupted_one(name: str) -> None:
    spec = SPECS[name]
    # The session merge aggregates on several threads, so a float sum adds in an
    # order that differs from run to run, with or without a restore (the fixed
    # windows here merge on one thread: they have count_distinct aggregates).
    loose = ("sx",) if isinstance(spec, SessionWindow) else ()
    ops = ops_for(events(seed=len(name)), seed=7)
    straight = run(stage(spec), ops)
    # the data exercises what a snapshot has to carry
    assert sum(len(o.late) for o in straight) > 20
    emitted = pa.concat_tables([o.emitted for o in straight if o.emitted.num_rows])
    assert emitted.num_rows > 50
    assert pc.max(emitted["hv"]).as_py() > 10
    assert pc.max(emitted["dp"]).as_py() == 6
    if spec.late_data == "reopen":  # a window or session emitted again
        keys = emitted.select(["window_start", "k"]).to_pylist()
        assert len({tuple(r.values()) for r in keys}) < len(keys)
    for k in split_points(ops, straight):
        a = stage(spec)
        same(run(a, ops[:k]), straight[:k], loose)
        blob = a.snapshot()["window"]
        assert a.snapshot()["window"] == blob  # taking one changes nothing
        b = restored(spec, blob)
        same_position(a, b)
        c = restored(spec, b.snapshot()["window"])  # the snapshot of a restored stage
        same_position(a, c)
        same(run(b, ops[k:]), straight[k:], loose)
        same(run(c, ops[k:]), straight[k:], loose)
        same(run(a, ops[k:]), straight[k:], loose)


@pytest.mark.parametrize("name", ["tumbling", "hopping", "session-reopen"])
def test_the_snapshot_of_a_restored_stage_is_the_same_bytes(name: str) -> None:
    # Without HLL sketches: a sketch with few values re-serialises its coupons in
    # another order, so with them only the behaviour is the same (tested above).
    spec = msgspec.structs.replace(SPECS[name], aggregations=NO_HLL)
    ops = ops_for(events(seed=3), seed=8)
    for k in (0, 5, len(ops) // 2):
        blob = fed(spec, ops[:k]).snapshot()["window"]
        again = restored(spec, blob).snapshot()["window"]
        assert again == blob
        assert restored(spec, again).snapshot()["window"] == blob


def test_hll_sketches_round_trip_exactly() -> None:
    """Sketches in list, set and HLL mode, merged by session bridges: the estimates
    after a restore are the uninterrupted ones, bit for bit."""
    rng = np.random.default_rng(21)
    spec = SessionWindow(
        gap_ms=50,
        max_session_duration_ms=600_000,
        group_by=["k"],
        aggregations=[
            Aggregation(agg="count_distinct", column="v", as_="hv"),
            Aggregation(agg="count_distinct", column="s", as_="hs"),
        ],
    )
    truth = {"big": 30_000, "mid": 200, "small": 3}  # HLL, set and list mode
    batches = []
    for step in range(8):
        parts = []
        for j, (key, distinct) in enumerate(truth.items()):
            m = max(distinct // 4, 3)
            values = rng.integers(0, distinct, m) + j * 10**6
            # 40 ms slots 60 ms apart: steps 0-3 fill the even ones (four sessions a
            # key, 80 ms gaps), steps 4-7 the odd ones, bridging them into one
            slot = 2 * step if step < 4 else 2 * (step - 4) + 1
            ts = rng.integers(0, 40, m) + slot * 60
            parts.append(
                pa.table(
                    {
                        "_event_ts": pa.array((T0 + ts) * MS, pa.timestamp("us", tz="UTC")),
                        "k": pa.array([key] * m),
                        "v": pa.array(values),
                        "s": pa.array([f"s{x}" for x in values.tolist()]),
                    }
                )
            )
        batches.append(pa.concat_tables(parts))
    ops = [Op(b, (T0 - 1) * MS) for b in batches] + [Op(None, (T0 + 10**6) * MS)]
    straight = run(stage(spec), ops)
    assert fed(spec, ops[:4]).state_size() == 12
    final = straight[-1].emitted.to_pylist()
    assert sorted(r["k"] for r in final) == sorted(truth)  # one session a key
    big = max(r["hv"] for r in final if r["k"] == "big")
    assert 10_000 < big < 40_000  # the sketch is in HLL mode
    for k in (1, 4, 7):
        a = fed(spec, ops[:k])
        b = restored(spec, a.snapshot()["window"])
        c = restored(spec, b.snapshot()["window"])
        same(run(b, ops[k:]), straight[k:])
        same(run(c, ops[k:]), straight[k:])


@pytest.mark.parametrize(
    "spec",
    [
        TumblingWindow(duration_ms=60_000, group_by=["k"], aggregations=AGGS),
        SessionWindow(
            gap_ms=60_000, max_session_duration_ms=600_000, group_by=["k"], aggregations=AGGS
        ),
    ],
)
def test_first_and_last_ties_keep_arrival_order_across_a_restore(spec: Window) -> None:
    def rows(ts_ms: list[int], p: list[str]) -> pa.Table:
        n = len(ts_ms)
        return pa.table(
            {
                "_event_ts": pa.array([(T0 + t) * MS for t in ts_ms], pa.timestamp("us", tz="UTC")),
                "k": ["a"] * n,
                "v": pa.array([1] * n),
                "x": pa.array([1.0] * n),
                "p": p,
            }
        )

    a = stage(spec)
    a.process(rows([30, 20, 10, 40], ["o0", "o1", "o2", "o3"]), None)
    b = restored(spec, a.snapshot()["window"])
    # the same event times as the first and the last row, arriving later: an
    # earlier arrival stays first, a later one becomes last
    for s in (a, b):
        s.process(rows([10, 40], ["n0", "n1"]), None)
        out = s.advance((T0 + 10**6) * MS).emitted.to_pylist()
        assert [(r["fp"], r["lp"], r["n"]) for r in out] == [("o2", "n1", 6)]


@pytest.mark.parametrize(
    ("ts_type", "values"),
    [
        (pa.timestamp("us", tz="Asia/Tokyo"), [1_000 * MS, 1_500 * MS]),
        (pa.timestamp("ms"), [1_000, 1_500]),
        (pa.int64(), [1_000 * MS, 1_500 * MS]),
    ],
)
def test_the_time_zone_survives_a_restore(ts_type: pa.DataType, values: list[int]) -> None:
    spec = TumblingWindow(
        duration_ms=1_000, group_by=["k"], aggregations=[Aggregation(agg="count", as_="n")]
    )
    a = stage(spec)
    a.process(pa.table({"_event_ts": pa.array(values, ts_type), "k": ["a", "b"]}), None)
    b = restored(spec, a.snapshot()["window"])
    # nothing closed yet: an empty table, in the output schema
    empty = b.advance(0).emitted
    assert empty.num_rows == 0 and empty.num_columns == 4
    assert empty.equals(a.advance(0).emitted, check_metadata=True)
    out = b.advance(3_000 * MS).emitted
    assert out.equals(a.advance(3_000 * MS).emitted)
    want_tz = getattr(ts_type, "tz", "UTC") if pa.types.is_timestamp(ts_type) else "UTC"
    assert out.schema.field("window_start").type == pa.timestamp("us", tz=want_tz)
    assert out["n"].to_pylist() == [1, 1]


def test_an_empty_stage_round_trips() -> None:
    spec = SPECS["hopping"]
    blob = stage(spec).snapshot()["window"]
    b = restored(spec, blob)
    assert b.watermark_us is None and b.state_size() == 0 and b.open_floor_us() is None
    assert b.advance(5).emitted.num_rows == 0
    assert b.advance(5).emitted.num_columns == 0  # no batch fixed the output schema yet
    ops = ops_for(events(seed=5), seed=9)
    same(run(restored(spec, blob), ops), run(stage(spec), ops))


def test_a_stage_with_only_a_watermark_keeps_the_larger_one() -> None:
    spec = SPECS["tumbling"]
    ops = ops_for(events(seed=6), seed=10)
    a = fed(spec, ops[:6])
    assert a.watermark_us is not None
    blob = a.snapshot()["window"]
    lower = stage(spec)
    lower.advance(a.watermark_us - 10**6)
    lower.restore({"window": blob})
    assert lower.watermark_us == a.watermark_us
    higher = stage(spec)
    higher.advance(a.watermark_us + 10**6)
    higher.restore({"window": blob})
    assert higher.watermark_us == a.watermark_us + 10**6
    assert higher.state_size() == a.state_size()


def test_the_state_is_one_key_and_restore_ignores_the_keys_of_others() -> None:
    spec = SPECS["session"]
    ops = ops_for(events(seed=23), seed=24)
    a = fed(spec, ops[:6])
    state = a.snapshot()
    assert list(state) == ["window"]
    b = stage(spec)
    b.restore({"join/orders:0": b"not ours", **state, "zzz": b""})
    same_position(a, b)
    same(run(b, ops[6:]), run(a, ops[6:]), loose=("sx",))  # sessions sum floats on threads
    # nothing of ours: the stage stays as it is, rows folded or not
    busy = fed(spec, ops[:3])
    before = busy.snapshot()
    busy.restore({})
    busy.restore({"join/orders:0": b"not ours"})
    assert busy.snapshot() == before


# -- refusals ----------------------------------------------------------------------


def test_restore_refuses_what_is_not_a_matching_snapshot_and_keeps_the_state() -> None:
    spec = SPECS["session"]
    ops = ops_for(events(seed=11), seed=12)
    blob = fed(spec, ops[:8]).snapshot()["window"]
    empty = stage(spec).snapshot()["window"]
    fresh = stage(spec)
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x40
    bad = {
        "not a window snapshot": [b"", b"SW", b"garbage", b"SJN" + blob[3:]],
        r"format version 3 is not supported \(this sluice reads versions 1, 2\); "
        "was it written by a newer sluice": [blob[:3] + b"\x03" + blob[4:]],
        "truncated or damaged": [blob[:6], blob[:-10], blob[: len(blob) // 2], bytes(flipped)],
    }
    for message, blobs in bad.items():
        for wrong in blobs:
            with pytest.raises(StageError, match=message):
                fresh.restore({"window": wrong})
            assert fresh.snapshot()["window"] == empty
    # a damaged blob whose checksum was made to match: still refused
    head = struct.Struct("<3sBII")
    _, _, n_meta, _ = head.unpack_from(blob)
    body = bytearray(blob[head.size :])
    body[n_meta + 40 : n_meta + 60] = b"\x00" * 20
    forged = head.pack(b"SWN", 1, n_meta, zlib.crc32(body)) + bytes(body)
    with pytest.raises(StageError, match="damaged"):
        fresh.restore({"window": forged})
    assert fresh.snapshot()["window"] == empty
    fresh.restore({"window": blob})  # untouched: the real one still goes in
    assert fresh.snapshot()["window"] == restored(spec, blob).snapshot()["window"]


@pytest.mark.parametrize(
    ("other", "message"),
    [
        (
            TumblingWindow(duration_ms=2000, group_by=["k"], aggregations=AGGS),
            "duration_ms 1000 in the snapshot, 2000 here",
        ),
        (
            HoppingWindow(duration_ms=1000, hop_ms=500, group_by=["k"], aggregations=AGGS),
            'kind "tumbling" in the snapshot, "hopping" here',
        ),
        (
            TumblingWindow(duration_ms=1000, group_by=["p"], aggregations=AGGS),
            r'group_by \["k"\] in the snapshot, \["p"\] here',
        ),
        (
            TumblingWindow(duration_ms=1000, group_by=["k"], aggregations=AGGS[:-1]),
            "aggregations .*count_distinct approximate\\(v\\)",
        ),
        (
            TumblingWindow(duration_ms=1000, group_by=["k"], aggregations=[*AGGS[1:], AGGS[0]]),
            'aggregations \\["count\\(\\)", "count_col\\(v\\)", .* in the snapshot, \\["count_col\\(v\\)"',
        ),
    ],
)
def test_restore_refuses_another_window_configuration(other: Window, message: str) -> None:
    spec = SPECS["tumbling"]
    blob = fed(spec, ops_for(events(seed=13), seed=14)[:6]).snapshot()["window"]
    s = stage(other)
    empty = s.snapshot()["window"]
    with pytest.raises(StageError, match=f"another window configuration.*{message}"):
        s.restore({"window": blob})
    assert s.snapshot()["window"] == empty


def test_caps_lateness_and_output_names_may_change_across_a_restore() -> None:
    spec = SPECS["tumbling"]
    blob = fed(spec, ops_for(events(seed=15), seed=16)[:6]).snapshot()["window"]
    renamed = [
        Aggregation(
            agg=a.agg,
            column=a.column,
            mode=a.mode,
            as_=a.as_ + "_2",
            max_distinct_values_per_group=None if a.mode is None else 500,
        )
        for a in AGGS
    ]
    other = TumblingWindow(
        duration_ms=1000,
        group_by=["k"],
        aggregations=renamed,
        max_groups_per_window=50,
        late_data="reopen",
        allowed_lateness_ms=100,
        window_start_column="ws",
    )
    restored(other, blob)


def test_restore_needs_an_open_stage_without_rows() -> None:
    spec = SPECS["tumbling"]
    ops = ops_for(events(seed=17), seed=18)
    blob = fed(spec, ops[:4]).snapshot()["window"]
    busy = fed(spec, ops[:2])
    before = busy.snapshot()["window"]
    with pytest.raises(StageError, match="has not folded any rows"):
        busy.restore({"window": blob})
    assert busy.snapshot()["window"] == before
    # rows that were all late count as folded too: they moved the arrival counter
    late = stage(spec)
    late.advance(10**18)
    assert len(late.process(ops[0].data, None).late) > 0  # type: ignore[arg-type]
    with pytest.raises(StageError, match="has not folded any rows"):
        late.restore({"window": blob})
    closed = WindowStage(spec, "test")
    with pytest.raises(StageError, match="not open"):
        closed.restore({"window": blob})
    with pytest.raises(StageError, match="not open"):
        closed.snapshot()["window"]


# -- size --------------------------------------------------------------------------


def test_a_snapshot_of_100k_open_groups_is_compact() -> None:
    groups = 100_000
    spec = TumblingWindow(
        duration_ms=60_000,
        group_by=["k"],
        max_groups_per_window=2 * groups,
        aggregations=[
            Aggregation(agg="count", as_="n"),
            Aggregation(agg="sum", column="v", as_="s"),
            Aggregation(agg="min", column="v", as_="mn"),
            Aggregation(agg="max", column="v", as_="mx"),
            Aggregation(agg="avg", column="v", as_="av"),
            Aggregation(agg="last", column="v", as_="lv"),
        ],
    )
    rng = np.random.default_rng(19)
    n = 2 * groups
    data = pa.table(
        {
            "_event_ts": pa.array(
                (T0 + rng.integers(0, 60_000, n)) * MS, pa.timestamp("us", tz="UTC")
            ),
            "k": pa.array(np.tile(np.arange(groups, dtype=np.int64), 2)),
            "v": pa.array(rng.integers(0, 1000, n)),
        }
    )
    a = stage(spec)
    a.process(data, None)
    assert a.state_size() == groups
    blob = a.snapshot()["window"]
    # the state uncompressed: window start and end, key, id, first/last event
    # time and arrival, 7 accumulators (avg has two): 15 int64s and a bool a group
    raw = groups * (15 * 8 + 1)
    bound = raw / 2 if pa.Codec.is_available("zstd") else raw * 1.1
    assert len(blob) < bound, (len(blob), raw)
    b = restored(spec, blob)
    out = b.advance((T0 + 60_000) * MS).emitted
    assert out.equals(a.advance((T0 + 60_000) * MS).emitted)
    assert out.num_rows == groups


def test_a_format_1_session_snapshot_restores_as_settled_sessions() -> None:
    """Format 1 (sessions cut at epoch multiples of the cap, no ``__ems``) still
    restores: each stored session becomes one settled item, and the stage goes
    on as the uninterrupted one wherever no old session straddles a cap."""
    spec = SPECS["session"]
    ops = ops_for(events(seed=21), seed=22)
    straight = run(stage(spec), ops)
    a = fed(spec, ops[:10])
    blob = a.snapshot()["window"]
    # the same state in format 1: the "state" piece without __ems, version byte 1
    head = struct.Struct("<3sBII")
    _, _, n_meta, _ = head.unpack_from(blob)
    body = blob[head.size :]
    meta = msgspec.json.decode(body[:n_meta])
    pieces, at = [], n_meta
    for name, size in meta.pop("pieces"):
        piece = body[at : at + size]
        at += size
        if name == "state":
            table = pa.ipc.open_stream(pa.py_buffer(piece)).read_all()
            sink = pa.BufferOutputStream()
            table = table.drop_columns(["__ems"])
            with pa.ipc.new_stream(sink, table.schema) as w:
                w.write_table(table)
            piece = sink.getvalue().to_pybytes()
        pieces.append((name, piece))
    meta["pieces"] = [[name, len(piece)] for name, piece in pieces]
    text = msgspec.json.encode(meta)
    crc = zlib.crc32(text)
    for _, piece in pieces:
        crc = zlib.crc32(piece, crc)
    old = b"".join([head.pack(b"SWN", 1, len(text), crc), text, *(p for _, p in pieces)])
    b = restored(spec, old)
    same_position(a, b)
    same(run(b, ops[10:]), straight[10:], loose=("sx",))
