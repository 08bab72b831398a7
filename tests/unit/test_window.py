"""The window stage against DuckDB SQL over the same events.

Each random test generates a few thousand events (out of order within the
watermark's lateness, plus some later rows), feeds them in random batch
splits with the watermark the run loop will compute (max event time seen
minus lateness), works out independently which rows were late for that batch
order, and compares every emitted row with the windows DuckDB computes over
the accepted rows.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import datasketches
import duckdb
import numpy as np
import pyarrow as pa
import pytest

from sluice.config.spec import Aggregation, HoppingWindow, SessionWindow, TumblingWindow, Window
from sluice.engine.stages.window import WindowStage
from sluice.errors import StageError

MS = 1000  # µs per ms
T0 = 1_700_000_040_000  # ms since the epoch: a realistic start, a whole minute

AGGS = [
    Aggregation(agg="count", as_="n"),
    Aggregation(agg="count_col", column="v", as_="nv"),
    Aggregation(agg="sum", column="v", as_="sv"),
    Aggregation(agg="avg", column="v", as_="av"),
    Aggregation(agg="min", column="v", as_="mn"),
    Aggregation(agg="max", column="p", as_="mx"),
    Aggregation(agg="sum", column="x", as_="sx"),
    Aggregation(agg="first", column="p", as_="fp"),
    Aggregation(agg="last", column="p", as_="lp"),
    Aggregation(
        agg="count_distinct", column="p", as_="dp", mode="exact", max_distinct_values_per_group=100
    ),
    Aggregation(agg="count_distinct", column="v", as_="hv"),
]
SQL_AGGS = """
    count(*) AS n, count(v) AS nv, sum(v) AS sv, avg(v) AS av, min(v) AS mn, max(p) AS mx,
    sum(x) AS sx, first(p ORDER BY ts, seq) AS fp, last(p ORDER BY ts, seq) AS lp,
    count(DISTINCT p) AS dp, count(DISTINCT v) AS hv
"""
EXACT = ["n", "nv", "sv", "mn", "mx", "fp", "lp", "dp"]
FLOAT = ["av", "sx"]
HLL_BOUND = max(
    abs(datasketches.hll_sketch.get_rel_err(up, unioned, 12, 3))
    for up in (True, False)
    for unioned in (True, False)
)


def events(
    seed: int, n: int, keys: int, span_ms: int, disorder_ms: int, very_ms: int = 0
) -> pa.Table:
    """Arrival-ordered events: ms-granular (ties), jittered back by up to
    ``disorder_ms``, 4 % jittered back up to ``very_ms`` (6x ``disorder_ms``
    unless given): late for most batches."""
    very_ms = very_ms or 6 * disorder_ms
    rng = np.random.default_rng(seed)
    base = np.sort(rng.integers(0, span_ms, n))
    jitter = rng.integers(0, disorder_ms + 1, n)
    very = rng.random(n) < 0.04
    jitter[very] = rng.integers(disorder_ms, very_ms, int(very.sum()))
    ts_ms = T0 + np.maximum(base - jitter, 0)
    key = rng.integers(0, keys + 1, n)
    k = pa.array([None if i == keys else f"user{i}" for i in key.tolist()], pa.string())
    v = rng.integers(-50, 1000, n)
    v_mask = rng.random(n) < 0.05
    p = rng.choice(np.array(["home", "cart", "pay", "faq", "blog", "docs"]), n)
    p_mask = rng.random(n) < 0.05
    return pa.table(
        {
            "_event_ts": pa.array(ts_ms * MS, pa.timestamp("us", tz="UTC")),
            "k": k,
            "v": pa.array(v, mask=v_mask),
            "x": pa.array(rng.random(n) * 100),
            "p": pa.array(p, mask=p_mask),
        }
    )


@dataclass
class Fed:
    emitted: list[dict[str, Any]]  # every emitted row, with "call": the call that emitted it
    late: np.ndarray  # indices the stage returned as late
    ref: np.ndarray  # per row: the watermark before its batch (None before the first)
    arrival_call: np.ndarray  # per row: the call that carried it
    floors: list[int | None]  # open_floor_us after each call
    sizes: list[int]  # state_size after each call


def feed(
    stage: WindowStage, table: pa.Table, seed: int, lateness_ms: int, batches: int = 40
) -> Fed:
    """Random batch splits, watermark = max event time seen - lateness, then a final flush."""
    rng = np.random.default_rng(seed)
    n = table.num_rows
    cuts = np.sort(rng.choice(np.arange(1, n), size=batches - 1, replace=False))
    bounds = [0, *cuts.tolist(), n]
    ts = us(table)
    ref: list[int | None] = [None] * n
    arrival = np.empty(n, np.int64)
    emitted: list[dict[str, Any]] = []
    late: list[np.ndarray] = []
    floors: list[int | None] = []
    sizes: list[int] = []
    wm: int | None = None
    top = None
    for call, (a, b) in enumerate(itertools.pairwise(bounds)):
        ref[a:b] = [wm] * (b - a)
        arrival[a:b] = call
        top = int(ts[a:b].max()) if top is None else max(top, int(ts[a:b].max()))
        wm = top - lateness_ms * MS
        out = stage.process(table.slice(a, b - a), wm)
        late.append(out.late + a)
        emitted += [{**r, "call": call} for r in rows(out.emitted)]
        floors.append(stage.open_floor_us())
        sizes.append(stage.state_size())
    out = stage.advance(int(ts.max()) + 10**12)
    assert len(out.late) == 0
    emitted += [{**r, "call": len(bounds) - 1} for r in rows(out.emitted)]
    floors.append(stage.open_floor_us())
    sizes.append(stage.state_size())
    assert stage.state_size() == 0 and stage.open_floor_us() is None
    return Fed(emitted, np.concatenate(late), np.array(ref, dtype=object), arrival, floors, sizes)


def us(table: pa.Table) -> np.ndarray:
    return np.asarray(table["_event_ts"].cast(pa.int64()).to_numpy())


def rows(table: pa.Table) -> list[dict[str, Any]]:
    if table.num_rows == 0:
        return []
    out = table
    for name in ("window_start", "window_end"):
        out = out.set_column(out.schema.get_field_index(name), name, out[name].cast(pa.int64()))
    return list(out.to_pylist())


def late_rows(ref: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """Rows whose ``bound`` (window end + allowed lateness, or event time) is <= the
    watermark before their batch."""
    has = np.array([r is not None for r in ref])
    refs = np.array([r if r is not None else 0 for r in ref], dtype=np.int64)
    return np.flatnonzero(has & (bound <= refs))


def duck(table: pa.Table, fed: Fed, sql: str) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Run ``sql`` over table ``r`` (the events with seq, ts µs and ref) keyed by window."""
    r = pa.table(
        {
            "seq": pa.array(np.arange(table.num_rows)),
            "ts": pa.array(us(table)),
            "k": table["k"],
            "v": table["v"],
            "x": table["x"],
            "p": table["p"],
            "ref": pa.array(list(fed.ref), pa.int64()),
            "late": pa.array(np.isin(np.arange(table.num_rows), fed.late)),
        }
    )
    con = duckdb.connect()
    con.register("r", r)
    result = con.sql(sql).to_arrow_table().to_pylist()
    return {(x["ws"], x["we"], x["k"]): x for x in result}


