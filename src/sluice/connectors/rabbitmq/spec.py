"""The RabbitMQ keys of pipeline.toml: ``kind = "rabbitmq"`` sources and targets."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from sluice.config.base import NonEmptyStr, SourceSpec, doc
from sluice.config.payload import EncodedTargetSpec

#: AMQP ``basic.qos`` carries the prefetch count in 16 bits.
MAX_PREFETCH = 65_535

QueueArgs = Annotated[
    dict[str, str | int | bool],
    doc(
        "queue arguments passed when the queue is declared, e.g. x-dead-letter-exchange, "
        'x-queue-type = "quorum" or "stream"'
    ),
]


class RabbitMQSource(SourceSpec, tag="rabbitmq", tag_field="kind", frozen=True, kw_only=True):
    """A RabbitMQ queue consumed with manual acks (a stream queue: read from a stored offset)."""

    amqp_url: Annotated[
        NonEmptyStr,
        doc("amqp://user:password@host:port/vhost; ?heartbeat=SECONDS sets the heartbeat"),
    ]
    queue_args: QueueArgs = msgspec.field(default_factory=dict)
    payload_format: Annotated[
        Literal["json", "raw_bytes"], doc("(ours) how message bodies decode")
    ] = "json"
    prefetch_count: Annotated[
        Annotated[int, Meta(gt=0, le=MAX_PREFETCH)] | None,
        doc(
            "(ours) unacknowledged messages the broker sends ahead (basic.qos), at least "
            "max_batch_rows; default twice max_batch_rows, at most 65535"
        ),
    ] = None

    @property
    def raw_payload(self) -> bool:
        """``payload_format = "raw_bytes"`` hands the bodies on undecoded."""
        return self.payload_format == "raw_bytes"

    @property
    def prefetch(self) -> int:
        """The ``basic.qos`` prefetch count the consumer asks for."""
        if self.prefetch_count is not None:
            return self.prefetch_count
        return min(MAX_PREFETCH, 2 * self.max_batch_rows)

    @property
    def batch_rows(self) -> int:
        """Most messages in one batch: ``max_batch_rows``, or the prefetch when
        that is smaller (only past 65535 rows: a smaller explicit prefetch is a
        configuration error), so a batch never waits for messages the broker
        will not send before an acknowledgement."""
        return min(self.max_batch_rows, self.prefetch)

    @property
    def stream(self) -> bool:
        """Whether the queue is a stream (``x-queue-type = "stream"``): a log read from an offset."""
        return self.queue_args.get("x-queue-type") == "stream"


class RabbitMQTarget(
    EncodedTargetSpec, tag="rabbitmq", tag_field="kind", frozen=True, kw_only=True
):
    """A RabbitMQ queue, one message per row (JSON by default), published with confirms."""

    amqp_url: Annotated[NonEmptyStr, doc("amqp://user:password@host:port/vhost")]
    queue: Annotated[NonEmptyStr, doc("queue to publish to (declared durable when missing)")]
    queue_args: QueueArgs = msgspec.field(default_factory=dict)
