"""Event-time windows through a real `flow consume`, the real broker and Postgres.

Every expected result is computed by DuckDB SQL over the same events. The
events are out of order by up to 4 s (inside ``lateness_ms`` = 5 s, so
whatever the batch boundaries, none of them is late); the late rows are
produced after the pipeline consumed the rest, far behind the watermark, so
they are late whatever the batching too. A closing event per partition, two
hours later, moves every partition's watermark past the last window.
"""

from __future__ import annotations

import heapq
import json
import random
import time
from collections.abc import Callable
from typing import Any

import duckdb
import psycopg
import pyarrow as pa
import pytest
from tests import endpoints
from tests.integration.conftest import Flow, committed, produce, unique, wait_until

pytestmark = pytest.mark.integration

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
T0_MS = 1_700_000_000_000 // HOUR_MS * HOUR_MS
PAGES = [f"/p{i}" for i in range(12)]
PARTITIONS = 3
AGGS = """
[[transform.window.aggregations]]
agg = "count"
as = "n"
[[transform.window.aggregations]]
agg = "sum"
column = "amount"
as = "total"
[[transform.window.aggregations]]
agg = "avg"
column = "amount"
as = "mean"
[[transform.window.aggregations]]
agg = "min"
column = "amount"
as = "lo"
[[transform.window.aggregations]]
agg = "max"
column = "amount"
as = "hi"
[[transform.window.aggregations]]
agg = "first"
column = "page"
as = "entry"
[[transform.window.aggregations]]
agg = "last"
column = "page"
as = "exit"
[[transform.window.aggregations]]
agg = "count_distinct"
column = "page"
as = "pages"
mode = "exact"
max_distinct_values_per_group = 100
[[transform.window.aggregations]]
agg = "count_distinct"
column = "page"
as = "pages_hll"
"""
COLUMNS = "n, total, mean, lo, hi, first_page, last_page, pages"


