"""Exactly-once into SQL targets, under real `flow consume` processes SIGKILLed
mid-stream.

Kafka → Postgres / MariaDB / SQLite / DuckDB in append mode: ten kills at
random points, each while rows were still in flight (the broker's committed
offsets below what was produced), a restart after each; in the end the table
holds every produced id exactly once. Then an interval join and a tumbling
window into an append Postgres table with the state store in the same
database: the output equals the DuckDB oracle, row for row, with no
duplicate.
"""

from __future__ import annotations

import collections
import random
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import psycopg
import pytest
from tests import endpoints
from tests.integration import test_join_consume as joins
from tests.integration import test_windows as windows
from tests.integration.conftest import Flow, committed, events, produce, unique, wait_until
from tests.integration.test_mysql import _connect as mysql_connect
from tests.integration.test_state_recovery import (
    close_join,
    inner_pairs,
    join_config,
    store_block,
    wait_for,
)

pytestmark = pytest.mark.integration

PARTITIONS = 3
#: Rows produced ahead of the pipeline before each start, so a kill always
#: falls mid-stream: at ~100-row batches the pipeline needs seconds for them.
AHEAD = 6000


def target_block(kind: str, table: str, tmp: Path) -> str:
    if kind == "postgres":
        where = f'url = "{endpoints.POSTGRES_URL}"'
        schema = 'schema = "public"'
    elif kind == "mysql":
        where = f'url = "{endpoints.MYSQL_URL}"'
        schema = ""
    else:
        where = f'path = "{tmp / (table + "." + kind)}"'
        schema = ""
    return f"""
[target]
kind = "{kind}"
{where}
mode = "append"

[target.table]
{schema}
name = "{table}"
"""


def config(topic: str, name: str, target: str) -> str:
    return f"""
pipeline_name = "{name}"
source_query = "{topic}"
idle_pause_ms = 100

[source]
kind = "kafka"
bootstrap_servers = "{endpoints.KAFKA_BOOTSTRAP}"
group_id = "{name}"
session_timeout_ms = 2000
max_batch_rows = 100

{target}
"""


def ids(kind: str, table: str, tmp: Path) -> collections.Counter[int]:
    """Every id in the target table, with its multiplicity."""
    if kind == "postgres":
        with psycopg.connect(endpoints.POSTGRES_URL) as conn:
            rows = conn.execute(f"SELECT id FROM public.{table}").fetchall()
    elif kind == "mysql":
        conn = mysql_connect()
        try:
            with conn.cursor() as cur:
                cur.execute(f"SELECT id FROM {table}")
                rows = list(cur.fetchall())
        finally:
            conn.close()
    elif kind == "sqlite":
        with sqlite3.connect(tmp / f"{table}.sqlite") as conn:
            rows = conn.execute(f"SELECT id FROM {table}").fetchall()
    else:
        with duckdb.connect(str(tmp / f"{table}.duckdb"), read_only=True) as conn:
            rows = conn.execute(f"SELECT id FROM {table}").fetchall()
    return collections.Counter(int(r[0]) for r in rows)


