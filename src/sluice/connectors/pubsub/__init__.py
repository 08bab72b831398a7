"""GCP Pub/Sub: a subscription source (pull, leases, ack last) and a topic target."""

from __future__ import annotations

from sluice.config.payload import registry_rule
from sluice.connectors.descriptor import Capabilities, Connector
from sluice.connectors.pubsub.spec import PubSubSource, PubSubTarget

CONNECTOR = Connector(
    name="pubsub",
    extra="pubsub",
    sources=(PubSubSource,),
    targets=(PubSubTarget,),
    capabilities=Capabilities(ack_only=True),
    source="sluice.connectors.pubsub.source:build_source",
    target_rules=(registry_rule,),
    target="sluice.connectors.pubsub.target:build_target",
)
