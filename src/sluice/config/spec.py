"""The pipeline.toml contract as frozen, typed msgspec Structs.

These classes are the single source of truth for which keys exist, their
types, defaults and one-line descriptions (``flow schema`` prints them as JSON
schema). A component is chosen by its ``kind`` key (msgspec tagged unions).
Specs are inert data: runtime code reads these, never raw dicts.

Keys marked "(ours)" in a description are sluice extensions; the rest follow
the ematix-flow daemon's format (``shared/PIPELINE_TOML.md``).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import msgspec
from msgspec import Meta

from sluice.config.redact import redact_value

# ---------------------------------------------------------------------------
# Shared field types. The unit is in the name (``_ms``) and in the constraint.

Ms = Annotated[int, Meta(ge=0)]
PositiveMs = Annotated[int, Meta(gt=0)]
PositiveInt = Annotated[int, Meta(gt=0)]
NonEmptyStr = Annotated[str, Meta(min_length=1)]


def _d(text: str) -> Meta:
    return Meta(description=text)


class Spec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of every spec: closed (unknown keys are errors), frozen, keyword-only.

    ``repr`` redacts secrets (passwords, secret keys, passwords inside URLs).
    """

    def __repr__(self) -> str:
        parts = []
        for name in self.__struct_fields__:
            value = getattr(self, name)
            parts.append(f"{name}={redact_value(name, value)!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    __str__ = __repr__


class Tagged(Spec, frozen=True, kw_only=True):
    """Base of the specs chosen by a ``kind`` key (sources, targets, lookups, ...)."""

    @property
    def kind(self) -> str:
        """The ``kind`` this spec was chosen by."""
        tag = self.__struct_config__.tag
        return tag if isinstance(tag, str) else ""


# ---------------------------------------------------------------------------
# Sources


class SourceSpec(Tagged, frozen=True, kw_only=True):
    """Keys every source kind takes."""

    ROLE: ClassVar[str] = "source"

    query: Annotated[
        str | None,
        _d(
            "what this source reads (topic, queue, subscription, stream, prefix); "
            "required in [[sources]], use top-level source_query with [source]"
        ),
    ] = None
    max_batch_rows: Annotated[PositiveInt, _d("(ours) most rows read into one batch")] = 50_000
    max_batch_wait_ms: Annotated[
        PositiveMs, _d("(ours) longest wait to fill a batch before handing it on")
    ] = 200


class KafkaSource(SourceSpec, tag="kafka", tag_field="kind", frozen=True, kw_only=True):
    """A Kafka (or Kafka-compatible) topic read through a consumer group."""

    bootstrap_servers: Annotated[NonEmptyStr, _d("comma-separated host:port list")]
    group_id: Annotated[str | None, _d("consumer group id; defaults to the pipeline_name")] = None
    payload_format: Annotated[
        Literal["json", "avro", "protobuf", "raw_bytes"], _d("how message values decode")
    ] = "json"
    auto_offset_reset: Annotated[
        Literal["earliest", "latest"], _d("where a new consumer group starts")
    ] = "earliest"
    schema_registry_url: Annotated[str | None, _d("schema registry for avro / protobuf")] = None
    schema_registry_basic_auth_user: Annotated[str | None, _d("schema registry user")] = None
    schema_registry_basic_auth_password: Annotated[
        str | None, _d("schema registry password (secret)")
    ] = None
    dead_letter_topic: Annotated[str | None, _d("topic that receives dead-lettered rows")] = None
    security_protocol: Annotated[
        Literal[
            "plaintext",
            "ssl",
            "sasl_plaintext",
            "sasl_ssl",
            "PLAINTEXT",
            "SSL",
            "SASL_PLAINTEXT",
            "SASL_SSL",
        ]
        | None,
        _d("librdkafka security.protocol"),
    ] = None
    sasl_mechanism: Annotated[
        Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "AWS_MSK_IAM"] | None,
        _d("librdkafka sasl.mechanism"),
    ] = None
    sasl_plain_username: Annotated[str | None, _d("SASL/PLAIN user")] = None
    sasl_plain_password: Annotated[str | None, _d("SASL/PLAIN password (secret)")] = None
    sasl_scram_username: Annotated[str | None, _d("SASL/SCRAM user")] = None
    sasl_scram_password: Annotated[str | None, _d("SASL/SCRAM password (secret)")] = None
    sasl_scram_mechanism: Annotated[Literal["sha-256", "sha-512"] | None, _d("SCRAM hash")] = None
    ssl_ca_location: Annotated[str | None, _d("CA certificate file")] = None
    ssl_certificate_location: Annotated[str | None, _d("client certificate file")] = None
    ssl_key_location: Annotated[str | None, _d("client key file")] = None
    ssl_key_password: Annotated[str | None, _d("client key password (secret)")] = None
    msk_iam_region: Annotated[str | None, _d("AWS region for MSK IAM auth")] = None
    session_timeout_ms: Annotated[
        PositiveMs,
        _d("(ours) consumer group session timeout; a dead consumer's partitions move after it"),
    ] = 10_000
    librdkafka: Annotated[
        dict[str, str | int | bool], _d("(ours) extra librdkafka properties, e.g. fetch.max.bytes")
    ] = msgspec.field(default_factory=dict)


