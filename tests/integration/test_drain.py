"""End of input: a bounded run (``flow consume --stop-after-idle-ms``) drains.

Every open window is emitted and written before the process exits 0, over
files and over Kafka, and equals DuckDB's windows over the same events.
``--no-drain`` keeps the last window open instead; the next run, with more
data, emits it exactly once (the target appends, so a window emitted twice
shows as a duplicate row).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import psycopg
import pyarrow as pa
import pytest
from tests import endpoints
from tests.integration.conftest import REPO, Flow, produce, unique

pytestmark = pytest.mark.integration

QUICKSTART = REPO / "examples" / "quickstart" / "events"
WINDOW = """
[transform.window]
kind = "tumbling"
duration_ms = 60000
group_by = ["event_type"]
{event_time}
[[transform.window.aggregations]]
agg = "count"
as = "n"
[[transform.window.aggregations]]
agg = "sum"
column = "event_id"
as = "ids"
"""
TARGET = """
[target]
kind = "postgres"
url = "{url}"
mode = "append"

[target.table]
schema = "public"
name = "{table}"
"""

Window = tuple[str, int, int, int]  # event_type, window start (ms), count, sum of ids


def quickstart_events() -> list[dict[str, Any]]:
    """The quickstart's 1200 events (minutes 10:00, 10:01, 10:02), in file order."""
    rows = []
    for path in sorted(QUICKSTART.glob("*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line]
    for r in rows:
        r["ts_ms"] = int(datetime.fromisoformat(r["ts"].replace("Z", "+00:00")).timestamp() * 1000)
    return rows


def expected(events: list[dict[str, Any]], closed_by_ms: int | None = None) -> list[Window]:
    """Tumbling minutes by DuckDB; with ``closed_by_ms`` only those that end by then."""
    con = duckdb.connect()
    con.register("ev", pa.Table.from_pylist(events))
    having = "" if closed_by_ms is None else f"HAVING ws + 60000 <= {closed_by_ms}"
    rows = con.sql(
        f"""SELECT event_type, ts_ms // 60000 * 60000 AS ws, count(*), sum(event_id)
            FROM ev GROUP BY event_type, ws {having}"""
    ).fetchall()
    return sorted((str(a), int(b), int(c), int(d)) for a, b, c, d in rows)


def table_rows(table: str) -> list[Window]:
    with psycopg.connect(endpoints.POSTGRES_URL) as conn:
        rows = conn.execute(
            f"""SELECT event_type, (extract(epoch FROM window_start) * 1000)::bigint, n, ids
                FROM public.{table}"""
        ).fetchall()
    return sorted((str(a), int(b), int(c), int(d)) for a, b, c, d in rows)


def finish(f: Flow) -> None:
    """The bounded run ends by itself, with exit 0."""
    assert f.proc.wait(timeout=90) == 0, f.output()


def test_a_bounded_run_over_files_emits_every_window(
    tmp_path: Path, flow: Callable[..., Flow]
) -> None:
    root = tmp_path / "data"
    shutil.copytree(QUICKSTART, root / "events")
    table = unique("drain_files")
    toml = f"""
pipeline_name = "{table}"
source_query = "events"
idle_pause_ms = 100

[source]
kind = "object_store_local"
path = "{root}"
format = "json_lines"
{TARGET.format(url=endpoints.POSTGRES_URL, table=table)}
{WINDOW.format(event_time='event_time_column = "ts"')}
"""
    finish(flow(toml, "--stop-after-idle-ms", "1000"))
    want = expected(quickstart_events())
    assert {ws for _, ws, _, _ in want} == {ws for _, ws, _, _ in table_rows(table)}
    assert len({ws for _, ws, _, _ in want}) == 3  # all three minutes, the last one too
    assert table_rows(table) == want


def kafka_config(topic: str, table: str) -> str:
    return f"""
pipeline_name = "{table}"
source_query = "{topic}"
idle_pause_ms = 100

[source]
kind = "kafka"
bootstrap_servers = "{endpoints.KAFKA_BOOTSTRAP}"
group_id = "{table}"
session_timeout_ms = 2000
max_batch_rows = 300
{TARGET.format(url=endpoints.POSTGRES_URL, table=table)}
{WINDOW.format(event_time="")}
"""


def send(topic: str, rows: list[dict[str, Any]]) -> None:
    produce(
        topic,
        [json.dumps(r).encode() for r in rows],
        keys=[str(r["user_id"]).encode() for r in rows],
        timestamps_ms=[r["ts_ms"] for r in rows],
    )


def test_a_bounded_kafka_run_emits_every_window(
    kafka_topic: Callable[..., str], flow: Callable[..., Flow]
) -> None:
    topic = kafka_topic(partitions=3)
    table = unique("drain_kafka")
    events = quickstart_events()
    send(topic, events)
    finish(flow(kafka_config(topic, table), "--stop-after-idle-ms", "1500"))
    want = expected(events)
    assert len({ws for _, ws, _, _ in want}) == 3
    assert table_rows(table) == want


def test_no_drain_keeps_the_last_window_for_the_next_run_which_emits_it_once(
    kafka_topic: Callable[..., str], flow: Callable[..., Flow]
) -> None:
    topic = kafka_topic(partitions=3)
    table = unique("nodrain_kafka")
    first = quickstart_events()
    send(topic, first)
    toml = kafka_config(topic, table)
    finish(flow(toml, "--stop-after-idle-ms", "1500", "--no-drain"))
    last_minute = max(e["ts_ms"] for e in first) // 60000 * 60000
    assert table_rows(table) == expected(first, closed_by_ms=last_minute)  # 10:02 still open
    # More data: the rest of 10:02 and a new minute, 10:03.
    more = [
        {**e, "event_id": 10_000 + i, "ts_ms": e["ts_ms"] + k * 20_000}
        for i, (k, e) in enumerate(
            (k, e) for k in (1, 2) for e in first if e["ts_ms"] >= last_minute
        )
    ]
    # In event-time order: the pipeline has no lateness to spare.
    more = sorted((e for e in more if e["ts_ms"] >= last_minute), key=lambda e: e["ts_ms"])
    send(topic, more)
    finish(flow(toml, "--stop-after-idle-ms", "1500"))
    want = expected(first + more)
    assert {ws for _, ws, _, _ in want} == {last_minute - 120_000 + k * 60_000 for k in range(4)}
    assert table_rows(table) == want  # 10:02 once, with its rows of both runs