def compare(got: dict[str, Any], want: dict[str, Any]) -> None:
    for name in EXACT:
        assert got[name] == want[name], (name, got, want)
    for name in FLOAT:
        if want[name] is None:
            assert got[name] is None, (name, got, want)
        else:
            assert math.isclose(got[name], want[name], rel_tol=1e-9, abs_tol=1e-9), (name, got)
    exact = want["hv"]
    assert abs(got["hv"] - exact) <= HLL_BOUND * exact + 1e-9, (got["hv"], exact)


def check_floor(fed: Fed, table: pa.Table, row_window: list[list[tuple[Any, ...]]]) -> None:
    """After every call, the floor is at most the event time of every accepted row whose
    windows are not all emitted for the last time yet, and None only when no such row exists."""
    last_emit: dict[tuple[Any, ...], int] = {}
    for r in fed.emitted:
        last_emit[(r["window_start"], r["window_end"], r["k"])] = r["call"]
    ts = us(table)
    calls = len(fed.floors)
    open_min = np.full(calls, np.iinfo(np.int64).max)
    for i, windows in enumerate(row_window):
        if not windows:
            continue
        done = max(last_emit[w] for w in windows)
        a = fed.arrival_call[i]
        if done > a:
            open_min[a:done] = np.minimum(open_min[a:done], ts[i])
    for call in range(calls):
        floor = fed.floors[call]
        if open_min[call] < np.iinfo(np.int64).max:
            assert floor is not None and floor <= open_min[call], (call, floor, open_min[call])


def stage(spec: Window) -> WindowStage:
    s = WindowStage(spec, "test")
    s.open()
    return s


# -- random feeds against DuckDB -----------------------------------------------------


