"""Windows and joins into Postgres merge targets equal a DuckDB oracle, straight
and after five SIGKILLs at random points.

Each case (tumbling, hopping, session, inner and left outer interval join)
produces one deterministic event set over several Kafka partitions, computes
the expected rows with DuckDB SQL written from the user guide's semantics (not
from sluice's code), and runs a real `flow consume` with a Postgres state
store and a Postgres ``merge`` target:

* straight: one bounded run (``--stop-after-idle-ms``), which drains every
  open window and every buffered outer row before it exits 0;
* killed: every event is produced first; five runs are each SIGKILLed at a
  random point while the input is still being read (checked: the positions
  stored in the state store after each kill are below what was produced),
  then a sixth, bounded run drains.

Either way the WHOLE target table must equal the oracle. A merge target keyed
by the output key absorbs what a restart emits again (output after the last
checkpoint is replayed, README "State store"); what it cannot absorb is a
wrong or missing row, or a row of a different key (a session cut elsewhere).

Event times are in order per key, with up to 4 s of disorder in production
order, inside ``lateness_ms`` = 5 s: whatever the batching, no row is late.
The sessions (gap 5 min, cap 40 min) start at 21:30 UTC and run for hours,
so they span hour and day boundaries and are capped off every multiple of
the cap; one user's rows exactly ``gap_ms`` apart and exactly at start + cap
pin both boundaries.
"""

from __future__ import annotations

import collections
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import duckdb
import psycopg
import pyarrow as pa
import pytest
from tests import endpoints
from tests.integration.conftest import Flow, kill_after_reading, produce, unique

pytestmark = pytest.mark.integration

MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS
# 21:30 UTC: the first hours of every user cross midnight.
T0_MS = 1_700_000_000_000 // DAY_MS * DAY_MS + 21 * HOUR_MS + 30 * MINUTE_MS
LATENESS_MS = 5_000
DISORDER_MS = 4_000  # < LATENESS_MS: no row is ever late
GAP_MS = 5 * MINUTE_MS
CAP_MS = 40 * MINUTE_MS  # not a divisor of an hour: caps land off the hour
TUMBLE_MS = 10 * MINUTE_MS
HOP_SIZE_MS, HOP_MS = 30 * MINUTE_MS, 10 * MINUTE_MS
JOIN_WINDOW_MS = 2 * MINUTE_MS
PAGES = [f"/p{i}" for i in range(9)]
KILLS = 5
BATCH_ROWS = 60
DRAIN = ("--stop-after-idle-ms", "2000")

Rows = list[dict[str, Any]]


# --- the events ---------------------------------------------------------------------------


def disordered(rows: Rows, rng: random.Random) -> Rows:
    """``rows`` in production order: event time plus up to DISORDER_MS of disorder."""
    late = {id(r): r["ts_ms"] + rng.randint(0, DISORDER_MS) for r in rows}
    return sorted(rows, key=lambda r: late[id(r)])


def visits(users: int, per_user: int, seed: int) -> Rows:
    """Page views: steps of 5-60 s, 10 % of 2-5 min (within the gap, 5 min
    included), 5 % of 5-15 min (past it). User 0 is a metronome: a row every
    minute from 07 min 13 s past T0, then every 5 min (exactly the gap) for an
    hour: its sessions hit the cap exactly at start + cap, off the hour."""
    rng = random.Random(seed)
    rows: Rows = []
    t = T0_MS + 7 * MINUTE_MS + 13_000
    steps = [MINUTE_MS] * 100 + [GAP_MS] * 12
    for i, step in enumerate(steps):
        rows.append({"user_id": 0, "amount": i % 41 + 1, "page": PAGES[i % 9], "ts_ms": t})
        t += step
    for u in range(1, users):
        t = T0_MS + rng.randint(0, HOUR_MS)
        for _ in range(per_user):
            r = rng.random()
            if r < 0.05:
                t += rng.randint(GAP_MS + 1, 15 * MINUTE_MS)
            elif r < 0.15:
                t += rng.randint(2 * MINUTE_MS, GAP_MS)
            else:
                t += rng.randint(5_000, MINUTE_MS)
            rows.append(
                {"user_id": u, "amount": rng.randint(1, 500), "page": rng.choice(PAGES), "ts_ms": t}
            )
    return disordered(rows, rng)


