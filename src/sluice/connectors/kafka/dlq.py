"""Kafka dead letters: produced to a topic on the brokers of a Kafka source.

Value = raw payload, key = raw key, headers carry the provenance (see
:meth:`~sluice.engine.dlq.DeadLetter.headers`). Produced with ``acks=all``
and idempotence; durable once every delivery report came back without error.
"""

from __future__ import annotations

from typing import Any

from sluice.connectors.kafka.spec import KafkaSource as KafkaSourceSpec
from sluice.engine.dlq import DeadLetter
from sluice.errors import ConnectorError, TransientError


class KafkaDeadLetters:
    """Produces dead letters to a topic and waits for every acknowledgement."""

    def __init__(self, topic: str, source: KafkaSourceSpec) -> None:
        self.topic = topic
        self.source = source
        self.id = f"dlq:kafka:{topic}"
        self._producer: Any = None

    def open(self) -> None:
        """Create the producer (connections are made on first send)."""
        import confluent_kafka as ck

        from sluice.connectors.kafka.source import client_config

        conf = client_config(self.source)
        conf.update({"acks": "all", "enable.idempotence": True, "linger.ms": 5, "log_level": 3})
        self._producer = ck.Producer(conf)

    def write(self, letters: list[DeadLetter]) -> None:
        """Produce every letter; raise unless all were acknowledged."""
        import confluent_kafka as ck

        producer = self._producer
        if producer is None:
            raise ConnectorError(f"{self.id} is not open")
        failures: list[str] = []

        def delivered(err: Any, _msg: Any) -> None:
            if err is not None:
                failures.append(err.str())

        for letter in letters:
            while True:
                try:
                    producer.produce(
                        self.topic,
                        value=letter.record.payload,
                        key=letter.record.key,
                        headers=letter.headers(),
                        on_delivery=delivered,
                    )
                    break
                except BufferError:
                    producer.poll(0.1)  # local queue full: let deliveries drain
                except ck.KafkaException as exc:
                    raise ConnectorError(f"{self.id}: {exc}") from exc
        left = producer.flush(30)
        if left or failures:
            detail = failures[0] if failures else f"{left} message(s) not acknowledged in 30 s"
            raise TransientError(f"{self.id}: {detail}")

    def close(self) -> None:
        """Drop the producer (nothing is pending: write() waited for every ack)."""
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.flush(1)


def build_sink(spec: KafkaSourceSpec, topic: str) -> KafkaDeadLetters:
    """Registry hook: dead letters to ``topic`` on ``spec``'s brokers."""
    return KafkaDeadLetters(topic, spec)
