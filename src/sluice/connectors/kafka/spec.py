"""The Kafka keys of pipeline.toml: ``kind = "kafka"`` sources and targets."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from sluice.config.base import NonEmptyStr, PositiveInt, PositiveMs, SourceSpec, doc
from sluice.config.payload import EncodedTargetSpec

# The connection keys both the source and the target take.
SecurityProtocol = Annotated[
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
    doc("librdkafka security.protocol"),
]
SaslMechanism = Annotated[
    Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "AWS_MSK_IAM"] | None,
    doc("librdkafka sasl.mechanism"),
]
SaslPlainUser = Annotated[str | None, doc("SASL/PLAIN user")]
SaslPlainPassword = Annotated[str | None, doc("SASL/PLAIN password (secret)")]


class KafkaSource(SourceSpec, tag="kafka", tag_field="kind", frozen=True, kw_only=True):
    """A Kafka (or Kafka-compatible) topic read through a consumer group."""

    bootstrap_servers: Annotated[NonEmptyStr, doc("comma-separated host:port list")]
    group_id: Annotated[str | None, doc("consumer group id; defaults to the pipeline_name")] = None
    payload_format: Annotated[
        Literal["json", "avro", "protobuf", "raw_bytes", "json_schema"],
        doc("how message values decode (json_schema, ours: JSON framed by a schema registry)"),
    ] = "json"
    json_schema_validation: Annotated[
        bool, doc("(ours) validate json_schema payloads against their registered schema")
    ] = False
    auto_offset_reset: Annotated[
        Literal["earliest", "latest"], doc("where a new consumer group starts")
    ] = "earliest"
    schema_registry_url: Annotated[str | None, doc("schema registry for avro / protobuf")] = None
    schema_registry_basic_auth_user: Annotated[str | None, doc("schema registry user")] = None
    schema_registry_basic_auth_password: Annotated[
        str | None, doc("schema registry password (secret)")
    ] = None
    dead_letter_topic: Annotated[str | None, doc("topic that receives dead-lettered rows")] = None
    security_protocol: SecurityProtocol = None
    sasl_mechanism: SaslMechanism = None
    sasl_plain_username: SaslPlainUser = None
    sasl_plain_password: SaslPlainPassword = None
    sasl_scram_username: Annotated[str | None, doc("SASL/SCRAM user")] = None
    sasl_scram_password: Annotated[str | None, doc("SASL/SCRAM password (secret)")] = None
    sasl_scram_mechanism: Annotated[Literal["sha-256", "sha-512"] | None, doc("SCRAM hash")] = None
    ssl_ca_location: Annotated[str | None, doc("CA certificate file")] = None
    ssl_certificate_location: Annotated[str | None, doc("client certificate file")] = None
    ssl_key_location: Annotated[str | None, doc("client key file")] = None
    ssl_key_password: Annotated[str | None, doc("client key password (secret)")] = None
    msk_iam_region: Annotated[str | None, doc("AWS region for MSK IAM auth")] = None
    session_timeout_ms: Annotated[
        PositiveMs,
        doc("(ours) consumer group session timeout; a dead consumer's partitions move after it"),
    ] = 10_000
    librdkafka: Annotated[
        dict[str, str | int | bool], doc("(ours) extra librdkafka properties, e.g. fetch.max.bytes")
    ] = msgspec.field(default_factory=dict)
    max_batch_bytes: Annotated[
        PositiveInt | None,
        doc(
            "(ours) most message bytes (values) read into one batch, besides "
            "max_batch_rows; unset: 4 MiB, or 8 MiB in a window or join pipeline "
            "(bigger rounds, fewer merges into the open state)"
        ),
    ] = None
    batch_linger_ms: Annotated[
        PositiveMs,
        doc(
            "(ours) a batch that is not full is handed on once no more messages "
            "came within this long: small batches when the stream is slow, full "
            "ones when it is backlogged (max_batch_wait_ms bounds the whole read)"
        ),
    ] = 50

    def derived_keys(self, pipeline_name: str) -> dict[str, Any]:
        """The consumer group defaults to the pipeline name."""
        return {"group_id": pipeline_name} if self.group_id is None else {}

    def reader_group(self, pipeline_name: str) -> str:
        """The consumer group."""
        return self.group_id or pipeline_name

    @property
    def raw_payload(self) -> bool:
        """``payload_format = "raw_bytes"`` hands the values on undecoded."""
        return self.payload_format == "raw_bytes"


class KafkaTarget(EncodedTargetSpec, tag="kafka", tag_field="kind", frozen=True, kw_only=True):
    """A Kafka topic, one message per row (JSON by default; the payload keys are
    :class:`~sluice.config.payload.EncodedTargetSpec`'s)."""

    bootstrap_servers: Annotated[NonEmptyStr, doc("comma-separated host:port list")]
    topic: Annotated[NonEmptyStr, doc("topic to produce to")]
    message_key_column: Annotated[str | None, doc("column whose value keys each message")] = None
    librdkafka: Annotated[
        dict[str, str | int | bool], doc("(ours) extra librdkafka producer properties")
    ] = msgspec.field(default_factory=dict)
    group_id: Annotated[str | None, doc("consumer group (transactional Kafka-to-Kafka)")] = None
    sasl_scram_username: Annotated[str | None, doc("SASL/SCRAM user")] = None
    sasl_scram_password: Annotated[str | None, doc("SASL/SCRAM password (secret)")] = None
    sasl_scram_mechanism: Annotated[Literal["sha-256", "sha-512"] | None, doc("SCRAM hash")] = None
    msk_iam_region: Annotated[str | None, doc("AWS region for MSK IAM auth")] = None
    # The connection keys repeat KafkaSource's (as the shared types above):
    # msgspec Structs cannot share fields through a mixin, and a source must
    # not inherit target keys.
    security_protocol: SecurityProtocol = None
    sasl_mechanism: SaslMechanism = None
    sasl_plain_username: SaslPlainUser = None
    sasl_plain_password: SaslPlainPassword = None
    ssl_ca_location: Annotated[str | None, doc("CA certificate file")] = None
