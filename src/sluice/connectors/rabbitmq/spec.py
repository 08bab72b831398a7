"""The RabbitMQ keys of pipeline.toml: ``kind = "rabbitmq"`` sources and targets."""

from __future__ import annotations

from typing import Annotated

import msgspec

from sluice.config.base import NonEmptyStr, PositiveInt, SourceSpec, TargetSpec, doc


class RabbitMQSource(SourceSpec, tag="rabbitmq", tag_field="kind", frozen=True, kw_only=True):
    """A RabbitMQ queue consumed with manual acks."""

    amqp_url: Annotated[NonEmptyStr, doc("amqp://user:password@host:port/vhost")]
    queue_args: Annotated[
        dict[str, str | int | bool], doc("queue arguments, e.g. x-dead-letter-exchange")
    ] = msgspec.field(default_factory=dict)
    prefetch_count: Annotated[PositiveInt, doc("(ours) unacked messages in flight")] = 10_000


class RabbitMQTarget(TargetSpec, tag="rabbitmq", tag_field="kind", frozen=True, kw_only=True):
    """A RabbitMQ queue, published with confirms."""

    amqp_url: Annotated[NonEmptyStr, doc("amqp://user:password@host:port/vhost")]
    queue: Annotated[NonEmptyStr, doc("queue to publish to")]