def test_tumbling_matches_duckdb() -> None:
    d, lateness = 1000, 300
    table = events(1, 4000, keys=12, span_ms=60_000, disorder_ms=lateness)
    spec = TumblingWindow(duration_ms=d, group_by=["k"], aggregations=AGGS)
    fed = feed(stage(spec), table, seed=2, lateness_ms=lateness)
    ts = us(table)
    expected_late = late_rows(fed.ref, ts // (d * MS) * (d * MS) + d * MS)
    assert len(expected_late) > 20
    assert np.array_equal(np.sort(fed.late), expected_late)
    want = duck(
        table,
        fed,
        f"SELECT ts // {d * MS} * {d * MS} AS ws, ts // {d * MS} * {d * MS} + {d * MS} AS we, k, "
        f"{SQL_AGGS} FROM r WHERE NOT late GROUP BY ALL",
    )
    keys = [(r["window_start"], r["window_end"], r["k"]) for r in fed.emitted]
    assert len(keys) == len(set(keys)), "a window was emitted twice"
    assert set(keys) == set(want)
    for r in fed.emitted:
        compare(r, want[(r["window_start"], r["window_end"], r["k"])])
    assert list(fed.emitted[0]) == [
        "window_start",
        "window_end",
        "k",
        *(a.as_ for a in AGGS),
        "call",
    ]
    row_window = [
        []
        if i in set(fed.late.tolist())
        else [(t // (d * MS) * (d * MS), t // (d * MS) * (d * MS) + d * MS, k)]
        for i, (t, k) in enumerate(zip(ts.tolist(), table["k"].to_pylist(), strict=True))
    ]
    check_floor(fed, table, row_window)


@pytest.mark.parametrize(("d", "hop"), [(2000, 500), (1000, 300)])
def test_hopping_matches_duckdb(d: int, hop: int) -> None:
    lateness = 300
    table = events(3, 4000, keys=6, span_ms=40_000, disorder_ms=lateness, very_ms=4 * d)
    spec = HoppingWindow(duration_ms=d, hop_ms=hop, group_by=["k"], aggregations=AGGS)
    fed = feed(stage(spec), table, seed=4, lateness_ms=lateness)
    ts = us(table)
    # a row is late when its newest window (start = floor(ts / hop) * hop) is closed
    expected_late = late_rows(fed.ref, ts // (hop * MS) * (hop * MS) + d * MS)
    assert len(expected_late) > 5
    assert np.array_equal(np.sort(fed.late), expected_late)
    want = duck(
        table,
        fed,
        f"""
        WITH pairs AS (
            SELECT * FROM (
                SELECT *, unnest(generate_series(
                    ((ts - {d * MS}) // {hop * MS} + 1) * {hop * MS}, ts // {hop * MS} * {hop * MS},
                    {hop * MS})) AS ws
                FROM r)
            WHERE ws + {d * MS} > ts AND (ref IS NULL OR ws + {d * MS} > ref)
        )
        SELECT ws, ws + {d * MS} AS we, k, {SQL_AGGS} FROM pairs GROUP BY ALL
        """,
    )
    keys = [(r["window_start"], r["window_end"], r["k"]) for r in fed.emitted]
    assert len(keys) == len(set(keys))
    assert set(keys) == set(want)
    for r in fed.emitted:
        compare(r, want[(r["window_start"], r["window_end"], r["k"])])
    row_window = []
    refs = fed.ref
    for t, k, ref in zip(ts.tolist(), table["k"].to_pylist(), refs, strict=True):
        oldest = ((t - d * MS) // (hop * MS) + 1) * (hop * MS)
        starts = range(oldest, t // (hop * MS) * (hop * MS) + 1, hop * MS)
        row_window.append([(s, s + d * MS, k) for s in starts if ref is None or s + d * MS > ref])
    check_floor(fed, table, row_window)


SESSION_SQL = """
WITH RECURSIVE a AS (SELECT * FROM r WHERE NOT late),
g AS (
    SELECT *, sum(CASE WHEN prev IS NULL OR ts - prev > {gap} THEN 1 ELSE 0 END)
        OVER (PARTITION BY k ORDER BY ts, seq ROWS UNBOUNDED PRECEDING) AS run
    FROM (SELECT *, lag(ts) OVER (PARTITION BY k ORDER BY ts, seq) AS prev FROM a)
),
starts(k, run, ws) AS (
    SELECT k, run, min(ts) FROM g GROUP BY k, run
    UNION ALL
    SELECT s.k, s.run, min(g.ts) FROM starts s JOIN g
        ON g.k IS NOT DISTINCT FROM s.k AND g.run = s.run AND g.ts >= s.ws + {cap}
    GROUP BY s.k, s.run, s.ws
),
rs AS (
    SELECT g.*, (SELECT max(s.ws) FROM starts s
                 WHERE s.k IS NOT DISTINCT FROM g.k AND s.run = g.run AND s.ws <= g.ts) AS ws
    FROM g
)
"""
"""The user guide's sessions: per key, gap runs (LAG: a row more than ``gap``
after the previous one opens a run), then each run cut from its first row:
a session starts at the run's first row and at the first row at or after the
previous session's start + ``cap`` (a recursive CTE). ``rs``: the accepted rows
with their session start ``ws``."""


def session_reference(
    table: pa.Table, fed: Fed, gap: int, cap: int
) -> tuple[dict[Any, Any], dict[int, Any]]:
    """DuckDB sessions (gap runs, cut at each session's start + ``cap``), and each
    accepted row's session."""
    sql = SESSION_SQL.format(gap=gap, cap=cap)
    want = duck(
        table,
        fed,
        sql + f"SELECT ws, least(max(ts) + {gap}, ws + {cap}) AS we, k, "
        f"{SQL_AGGS} FROM rs GROUP BY ws, k",
    )
    by_start = {(w[0], w[2]): w for w in want}
    member = duck(table, fed, sql + "SELECT seq AS ws, NULL AS we, k, ws AS start FROM rs")
    of_row = {key[0]: by_start[(m["start"], m["k"])] for key, m in member.items()}
    return want, of_row


def test_session_matches_duckdb() -> None:
    gap, cap, lateness = 400, 3000, 300
    table = events(5, 4000, keys=8, span_ms=60_000, disorder_ms=lateness)
    spec = SessionWindow(
        gap_ms=gap,
        max_session_duration_ms=cap,
        group_by=["k"],
        aggregations=AGGS,
    )
    fed = feed(stage(spec), table, seed=6, lateness_ms=lateness)
    ts = us(table)
    expected_late = late_rows(fed.ref, ts)
    assert len(expected_late) > 20
    assert np.array_equal(np.sort(fed.late), expected_late)
    want, of_row = session_reference(table, fed, gap * MS, cap * MS)
    keys = [(r["window_start"], r["window_end"], r["k"]) for r in fed.emitted]
    assert len(keys) == len(set(keys))
    assert set(keys) == set(want)
    cut = [w for w in want if w[1] - w[0] == cap * MS and want[w]["n"] > 1]
    assert len(cut) > 10, "the test data never hit the session cap"
    assert sum(w[0] % (cap * MS) != 0 for w in cut) > 10, "no capped session starts off a multiple"
    for r in fed.emitted:
        compare(r, want[(r["window_start"], r["window_end"], r["k"])])
    ids = [r["session_id"] for r in fed.emitted]
    assert len(set(ids)) == len(ids)
    # session_id is a function of key and start only: another batch split agrees
    again = feed(stage(spec), table, seed=7, lateness_ms=lateness, batches=25)
    first_ids = {(r["window_start"], r["k"]): r["session_id"] for r in fed.emitted}
    second_ids = {(r["window_start"], r["k"]): r["session_id"] for r in again.emitted}
    both = first_ids.keys() & second_ids.keys()  # the split changes which rows are late
    assert len(both) > len(first_ids) // 2
    assert all(first_ids[key] == second_ids[key] for key in both)
    row_window = [[of_row[i]] if i in of_row else [] for i in range(table.num_rows)]
    check_floor(fed, table, row_window)


def test_hll_count_distinct_within_its_stated_error() -> None:
    spec = TumblingWindow(
        duration_ms=60_000,
        group_by=["k"],
        aggregations=[Aggregation(agg="count_distinct", column="v", as_="d")],
    )
    s = stage(spec)
    rng = np.random.default_rng(12)
    truth = {"a": 50_000, "b": 3_000}
    values = np.concatenate([rng.permutation(truth["a"]), rng.permutation(truth["b"]) + 10**9])
    keys = ["a"] * truth["a"] + ["b"] * truth["b"]
    order = rng.permutation(len(keys))  # interleaved, with repeats on top
    order = np.concatenate([order, order[: len(order) // 3]])
    for part in np.array_split(order, 17):
        s.process(batch([1] * len(part), [keys[i] for i in part], values[part].tolist()), None)
    for r in rows(s.advance((T0 + 60_000) * MS).emitted):
        exact = truth[r["k"]]
        assert abs(r["d"] - exact) <= HLL_BOUND * exact, (r["k"], r["d"], exact)


# -- reopen ---------------------------------------------------------------------------


def last_versions(fed: Fed) -> dict[tuple[Any, ...], dict[str, Any]]:
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in fed.emitted:  # in emission order: later versions replace earlier ones
        out[(r["window_start"], r["window_end"], r["k"])] = r
    return out


def test_tumbling_reopen_re_emits_corrected_rows() -> None:
    d, lateness, allowed = 1000, 300, 700
    table = events(8, 4000, keys=12, span_ms=60_000, disorder_ms=lateness, very_ms=3 * d)
    spec = TumblingWindow(
        duration_ms=d,
        group_by=["k"],
        aggregations=AGGS,
        late_data="reopen",
        allowed_lateness_ms=allowed,
    )
    fed = feed(stage(spec), table, seed=9, lateness_ms=lateness)
    ts = us(table)
    end = ts // (d * MS) * (d * MS) + d * MS
    expected_late = late_rows(fed.ref, end + allowed * MS)
    assert len(expected_late) > 5
    assert np.array_equal(np.sort(fed.late), expected_late)
    want = duck(
        table,
        fed,
        f"SELECT ts // {d * MS} * {d * MS} AS ws, ts // {d * MS} * {d * MS} + {d * MS} AS we, k, "
        f"{SQL_AGGS} FROM r WHERE NOT late GROUP BY ALL",
    )
    final = last_versions(fed)
    assert set(final) == set(want)
    for key, r in final.items():
        compare(r, want[key])
    re_emitted = len(fed.emitted) - len(final)
    assert re_emitted > 10, "no window was reopened"
    row_window = [
        [] if i in set(fed.late.tolist()) else [(int(e) - d * MS, int(e), k)]
        for i, (e, k) in enumerate(zip(end.tolist(), table["k"].to_pylist(), strict=True))
    ]
    check_floor(fed, table, row_window)


def test_session_reopen_bridges_and_re_emits() -> None:
    gap, cap, lateness, allowed = 400, 3000, 300, 500
    table = events(10, 3000, keys=6, span_ms=40_000, disorder_ms=lateness)
    spec = SessionWindow(
        gap_ms=gap,
        max_session_duration_ms=cap,
        group_by=["k"],
        aggregations=AGGS,
        late_data="reopen",
        allowed_lateness_ms=allowed,
    )
    fed = feed(stage(spec), table, seed=11, lateness_ms=lateness)
    ts = us(table)
    expected_late = late_rows(fed.ref, ts + allowed * MS)
    assert np.array_equal(np.sort(fed.late), expected_late)
    want, _ = session_reference(table, fed, gap * MS, cap * MS)
    # a merge target keyed by (k, window_start): the last version of each row wins
    target: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in fed.emitted:
        target[(r["window_start"], r["k"])] = r
    for ws, we, k in want:
        got = target.pop((ws, k))
        assert got["window_end"] == we
        compare(got, want[(ws, we, k)])
    # what is left are rows of sessions a late row bridged into an earlier one
    # or moved the start of: each lies inside one reference session
    for (ws, k), r in target.items():
        assert any(w[2] == k and w[0] <= ws and r["window_end"] <= w[1] for w in want), r
    assert len(fed.emitted) > len(want), "no session was reopened"


def test_reopen_inside_and_past_allowed_lateness() -> None:
    spec = TumblingWindow(
        duration_ms=10_000,
        group_by=["k"],
        aggregations=[
            Aggregation(agg="count", as_="n"),
            Aggregation(agg="sum", column="v", as_="s"),
        ],
        late_data="reopen",
        allowed_lateness_ms=5_000,
    )
    s = stage(spec)
    first = s.process(batch([1_000, 2_000], ["a", "a"], [1, 2]), (T0 + 10_000) * MS)
    assert [(r["n"], r["s"]) for r in rows(first.emitted)] == [(2, 3)]
    assert s.open_floor_us() == T0 * MS  # emitted, but retained for re-emits
    # inside allowed lateness (end 10 s + 5 s > watermark 12 s): corrected re-emit
    again = s.process(batch([3_000], ["a"], [10]), (T0 + 12_000) * MS)
    assert len(again.late) == 0
    assert [(r["n"], r["s"]) for r in rows(again.emitted)] == [(3, 13)]
    assert s.state_size() == 1
    # the watermark passes end + allowed lateness: the state goes, nothing re-emits
    assert rows(s.advance((T0 + 15_000) * MS).emitted) == []
    assert s.state_size() == 0 and s.open_floor_us() is None
    # later than that: late
    past = s.process(batch([4_000, 16_000], ["a", "a"], [100, 5]), (T0 + 16_000) * MS)
    assert past.late.tolist() == [0]
    assert rows(past.emitted) == []


# -- small cases -----------------------------------------------------------------------


def batch(ts_ms: list[int], k: list[Any], v: list[Any], p: list[Any] | None = None) -> pa.Table:
    cols: dict[str, Any] = {
        "_event_ts": pa.array([(T0 + t) * MS for t in ts_ms], pa.timestamp("us", tz="UTC")),
        "k": pa.array(k),
        "v": pa.array(v, pa.int64()),
    }
    if p is not None:
        cols["p"] = pa.array(p, pa.string())
    return pa.table(cols)


def test_group_cap_fails_with_the_guide_message_and_keeps_state() -> None:
    spec = TumblingWindow(
        duration_ms=60_000,
        group_by=["k"],
        max_groups_per_window=3,
        aggregations=[Aggregation(agg="count", as_="n")],
    )
    s = stage(spec)
    s.process(batch([1, 2, 3], ["a", "b", "c"], [1, 1, 1]), None)
    with pytest.raises(StageError, match=r"^max_groups_per_window=3 reached"):
        s.process(batch([4, 5], ["a", "d"], [1, 1]), None)
    assert s.state_size() == 3
    out = s.advance((T0 + 60_000) * MS)
    assert sorted((r["k"], r["n"]) for r in rows(out.emitted)) == [("a", 1), ("b", 1), ("c", 1)]


def test_session_cap_counts_open_sessions() -> None:
    spec = SessionWindow(
        gap_ms=10,
        max_session_duration_ms=100,
        group_by=["k"],
        max_groups_per_window=2,
        aggregations=[Aggregation(agg="count", as_="n")],
    )
    s = stage(spec)
    s.process(batch([1, 50], ["a", "a"], [1, 1]), None)  # two sessions of one key
    with pytest.raises(StageError, match=r"^max_groups_per_window=2 reached"):
        s.process(batch([1], ["b"], [1]), None)


def test_exact_count_distinct_cap_names_the_group() -> None:
    spec = TumblingWindow(
        duration_ms=60_000,
        group_by=["k"],
        aggregations=[
            Aggregation(
                agg="count_distinct",
                column="p",
                as_="d",
                mode="exact",
                max_distinct_values_per_group=2,
            )
        ],
    )
    s = stage(spec)
    s.process(batch([1, 2, 3], ["a", "a", "b"], [0, 0, 0], ["x", "y", "x"]), None)
    with pytest.raises(StageError, match=r"count_distinct 'd'.*k='a'"):
        s.process(batch([4, 5], ["a", "a"], [0, 0], ["y", "z"]), None)
    s.process(batch([6, 7], ["a", "b"], [0, 0], ["x", None]), None)  # repeats and nulls are fine
    out = rows(s.advance((T0 + 60_000) * MS).emitted)
    assert sorted((r["k"], r["d"]) for r in out) == [("a", 2), ("b", 1)]


def test_first_and_last_follow_event_time_then_arrival() -> None:
    spec = TumblingWindow(
        duration_ms=60_000,
        group_by=["k"],
        aggregations=[
            Aggregation(agg="first", column="p", as_="f"),
            Aggregation(agg="last", column="p", as_="l"),
        ],
    )
    s = stage(spec)
    s.process(batch([30, 10, 50], ["a"] * 3, [0] * 3, ["mid", "early", "late"]), None)
    # an earlier row arriving later wins first; ties on event time go by arrival order
    s.process(batch([5, 50, 5], ["a"] * 3, [0] * 3, ["earliest", "late2", "earliest2"]), None)
    out = rows(s.advance((T0 + 60_000) * MS).emitted)
    assert [(r["f"], r["l"]) for r in out] == [("earliest", "late2")]
    # a null value is a value: first is null when the first row's value is
    s.process(batch([60_001, 60_002], ["a", "a"], [0, 0], [None, "x"]), None)
    out = rows(s.advance((T0 + 120_000) * MS).emitted)
    assert [(r["f"], r["l"]) for r in out] == [(None, "x")]


def test_idle_advance_emits_and_watermark_never_goes_back() -> None:
    spec = TumblingWindow(
        duration_ms=1_000, group_by=["k"], aggregations=[Aggregation(agg="count", as_="n")]
    )
    s = stage(spec)
    out = s.process(batch([100, 1_500, 2_500], ["a", "a", "b"], [0, 0, 0]), None)
    assert out.emitted.num_rows == 0 and s.state_size() == 3
    floor = s.open_floor_us()
    assert floor == T0 * MS
    assert [r["n"] for r in rows(s.advance((T0 + 2_000) * MS).emitted)] == [1, 1]
    assert s.open_floor_us() == (T0 + 2_000) * MS
    assert rows(s.advance((T0 + 1_000) * MS).emitted) == []  # an older watermark is ignored
    late = s.process(batch([1_999], ["a"], [0]), (T0 + 1_000) * MS)
    assert late.late.tolist() == [0]
    assert [r["k"] for r in rows(s.advance((T0 + 3_000) * MS).emitted)] == ["b"]
    assert s.state_size() == 0 and s.open_floor_us() is None


def test_session_bridge_merges_two_sessions() -> None:
    spec = SessionWindow(
        gap_ms=100,
        max_session_duration_ms=10_000,
        group_by=["k"],
        aggregations=[
            Aggregation(agg="count", as_="n"),
            Aggregation(agg="sum", column="v", as_="s"),
            Aggregation(agg="first", column="p", as_="f"),
            Aggregation(agg="last", column="p", as_="l"),
            Aggregation(
                agg="count_distinct",
                column="p",
                as_="dx",
                mode="exact",
                max_distinct_values_per_group=10,
            ),
            Aggregation(agg="count_distinct", column="p", as_="dh"),
        ],
    )
    s = stage(spec)
    s.process(batch([0, 50, 200, 250], ["a"] * 4, [1, 2, 3, 4], ["x", "y", "y", "z"]), None)
    assert s.state_size() == 2
    # within 100 ms of both: one session
    s.process(batch([125, 5_000], ["a", "b"], [10, 0], ["w", "q"]), None)
    assert s.state_size() == 2
    out = rows(s.advance((T0 + 10_000) * MS).emitted)
    got = [(r["window_start"], r["window_end"], r["n"], r["s"], r["f"], r["l"]) for r in out]
    assert got[0] == (T0 * MS, (T0 + 350) * MS, 5, 20, "x", "z")
    assert (out[0]["dx"], out[0]["dh"]) == (4, 4)
    assert (out[1]["k"], out[1]["n"], out[1]["dx"], out[1]["dh"]) == ("b", 1, 1, 1)


def test_session_cut_at_max_duration() -> None:
    spec = SessionWindow(
        gap_ms=100,
        max_session_duration_ms=250,
        group_by=["k"],
        aggregations=[Aggregation(agg="count", as_="n")],
    )
    s = stage(spec)
    s.process(batch([0, 80, 160, 240, 250, 330, 420], ["a"] * 7, [0] * 7), None)
    out = rows(s.advance((T0 + 10_000) * MS).emitted)
    got = [(r["window_start"] // MS - T0, r["window_end"] // MS - T0, r["n"]) for r in out]
    # T0 is a multiple of 250 ms: the sessions are cut at T0 + 250 ms, 100 ms gap or not
    assert got == [(0, 250, 4), (250, 500, 3)]


def test_without_group_by_one_row_per_window() -> None:
    spec = TumblingWindow(
        duration_ms=1_000,
        aggregations=[
            Aggregation(agg="count", as_="n"),
            Aggregation(agg="max", column="v", as_="m"),
        ],
    )
    s = stage(spec)
    s.process(batch([1, 999, 1_000], ["a", "b", "c"], [3, None, 1]), None)
    out = rows(s.advance((T0 + 2_000) * MS).emitted)
    assert [list(r) for r in out] == [["window_start", "window_end", "n", "m"]] * 2
    assert [(r["n"], r["m"]) for r in out] == [(2, 3), (1, 1)]


def test_integer_event_time_and_ms_timestamps() -> None:
    spec = TumblingWindow(
        duration_ms=1_000, group_by=["k"], aggregations=[Aggregation(agg="count", as_="n")]
    )
    s = stage(spec)
    data = pa.table({"_event_ts": pa.array([500_000, 1_500_000], pa.int64()), "k": ["a", "a"]})
    out = s.process(data, 2_000_000)
    assert out.emitted.schema.field("window_start").type == pa.timestamp("us", tz="UTC")
    assert [(r["window_start"], r["n"]) for r in rows(out.emitted)] == [(0, 1), (1_000_000, 1)]
    s = stage(spec)
    data = pa.table({"_event_ts": pa.array([1_500], pa.timestamp("ms")), "k": ["a"]})
    out = s.process(data, 2_000_000)
    assert out.emitted.schema.field("window_start").type == pa.timestamp("us")
    assert [(r["window_start"], r["n"]) for r in rows(out.emitted)] == [(1_000_000, 1)]


def test_bad_input_is_a_stage_error() -> None:
    spec = TumblingWindow(
        duration_ms=1_000,
        group_by=["k"],
        aggregations=[Aggregation(agg="sum", column="v", as_="s")],
    )
    s = stage(spec)
    with pytest.raises(StageError, match="no column 'v'"):
        s.process(pa.table({"_event_ts": pa.array([1], pa.int64()), "k": ["a"]}), None)
    with pytest.raises(StageError, match="without an event time"):
        s.process(pa.table({"_event_ts": pa.array([None], pa.int64()), "k": ["a"], "v": [1]}), None)
    with pytest.raises(StageError, match="sum 's'"):
        s.process(pa.table({"_event_ts": pa.array([1], pa.int64()), "k": ["a"], "v": ["x"]}), None)
    with pytest.raises(StageError, match="not open"):
        WindowStage(spec, "test").process(pa.table({}), None)


# -- sessions: cut from their own start ----------------------------------------------

MIN = 60_000  # ms
HOUR = 60 * MIN


def at(ts_ms: list[int], keys: list[str]) -> pa.Table:
    """Rows at absolute event times (ms since the epoch)."""
    return pa.table(
        {
            "_event_ts": pa.array([t * MS for t in ts_ms], pa.timestamp("us", tz="UTC")),
            "k": pa.array(keys, pa.string()),
            "v": pa.array([1] * len(ts_ms), pa.int64()),
        }
    )


def sessions_of(out: pa.Table) -> list[tuple[str, int, int, int]]:
    """(key, start ms, end ms, rows) of each emitted session, sorted."""
    return sorted(
        (r["k"], r["window_start"] // MS, r["window_end"] // MS, r["n"]) for r in rows(out)
    )


def test_session_cap_runs_from_the_session_start_across_hour_and_day_boundaries() -> None:
    spec = SessionWindow(
        gap_ms=5 * MIN,
        max_session_duration_ms=HOUR,
        group_by=["k"],
        aggregations=[Aggregation(agg="count", as_="n")],
    )
    day = 1_700_006_400_000  # 2023-11-15T00:00:00Z, a day (and an hour) boundary
    hour = day - HOUR  # 23:00
    a = [hour - 10 * MIN + i * 4 * MIN for i in range(6)]  # 22:50 … 23:10: spans 23:00
    b = [day - 10 * MIN + i * 5 * MIN for i in range(6)]  # 23:50 … 00:15, gaps exactly gap_ms
    c = [hour - 43 * MIN + i * 2 * MIN for i in range(76)]  # 22:17 … 00:47, every 2 min
    d = [hour, hour + 5 * MIN + 1]  # just over gap_ms apart
    ts = a + b + c + d
    keys = ["a"] * len(a) + ["b"] * len(b) + ["c"] * len(c) + ["d"] * len(d)
    order = np.random.default_rng(3).permutation(len(ts))  # arrival order: any
    s = stage(spec)
    s.process(at([ts[i] for i in order], [keys[i] for i in order]), None)
    got = sessions_of(s.advance((day + 10 * HOUR) * MS).emitted)
    start_c = hour - 43 * MIN  # 22:17: the cap falls at 23:17 and 00:17, rows exactly there
    assert got == [
        ("a", a[0], a[-1] + 5 * MIN, 6),  # one 20-minute session over 23:00
        ("b", b[0], b[-1] + 5 * MIN, 6),  # one 25-minute session over midnight
        ("c", start_c, start_c + HOUR, 30),  # capped: ends at its start + 1 h …
        ("c", start_c + HOUR, start_c + 2 * HOUR, 30),  # … and a row at the cap opens the next
        ("c", start_c + 2 * HOUR, c[-1] + 5 * MIN, 16),
        ("d", hour, hour + 5 * MIN, 1),
        ("d", hour + 5 * MIN + 1, hour + 10 * MIN + 1, 1),
    ]


def test_session_capped_mid_run_from_a_start_off_any_multiple() -> None:
    spec = SessionWindow(
        gap_ms=100,
        max_session_duration_ms=250,
        group_by=["k"],
        aggregations=[Aggregation(agg="count", as_="n")],
    )
    s = stage(spec)
    # starts 30 ms past a multiple of 250 ms: the cap falls at 280, not at 250
    s.process(batch([30, 110, 190, 270, 279, 280, 360, 460], ["a"] * 8, [0] * 8), None)
    out = rows(s.advance((T0 + 10_000) * MS).emitted)
    got = [(r["window_start"] // MS - T0, r["window_end"] // MS - T0, r["n"]) for r in out]
    assert got == [(30, 280, 5), (280, 530, 3)]


@pytest.mark.parametrize("wm_after_first", [200, 500])
def test_reopen_bridge_whose_merge_exceeds_the_cap_is_cut_from_the_merged_start(
    wm_after_first: int,
) -> None:
    spec = SessionWindow(
        gap_ms=100,
        max_session_duration_ms=250,
        group_by=["k"],
        late_data="reopen",
        allowed_lateness_ms=1000,
        aggregations=[
            Aggregation(agg="count", as_="n"),
            Aggregation(agg="sum", column="v", as_="s"),
        ],
    )
    s = stage(spec)

    def got(out: pa.Table) -> list[tuple[int, int, int, int]]:
        return [
            (r["window_start"] // MS - T0, r["window_end"] // MS - T0, r["n"], r["s"])
            for r in rows(out)
        ]

    # A = [0, 80] (ends 180), B = [200 … 440] (ends at its cap, 450)
    first = s.process(
        batch([0, 80, 200, 280, 360, 440], ["a"] * 6, [1] * 6), (T0 + wm_after_first) * MS
    )
    before = [(0, 180, 2, 2)] + ([(200, 450, 4, 4)] if wm_after_first >= 450 else [])
    assert got(first.emitted) == before
    # 140 is within gap_ms of both: one run from 0, cut at 0 + 250; B's rows from
    # 280 on open the next session at 280, which ends at its own cap, 530
    bridged = s.process(batch([140], ["a"], [10]), (T0 + wm_after_first) * MS)
    assert len(bridged.late) == 0
    final = got(bridged.emitted) + got(s.advance((T0 + 10_000) * MS).emitted)
    assert final == [(0, 250, 4, 13), (280, 530, 3, 3)]
    # the same rows in event-time order, in one batch, give the same sessions
    sorted_stage = stage(spec)
    sorted_stage.process(
        batch([0, 80, 140, 200, 280, 360, 440], ["a"] * 7, [1, 1, 10, 1, 1, 1, 1]), None
    )
    assert got(sorted_stage.advance((T0 + 10_000) * MS).emitted) == final


@pytest.mark.parametrize("seed", range(6))
def test_sessions_do_not_depend_on_arrival_order_or_batch_split(seed: int) -> None:
    """Random events, shuffled within the lateness and split at random: every
    session is emitted once and equals the oracle over all rows."""
    rng = np.random.default_rng(100 + seed)
    lateness = int(rng.integers(50, 400))
    gap, cap = int(rng.integers(20, 300)), int(rng.integers(300, 2000))
    n = int(rng.integers(300, 2500))
    table = events(
        200 + seed, n, keys=int(rng.integers(1, 9)), span_ms=20_000, disorder_ms=1, very_ms=2
    )
    # arrival order: event time plus up to `lateness` - 1 ms of delay, so no row is late
    ts = us(table)
    arrival = np.argsort(ts + rng.integers(0, lateness * MS - MS, n), kind="stable")
    table = table.take(pa.array(arrival))
    late_data = "reopen" if seed % 2 else "drop"
    spec = SessionWindow(
        gap_ms=gap,
        max_session_duration_ms=cap,
        group_by=["k"],
        aggregations=AGGS,
        late_data=late_data,
        allowed_lateness_ms=int(rng.integers(0, 500)) if late_data == "reopen" else None,
    )
    fed = feed(
        stage(spec), table, seed=seed, lateness_ms=lateness, batches=int(rng.integers(2, 60))
    )
    assert len(fed.late) == 0
    want, _ = session_reference(table, fed, gap * MS, cap * MS)
    final = last_versions(fed)
    assert set(final) == set(want)
    for key, r in final.items():
        compare(r, want[key])
    if late_data == "drop":
        assert len(fed.emitted) == len(want)  # each session once


@pytest.mark.parametrize("span", [1_000, 2**62], ids=["offsets", "ranks"])
def test_the_running_maximum_restarts_at_each_key(span: int) -> None:
    """sessionise's running max of the items' last event times: per segment,
    whether the segments fit side by side in int64 (offsets) or need ranks."""
    from sluice.engine.stages.window.assign import _running_max

    rng = np.random.default_rng(7)
    values = rng.integers(-span // 2, span // 2, 5_000, dtype=np.int64)
    seg = np.sort(rng.integers(0, 40, 5_000)).astype(np.int64)
    seg -= seg[0]
    want = values.copy()
    for i in range(1, len(values)):
        if seg[i] == seg[i - 1]:
            want[i] = max(want[i - 1], values[i])
    np.testing.assert_array_equal(_running_max(values, seg), want)
    assert len(_running_max(values[:0], seg[:0])) == 0


@pytest.mark.parametrize("span", [10**6, 2**61], ids=["one sort", "two sorts"])
def test_session_items_are_ordered_by_key_then_start(span: int) -> None:
    """sessionise's order: a permutation sorted by (key, start), whether the
    two fit in one int64 sort key or not."""
    from sluice.engine.stages.window.assign import _by_key_and_start

    rng = np.random.default_rng(11)
    key = rng.integers(0, 50, 4_000).astype(np.int64)
    start = rng.integers(-span, span, 4_000).astype(np.int64)
    start[::7] = start[0]  # equal starts, within and across keys
    order = _by_key_and_start(key, start)
    assert sorted(order.tolist()) == list(range(4_000))
    got = list(zip(key[order].tolist(), start[order].tolist(), strict=True))
    assert got == sorted(got)
    assert len(_by_key_and_start(key[:0], start[:0])) == 0
