"""The pipelines of ``configs/*.toml``, declared with the typed Python API.

Relative paths in a twin resolve from the working directory (the
repository root), as those of a file resolve from its folder (``configs/``).
Each function returns the keyword arguments of
``sluice.run_streaming_pipeline`` for the file of the same name (``-`` and
``.`` as ``_``); ``tests/unit/test_python_api.py`` checks that each lowers
to exactly the spec its TOML file loads to.
"""

from __future__ import annotations

from typing import Any

from sluice import (
    CDC,
    Aggregation,
    DeltaLocalConnection,
    DuckDBConnection,
    Join,
    KafkaConnection,
    KinesisConnection,
    Lookup,
    MySQLConnection,
    ObjectStoreLocalConnection,
    ObjectStoreS3Connection,
    PostgresConnection,
    PubSubConnection,
    RabbitMQConnection,
    SchemaRegistryConnection,
    Source,
    SQLiteConnection,
    StateStore,
    Target,
    Watermark,
    Window,
)

BROKER = "127.0.0.1:19092"
PG = "postgresql://postgres@127.0.0.1:55432/postgres"

kafka = KafkaConnection(name="kafka", bootstrap_servers=BROKER)
warehouse = PostgresConnection(name="warehouse", url=PG)


def cdc_delta() -> dict[str, Any]:
    return dict(
        name="cdc-mirror-customers-delta",
        source=KafkaConnection(name="src", bootstrap_servers=BROKER, group_id="sluice-cdc-delta"),
        source_query="dbz.public.customers",
        target=Target(
            DeltaLocalConnection(name="lake", path="/tmp/sluice/delta/customers"),
            table=("default", "customers"),
            primary_key=["id"],
        ),
        cdc=CDC(envelope="debezium", key_field="after.id"),
    )


def cdc_postgres() -> dict[str, Any]:
    return dict(
        name="cdc-mirror-customers",
        source=KafkaConnection(name="src", bootstrap_servers=BROKER, group_id="sluice-cdc"),
        source_query="dbz.public.customers",
        target=warehouse,
        target_table=("public", "customers"),
        cdc=CDC(
            envelope="debezium", key_field="after.id", delete_mode="hard", schema_evolution="skip"
        ),
    )


def events_to_pg() -> dict[str, Any]:
    return dict(
        name="events-to-pg",
        source=KafkaConnection(
            name="src", bootstrap_servers=BROKER, group_id="sluice-events-to-pg"
        ),
        source_query="events",
        idle_pause_ms=500,
        target=warehouse,
        target_table=("public", "events"),
    )


def fan_in() -> dict[str, Any]:
    return dict(
        name="fanin",
        sources=[Source(kafka, query="orders"), Source(kafka, query="payments")],
        target=warehouse,
        target_table=("public", "events_union"),
    )


def fan_out() -> dict[str, Any]:
    return dict(
        name="fanout",
        source=kafka,
        source_query="events",
        targets=[
            Target(warehouse, table=("public", "events_pg")),
            Target(
                DeltaLocalConnection(name="lake", path="/tmp/sluice/delta/events"),
                partition_by=["event_type"],
            ),
        ],
    )


def hopping() -> dict[str, Any]:
    return dict(
        name="events-5min-hopping",
        source=kafka,
        source_query="events",
        target=Target(
            warehouse,
            table=("public", "events_5min"),
            primary_key=["window_start", "user_id"],
            mode="merge",
        ),
        window=Window(
            kind="hopping",
            duration_ms=300_000,
            hop_ms=60_000,
            group_by=["user_id"],
            late_data="reopen",
            allowed_lateness_ms=30_000,
            aggregations=[
                Aggregation(agg="count", as_="n"),
                Aggregation(agg="max", column="amount", as_="amount_max"),
            ],
        ),
        watermark=Watermark(lateness_ms=5000, source_idleness_ms=120_000),
    )


def join() -> dict[str, Any]:
    return dict(
        name="orders-payments",
        sources=[Source(kafka, query="orders"), Source(kafka, query="payments")],
        target=warehouse,
        target_table=("public", "orders_with_payments"),
        join=Join(
            kind="inner",
            left_source="orders",
            right_source="payments",
            left_keys=["order_id"],
            right_keys=["order_id"],
            time_window_ms=300_000,
        ),
        state_store=StateStore(connection=warehouse),
    )


