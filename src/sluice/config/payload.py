"""The payload keys every broker target whose messages are bytes takes.

Kafka, RabbitMQ, Pub/Sub and Kinesis targets inherit :class:`EncodedTargetSpec`
and encode with the one :class:`sluice.formats.encode.PayloadEncoder`.
``payload_format`` is ``json`` (the default), ``raw_bytes`` (one column's
bytes), or ``avro`` / ``protobuf`` / ``json_schema`` framed for a Confluent
schema registry (magic byte 0 + the 4-byte schema id, Protobuf's message
index ``[0]``, then the body).

Subjects: the subject naming strategies are Kafka's, with the target's
*destination name* in the place of the topic: the Kafka topic, the RabbitMQ
queue, the Pub/Sub topic's short name (not ``projects/…/topics/…``), the
Kinesis stream name. So ``topic_name`` registers a RabbitMQ target's schema
under ``<queue>-value``, and a consumer decodes the bytes with Confluent's
deserializers given that name as the topic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from sluice.config.base import NonEmptyStr, TargetSpec, doc

#: The formats that need a schema registry.
REGISTRY_FORMATS = ("avro", "protobuf", "json_schema")


class EncodedTargetSpec(TargetSpec, frozen=True, kw_only=True):
    """Keys of a target that writes one message (bytes) per row."""

    payload_format: Annotated[
        Literal["json", "raw_bytes", "avro", "protobuf", "json_schema"],
        doc(
            "(ours) how rows encode: JSON, one column's bytes, or Avro / Protobuf / "
            "JSON Schema via the registry"
        ),
    ] = "json"
    value_column: Annotated[
        NonEmptyStr, doc("(ours) the column written as is with payload_format 'raw_bytes'")
    ] = "value"
    schema_registry_url: Annotated[
        str | None, doc("schema registry for avro / protobuf / json_schema")
    ] = None
    schema_registry_basic_auth_user: Annotated[str | None, doc("schema registry user")] = None
    schema_registry_basic_auth_password: Annotated[
        str | None, doc("schema registry password (secret)")
    ] = None
    auto_register: Annotated[
        bool,
        doc("(ours) register the schema derived from the batch, else it must be registered"),
    ] = False
    subject_name_strategy: Annotated[
        Literal["topic_name", "record_name", "topic_record_name"],
        doc(
            "(ours) registry subject: <name>-value, <record>, or <name>-<record>; <name> is "
            "the topic / queue / stream"
        ),
    ] = "topic_name"
    avro_record_name: Annotated[
        str | None,
        doc(
            "(ours) name of the Avro record / Protobuf message / JSON schema title; "
            "defaults to the topic / queue / stream"
        ),
    ] = None


def registry_rule(at: str, target: dict[str, Any], add: Callable[[tuple[str, str]], None]) -> None:
    """A target rule: a registry format needs ``schema_registry_url``."""
    fmt = target.get("payload_format")
    if fmt in REGISTRY_FORMATS and not target.get("schema_registry_url"):
        add(
            (
                f"{at}.schema_registry_url",
                f"missing: payload_format '{fmt}' needs a schema registry",
            )
        )