class RabbitMQSource(SourceSpec, tag="rabbitmq", tag_field="kind", frozen=True, kw_only=True):
    """A RabbitMQ queue consumed with manual acks."""

    amqp_url: Annotated[NonEmptyStr, _d("amqp://user:password@host:port/vhost")]
    queue_args: Annotated[
        dict[str, str | int | bool], _d("queue arguments, e.g. x-dead-letter-exchange")
    ] = msgspec.field(default_factory=dict)
    prefetch_count: Annotated[PositiveInt, _d("(ours) unacked messages in flight")] = 10_000


class DeadLetterPolicy(Spec, frozen=True, kw_only=True):
    """Pub/Sub subscription dead-letter policy."""

    topic: Annotated[NonEmptyStr, _d("topic that receives undeliverable messages")]
    max_delivery_attempts: Annotated[
        Annotated[int, Meta(ge=5, le=100)], _d("deliveries before dead-lettering (5-100)")
    ] = 5


class PubSubSource(SourceSpec, tag="pubsub", tag_field="kind", frozen=True, kw_only=True):
    """A GCP Pub/Sub subscription read with synchronous pull."""

    project_id: Annotated[NonEmptyStr, _d("GCP project")]
    subscription: Annotated[
        str | None, _d("subscription to pull; defaults to the source query")
    ] = None
    endpoint: Annotated[str | None, _d("emulator or private endpoint host:port")] = None
    anonymous_auth: Annotated[bool, _d("skip credentials (emulator)")] = False
    dead_letter_policy: Annotated[
        DeadLetterPolicy | None, _d("subscription dead-letter policy")
    ] = None


class KinesisSource(SourceSpec, tag="kinesis", tag_field="kind", frozen=True, kw_only=True):
    """An AWS Kinesis stream, every shard."""

    stream_name: Annotated[str | None, _d("stream; defaults to the source query")] = None
    region: Annotated[str | None, _d("AWS region")] = None
    endpoint: Annotated[str | None, _d("endpoint URL (local server / VPC)")] = None
    access_key_id: Annotated[str | None, _d("AWS access key id")] = None
    secret_access_key: Annotated[str | None, _d("AWS secret access key (secret)")] = None


FileFormat = Literal["parquet", "csv", "json_lines", "jsonl", "orc"]


class ObjectStoreLocalSource(
    SourceSpec, tag="object_store_local", tag_field="kind", frozen=True, kw_only=True
):
    """(ours) New files under a local folder prefix, each read once."""

    path: Annotated[NonEmptyStr, _d("root folder; source_query is the watched prefix")]
    format: Annotated[FileFormat, _d("file format")]


class ObjectStoreS3Source(
    SourceSpec, tag="object_store_s3", tag_field="kind", frozen=True, kw_only=True
):
    """(ours) New objects under an S3 prefix, each read once."""

    bucket: Annotated[NonEmptyStr, _d("bucket")]
    format: Annotated[FileFormat, _d("file format")]
    endpoint: Annotated[str | None, _d("endpoint URL")] = None
    region: Annotated[str | None, _d("AWS region")] = None
    access_key_id: Annotated[str | None, _d("AWS access key id")] = None
    secret_access_key: Annotated[str | None, _d("AWS secret access key (secret)")] = None


class DeltaLocalSource(SourceSpec, tag="delta_local", tag_field="kind", frozen=True, kw_only=True):
    """(ours) A local Delta table; each new version read once."""

    path: Annotated[NonEmptyStr, _d("table folder")]