def kafka_cdc_to_postgres() -> dict[str, Any]:
    return dict(
        name="customers-mirror",
        source=KafkaConnection(
            name="src",
            bootstrap_servers=BROKER,
            group_id="sluice-customers-mirror",
            dead_letter_topic="dbz.public.customers.dlq",
        ),
        source_query="dbz.public.customers",
        idle_pause_ms=500,
        target=warehouse,
        target_table=("public", "customers"),
        on_error="dlq",
        cdc=CDC(
            envelope="debezium",
            key_field="after.id",
            delete_mode="soft",
            soft_delete_column="deleted_at",
            schema_evolution="add_columns",
        ),
    )


def kafka_to_mysql() -> dict[str, Any]:
    return dict(
        name="events-to-mysql",
        source=KafkaConnection(
            name="src", bootstrap_servers=BROKER, group_id="sluice-events-to-mysql"
        ),
        source_query="events",
        idle_pause_ms=500,
        target=Target(
            MySQLConnection(name="mysql", url="mysql://root@127.0.0.1:53306/sluice"),
            table="events",
            primary_key=["id"],
            mode="merge",
        ),
    )


def kinesis_to_pg() -> dict[str, Any]:
    return dict(
        name="kinesis-events",
        source=KinesisConnection(
            name="kinesis",
            region="us-east-1",
            endpoint="http://127.0.0.1:4568",
            access_key_id="test",
            secret_access_key="${AWS_SECRET_ACCESS_KEY:-test}",
        ),
        source_query="events",
        target=warehouse,
        target_table=("public", "kinesis_events"),
    )


def object_store_target() -> dict[str, Any]:
    lake = ObjectStoreLocalConnection(name="lake", path="/tmp/sluice/lake")
    return dict(
        name="events_archive",
        source=kafka,
        source_query="events",
        targets=[
            Target(lake, format="parquet", prefix="events/raw", parquet_compression="zstd"),
            Target(
                lake,
                format="csv",
                prefix="events/csv",
                csv_delimiter=";",
                csv_header=True,
                csv_quote="'",
                csv_escape="\\",
                csv_null_value="\\N",
                read_options={
                    "csv": {
                        "has_header": True,
                        "delimiter": 59,
                        "quote": "'",
                        "escape": "\\",
                        "comment": "#",
                        "null_regex": "^(NA|NULL|\\\\N)$",
                        "truncated_rows_ok": False,
                        "schema_infer_max_records": 4096,
                    }
                },
            ),
        ],
    )


def pubsub_to_pg() -> dict[str, Any]:
    return dict(
        name="pubsub-events",
        source=PubSubConnection(
            name="pubsub", project_id="sluice-test", endpoint="127.0.0.1:8085", anonymous_auth=True
        ),
        source_query="events-sub",
        target=warehouse,
        target_table=("public", "pubsub_events"),
    )


def quickstart() -> dict[str, Any]:
    return dict(
        name="quickstart",
        source=ObjectStoreLocalConnection(
            name="files", path="examples/quickstart", format="json_lines"
        ),
        source_query="events",
        target=Target(
            SQLiteConnection(name="db", path="quickstart.db"),
            table="events",
            primary_key=["event_id"],
            mode="merge",
        ),
    )


def quickstart_window() -> dict[str, Any]:
    return dict(
        name="quickstart-window",
        source=ObjectStoreLocalConnection(
            name="files", path="examples/quickstart", format="json_lines"
        ),
        source_query="events",
        target=Target(
            DuckDBConnection(name="db", path="quickstart.duckdb"),
            table="events_per_minute",
            primary_key=["window_start", "event_type"],
            mode="merge",
        ),
        transform_sql=(
            "SELECT event_type, amount, CAST(ts AS TIMESTAMP) AS event_time\n"
            "FROM source\nWHERE amount > 0\n"
        ),
        window=Window(
            kind="tumbling",
            duration_ms=60_000,
            event_time_column="event_time",
            group_by=["event_type"],
            aggregations=[
                Aggregation(agg="count", as_="events"),
                Aggregation(agg="sum", column="amount", as_="amount_sum"),
            ],
        ),
    )


def rabbitmq_to_pg() -> dict[str, Any]:
    return dict(
        name="rabbit-events",
        source=RabbitMQConnection(
            name="rabbit",
            amqp_url="amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=30",
            queue_args={"x-dead-letter-exchange": "sluice.dlx"},
        ),
        source_query="events",
        target=Target(
            warehouse, table=("public", "rabbit_events"), primary_key=["id"], mode="merge"
        ),
    )