def orders_and_payments(n: int, seed: int, multi: bool) -> tuple[Rows, Rows]:
    """``n`` orders 1.5 s apart; 70 % paid within ±JOIN_WINDOW_MS (the bound
    itself included), with ``multi`` a further 15 % paid twice within it; 15 %
    paid only outside it; the rest never."""
    rng = random.Random(seed)
    orders: Rows = []
    payments: Rows = []
    w = JOIN_WINDOW_MS

    def pay(order_id: int, ts: int) -> None:
        payments.append(
            {"order_id": order_id, "pay_id": len(payments), "paid": rng.randint(1, 99), "ts_ms": ts}
        )

    for i in range(n):
        ts = T0_MS + i * 1_500 + rng.randint(0, 1_000)
        orders.append({"order_id": i, "amount": rng.randint(1, 900), "ts_ms": ts})
        r = rng.random()
        if r < 0.7:
            # One in ten exactly on a bound, which is in reach.
            pay(i, ts + (rng.choice([-w, w]) if rng.random() < 0.1 else rng.randint(-w, w)))
            if multi and rng.random() < 0.2:
                pay(i, ts + rng.randint(-w, w))
        elif r < 0.85:
            pay(i, ts + rng.choice([-1, 1]) * rng.randint(w + 1, 4 * w))
    return disordered(orders, rng), disordered(payments, rng)


def send(topic: str, rows: Rows, key: str) -> None:
    """Produce ``rows`` keyed by ``key`` (so a key stays on one partition),
    each with its event time as the message timestamp."""
    produce(
        topic,
        [json.dumps(r).encode() for r in rows],
        keys=[str(r[key]).encode() for r in rows],
        timestamps_ms=[r["ts_ms"] for r in rows],
    )


# --- the oracles (DuckDB, from the user guide) --------------------------------------------

WINDOW_AGGS = """count(*), sum(amount), avg(amount), min(amount), max(amount),
    arg_min(page, ts_ms), arg_max(page, ts_ms), count(DISTINCT page)"""


def window_oracle(kind: str, rows: Rows) -> list[tuple[Any, ...]]:
    """(user_id, window_start ms, window_end ms, n, total, mean, lo, hi, entry,
    exit, pages) per window, sorted.

    Tumbling: ``[k * size, (k + 1) * size)``. Hopping: every window starting
    at a multiple of the hop that contains the row. Session, per user in
    event-time order: a row opens a new session when it comes more than the
    gap after the previous row or at or after the session's start + cap (the
    window is ``[start, start + cap)``); otherwise it joins the open one.
    ``window_start`` = the first event time, ``window_end`` = last event time
    + gap, never past start + cap.
    """
    con = duckdb.connect()
    con.register("ev", pa.Table.from_pylist(rows))
    if kind == "tumbling":
        sql = f"""SELECT user_id, ts_ms // {TUMBLE_MS} * {TUMBLE_MS} AS ws, ws + {TUMBLE_MS},
                         {WINDOW_AGGS}
                  FROM ev GROUP BY user_id, ws"""
    elif kind == "hopping":
        sql = f"""SELECT user_id, ws, ws + {HOP_SIZE_MS}, {WINDOW_AGGS}
                  FROM (SELECT ev.*, (ts_ms // {HOP_MS} - k) * {HOP_MS} AS ws
                        FROM ev, range({HOP_SIZE_MS // HOP_MS + 1}) AS r(k))
                  WHERE ws <= ts_ms AND ts_ms < ws + {HOP_SIZE_MS}
                  GROUP BY user_id, ws"""
    else:
        # A walk down each user's rows in event-time order, carrying the open
        # session's start: the cap is measured from it, so it is sequential.
        sql = f"""
        WITH RECURSIVE r AS (
            SELECT *, row_number() OVER (PARTITION BY user_id ORDER BY ts_ms) AS i FROM ev),
        walk(user_id, i, ts_ms, ws) AS (
            SELECT user_id, i, ts_ms, ts_ms FROM r WHERE i = 1
            UNION ALL
            SELECT r.user_id, r.i, r.ts_ms,
                   CASE WHEN r.ts_ms - w.ts_ms > {GAP_MS} OR r.ts_ms >= w.ws + {CAP_MS}
                        THEN r.ts_ms ELSE w.ws END
            FROM walk w JOIN r ON r.user_id = w.user_id AND r.i = w.i + 1)
        SELECT user_id, ws, least(max(ts_ms) + {GAP_MS}, ws + {CAP_MS}), {WINDOW_AGGS}
        FROM r JOIN walk USING (user_id, i, ts_ms) GROUP BY user_id, ws"""
    return sorted(con.sql(sql).fetchall())