class DeltaS3Source(SourceSpec, tag="delta_s3", tag_field="kind", frozen=True, kw_only=True):
    """(ours) A Delta table on S3; each new version read once."""

    bucket: Annotated[NonEmptyStr, _d("bucket")]
    prefix: Annotated[str | None, _d("table prefix inside the bucket")] = None
    endpoint: Annotated[str | None, _d("endpoint URL")] = None
    region: Annotated[str | None, _d("AWS region")] = None
    access_key_id: Annotated[str | None, _d("AWS access key id")] = None
    secret_access_key: Annotated[str | None, _d("AWS secret access key (secret)")] = None


Source = (
    KafkaSource
    | RabbitMQSource
    | PubSubSource
    | KinesisSource
    | ObjectStoreLocalSource
    | ObjectStoreS3Source
    | DeltaLocalSource
    | DeltaS3Source
)

# ---------------------------------------------------------------------------
# Targets

WriteMode = Literal["append", "merge", "scd2", "truncate"]


class DbTable(Spec, frozen=True, kw_only=True):
    """A database table: [target.table]."""

    name: Annotated[NonEmptyStr, _d("table name")]
    schema: Annotated[
        str | None, _d("schema; the database's default when omitted (public / main)")
    ] = None
    primary_key: Annotated[
        list[NonEmptyStr] | None, _d("key columns; reflected from the table when omitted")
    ] = None


class DeltaTable(Spec, frozen=True, kw_only=True):
    """A Delta table's identity and key: [target.table] on a Delta target."""

    name: Annotated[str | None, _d("table name (informational)")] = None
    schema: Annotated[str | None, _d("schema (informational)")] = None
    primary_key: Annotated[
        list[NonEmptyStr] | None, _d("key columns for merge / CDC (Delta has no PK metadata)")
    ] = None


class TargetSpec(Tagged, frozen=True, kw_only=True):
    """Keys every target kind takes."""

    ROLE: ClassVar[str] = "target"


class PostgresTarget(TargetSpec, tag="postgres", tag_field="kind", frozen=True, kw_only=True):
    """A PostgreSQL table, written with binary COPY."""

    url: Annotated[NonEmptyStr, _d("postgres://user:password@host:port/db")]
    table: Annotated[DbTable, _d("the table")]
    mode: Annotated[WriteMode, _d("(ours) append, merge (upsert on the key), scd2, truncate")] = (
        "append"
    )


class MySQLTarget(TargetSpec, tag="mysql", tag_field="kind", frozen=True, kw_only=True):
    """A MySQL / MariaDB table."""

    url: Annotated[NonEmptyStr, _d("mysql://user:password@host:port/db")]
    table: Annotated[DbTable, _d("the table")]
    mode: Annotated[WriteMode, _d("(ours) append, merge, scd2, truncate")] = "append"


class SQLiteTarget(TargetSpec, tag="sqlite", tag_field="kind", frozen=True, kw_only=True):
    """A SQLite table (the embedded default)."""

    path: Annotated[NonEmptyStr, _d("database file")]
    table: Annotated[DbTable, _d("the table")]
    mode: Annotated[WriteMode, _d("(ours) append, merge, scd2, truncate")] = "append"


class DuckDBTarget(TargetSpec, tag="duckdb", tag_field="kind", frozen=True, kw_only=True):
    """A DuckDB table, written by Arrow scan."""

    path: Annotated[NonEmptyStr, _d("database file (':memory:' for tests)")]
    table: Annotated[DbTable, _d("the table")]
    mode: Annotated[WriteMode, _d("(ours) append, merge, scd2, truncate")] = "append"


