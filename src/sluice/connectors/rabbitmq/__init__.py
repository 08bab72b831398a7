"""RabbitMQ: queue source and target, configuration-only today."""

from __future__ import annotations

from sluice.connectors.descriptor import Connector, url_rule
from sluice.connectors.rabbitmq.spec import RabbitMQSource, RabbitMQTarget

_URL = url_rule("amqp_url", ("amqp://", "amqps://"), article="an")

CONNECTOR = Connector(
    name="rabbitmq",
    extra="rabbitmq",
    sources=(RabbitMQSource,),
    targets=(RabbitMQTarget,),
    source_rules=(_URL,),
    target_rules=(_URL,),
)
