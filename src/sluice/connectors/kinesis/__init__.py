"""AWS Kinesis: a stream source (every shard, reshards, per-shard positions) and target."""

from __future__ import annotations

from sluice.config.payload import registry_rule
from sluice.connectors.descriptor import Capabilities, Connector
from sluice.connectors.kinesis.spec import KinesisSource, KinesisTarget

CONNECTOR = Connector(
    name="kinesis",
    extra="aws",
    sources=(KinesisSource,),
    targets=(KinesisTarget,),
    capabilities=Capabilities(seekable=True),
    source="sluice.connectors.kinesis.source:build_source",
    target_rules=(registry_rule,),
    target="sluice.connectors.kinesis.target:build_target",
)