class KafkaTarget(TargetSpec, tag="kafka", tag_field="kind", frozen=True, kw_only=True):
    """A Kafka topic, one JSON message per row."""

    bootstrap_servers: Annotated[NonEmptyStr, _d("comma-separated host:port list")]
    topic: Annotated[NonEmptyStr, _d("topic to produce to")]
    message_key_column: Annotated[str | None, _d("column whose value keys each message")] = None
    group_id: Annotated[str | None, _d("consumer group (transactional Kafka-to-Kafka)")] = None
    schema_registry_url: Annotated[str | None, _d("schema registry for avro / protobuf")] = None
    schema_registry_basic_auth_user: Annotated[str | None, _d("schema registry user")] = None
    schema_registry_basic_auth_password: Annotated[
        str | None, _d("schema registry password (secret)")
    ] = None
    sasl_scram_username: Annotated[str | None, _d("SASL/SCRAM user")] = None
    sasl_scram_password: Annotated[str | None, _d("SASL/SCRAM password (secret)")] = None
    sasl_scram_mechanism: Annotated[Literal["sha-256", "sha-512"] | None, _d("SCRAM hash")] = None
    msk_iam_region: Annotated[str | None, _d("AWS region for MSK IAM auth")] = None
    # The connection keys repeat KafkaSource's: msgspec Structs cannot share
    # fields through a mixin, and a source must not inherit target keys.
    security_protocol: Annotated[
        Literal[
            "plaintext",
            "ssl",
            "sasl_plaintext",
            "sasl_ssl",
            "PLAINTEXT",
            "SSL",
            "SASL_PLAINTEXT",
            "SASL_SSL",
        ]
        | None,
        _d("librdkafka security.protocol"),
    ] = None
    sasl_mechanism: Annotated[
        Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "AWS_MSK_IAM"] | None,
        _d("librdkafka sasl.mechanism"),
    ] = None
    sasl_plain_username: Annotated[str | None, _d("SASL/PLAIN user")] = None
    sasl_plain_password: Annotated[str | None, _d("SASL/PLAIN password (secret)")] = None
    ssl_ca_location: Annotated[str | None, _d("CA certificate file")] = None


class RabbitMQTarget(TargetSpec, tag="rabbitmq", tag_field="kind", frozen=True, kw_only=True):
    """A RabbitMQ queue, published with confirms."""

    amqp_url: Annotated[NonEmptyStr, _d("amqp://user:password@host:port/vhost")]
    queue: Annotated[NonEmptyStr, _d("queue to publish to")]


class PubSubTarget(TargetSpec, tag="pubsub", tag_field="kind", frozen=True, kw_only=True):
    """A GCP Pub/Sub topic."""

    project_id: Annotated[NonEmptyStr, _d("GCP project")]
    topic: Annotated[NonEmptyStr, _d("topic to publish to")]
    endpoint: Annotated[str | None, _d("emulator or private endpoint host:port")] = None
    anonymous_auth: Annotated[bool, _d("skip credentials (emulator)")] = False


class KinesisTarget(TargetSpec, tag="kinesis", tag_field="kind", frozen=True, kw_only=True):
    """An AWS Kinesis stream."""

    stream_name: Annotated[NonEmptyStr, _d("stream to put records to")]
    partition_key_prefix: Annotated[str | None, _d("prefix of each record's partition key")] = None
    region: Annotated[str | None, _d("AWS region")] = None
    endpoint: Annotated[str | None, _d("endpoint URL")] = None
    access_key_id: Annotated[str | None, _d("AWS access key id")] = None
    secret_access_key: Annotated[str | None, _d("AWS secret access key (secret)")] = None


class DeltaLocalTarget(TargetSpec, tag="delta_local", tag_field="kind", frozen=True, kw_only=True):
    """A local Delta Lake table."""

    path: Annotated[NonEmptyStr, _d("table folder")]
    partition_by: Annotated[list[NonEmptyStr], _d("partition columns")] = msgspec.field(
        default_factory=list
    )
    table: Annotated[DeltaTable | None, _d("key declaration for merge / CDC")] = None
    mode: Annotated[WriteMode, _d("(ours) append, merge, scd2, truncate")] = "append"


class DeltaS3Target(TargetSpec, tag="delta_s3", tag_field="kind", frozen=True, kw_only=True):
    """A Delta Lake table on S3."""

    bucket: Annotated[NonEmptyStr, _d("bucket")]
    prefix: Annotated[str | None, _d("table prefix inside the bucket")] = None
    endpoint: Annotated[str | None, _d("endpoint URL")] = None
    region: Annotated[str | None, _d("AWS region")] = None
    access_key_id: Annotated[str | None, _d("AWS access key id")] = None
    secret_access_key: Annotated[str | None, _d("AWS secret access key (secret)")] = None
    partition_by: Annotated[list[NonEmptyStr], _d("partition columns")] = msgspec.field(
        default_factory=list
    )
    table: Annotated[DeltaTable | None, _d("key declaration for merge / CDC")] = None
    mode: Annotated[WriteMode, _d("(ours) append, merge, scd2, truncate")] = "append"