@pytest.mark.parametrize("kind", ["postgres", "mysql", "sqlite", "duckdb"])
def test_append_killed_ten_times_holds_every_row_exactly_once(
    kind: str, kafka_topic: Callable[..., str], flow: Callable[..., Flow], tmp_path: Path
) -> None:
    topic = kafka_topic(PARTITIONS, "eo")
    name = unique(f"eo_{kind}")
    toml = config(topic, name, target_block(kind, name, tmp_path))
    rng = random.Random(kind)
    produced = 0
    for kill in range(10):
        # Keep AHEAD rows beyond what the broker has committed, so the kill
        # lands while rows are in flight.
        behind = produced - committed(name, topic, PARTITIONS)
        if behind < AHEAD:
            produce(topic, events(AHEAD - behind, produced))
            produced += AHEAD - behind
        f = flow(toml)
        upto = rng.randint(1, AHEAD // 2)  # a random point, well before the backlog ends
        wait_until(
            lambda f=f, t=upto: (
                f.proc.poll() is not None or f.metric("sluice_rows_written_total") >= t
            ),
            60,
            f"run {kill + 1} to write {upto} rows",
            0.01,
        )
        time.sleep(rng.uniform(0, 0.02))  # not always right after a scrape
        assert f.proc.poll() is None, f.output()
        f.kill()
        done = committed(name, topic, PARTITIONS)
        assert done < produced, f"kill {kill + 1} fell after the stream ({done} of {produced})"
    f = flow(toml)
    wait_until(
        lambda: f.proc.poll() is not None or committed(name, topic, PARTITIONS) == produced,
        120,
        "the last run to commit every row",
        0.5,
    )
    assert f.stop() == 0, f.output()
    got = ids(kind, name, tmp_path)
    want = collections.Counter(range(produced))
    assert got == want, (
        f"{kind}: {sum((want - got).values())} lost, {sum((got - want).values())} duplicated "
        f"of {produced}"
    )


def pg_append_target(table: str) -> str:
    return f"""
[target]
kind = "postgres"
url = "{endpoints.POSTGRES_URL}"
mode = "append"

[target.table]
schema = "public"
name = "{table}"
"""


def test_an_interval_join_into_append_postgres_with_the_store_beside_it_is_exactly_once(
    kafka_topic: Callable[..., str], flow: Callable[..., Flow]
) -> None:
    orders_t, payments_t = kafka_topic(2, "orders"), kafka_topic(2, "payments")
    name = unique("eojoin")
    orders, payments = joins.history(6000, seed=17)
    step = -(-len(orders) // 5)
    chunks = [
        (orders[i * step : (i + 1) * step], payments[i * step : (i + 1) * step]) for i in range(5)
    ]
    fed = 0

    def feed(i: int) -> int:
        nonlocal fed
        joins.send(orders_t, chunks[i][0])
        joins.send(payments_t, chunks[i][1])
        fed += len(chunks[i][0]) + len(chunks[i][1])
        return len(chunks[i][0]) + len(chunks[i][1])

    toml = join_config(orders_t, payments_t, name, pg_append_target(name), 200)
    rng = random.Random(23)
    for kill in range(4):
        n = feed(kill)
        f = flow(toml)
        want_rows = rng.randint(1, n)
        wait_until(
            lambda f=f, t=want_rows: (
                f.proc.poll() is not None or f.metric("sluice_rows_consumed_total") >= t
            ),
            90,
            f"run {kill + 1} to consume",
            0.05,
        )
        time.sleep(rng.uniform(0, 0.3))
        assert f.proc.poll() is None, f.output()
        # Each partition is in event-time order within the lateness: no row is
        # late, also after a rebalance read rows again.
        assert f.metric("sluice_late_rows_dropped_total") == 0
        f.kill()
        done = committed(name, orders_t, 2) + committed(name, payments_t, 2)
        assert done < fed, f"kill {kill + 1} fell after the stream ({done} of {fed})"
    feed(4)
    f = flow(toml)
    close_join(orders_t, payments_t, max(e["ts_ms"] for e in orders + payments) + 7_200_000)
    want = joins.expected(orders, payments, "inner")
    wait_for(lambda: inner_pairs(name), want, f, "the join after 4 kills", 120)
    assert f.metric("sluice_late_rows_dropped_total") == 0
    assert max(inner_pairs(name).values()) == 1
    assert "in the transaction of the output rows" in f.output()


def test_a_tumbling_window_into_append_postgres_with_the_store_beside_it_is_exactly_once(
    kafka_topic: Callable[..., str], flow: Callable[..., Flow]
) -> None:
    topic = kafka_topic(windows.PARTITIONS, "eowin")
    name = unique("eowin")
    rows = windows.history(6000, seed=29)
    toml = windows.config(
        topic, name, 'kind = "tumbling"\nduration_ms = 60000', "window_start"
    ).replace('mode = "merge"', 'mode = "append"').replace(
        'primary_key = ["user_id", "window_start"]', ""
    ).replace("max_batch_rows = 700", "max_batch_rows = 200") + store_block(name)
    step = -(-len(rows) // 4)
    rng = random.Random(31)
    sent = 0
    for kill in range(3):
        part = rows[kill * step : (kill + 1) * step]
        windows.send(topic, part)
        sent += len(part)
        f = flow(toml)
        want_rows = rng.randint(1, len(part))
        wait_until(
            lambda f=f, t=want_rows: (
                f.proc.poll() is not None or f.metric("sluice_rows_consumed_total") >= t
            ),
            90,
            f"run {kill + 1} to consume",
            0.05,
        )
        time.sleep(rng.uniform(0, 0.3))
        assert f.proc.poll() is None, f.output()
        f.kill()
        done = committed(name, topic, windows.PARTITIONS)
        assert done < sent, f"kill {kill + 1} fell after the stream ({done} of {sent})"
    windows.send(topic, rows[3 * step :])
    f = flow(toml)
    windows.close_all(topic, max(r["ts_ms"] for r in rows) + 7_200_000)
    want = windows.expected(rows, "tumbling")
    windows.wait_for_table(name, want, f)

    def count() -> int:
        with psycopg.connect(endpoints.POSTGRES_URL) as conn:
            row = conn.execute(f"SELECT count(*) FROM public.{name} WHERE user_id < 100000")
            return int(row.fetchone()[0])  # type: ignore[index]

    assert count() == len(want), "duplicated windows"
    assert "in the transaction of the output rows" in f.output()
