"""The benchmark's join as a Quix Streams program: orders ⋈ payments ±5 min -> Postgres.

    /opt/peers/quixstreams/bin/python quix_join.py --bootstrap-servers ... --orders T1 \\
        --payments T2 --group G --postgres-url URL --schema S --table T --state-dir DIR

Run by ``run.py`` in the peers' own venv (``benchmarks/setup_peers.sh``), never
in the project's: it imports nothing from the repository.

It is the pipeline of ``pipeline.toml.tmpl`` written with the library's own
parts, as its documentation shows them:

* both topics through ``Application.dataframe`` (JSON values, the message
  key is the order_id, the event time is the Kafka message timestamp);
* ``StreamingDataFrame.join_interval(how="inner", backward_ms=300_000,
  forward_ms=300_000)``: a pair matches when ``|payment ts - order ts| <=
  5 min``, the TOML's ``time_window_ms``. ``grace_ms`` (how long a key keeps
  its rows in the RocksDB store) is the window plus the 5 s the TOML's
  watermark allows for disorder;
* the community ``PostgreSQLSink`` into the pre-created table, without its
  metadata columns and without schema changes.

The merge callback names the columns as sluice's join does (``left_`` /
``right_`` + the field, ``_event_ts`` being the message timestamp), so every
engine writes the same table. Quix's state is RocksDB backed by changelog
topics (its defaults); ``run.py`` deletes those topics afterwards.

It runs until SIGTERM (``Application.run``), like the reference engine.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from quixstreams import Application
from quixstreams.sinks.community.postgresql import PostgreSQLSink

WINDOW_MS = 300_000  # the TOML's time_window_ms
LATENESS_MS = 5_000  # the TOML's [watermark] lateness_ms


def with_event_ts(
    value: dict[str, Any], _key: Any, timestamp: int, _headers: Any
) -> dict[str, Any]:
    """The value plus its message timestamp (ms), as sluice's ``_event_ts``."""
    return {**value, "_event_ts": timestamp}


def merge(left: dict[str, Any], right: dict[str, Any]) -> dict[str, Any]:
    """One output row: sluice's column names, ``_event_ts`` as a timestamp.

    It builds a new dict: Quix's docs say a merge must not mutate its inputs,
    which are the stored rows.
    """
    row: dict[str, Any] = {}
    for prefix, value in (("left_", left), ("right_", right)):
        for name, v in value.items():
            if name == "_event_ts":
                v = datetime.fromtimestamp(v / 1000, UTC)
            row[prefix + name] = v
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bootstrap-servers", required=True)
    p.add_argument("--orders", required=True, help="the left topic")
    p.add_argument("--payments", required=True, help="the right topic")
    p.add_argument("--group", required=True, help="consumer group")
    p.add_argument("--postgres-url", required=True)
    p.add_argument("--schema", required=True)
    p.add_argument("--table", required=True)
    p.add_argument("--state-dir", required=True)
    a = p.parse_args()

    app = Application(
        broker_address=a.bootstrap_servers,
        consumer_group=a.group,
        auto_offset_reset="earliest",
        state_dir=a.state_dir,
        loglevel="WARNING",
    )
    orders = app.dataframe(app.topic(a.orders, key_deserializer="str", value_deserializer="json"))
    payments = app.dataframe(
        app.topic(a.payments, key_deserializer="str", value_deserializer="json")
    )
    orders = orders.apply(with_event_ts, metadata=True)
    payments = payments.apply(with_event_ts, metadata=True)
    joined = orders.join_interval(
        payments,
        how="inner",
        on_merge=merge,
        grace_ms=WINDOW_MS + LATENESS_MS,
        backward_ms=WINDOW_MS,
        forward_ms=WINDOW_MS,
    )
    url = urlsplit(a.postgres_url)
    joined.sink(
        PostgreSQLSink(
            host=url.hostname or "127.0.0.1",
            port=url.port or 5432,
            dbname=url.path.lstrip("/") or "postgres",
            user=url.username or "postgres",
            password=url.password or "",
            table_name=a.table,
            schema_name=a.schema,
            schema_auto_update=False,  # the harness created the table
            include_metadata=False,  # no __key / timestamp columns: sluice has none
        )
    )
    app.run()


if __name__ == "__main__":
    main()
