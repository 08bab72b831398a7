"""A backlog read from the start must not turn into late rows (issue 14).

Three partitions, each ending with a closing event a day later. Partition 0
is small and produced first; partitions 1 and 2 are large backlogs. The
consumer fetches per partition in small slices, so the broker serves the
partitions in runs, one after another, and partition 0's closing event
arrives while the others still have most of their records on the broker.
Every assigned partition must hold the watermark until it delivers, and a
partition with records left on the broker is never idle, even when its
backlog outlasts ``source_idleness_ms``: no row is late, and every window
equals DuckDB's over the produced events.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import duckdb
import psycopg
import pyarrow as pa
import pytest
from tests import endpoints
from tests.integration.conftest import Flow, produce, unique, wait_until

pytestmark = pytest.mark.integration

MIN_MS = 60_000
DAY_MS = 86_400_000
T0_MS = 1_700_000_000_000 // MIN_MS * MIN_MS
CLOSING_USER = 100_000


def partition_events(p: int, n: int) -> list[dict[str, Any]]:
    """``n`` events in event-time order over ~40 minutes, then the closing event."""
    step = 40 * MIN_MS // n
    rows = [
        {"user_id": (i * 7 + p) % 50, "amount": (i % 97) + p, "ts_ms": T0_MS + i * step + p}
        for i in range(n)
    ]
    rows.append({"user_id": CLOSING_USER + p, "amount": 0, "ts_ms": T0_MS + DAY_MS})
    return rows


def send(topic: str, p: int, rows: list[dict[str, Any]]) -> None:
    produce(
        topic,
        [json.dumps(r).encode() for r in rows],
        partition=p,
        timestamps_ms=[r["ts_ms"] for r in rows],
    )


#: Fetch each partition in small slices, and prefetch little: the broker then
#: serves the partitions in runs while the window writes into Postgres.
SLICES = (
    'librdkafka = { "max.partition.fetch.bytes" = 8192, "fetch.max.bytes" = 16384, '
    '"message.max.bytes" = 8192, "queued.min.messages" = 1000, '
    '"queued.max.messages.kbytes" = 256 }'
)


def config(topic: str, table: str, idleness_ms: int, fetch: str = SLICES) -> str:
    return f"""
pipeline_name = "{table}"
source_query = "{topic}"
idle_pause_ms = 100

[source]
kind = "kafka"
bootstrap_servers = "{endpoints.KAFKA_BOOTSTRAP}"
group_id = "{table}"
session_timeout_ms = 2000
max_batch_rows = 500
{fetch}

[target]
kind = "postgres"
url = "{endpoints.POSTGRES_URL}"
mode = "append"

[target.table]
schema = "public"
name = "{table}"

[watermark]
lateness_ms = 0
source_idleness_ms = {idleness_ms}

[transform.window]
kind = "tumbling"
duration_ms = 60000
group_by = ["user_id"]
[[transform.window.aggregations]]
agg = "count"
as = "n"
[[transform.window.aggregations]]
agg = "sum"
column = "amount"
as = "total"
"""


def expected(events: list[dict[str, Any]]) -> list[tuple[int, int, int, int]]:
    """Every closed window by DuckDB (the closing events' windows stay open)."""
    con = duckdb.connect()
    con.register("ev", pa.Table.from_pylist(events))
    return sorted(
        con.sql(
            f"""SELECT user_id, ts_ms // {MIN_MS} * {MIN_MS} AS ws, count(*), sum(amount)
                FROM ev WHERE user_id < {CLOSING_USER} GROUP BY user_id, ws"""
        ).fetchall()
    )


def table_rows(table: str) -> list[tuple[int, int, int, int]]:
    with psycopg.connect(endpoints.POSTGRES_URL) as conn:
        rows = conn.execute(
            f"""SELECT user_id, (extract(epoch FROM window_start) * 1000)::bigint, n, total
                FROM public.{table}"""
        ).fetchall()
    return sorted((int(a), int(b), int(c), int(d)) for a, b, c, d in rows)


SMALL = {0: 2_000, 1: 25_000, 2: 25_000}
#: The issue's case: 1M events, partitions 1 and 2 backlogs of ~half a million
#: each behind a small partition 0 whose closing event is served first; the
#: consumer's own (large) fetch sizes.
MILLION = {0: 20_000, 1: 490_000, 2: 490_000}


@pytest.mark.parametrize(
    ("idleness_ms", "sizes", "fetch"),
    [
        pytest.param(60_000, SMALL, SLICES, id="default-idleness"),
        pytest.param(200, SMALL, SLICES, id="backlog-outlasts-idleness"),
        pytest.param(200, MILLION, "", id="one-million-events"),
    ],
)
def test_a_backlog_read_from_the_start_drops_no_row_as_late(
    idleness_ms: int,
    sizes: dict[int, int],
    fetch: str,
    kafka_topic: Callable[..., str],
    flow: Callable[..., Flow],
) -> None:
    topic = kafka_topic(partitions=3)
    table = unique("backlog")
    events: list[dict[str, Any]] = []
    for p in (0, 1, 2):  # partition 0, with its closing event, is on the broker first
        rows = partition_events(p, sizes[p])
        send(topic, p, rows)
        events += rows
    want = expected(events)
    f = flow(config(topic, table, idleness_ms, fetch))

    def consumed() -> bool:
        assert f.proc.poll() is None, f.output()
        return f.metric("sluice_rows_consumed_total") >= len(events)

    wait_until(consumed, 240, "every event consumed")

    def check() -> bool:
        try:
            return len(table_rows(table)) >= len(want)
        except psycopg.errors.UndefinedTable:
            return False

    wait_until(check, 60, f"{len(want)} windows written", 0.5)
    # The watermark held for partitions 1 and 2 while partition 0 ran a day ahead.
    assert f.metric("sluice_late_rows_dropped_total") == 0
    assert table_rows(table) == want  # appended: each window exactly once
    assert f.stop() == 0
