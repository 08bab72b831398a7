"""Batch jobs: a nightly load into DuckDB, a same-database rollup, and a
report copied out to SQLite once the load succeeded.

Run it (no services needed; files land in ``$SHOP_DIR``, default
``./shop-data``)::

    flow run --module examples/batch_jobs/shop_jobs.py nightly
    flow run --module examples/batch_jobs/shop_jobs.py report
    flow run-due --module examples/batch_jobs/shop_jobs.py --interval 60
    flow status --module examples/batch_jobs/shop_jobs.py
    flow runs list

``nightly`` fires daily at 02:00 Berlin time: ``ingest_orders`` pulls new
orders (an Arrow-yielding body standing in for an API) and appends them;
``daily_revenue`` (after it) rebuilds the day totals inside DuckDB with one
``INSERT … SELECT`` (mode truncate). ``report`` fires after each successful
``nightly``: ``export_revenue`` streams the totals to SQLite (mode merge).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from typing import Annotated, Any

import pyarrow as pa

import sluice
from sluice.normalize import lower, trim
from sluice.types import BigInt, Date, Double, Text, TimestampTZ

DATA = os.environ.get("SHOP_DIR", "shop-data")


@sluice.connection
class shop_lake:  # noqa: N801 - the class name is the connection name
    kind = "duckdb"
    path = f"{DATA}/lake.duckdb"


@sluice.connection
class shop_reports:  # noqa: N801 - the class name is the connection name
    kind = "sqlite"
    path = f"{DATA}/reports.sqlite"


@sluice.table(schema="shop")
class Orders:
    order_id: Annotated[BigInt, sluice.pk()]
    customer: Annotated[Text, trim(), lower()]
    amount: Double
    ordered_at: TimestampTZ


@sluice.table(schema="shop")
class DailyRevenue:
    day: Annotated[Date, sluice.pk()]
    orders: BigInt
    revenue: Double


@sluice.table
class RevenueReport:
    day: Annotated[Date, sluice.pk()]
    revenue: Double


@sluice.job(
    name="ingest_orders",
    target=Orders,
    target_connection="shop_lake",
    retry={"max_attempts": 3, "backoff_seconds": 60, "backoff_factor": 2.0},
)
def ingest_orders() -> Iterator[pa.RecordBatch]:
    """Stands in for an API pull: 1,000 orders per run, ids continuing."""
    start = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
    ids = pa.array(range(start, start + 1000), pa.int64())
    yield pa.record_batch(
        {
            "order_id": ids,
            "customer": [f"  Customer{i % 37} " for i in range(1000)],
            "amount": [round(5 + (i % 50) * 1.25, 2) for i in range(1000)],
            "ordered_at": pa.array(
                [dt.datetime.now(dt.UTC) - dt.timedelta(minutes=i) for i in range(1000)],
                pa.timestamp("us", tz="UTC"),
            ),
        }
    )


@sluice.job(
    name="daily_revenue",
    target=DailyRevenue,
    target_connection="shop_lake",
    mode="truncate",
    depends_on=["ingest_orders"],
)
def daily_revenue(conn: Any) -> str:
    return (
        "SELECT CAST(ordered_at AS DATE) AS day, count(*) AS orders, sum(amount) AS revenue "
        "FROM shop.orders GROUP BY 1"
    )


@sluice.job(
    name="export_revenue",
    target=RevenueReport,
    source_connection="shop_lake",
    target_connection="shop_reports",
    mode="merge",
)
def export_revenue(conn: Any) -> str:
    return "SELECT day, revenue FROM shop.daily_revenue"


sluice.workflow(
    "nightly",
    jobs=[ingest_orders, daily_revenue],
    schedule="daily at 02:00",
    timezone="Europe/Berlin",
)
sluice.workflow("report", jobs=[export_revenue], triggered_by=["nightly"])
