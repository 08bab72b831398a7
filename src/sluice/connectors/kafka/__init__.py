"""Kafka (and Kafka-compatible brokers): a consumer-group source, a producer
target and dead letters. Payloads may be Avro / Protobuf through a schema
registry (:mod:`sluice.formats`)."""

from __future__ import annotations

from typing import Any

from sluice.config.payload import registry_rule
from sluice.connectors.descriptor import Add, Capabilities, Connector, DeadLetters
from sluice.connectors.kafka.spec import KafkaSource, KafkaTarget


def _source_rules(at: str, source: dict[str, Any], add: Add) -> None:
    fmt = source.get("payload_format")
    if fmt in ("avro", "protobuf", "json_schema") and not source.get("schema_registry_url"):
        add(
            (
                f"{at}.schema_registry_url",
                f"missing: payload_format '{fmt}' needs a schema registry",
            )
        )
    if source.get("sasl_mechanism") == "PLAIN":
        for key in ("sasl_plain_username", "sasl_plain_password"):
            if not source.get(key):
                add((f"{at}.{key}", "missing: sasl_mechanism 'PLAIN' needs it"))


def _own_topic(spec: Any) -> str | None:
    topic: str | None = spec.dead_letter_topic if isinstance(spec, KafkaSource) else None
    return topic


CONNECTOR = Connector(
    name="kafka",
    extra="kafka",
    sources=(KafkaSource,),
    targets=(KafkaTarget,),
    # transactional_positions: with delivery = "exactly_once" only (the target
    # is then transactions.TransactionalKafkaTarget; the plain one records none).
    capabilities=Capabilities(
        seekable=True, partitioned=True, dead_letters=True, transactional_positions=True
    ),
    source="sluice.connectors.kafka.source:build_source",
    shared_sources="sluice.connectors.kafka.shared:build_sources",
    target="sluice.connectors.kafka.target:build_target",
    dead_letters=DeadLetters(
        word="topic",
        role="source",
        destination="TOPIC",
        pattern=r"[^\s]+",
        sink="sluice.connectors.kafka.dlq:build_sink",
        own=_own_topic,
    ),
    source_rules=(_source_rules,),
    target_rules=(registry_rule,),
)