class CsvReadOptions(Spec, frozen=True, kw_only=True):
    """[target.read_options.csv]: how CSV written here is read back."""

    has_header: Annotated[bool | None, _d("first line is a header")] = None
    delimiter: Annotated[str | int | None, _d("one ASCII char, or its code (44 = ',')")] = None
    quote: Annotated[str | int | None, _d("quote char or its code")] = None
    escape: Annotated[str | int | None, _d("escape char or its code")] = None
    comment: Annotated[str | int | None, _d("lines starting with this are ignored")] = None
    null_regex: Annotated[str | None, _d("cells matching this read as null")] = None
    truncated_rows_ok: Annotated[bool | None, _d("allow rows with missing cells")] = None
    schema_infer_max_records: Annotated[PositiveInt | None, _d("rows read to infer types")] = None


class JsonReadOptions(Spec, frozen=True, kw_only=True):
    """[target.read_options.json]: how JSON lines written here are read back."""

    schema_infer_max_records: Annotated[PositiveInt | None, _d("rows read to infer types")] = None
    batch_size: Annotated[PositiveInt | None, _d("rows per decoded batch")] = None


class ReadOptions(Spec, frozen=True, kw_only=True):
    """[target.read_options]: per-format read options."""

    csv: Annotated[CsvReadOptions | None, _d("CSV read options")] = None
    json: Annotated[JsonReadOptions | None, _d("JSON read options")] = None


class ObjectStoreTargetSpec(TargetSpec, frozen=True, kw_only=True):
    """Keys every object-store target takes."""

    format: Annotated[FileFormat, _d("file format")]
    prefix: Annotated[str | None, _d("folder / key prefix new files go under")] = None
    parquet_compression: Annotated[
        Literal["snappy", "gzip", "zstd", "uncompressed"] | None, _d("parquet codec")
    ] = None
    csv_delimiter: Annotated[str | None, _d("one ASCII char (default ',')")] = None
    csv_header: Annotated[bool | None, _d("write a header line (default true)")] = None
    csv_quote: Annotated[str | None, _d("one ASCII char (default '\"')")] = None
    csv_escape: Annotated[str | None, _d("one ASCII char (default: doubled quote)")] = None
    csv_null_value: Annotated[str | None, _d("how null cells render (default '')")] = None
    read_options: Annotated[ReadOptions | None, _d("how files written here are read back")] = None


class ObjectStoreLocalTarget(
    ObjectStoreTargetSpec, tag="object_store_local", tag_field="kind", frozen=True, kw_only=True
):
    """Files (parquet / csv / json_lines / orc) under a local folder."""

    path: Annotated[NonEmptyStr, _d("root folder")]


class ObjectStoreS3Target(
    ObjectStoreTargetSpec, tag="object_store_s3", tag_field="kind", frozen=True, kw_only=True
):
    """Objects (parquet / csv / json_lines / orc) under an S3 prefix."""

    bucket: Annotated[NonEmptyStr, _d("bucket")]
    endpoint: Annotated[str | None, _d("endpoint URL")] = None
    region: Annotated[str | None, _d("AWS region")] = None
    access_key_id: Annotated[str | None, _d("AWS access key id")] = None
    secret_access_key: Annotated[str | None, _d("AWS secret access key (secret)")] = None


Target = (
    PostgresTarget
    | MySQLTarget
    | SQLiteTarget
    | DuckDBTarget
    | KafkaTarget
    | RabbitMQTarget
    | PubSubTarget
    | KinesisTarget
    | DeltaLocalTarget
    | DeltaS3Target
    | ObjectStoreLocalTarget
    | ObjectStoreS3Target
)

DB_TARGETS = (PostgresTarget, MySQLTarget, SQLiteTarget, DuckDBTarget)
TABLE_TARGETS = (*DB_TARGETS, DeltaLocalTarget, DeltaS3Target)

# ---------------------------------------------------------------------------
# Transform


class LookupSpec(Tagged, frozen=True, kw_only=True):
    """Keys every lookup kind takes."""

    table: Annotated[NonEmptyStr, _d("table to load")]
    schema: Annotated[str | None, _d("schema of the table")] = None
    refresh_interval_ms: Annotated[
        PositiveMs | None, _d("reload in the background this often; never when omitted")
    ] = None