def join_oracle(kind: str, orders: Rows, payments: Rows) -> list[tuple[Any, ...]]:
    """(order_id, amount, pay order_id, pay_id, paid) per joined row, sorted:
    an order and a payment of the same order whose event times are at most
    JOIN_WINDOW_MS apart; under ``left_outer`` an order that has none once,
    with nulls."""
    con = duckdb.connect()
    con.register("o", pa.Table.from_pylist(orders))
    con.register("p", pa.Table.from_pylist(payments))
    how = {"inner": "JOIN", "left_outer": "LEFT JOIN"}[kind]
    rows = con.sql(
        f"""SELECT o.order_id, o.amount, p.order_id, p.pay_id, p.paid FROM o {how} p
            ON o.order_id = p.order_id AND abs(p.ts_ms - o.ts_ms) <= {JOIN_WINDOW_MS}"""
    ).fetchall()
    return sorted(rows, key=repr)


# --- pipelines ----------------------------------------------------------------------------


def source_block(topic: str, group: str) -> str:
    """One Kafka source of ``topic``, in small batches (many checkpoints)."""
    return f"""
[[sources]]
query = "{topic}"
kind = "kafka"
bootstrap_servers = "{endpoints.KAFKA_BOOTSTRAP}"
group_id = "{group}"
session_timeout_ms = 2000
max_batch_rows = {BATCH_ROWS}
"""


def pipeline(name: str, sources: str, primary_key: list[str], transform: str) -> str:
    """A pipeline into the merge table ``name``, its state in schema ``<name>_state``."""
    return f"""
pipeline_name = "{name}"
idle_pause_ms = 100
{sources}

[target]
kind = "postgres"
url = "{endpoints.POSTGRES_URL}"
mode = "merge"

[target.table]
schema = "public"
name = "{name}"
primary_key = {json.dumps(primary_key)}

[watermark]
lateness_ms = {LATENESS_MS}

[state_store]
kind = "postgres"
url = "{endpoints.POSTGRES_URL}"
schema = "{name}_state"
checkpoint_interval_ms = 100

{transform}
"""


WINDOW_SPECS = {
    "tumbling": (f'kind = "tumbling"\nduration_ms = {TUMBLE_MS}', "window_start"),
    "hopping": (
        f'kind = "hopping"\nduration_ms = {HOP_SIZE_MS}\nhop_ms = {HOP_MS}',
        "window_start",
    ),
    "session": (
        f'kind = "session"\ngap_ms = {GAP_MS}\nmax_session_duration_ms = {CAP_MS}',
        "session_id",
    ),
}