def avro_to_kafka() -> dict[str, Any]:
    registry = SchemaRegistryConnection(name="registry", url="http://127.0.0.1:8081")
    return dict(
        name="avro-to-kafka",
        source=KafkaConnection(
            name="src",
            bootstrap_servers=BROKER,
            group_id="sluice-avro-to-kafka",
            payload_format="avro",
            schema_registry=registry,
        ),
        source_query="orders",
        transform_sql=(
            "SELECT order_id, customer_id, amount, ts, _event_ts FROM source WHERE amount > 100"
        ),
        target=Target(
            KafkaConnection(name="out", bootstrap_servers=BROKER),
            topic="big_orders",
            message_key_column="customer_id",
            payload_format="avro",
            schema_registry_url="http://127.0.0.1:8081",
            auto_register=True,
        ),
    )


def session() -> dict[str, Any]:
    return dict(
        name="user-sessions",
        source=kafka,
        source_query="events",
        target=warehouse,
        target_table=("public", "user_sessions"),
        transform_sql="SELECT user_id, page, _event_ts FROM source",
        window=Window(
            kind="session",
            gap_ms=300_000,
            max_session_duration_ms=86_400_000,
            group_by=["user_id"],
            max_groups_per_window=1_000_000,
            aggregations=[
                Aggregation(agg="count", as_="events"),
                Aggregation(agg="first", column="page", as_="entry_page"),
                Aggregation(agg="last", column="page", as_="exit_page"),
            ],
        ),
        state_store=StateStore(kind="postgres", url=PG, schema="public"),
    )


def sql_lookup() -> dict[str, Any]:
    return dict(
        name="events-clean",
        source=kafka,
        source_query="events",
        target=warehouse,
        target_table=("public", "events_enriched"),
        transform_sql="""
SELECT
  s.user_id,
  s.event_type,
  s.amount,
  u.country,
  s._event_ts
FROM source s
LEFT JOIN users u ON s.user_id = u.id
WHERE s.event_type IN ('click', 'view', 'purchase')
  AND s.amount > 0
""".lstrip("\n"),
        on_error="fail",
        lookups={
            "users": Lookup(warehouse, table="users", schema="public", refresh_interval_ms=300_000)
        },
    )


def tumbling() -> dict[str, Any]:
    return dict(
        name="events-per-min",
        source=kafka,
        source_query="events",
        target=warehouse,
        target_table=("public", "events_per_min"),
        transform_sql="SELECT user_id, amount, event_type, _event_ts FROM source",
        window=Window(
            kind="tumbling",
            duration_ms=60_000,
            group_by=["user_id"],
            max_groups_per_window=1_000_000,
            aggregations=[
                Aggregation(agg="count", as_="n"),
                Aggregation(agg="sum", column="amount", as_="amount_sum"),
                Aggregation(agg="avg", column="amount", as_="amount_avg"),
                Aggregation(agg="count_distinct", column="event_type", as_="distinct_event_types"),
            ],
        ),
    )


def files_to_delta() -> dict[str, Any]:
    return dict(
        name="files_to_delta",
        source=Source(
            ObjectStoreS3Connection(
                name="landing",
                bucket="landing",
                endpoint="${AWS_ENDPOINT_URL:-http://127.0.0.1:5000}",
                region="us-east-1",
                access_key_id="${AWS_ACCESS_KEY_ID:-test}",
                secret_access_key="${AWS_SECRET_ACCESS_KEY:-test}",
            ),
            rescan_interval_ms=60_000,
            max_batch_rows=50_000,
            read_options={"csv": {"delimiter": ";", "null_regex": "^(NA|)$"}},
        ),
        source_query="incoming/",
        dlq_store="/var/lib/lake/dead_letters.jsonl",
        on_error="dlq",
        target=Target(
            DeltaLocalConnection(name="lake", path="/var/lib/lake/events"),
            partition_by=["event_type"],
            flush_rows=100_000,
            flush_interval_ms=10_000,
        ),
    )


def delta_to_postgres() -> dict[str, Any]:
    return dict(
        name="delta_to_postgres",
        source=DeltaLocalConnection(name="lake", path="/var/lib/lake"),
        source_query="events",
        target=Target(
            PostgresConnection(name="pg", url="postgres://postgres@127.0.0.1:55432/postgres"),
            table=("public", "events_mirror"),
            primary_key=["id"],
            mode="merge",
        ),
    )
