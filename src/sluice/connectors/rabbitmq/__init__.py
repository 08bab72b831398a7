"""RabbitMQ (pika): a queue source (acks after the write; stream queues read
from offsets) and a queue target (publisher confirms)."""

from __future__ import annotations

from typing import Any

from sluice.config.payload import registry_rule
from sluice.connectors.descriptor import Add, Capabilities, Connector, DeadLetters, url_rule
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


def _dead_letter_exchange(spec: Any) -> str | None:
    """A source queue's ``x-dead-letter-exchange`` takes its dead letters."""
    if not isinstance(spec, RabbitMQSource):
        return None
    exchange = spec.queue_args.get("x-dead-letter-exchange")
    return exchange if isinstance(exchange, str) and exchange else None


CONNECTOR = Connector(
    name="rabbitmq",
    extra="rabbitmq",
    sources=(RabbitMQSource,),
    targets=(RabbitMQTarget,),
    # ack_only: a window or join over a queue needs a [state_store]. A stream
    # queue's source is Seekable at run time (the engine asks the source).
    capabilities=Capabilities(ack_only=True, dead_letters=True),
    source="sluice.connectors.rabbitmq.source:build_source",
    target="sluice.connectors.rabbitmq.target:build_target",
    # Dead letters of a source whose queue names x-dead-letter-exchange go
    # there (published with confirms), like a Kafka source's dead_letter_topic.
    dead_letters=DeadLetters(
        word="exchange",
        role="source",
        destination="EXCHANGE",
        pattern=r"[^\s]+",
        sink="sluice.connectors.rabbitmq.dlq:build_sink",
        own=_dead_letter_exchange,
    ),
    source_rules=(_URL, _prefetch_rule),
    target_rules=(_URL, registry_rule),
)
