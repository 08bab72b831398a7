"""GCP Pub/Sub: subscription source and topic target, configuration-only today."""

from __future__ import annotations

from sluice.connectors.descriptor import Connector
from sluice.connectors.pubsub.spec import PubSubSource, PubSubTarget

CONNECTOR = Connector(
    name="pubsub", extra="pubsub", sources=(PubSubSource,), targets=(PubSubTarget,)
)