class PostgresLookup(LookupSpec, tag="postgres", tag_field="kind", frozen=True, kw_only=True):
    """A lookup table loaded from PostgreSQL."""

    url: Annotated[NonEmptyStr, _d("postgres://user:password@host:port/db")]


class MySQLLookup(LookupSpec, tag="mysql", tag_field="kind", frozen=True, kw_only=True):
    """A lookup table loaded from MySQL / MariaDB."""

    url: Annotated[NonEmptyStr, _d("mysql://user:password@host:port/db")]


class SQLiteLookup(LookupSpec, tag="sqlite", tag_field="kind", frozen=True, kw_only=True):
    """A lookup table loaded from SQLite."""

    path: Annotated[NonEmptyStr, _d("database file")]


class DuckDBLookup(LookupSpec, tag="duckdb", tag_field="kind", frozen=True, kw_only=True):
    """A lookup table loaded from DuckDB."""

    path: Annotated[NonEmptyStr, _d("database file")]


Lookup = PostgresLookup | MySQLLookup | SQLiteLookup | DuckDBLookup

AggFunction = Literal[
    "count", "count_col", "sum", "avg", "min", "max", "first", "last", "count_distinct"
]


class Aggregation(Spec, frozen=True, kw_only=True):
    """One [[transform.window.aggregations]] entry."""

    agg: Annotated[AggFunction, _d("aggregate function")]
    as_: Annotated[NonEmptyStr, _d("output column name")] = msgspec.field(name="as")
    column: Annotated[str | None, _d("input column (all but count)")] = None
    mode: Annotated[
        Literal["approximate", "exact"] | None,
        _d("count_distinct: approximate (HLL, default) or exact"),
    ] = None
    max_distinct_values_per_group: Annotated[
        PositiveInt | None, _d("count_distinct exact: fail-loud cap per group")
    ] = None


LateData = Literal["drop", "reopen", "dlq"]


class WindowSpec(Tagged, frozen=True, kw_only=True):
    """Keys every window kind takes."""

    aggregations: Annotated[list[Aggregation], _d("aggregates computed per window and group")]
    group_by: Annotated[list[NonEmptyStr], _d("group key columns")] = msgspec.field(
        default_factory=list
    )
    event_time_column: Annotated[NonEmptyStr, _d("event-time column")] = "_event_ts"
    late_data: Annotated[LateData, _d("drop, reopen (re-emit corrected), dlq (ours)")] = "drop"
    allowed_lateness_ms: Annotated[Ms | None, _d("reopen: keep state this long past the end")] = (
        None
    )
    max_groups_per_window: Annotated[
        PositiveInt,
        _d(
            "fail-loud cap on groups in one window (the reference requires it; the default is ours)"
        ),
    ] = 1_000_000
    window_start_column: Annotated[NonEmptyStr, _d("output column of the window start")] = (
        "window_start"
    )
    window_end_column: Annotated[NonEmptyStr, _d("output column of the window end")] = "window_end"


class TumblingWindow(WindowSpec, tag="tumbling", tag_field="kind", frozen=True, kw_only=True):
    """Fixed, non-overlapping windows."""

    duration_ms: Annotated[PositiveMs, _d("window length")]


class HoppingWindow(WindowSpec, tag="hopping", tag_field="kind", frozen=True, kw_only=True):
    """Fixed windows that overlap: a new one starts every hop_ms."""

    duration_ms: Annotated[PositiveMs, _d("window length")]
    hop_ms: Annotated[PositiveMs, _d("distance between window starts")]


class SessionWindow(WindowSpec, tag="session", tag_field="kind", frozen=True, kw_only=True):
    """Per-key windows closed by a gap of inactivity."""

    gap_ms: Annotated[PositiveMs, _d("inactivity that closes a session")]
    max_session_duration_ms: Annotated[PositiveMs, _d("hard cap on one session's length")]
    session_id_column: Annotated[NonEmptyStr, _d("output column of the session id")] = "session_id"


Window = TumblingWindow | HoppingWindow | SessionWindow