def window_transform(kind: str) -> str:
    spec = WINDOW_SPECS[kind][0]
    aggs = [
        ("count", None, "n"),
        ("sum", "amount", "total"),
        ("avg", "amount", "mean"),
        ("min", "amount", "lo"),
        ("max", "amount", "hi"),
        ("first", "page", "entry"),
        ("last", "page", "exit"),
    ]
    blocks = "".join(
        f'\n[[transform.window.aggregations]]\nagg = "{agg}"\nas = "{alias}"\n'
        + (f'column = "{column}"\n' if column else "")
        for agg, column, alias in aggs
    )
    return f"""[transform.window]
{spec}
group_by = ["user_id"]
{blocks}
[[transform.window.aggregations]]
agg = "count_distinct"
column = "page"
as = "pages"
mode = "exact"
max_distinct_values_per_group = 100
"""


@dataclass(frozen=True)
class Case:
    """One pipeline over its produced input: its name (pipeline, table and
    ``<name>_state`` schema), config, the expected table, how many messages
    were produced, and how to read the target table in the oracle's shape."""

    name: str
    config: str
    want: list[tuple[Any, ...]]
    produced: int
    read: Callable[[str], list[tuple[Any, ...]]]


def read_windows(table: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(endpoints.POSTGRES_URL) as conn:
        rows = conn.execute(
            f"""SELECT user_id, (extract(epoch FROM window_start) * 1000)::bigint,
                       (extract(epoch FROM window_end) * 1000)::bigint,
                       n, total, mean, lo, hi, entry, exit, pages
                FROM public.{table}"""
        ).fetchall()
    return sorted(rows)


def read_join(table: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(endpoints.POSTGRES_URL) as conn:
        rows = conn.execute(
            f"""SELECT left_order_id, left_amount, right_order_id, right_pay_id, right_paid
                FROM public.{table}"""
        ).fetchall()
    return sorted(rows, key=repr)


def assert_off_boundary_sessions(want: list[tuple[Any, ...]]) -> None:
    """The session data exercises what the epoch cut got wrong: sessions across
    an hour and a day boundary, sessions capped at a start that is not a
    multiple of the cap, and a cap exactly hit by a row."""
    span_hour = [w for w in want if w[1] // HOUR_MS != (w[2] - 1) // HOUR_MS]
    span_day = [w for w in want if w[1] // DAY_MS != (w[2] - 1) // DAY_MS]
    capped = [w for w in want if w[2] - w[1] == CAP_MS and w[1] % CAP_MS]
    assert len(span_hour) > 50 and span_day and len(capped) > 10, "no off-boundary sessions"
    metronome = [w for w in want if w[0] == 0]
    # A row a minute from 07:13 past T0: 40 rows, then the 41st opens the next.
    assert metronome[0][1:4] == (T0_MS + 7 * MINUTE_MS + 13_000, metronome[0][1] + CAP_MS, 40)


def window_case(kind: str, kafka_topic: Callable[..., str]) -> Case:
    topic = kafka_topic(3)
    name = unique(f"cw_{kind[:4]}")
    rows = visits(users=24, per_user=480, seed=len(kind))
    send(topic, rows, "user_id")
    key = WINDOW_SPECS[kind][1]
    config = pipeline(name, source_block(topic, name), ["user_id", key], window_transform(kind))
    want = window_oracle(kind, rows)
    if kind == "session":
        assert_off_boundary_sessions(want)
    return Case(name, config, want, len(rows), read_windows)


def join_case(kind: str, kafka_topic: Callable[..., str]) -> Case:
    orders_t, payments_t = kafka_topic(2, "orders"), kafka_topic(2, "payments")
    name = unique(f"cj_{kind[:4]}")
    orders, payments = orders_and_payments(6000, seed=len(kind), multi=kind == "inner")
    send(orders_t, orders, "order_id")
    send(payments_t, payments, "order_id")
    sources = source_block(orders_t, name) + source_block(payments_t, name)
    # The join's output key: an order and its payment; an outer row has no
    # payment, so with at most one payment in reach per order the order id alone.
    key = ["left_order_id", "right_pay_id"] if kind == "inner" else ["left_order_id"]
    transform = f"""[transform.join]
kind = "{kind}"
left_source = "{orders_t}"
right_source = "{payments_t}"
left_keys = ["order_id"]
right_keys = ["order_id"]
time_window_ms = {JOIN_WINDOW_MS}
"""
    want = join_oracle(kind, orders, payments)
    return Case(
        name, pipeline(name, sources, key, transform), want, len(orders + payments), read_join
    )


CASES = {
    "tumbling": window_case,
    "hopping": window_case,
    "session": window_case,
    "inner": join_case,
    "left_outer": join_case,
}


# --- running and checking -----------------------------------------------------------------


def stored(case: Case) -> int:
    """Messages before the positions in the state store, over every source and
    partition (0 before the process made its tables)."""
    try:
        with psycopg.connect(endpoints.POSTGRES_URL) as conn:
            row = conn.execute(
                f"""SELECT coalesce(sum(position_int), 0) FROM {case.name}_state.sluice_offsets
                    WHERE pipeline = %s""",
                (case.name,),
            ).fetchone()
    except psycopg.errors.UndefinedTable:
        return 0
    assert row is not None
    return int(row[0])


def drain(case: Case, flow: Callable[..., Flow]) -> None:
    """A bounded run to the end of the input: every window and outer row is
    written, and every position stored, before it exits 0."""
    f = flow(case.config, *DRAIN)
    assert f.proc.wait(timeout=120) == 0, f.output()
    assert stored(case) == case.produced, f.output()


def kill_five_times(case: Case, flow: Callable[..., Flow], rng: random.Random) -> None:
    """Five runs, each SIGKILLed at a random point while it is reading: after
    a random share of the input (in increasing order) plus a random delay, so
    the kill does not land right after a checkpoint. Each kill must fall
    mid-stream (stored positions below what was produced) and no restart may
    lose stored positions."""
    points = sorted(rng.uniform(0.05, 0.6) * case.produced for _ in range(KILLS))
    before = 0
    for kill, point in enumerate(points, 1):
        f = flow(case.config, name=f"run{kill}")
        # The run reads on from the stored positions.
        kill_after_reading(f, max(point - before, 1), rng.uniform(0, 0.1))
        now = stored(case)
        assert before <= now < case.produced, (
            f"kill {kill}: stored {now}, before {before}, produced {case.produced}"
        )
        before = now
    assert before > 0, "five runs stored no position"


def assert_table(case: Case) -> None:
    """The whole target table equals the oracle, row for row (means to 1e-9)."""
    got = case.read(case.name)
    assert len(got) == len(case.want), (len(got), len(case.want))
    diff = [
        (g, w)
        for g, w in zip(got, case.want, strict=True)
        if not all(
            a == b or (isinstance(b, float) and abs(a - b) <= 1e-9 * max(1.0, abs(b)))
            for a, b in zip(g, w, strict=True)
        )
    ]
    if diff:
        missing = collections.Counter(case.want) - collections.Counter(got)
        extra = collections.Counter(got) - collections.Counter(case.want)
        raise AssertionError(
            f"{len(diff)} rows differ; missing {list(missing)[:5]} extra {list(extra)[:5]}"
        )


@pytest.mark.parametrize("kills", [0, KILLS], ids=["straight", "killed5"])
@pytest.mark.parametrize("kind", list(CASES))
def test_output_equals_the_duckdb_oracle(
    kind: str, kills: int, kafka_topic: Callable[..., str], flow: Callable[..., Flow]
) -> None:
    case = CASES[kind](kind, kafka_topic)
    if kills:
        kill_five_times(case, flow, random.Random(f"{kind}-kills"))
    drain(case, flow)
    assert_table(case)
