"""RabbitMQ (pika): a queue source (acks after the write; stream queues read
from offsets) and a queue target (publisher confirms)."""

from __future__ import annotations

from typing import Any

from sluice.connectors.descriptor import Add, Capabilities, Connector, url_rule
from sluice.connectors.rabbitmq.spec import MAX_PREFETCH, RabbitMQSource, RabbitMQTarget

_URL = url_rule("amqp_url", ("amqp://", "amqps://"), article="an")

#: ``max_batch_rows`` when the file leaves it out (``SourceSpec``'s default).
_DEFAULT_BATCH_ROWS = 50_000


def _prefetch_rule(at: str, source: dict[str, Any], add: Add) -> None:
    """An explicit prefetch below the batch size would make every batch wait
    for messages the broker holds back until an acknowledgement."""
    prefetch = source.get("prefetch_count")
    rows = source.get("max_batch_rows", _DEFAULT_BATCH_ROWS)
    if (
        isinstance(prefetch, int)
        and isinstance(rows, int)
        and not isinstance(prefetch, bool)
        and 0 < prefetch < rows
        and prefetch <= MAX_PREFETCH
    ):
        add(
            (
                f"{at}.prefetch_count",
                f"must be at least max_batch_rows ({rows}): the broker sends no more than "
                f"{prefetch} unacknowledged messages, so a batch of {rows} could never fill; "
                f"raise prefetch_count (at most {MAX_PREFETCH}) or lower max_batch_rows",
            )
        )


CONNECTOR = Connector(
    name="rabbitmq",
    extra="rabbitmq",
    sources=(RabbitMQSource,),
    targets=(RabbitMQTarget,),
    # ack_only: a window or join over a queue needs a [state_store]. A stream
    # queue's source is Seekable at run time (the engine asks the source).
    capabilities=Capabilities(ack_only=True),
    source="sluice.connectors.rabbitmq.source:build_source",
    target="sluice.connectors.rabbitmq.target:build_target",
    source_rules=(_URL, _prefetch_rule),
    target_rules=(_URL,),
)