def history(n: int, seed: int, users: int = 40) -> list[dict[str, Any]]:
    """``n`` events of ``users`` users: bursts 5-60 s apart, with 3-10 min pauses.

    Each user's event times are distinct. The list is in production order:
    event time plus up to 4 s of disorder.
    """
    rng = random.Random(seed)
    out = []
    for u in range(users):
        t = T0_MS + rng.randint(0, 60_000)
        for _ in range(n // users):
            t += rng.randint(180_000, 600_000) if rng.random() < 0.1 else rng.randint(5_000, 60_000)
            out.append(
                {
                    "user_id": u,
                    "amount": rng.randint(1, 500),
                    "page": rng.choice(PAGES),
                    "ts_ms": t,
                    "ts_us": t * 1000,
                }
            )
    order = {id(e): e["ts_ms"] + rng.randint(0, 4_000) for e in out}
    out.sort(key=lambda e: order[id(e)])
    return out


def marathon() -> list[dict[str, Any]]:
    """One user active every 90 s (under the 2 min gap) for 3.5 h from 17 min 13 s
    past T0: sessions capped at their own start + 1 h, off the hour, one over midnight."""
    t0 = T0_MS + 17 * 60_000 + 13_000
    return [
        {"user_id": 999, "amount": i % 97 + 1, "page": PAGES[i % 12], "ts_ms": t, "ts_us": t * 1000}
        for i, t in enumerate(range(t0, t0 + 210 * 60_000, 90_000))
    ]


def send(topic: str, rows: list[dict[str, Any]], partition: int | None = None) -> None:
    produce(
        topic,
        [json.dumps(r).encode() for r in rows],
        keys=[str(r["user_id"]).encode() for r in rows],
        partition=partition,
        timestamps_ms=[r["ts_ms"] for r in rows],
    )


def close_all(topic: str, after_ms: int) -> None:
    """One event per partition, two hours after ``after_ms``: every window before closes."""
    for p in range(PARTITIONS):
        row = {"user_id": 100_000 + p, "amount": 1, "page": "/end", "ts_ms": after_ms + 2 * HOUR_MS}
        row["ts_us"] = row["ts_ms"] * 1000
        send(topic, [row], partition=p)


def late_rows(n: int) -> list[dict[str, Any]]:
    """Rows a few minutes after T0, produced when the watermark is hours later."""
    return [
        {"user_id": i % 7, "amount": 999, "page": "/late", "ts_ms": T0_MS + 90_000 + i, "ts_us": 0}
        for i in range(n)
    ]


def config(topic: str, table: str, window: str, key: str, extra: str = "") -> str:
    return f"""
pipeline_name = "{table}"
source_query = "{topic}"
idle_pause_ms = 100

[source]
kind = "kafka"
bootstrap_servers = "{endpoints.KAFKA_BOOTSTRAP}"
group_id = "{table}"
session_timeout_ms = 6000
max_batch_rows = 700

[target]
kind = "postgres"
url = "{endpoints.POSTGRES_URL}"
mode = "merge"

[target.table]
schema = "public"
name = "{table}"
primary_key = ["user_id", "{key}"]

[watermark]
lateness_ms = 5000

{extra}

[transform.window]
{window}
group_by = ["user_id"]
{AGGS}
"""


def expected(events: list[dict[str, Any]], kind: str) -> dict[tuple[int, int], tuple[Any, ...]]:
    """Windows by DuckDB: (user_id, start ms) -> (end ms, aggregates...)."""
    con = duckdb.connect()
    con.register("ev", pa.Table.from_pylist(events))
    aggs = """count(*), sum(amount), avg(amount), min(amount), max(amount),
              arg_min(page, ts_ms), arg_max(page, ts_ms), count(DISTINCT page)"""
    if kind == "tumbling":
        sql = f"""SELECT user_id, ts_ms // 60000 * 60000 AS ws, ws + 60000, {aggs}
                  FROM ev GROUP BY user_id, ws"""
    elif kind == "hopping":
        sql = f"""SELECT user_id, ws, ws + 300000, {aggs} FROM
                    (SELECT ev.*, ts_ms // 60000 * 60000 - k * 60000 AS ws FROM ev, range(5) r(k))
                  GROUP BY user_id, ws"""
    else:
        # The user guide's sessions: gap runs (LAG), each cut from its own start: a
        # session opens at the run's first row and at the first row at or after the
        # previous session's start + max_session_duration_ms (a recursive CTE).
        sql = f"""
        WITH RECURSIVE o AS (
            SELECT *, lag(ts_ms) OVER (PARTITION BY user_id ORDER BY ts_ms) AS prev FROM ev),
        g AS (SELECT *, sum(CASE WHEN prev IS NULL OR ts_ms - prev > 120000 THEN 1 ELSE 0 END)
                            OVER (PARTITION BY user_id ORDER BY ts_ms) AS run FROM o),
        starts(user_id, run, ws) AS (
            SELECT user_id, run, min(ts_ms) FROM g GROUP BY user_id, run
            UNION ALL
            SELECT s.user_id, s.run, min(g.ts_ms) FROM starts s JOIN g
                ON g.user_id = s.user_id AND g.run = s.run AND g.ts_ms >= s.ws + {HOUR_MS}
            GROUP BY s.user_id, s.run, s.ws),
        s AS (SELECT g.*, (SELECT max(st.ws) FROM starts st WHERE st.user_id = g.user_id
                           AND st.run = g.run AND st.ws <= g.ts_ms) AS ws FROM g)
        SELECT user_id, ws, least(max(ts_ms) + 120000, ws + {HOUR_MS}), {aggs}
        FROM s GROUP BY user_id, ws"""
    return {(r[0], r[1]): tuple(r[2:]) for r in con.sql(sql).fetchall()}


def table_rows(table: str) -> dict[tuple[int, int], tuple[Any, ...]]:
    with psycopg.connect(endpoints.POSTGRES_URL) as conn:
        rows = conn.execute(
            f"""SELECT user_id, (extract(epoch FROM window_start) * 1000)::bigint,
                       (extract(epoch FROM window_end) * 1000)::bigint,
                       n, total, mean, lo, hi, entry, exit, pages, pages_hll
                FROM public.{table} WHERE user_id < 100000"""
        ).fetchall()
    out = {}
    for r in rows:
        *exact, hll = r[2:]
        assert abs(hll - exact[-1]) <= max(1, 0.05 * exact[-1]), r  # HLL: ~1.6 % rse
        out[(r[0], r[1])] = tuple(exact)
    return out


def same(got: dict[Any, tuple[Any, ...]], want: dict[Any, tuple[Any, ...]]) -> bool:
    if got.keys() != want.keys():
        return False
    for k, w in want.items():
        g = got[k]
        if g[:2] != w[:2] or g[3:] != w[3:] or abs(g[2] - w[2]) > 1e-9 * max(1, abs(w[2])):
            return False
    return True


def wait_for_table(table: str, want: dict[Any, tuple[Any, ...]], flow: Flow) -> None:
    def check() -> bool:
        assert flow.proc.poll() is None, flow.output()
        try:
            return same(table_rows(table), want)
        except psycopg.errors.UndefinedTable:
            return False

    try:
        wait_until(check, 90, f"table {table} to equal DuckDB's {len(want)} windows", 0.5)
    except AssertionError as exc:  # a timeout, or the process died: chained below
        got = table_rows(table)
        missing = [k for k in want if k not in got][:5]
        wrong = [(k, got[k], want[k]) for k in want if k in got and got[k] != want[k]][:5]
        extra = [k for k in got if k not in want][:5]
        raise AssertionError(f"missing {missing} wrong {wrong} extra {extra}") from exc


WINDOWS = {
    "tumbling": ('kind = "tumbling"\nduration_ms = 60000', "window_start", ""),
    "hopping": (
        'kind = "hopping"\nduration_ms = 300000\nhop_ms = 60000\nevent_time_column = "ts_us"',
        "window_start",
        "",
    ),
    "session": (
        'kind = "session"\ngap_ms = 120000\nmax_session_duration_ms = 3600000',
        "session_id",
        '[state_store]\nkind = "in_memory"\n'
        '[transform]\nsql = "SELECT user_id, amount, page, _event_ts FROM source WHERE amount > 0"',
    ),
}


@pytest.mark.parametrize("kind", sorted(WINDOWS))
def test_windows_equal_duckdb_with_out_of_order_and_late_rows(
    kind: str, kafka_topic: Callable[..., str], flow: Callable[..., Flow]
) -> None:
    topic = kafka_topic(PARTITIONS)
    table = unique(f"win_{kind}")
    window, key, extra = WINDOWS[kind]
    events = history(6000, seed=len(kind))
    if kind == "session":
        # within the same 4 s of disorder: each marathon row goes before the first
        # later history row
        events = list(heapq.merge(events, marathon(), key=lambda e: e["ts_ms"]))
    send(topic, events)
    f = flow(config(topic, table, window, key, extra))
    wait_until(lambda: f.metric("sluice_rows_consumed_total") >= len(events), 60, "phase 1")
    wait_until(lambda: f.metric("sluice_windows_emitted_total") > 0, 30, "first windows")
    assert f.metric("sluice_windows_active") > 0
    assert f.metric("sluice_state_groups") > 0
    late = late_rows(25)
    send(topic, late)
    wait_until(
        lambda: f.metric("sluice_late_rows_dropped_total") >= len(late), 30, "late rows counted"
    )
    close_all(topic, max(e["ts_ms"] for e in events))
    want = expected(events, kind)
    if kind == "session":
        spans_hour = [k for k, w in want.items() if k[1] // HOUR_MS != (w[0] - 1) // HOUR_MS]
        spans_day = [k for k, w in want.items() if k[1] // DAY_MS != (w[0] - 1) // DAY_MS]
        capped = [k for k, w in want.items() if w[0] - k[1] == HOUR_MS and k[1] % HOUR_MS]
        assert len(spans_hour) > 20 and spans_day and len(capped) >= 2, "no off-boundary case"
    wait_for_table(table, want, f)
    assert f.metric("sluice_late_rows_dropped_total") == len(late)
    assert f.metric("sluice_windows_emitted_total") == len(want)  # each window once
    assert f.metric("sluice_windows_active") >= 1  # the closing events' windows
    groups = PARTITIONS * (5 if kind == "hopping" else 1)  # the closing events' windows
    wait_until(lambda: f.metric("sluice_state_groups") == groups, 10, f"{groups} groups open")
    # Offsets stop before the closing events: their windows are still open.
    wait_until(
        lambda: committed(table, topic, PARTITIONS) == len(events) + len(late), 30, "commits"
    )


def test_a_tumbling_pipeline_killed_twice_still_equals_duckdb(
    kafka_topic: Callable[..., str], flow: Callable[..., Flow]
) -> None:
    topic = kafka_topic(PARTITIONS)
    table = unique("win_kill")
    window, key, _ = WINDOWS["tumbling"]
    events = history(30_000, seed=42, users=200)
    toml = config(topic, table, window, key).replace("max_batch_rows = 700", "max_batch_rows = 300")
    send(topic, events[:10_000])
    f = flow(toml)
    for produced in (20_000, 30_000):
        wait_until(lambda f=f: f.metric("sluice_windows_emitted_total") > 50, 60, "windows")
        f.kill()
        send(topic, events[produced - 10_000 : produced])
        f = flow(toml)
    close_all(topic, max(e["ts_ms"] for e in events))
    wait_for_table(table, expected(events, "tumbling"), f)


def aligned_tightly(topic: str, table: str) -> str:
    """A tumbling pipeline aligned at 1 s (``max_drift_ms``) against events seconds
    to minutes apart: its partitions are paused and resumed all through a backlog
    (librdkafka drops what it prefetched of a paused one)."""
    window, key, _ = WINDOWS["tumbling"]
    return (
        config(topic, table, window, key)
        .replace("lateness_ms = 5000", "lateness_ms = 5000\nmax_drift_ms = 1000")
        .replace("max_batch_rows = 700", "max_batch_rows = 200")
    )


def most_paused(f: Flow, until: Callable[[], bool], timeout_s: float = 90) -> float:
    """The largest ``sluice_partitions_paused`` seen, polled until ``until()``."""
    paused = 0.0
    deadline = time.monotonic() + timeout_s
    while not until():
        assert time.monotonic() < deadline, f"not reached within {timeout_s} s"
        paused = max(paused, f.metric("sluice_partitions_paused"))
        time.sleep(0.05)
    return paused


def test_a_tightly_aligned_window_pauses_partitions_and_still_equals_duckdb(
    kafka_topic: Callable[..., str], flow: Callable[..., Flow]
) -> None:
    # Every window still comes out once, exactly.
    topic = kafka_topic(PARTITIONS)
    table = unique("win_align")
    events = history(12_000, seed=11, users=120)
    send(topic, events)
    f = flow(aligned_tightly(topic, table))
    paused = most_paused(f, lambda: f.metric("sluice_rows_consumed_total") >= len(events))
    assert paused > 0, "no partition was ever paused"
    close_all(topic, max(e["ts_ms"] for e in events))
    want = expected(events, "tumbling")
    wait_for_table(table, want, f)
    assert f.metric("sluice_windows_emitted_total") == len(want)


def test_a_tightly_aligned_window_killed_while_partitions_wait_equals_duckdb(
    kafka_topic: Callable[..., str], flow: Callable[..., Flow]
) -> None:
    # SIGKILLed twice while partitions are paused: the restarted process reads
    # them from the committed positions, nothing lost, no window written twice
    # with other values (the merge target keeps one row per window).
    topic = kafka_topic(PARTITIONS)
    table = unique("win_align_kill")
    events = history(12_000, seed=13, users=120)
    send(topic, events)
    toml = aligned_tightly(topic, table)
    f = flow(toml)
    for _ in range(2):
        wait_until(
            lambda f=f: f.metric("sluice_partitions_paused") > 0, 60, "a partition paused", 0.02
        )
        f.kill()
        f = flow(toml)
    close_all(topic, max(e["ts_ms"] for e in events))
    wait_for_table(table, expected(events, "tumbling"), f)


def test_reopen_re_emits_inside_the_allowed_lateness_and_drops_beyond(
    kafka_topic: Callable[..., str], flow: Callable[..., Flow]
) -> None:
    topic = kafka_topic(1)
    table = unique("win_reopen")
    window = (
        'kind = "tumbling"\nduration_ms = 60000\nlate_data = "reopen"\nallowed_lateness_ms = 120000'
    )
    toml = config(topic, table, window, "window_start").replace(
        "lateness_ms = 5000", "lateness_ms = 0"
    )
    minute = 60_000

    def row(ts: int, amount: int) -> dict[str, Any]:
        return {"user_id": 1, "amount": amount, "page": "/a", "ts_ms": T0_MS + ts, "ts_us": 0}

    on_time = [row(m * minute + 10_000, 10 + m) for m in range(5)] + [row(4 * minute + 50_000, 1)]
    send(topic, on_time)
    f = flow(toml)
    start = lambda m: (1, T0_MS + m * minute)  # noqa: E731

    def emitted(n: int) -> Callable[[], bool]:
        # Windows count as emitted before they are written: wait for the write
        # too (one user, so one row per window).
        return lambda: (
            f.metric("sluice_windows_emitted_total") >= n
            and f.metric("sluice_rows_written_total") >= n
        )

    wait_until(emitted(4), 60, "minutes 0-3 emitted (watermark at 4:50)")
    assert table_rows(table)[start(3)][1:3] == (1, 13)
    inside = row(3 * minute + 20_000, 100)  # window 3 ends at 4:00, kept until 6:00 > 4:50
    beyond = row(1 * minute + 20_000, 100)  # window 1 ends at 2:00, kept until 4:00 <= 4:50
    send(topic, [inside, beyond])
    wait_until(emitted(5), 30, "the corrected re-emit of minute 3")
    wait_until(
        lambda: f.metric("sluice_late_rows_dropped_total") == 1, 30, "the row beyond to be counted"
    )
    got = table_rows(table)
    assert got[start(3)][1:3] == (2, 113)
    assert got[start(1)][1:3] == (1, 11)
    assert 'policy="reopen"' in f.scrape()


def test_an_idle_source_lets_the_windows_close(
    kafka_topic: Callable[..., str], flow: Callable[..., Flow]
) -> None:
    busy, quiet = kafka_topic(1), kafka_topic(1)
    table = unique("win_idle")
    toml = f"""
pipeline_name = "{table}"
idle_pause_ms = 100

[[sources]]
query = "{busy}"
kind = "kafka"
bootstrap_servers = "{endpoints.KAFKA_BOOTSTRAP}"
group_id = "{table}"
session_timeout_ms = 6000

[[sources]]
query = "{quiet}"
kind = "kafka"
bootstrap_servers = "{endpoints.KAFKA_BOOTSTRAP}"
group_id = "{table}_quiet"
session_timeout_ms = 6000

[target]
kind = "postgres"
url = "{endpoints.POSTGRES_URL}"
mode = "merge"

[target.table]
schema = "public"
name = "{table}"
primary_key = ["user_id", "window_start"]

[watermark]
source_idleness_ms = 8000

[transform.window]
kind = "tumbling"
duration_ms = 60000
group_by = ["user_id"]
{AGGS}
"""
    rows = [
        {"user_id": 1, "amount": m, "page": "/x", "ts_ms": T0_MS + m * 60_000 + 1, "ts_us": 0}
        for m in range(10)
    ]
    send(quiet, [{**rows[0], "user_id": 2}])
    send(busy, rows[:2])
    f = flow(toml)
    wait_until(lambda: f.metric("sluice_rows_consumed_total") >= 3, 60, "both sources read")
    # The quiet source's minute 0 holds the watermark (the busy one is at minute 1).
    assert f.metric("sluice_watermark_seconds") <= T0_MS / 1000 + 1
    assert f.metric("sluice_windows_emitted_total") == 0
    # The busy source goes on; the quiet one sends nothing more, so it turns
    # idle source_idleness_ms (8 s) after its row while the busy one is still
    # active, and from then on the busy one alone moves the watermark. Until
    # then the quiet source holds it at minute 0 and nothing closes, so the
    # windows closing at all is the proof: no sleep has to outlast the timer.
    for m in range(2, 6):
        send(busy, [rows[m]])
        # Pacing, not waiting: a row every 2 s keeps the busy source active
        # until at least 6 s after the quiet one turns idle.
        time.sleep(2)
    wait_until(lambda: f.metric("sluice_windows_emitted_total") >= 5, 30, "windows to close")
    got = table_rows(table)
    assert got[(1, T0_MS)][1] == 1 and got[(2, T0_MS)][1] == 1
    assert (1, T0_MS + 60_000) in got
