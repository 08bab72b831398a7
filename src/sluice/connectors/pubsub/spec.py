"""The GCP Pub/Sub keys of pipeline.toml: ``kind = "pubsub"`` sources and targets."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta

from sluice.config.base import NonEmptyStr, SourceSpec, Spec, doc
from sluice.config.payload import EncodedTargetSpec

# Pub/Sub accepts 5 to 100 delivery attempts.
DeliveryAttempts = Annotated[int, Meta(ge=5, le=100)]
# Pub/Sub accepts ack deadlines of 10 to 600 seconds.
AckDeadlineSecs = Annotated[int, Meta(ge=10, le=600)]


class DeadLetterPolicy(Spec, frozen=True, kw_only=True):
    """Pub/Sub subscription dead-letter policy."""

    topic: Annotated[NonEmptyStr, doc("topic that receives undeliverable messages")]
    max_delivery_attempts: Annotated[
        DeliveryAttempts, doc("deliveries before dead-lettering (5-100)")
    ] = 5


class PubSubSource(SourceSpec, tag="pubsub", tag_field="kind", frozen=True, kw_only=True):
    """A GCP Pub/Sub subscription read with synchronous pull."""

    project_id: Annotated[NonEmptyStr, doc("GCP project")]
    subscription: Annotated[
        str | None, doc("subscription to pull; defaults to the source query")
    ] = None
    endpoint: Annotated[
        str | None,
        doc(
            "emulator or private endpoint host:port; http://host:port is plaintext (else PUBSUB_EMULATOR_HOST)"
        ),
    ] = None
    anonymous_auth: Annotated[bool, doc("skip credentials (emulator)")] = False
    dead_letter_policy: Annotated[
        DeadLetterPolicy | None,
        doc("subscription dead-letter policy: set when the subscription has none, else checked"),
    ] = None
    payload_format: Annotated[
        Literal["json", "raw_bytes"], doc("(ours) how message data decodes")
    ] = "json"
    lease_secs: Annotated[
        AckDeadlineSecs | None,
        doc(
            "(ours) ack deadline each lease extension asks for while a batch is in "
            "flight; defaults to the subscription's ack deadline"
        ),
    ] = None


class PubSubTarget(EncodedTargetSpec, tag="pubsub", tag_field="kind", frozen=True, kw_only=True):
    """A GCP Pub/Sub topic, one message per row (JSON by default)."""

    project_id: Annotated[NonEmptyStr, doc("GCP project")]
    topic: Annotated[NonEmptyStr, doc("topic to publish to (created when missing)")]
    endpoint: Annotated[
        str | None,
        doc(
            "emulator or private endpoint host:port; http://host:port is plaintext (else PUBSUB_EMULATOR_HOST)"
        ),
    ] = None
    anonymous_auth: Annotated[bool, doc("skip credentials (emulator)")] = False
    ordering_key_column: Annotated[
        str | None, doc("(ours) column whose value is each message's ordering key")
    ] = None