class JoinSpec(Spec, frozen=True, kw_only=True):
    """[transform.join]: a keyed, time-bounded stream-stream join."""

    left_source: Annotated[NonEmptyStr, _d("query of the left [[sources]] entry")]
    right_source: Annotated[NonEmptyStr, _d("query of the right [[sources]] entry")]
    left_keys: Annotated[list[NonEmptyStr], _d("key columns on the left")]
    right_keys: Annotated[list[NonEmptyStr], _d("key columns on the right")]
    kind: Annotated[
        Literal["inner", "left_outer", "right_outer", "full_outer", "stream_stream_join"],
        _d("join kind (stream_stream_join = inner)"),
    ] = "inner"
    time_window_ms: Annotated[PositiveMs | None, _d("symmetric window: |right - left| <= this")] = (
        None
    )
    min_delta_ms: Annotated[int | None, _d("asymmetric: right - left >= this")] = None
    max_delta_ms: Annotated[int | None, _d("asymmetric: right - left <= this")] = None
    event_time_column: Annotated[NonEmptyStr, _d("event-time column on both sides")] = "_event_ts"
    late_data: Annotated[Literal["drop", "reopen"], _d("drop, or reopen (longer retention)")] = (
        "drop"
    )
    allowed_lateness_ms: Annotated[Ms | None, _d("reopen: extra buffer retention")] = None
    left_column_prefix: Annotated[str, _d("prefix of left output columns")] = "left_"
    right_column_prefix: Annotated[str, _d("prefix of right output columns")] = "right_"
    max_buffer_rows: Annotated[
        PositiveInt, _d("(ours) fail-loud cap on the rows buffered by both sides together")
    ] = 10_000_000


CdcOp = Literal["create", "update", "delete", "read"]


class CdcSpec(Spec, frozen=True, kw_only=True):
    """[transform.cdc]: apply a change stream to a mirror table."""

    envelope: Annotated[Literal["debezium", "maxwell", "custom"], _d("envelope format")]
    key_field: Annotated[str | None, _d("path of the key in the envelope, e.g. after.id")] = None
    op_field: Annotated[str | None, _d("path of the operation")] = None
    op_map: Annotated[
        dict[str, CdcOp] | None, _d("operation value -> create/update/delete/read")
    ] = None
    before_field: Annotated[str | None, _d("path of the row before the change")] = None
    after_field: Annotated[str | None, _d("path of the row after the change")] = None
    ts_field: Annotated[str | None, _d("path of the change time in ms")] = None
    delete_mode: Annotated[
        Literal["hard", "soft"], _d("delete rows, or set soft_delete_column")
    ] = "hard"
    soft_delete_column: Annotated[str | None, _d("soft deletes: column set to now()")] = None
    schema_evolution: Annotated[
        Literal["skip", "fail", "add_columns"],
        _d("unknown columns: skip, fail the batch, or add_columns (ours)"),
    ] = "skip"
    out_of_order_tolerance_ms: Annotated[Ms, _d("reserved: warn window for backwards time")] = 5_000


class TlsSpec(Spec, frozen=True, kw_only=True):
    """[transform.tls]: the reference daemon's mesh TLS (accepted; sluice runs single-node)."""

    ca_cert_pem_path: Annotated[NonEmptyStr, _d("CA certificate")]
    domain_name_override: Annotated[str | None, _d("TLS server name")] = None
    client_identity: Annotated[dict[str, str] | None, _d("cert_pem_path / key_pem_path")] = None


class TransformSpec(Spec, frozen=True, kw_only=True):
    """[transform]: what happens between the sources and the targets."""

    sql: Annotated[str | None, _d("DataFusion SQL over the table `source` and the lookups")] = None
    dialect: Annotated[Literal["datafusion"], _d("SQL dialect")] = "datafusion"
    engine: Annotated[
        Literal["auto", "datafusion", "distributed"],
        _d("auto / datafusion run in-process; distributed is not supported (scale by replicas)"),
    ] = "auto"
    peers: Annotated[list[NonEmptyStr], _d("reference daemon's mesh peers; must be empty here")] = (
        msgspec.field(default_factory=list)
    )
    tls: Annotated[TlsSpec | None, _d("reference daemon's mesh TLS (unused single-node)")] = None
    on_error: Annotated[
        Literal["fail", "drop", "dlq"], _d("a batch that fails to decode or transform")
    ] = "fail"
    lookups: Annotated[dict[str, Lookup], _d("lookup tables by name")] = msgspec.field(
        default_factory=dict
    )
    udf_modules: Annotated[
        list[NonEmptyStr], _d("(ours) modules whose @sluice.udf functions are registered")
    ] = msgspec.field(default_factory=list)
    window: Annotated[Window | None, _d("event-time window aggregation")] = None
    join: Annotated[JoinSpec | None, _d("stream-stream join of two [[sources]]")] = None
    cdc: Annotated[CdcSpec | None, _d("change-data-capture apply")] = None


