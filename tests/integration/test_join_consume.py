"""The stream-stream join through a real `flow consume`, broker and Postgres,
with its buffers in the Postgres state store.

Orders and payments on two topics; the expected rows are the same interval
join computed by DuckDB SQL over the same events. Arrival is out of order by
up to 4 s, inside ``lateness_ms``; one closing event per side, two hours
later, moves the watermark past every buffered row, so the unmatched outer
rows are emitted too.
"""

from __future__ import annotations

import collections
import json
import random
from collections.abc import Callable
from typing import Any

import duckdb
import psycopg
import pyarrow as pa
import pytest
from tests import endpoints
from tests.integration.conftest import Flow, produce, unique, wait_until

pytestmark = pytest.mark.integration

T0_MS = 1_700_000_000_000
WINDOW_MS = 300_000


def history(n: int, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``n`` orders; 80 % paid within ±5 min, 10 % paid 6-20 min later, 10 % never."""
    rng = random.Random(seed)
    orders, payments = [], []
    for i in range(n):
        ts = T0_MS + i * 2_000 + rng.randint(0, 1_000)
        orders.append({"order_id": i, "amount": rng.randint(1, 900), "ts_ms": ts})
        r = rng.random()
        if r < 0.8:
            payments.append(
                {"order_id": i, "paid": i * 10, "ts_ms": ts + rng.randint(-WINDOW_MS, WINDOW_MS)}
            )
        elif r < 0.9:
            payments.append(
                {"order_id": i, "paid": i * 10, "ts_ms": ts + rng.randint(360_000, 1_200_000)}
            )
    for rows in (orders, payments):
        order = {id(e): e["ts_ms"] + rng.randint(0, 4_000) for e in rows}
        rows.sort(key=lambda e: order[id(e)])
    return orders, payments


def send(topic: str, rows: list[dict[str, Any]]) -> None:
    produce(
        topic,
        [json.dumps(r).encode() for r in rows],
        timestamps_ms=[r["ts_ms"] for r in rows],
    )


def expected(orders: list[dict[str, Any]], payments: list[dict[str, Any]], kind: str) -> Any:
    con = duckdb.connect()
    con.register("o", pa.Table.from_pylist(orders))
    con.register("p", pa.Table.from_pylist(payments))
    how = {
        "inner": "JOIN",
        "left_outer": "LEFT JOIN",
        "right_outer": "RIGHT JOIN",
        "full_outer": "FULL JOIN",
    }[kind]
    rows = con.sql(
        f"""SELECT o.order_id, o.amount, p.order_id, p.paid FROM o {how} p
            ON o.order_id = p.order_id AND abs(p.ts_ms - o.ts_ms) <= {WINDOW_MS}"""
    ).fetchall()
    return collections.Counter(rows)


def got(table: str) -> Any:
    with psycopg.connect(endpoints.POSTGRES_URL) as conn:
        rows = conn.execute(
            f"""SELECT left_order_id, left_amount, right_order_id, right_paid FROM public.{table}
                WHERE coalesce(left_order_id, right_order_id) >= 0"""
        ).fetchall()
    return collections.Counter(rows)


@pytest.mark.parametrize("kind", ["inner", "left_outer", "right_outer", "full_outer"])
def test_join_kinds_equal_duckdb(
    kind: str, kafka_topic: Callable[..., str], flow: Callable[..., Flow]
) -> None:
    orders_t, payments_t = kafka_topic(2, "orders"), kafka_topic(2, "payments")
    table = unique(f"join_{kind}")
    orders, payments = history(3000, seed=len(kind))
    send(orders_t, orders)
    send(payments_t, payments)
    toml = f"""
pipeline_name = "{table}"
idle_pause_ms = 100

[[sources]]
query = "{orders_t}"
kind = "kafka"
bootstrap_servers = "{endpoints.KAFKA_BOOTSTRAP}"
group_id = "{table}"
session_timeout_ms = 6000
max_batch_rows = 500

[[sources]]
query = "{payments_t}"
kind = "kafka"
bootstrap_servers = "{endpoints.KAFKA_BOOTSTRAP}"
group_id = "{table}"
session_timeout_ms = 6000
max_batch_rows = 500

[target]
kind = "postgres"
url = "{endpoints.POSTGRES_URL}"

[target.table]
schema = "public"
name = "{table}"

[watermark]
lateness_ms = 5000

[state_store]
kind = "postgres"
url = "{endpoints.POSTGRES_URL}"
schema = "{table}_state"
checkpoint_interval_ms = 1000

[transform.join]
kind = "{kind}"
left_source = "{orders_t}"
right_source = "{payments_t}"
left_keys = ["order_id"]
right_keys = ["order_id"]
time_window_ms = {WINDOW_MS}
"""
    f = flow(toml)
    wait_until(
        lambda: f.metric("sluice_rows_consumed_total") >= len(orders) + len(payments), 60, "input"
    )
    end = max(e["ts_ms"] for e in orders + payments) + 7_200_000
    for topic, row in (
        (orders_t, {"order_id": -1, "amount": 0}),
        (payments_t, {"order_id": -2, "paid": 0}),
    ):
        for p in range(2):
            produce(topic, [json.dumps(row).encode()], partition=p, timestamps_ms=[end])
    want = expected(orders, payments, kind)

    def check() -> bool:
        assert f.proc.poll() is None, f.output()
        try:
            return bool(got(table) == want)
        except psycopg.errors.UndefinedTable:
            return False

    try:
        wait_until(check, 60, f"the {kind} join to equal DuckDB's", 0.5)
    except AssertionError as exc:  # a timeout, or the process died: chained below
        have = got(table)
        raise AssertionError(
            f"missing {list((want - have).items())[:5]} extra {list((have - want).items())[:5]}"
        ) from exc
    assert f.metric("sluice_late_rows_dropped_total") == 0
    assert f.metric("sluice_join_buffer_rows") > 0  # the closing events
