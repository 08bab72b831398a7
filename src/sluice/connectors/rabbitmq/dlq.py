"""RabbitMQ dead letters: published, with confirms, to an exchange of the
source's broker (by default the queue's ``x-dead-letter-exchange``).

Body = the raw payload as it was delivered; routing key = the queue's
``x-dead-letter-routing-key`` when set, else the message's own routing key
(what the broker's dead-lettering uses); headers carry the provenance
(:meth:`~sluice.engine.dlq.DeadLetter.headers`: pipeline, source, stage,
error, queue, delivery tag, timestamp). Durable once the broker confirmed
every letter; a letter the exchange cannot route is an error, never dropped
(the broker's own dead-lettering drops those silently).
"""

from __future__ import annotations

from typing import Any

from sluice.connectors.rabbitmq.spec import RabbitMQSource as RabbitMQSourceSpec
from sluice.connectors.rabbitmq.target import Publisher
from sluice.engine.dlq import DeadLetter


class RabbitMQDeadLetters:
    """Publishes dead letters to one exchange and waits for every confirm."""

    def __init__(self, exchange: str, source: RabbitMQSourceSpec) -> None:
        self.exchange = exchange
        self.id = f"dlq:rabbitmq:{exchange}"
        routing = source.queue_args.get("x-dead-letter-routing-key")
        self._routing_key = routing if isinstance(routing, str) else None
        self._publisher = Publisher(source.amqp_url, f"sluice dead letters -> {exchange}", self.id)

    def open(self) -> None:
        """Connect (a confirm channel)."""
        self._publisher.open()

    def write(self, letters: list[DeadLetter]) -> None:
        """Publish every letter; raise unless the broker confirmed them all."""
        import pika

        messages: list[tuple[str, bytes, Any]] = []
        for letter in letters:
            record = letter.record
            key = self._routing_key
            if key is None:
                key = record.key.decode(errors="replace") if record.key else record.partition
            headers = {k: v.decode(errors="replace") for k, v in letter.headers()}
            props = pika.BasicProperties(delivery_mode=2, headers=headers)
            messages.append((key, record.payload or b"", props))
        self._publisher.publish(self.exchange, messages)

    def close(self) -> None:
        """Close the connection (write() waited for every confirm)."""
        self._publisher.close()


def build_sink(spec: RabbitMQSourceSpec, exchange: str) -> RabbitMQDeadLetters:
    """Registry hook: dead letters to ``exchange`` on ``spec``'s broker."""
    return RabbitMQDeadLetters(exchange, spec)
