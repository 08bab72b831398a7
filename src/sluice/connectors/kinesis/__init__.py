"""AWS Kinesis: stream source and target, configuration-only today."""

from __future__ import annotations

from sluice.connectors.descriptor import Connector
from sluice.connectors.kinesis.spec import KinesisSource, KinesisTarget

CONNECTOR = Connector(
    name="kinesis", extra="aws", sources=(KinesisSource,), targets=(KinesisTarget,)
)