# ---------------------------------------------------------------------------
# State and watermarks


class StateStoreSpec(Tagged, frozen=True, kw_only=True):
    """Keys every state store kind takes."""

    checkpoint_interval_ms: Annotated[PositiveMs, _d("how often dirty state is written")] = 60_000


class PostgresStateStore(
    StateStoreSpec, tag="postgres", tag_field="kind", frozen=True, kw_only=True
):
    """Operator state and source positions in PostgreSQL, one transaction per commit."""

    url: Annotated[NonEmptyStr, _d("postgres://user:password@host:port/db")]
    schema: Annotated[NonEmptyStr, _d("schema of the state tables")] = "public"


class InMemoryStateStore(
    StateStoreSpec, tag="in_memory", tag_field="kind", frozen=True, kw_only=True
):
    """Process-local state (tests; lost on restart)."""


StateStore = PostgresStateStore | InMemoryStateStore


class WatermarkSpec(Spec, frozen=True, kw_only=True):
    """[watermark]: how event time advances."""

    lateness_ms: Annotated[Ms, _d("slack subtracted from each source's max event time")] = 0
    source_idleness_ms: Annotated[
        PositiveMs, _d("a source silent this long stops holding the watermark back")
    ] = 60_000


# ---------------------------------------------------------------------------
# The pipeline


class PipelineSpec(Spec, frozen=True, kw_only=True):
    """One pipeline.toml."""

    pipeline_name: Annotated[NonEmptyStr, _d("names metrics labels, state rows, DLQ records")]
    source_query: Annotated[str | None, _d("what the single [source] reads")] = None
    idle_pause_ms: Annotated[Ms, _d("sleep after an empty read")] = 500
    delivery: Annotated[
        Literal["auto", "at_least_once", "exactly_once"],
        _d("auto / at_least_once; exactly_once (Kafka to Kafka transactions) is not supported yet"),
    ] = "auto"
    dead_letter_topic: Annotated[str | None, _d("app-level DLQ topic (Kafka source)")] = None
    dlq_store: Annotated[
        str | None,
        _d(
            "DLQ store: auto / topic / table as the reference; ours: kafka:TOPIC, "
            "postgres:SCHEMA.TABLE or a .jsonl file path"
        ),
    ] = None
    dlq_max_attempts: Annotated[PositiveInt | None, _d("tries of a failing batch before DLQ")] = (
        None
    )
    source: Annotated[Source | None, _d("the one source")] = None
    sources: Annotated[list[Source] | None, _d("several sources, each with its query")] = None
    target: Annotated[Target | None, _d("the one target")] = None
    targets: Annotated[list[Target] | None, _d("several targets, all written before a commit")] = (
        None
    )
    transform: Annotated[TransformSpec | None, _d("stages between sources and targets")] = None
    state_store: Annotated[StateStore | None, _d("where operator state and positions live")] = None
    watermark: Annotated[WatermarkSpec | None, _d("event-time watermark tuning")] = None

    @property
    def all_sources(self) -> list[Source]:
        """The sources in file order, whichever form the file used."""
        if self.sources is not None:
            return list(self.sources)
        return [self.source] if self.source is not None else []

    @property
    def all_targets(self) -> list[Target]:
        """The targets in file order, whichever form the file used."""
        if self.targets is not None:
            return list(self.targets)
        return [self.target] if self.target is not None else []

    def query_of(self, source: Source) -> str:
        """What ``source`` reads: its own ``query`` or the top-level ``source_query``."""
        return source.query or self.source_query or ""


__all__ = [
    "DB_TARGETS",
    "TABLE_TARGETS",
    "Aggregation",
    "CdcSpec",
    "JoinSpec",
    "Lookup",
    "PipelineSpec",
    "Source",
    "StateStore",
    "Target",
    "TransformSpec",
    "WatermarkSpec",
    "Window",
]
