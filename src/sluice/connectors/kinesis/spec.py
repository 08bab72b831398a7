"""The AWS Kinesis keys of pipeline.toml: ``kind = "kinesis"`` sources and targets."""

from __future__ import annotations

from typing import Annotated, Literal

from sluice.config.base import NonEmptyStr, PositiveMs, SourceSpec, doc
from sluice.config.payload import EncodedTargetSpec


class KinesisSource(SourceSpec, tag="kinesis", tag_field="kind", frozen=True, kw_only=True):
    """An AWS Kinesis stream, every shard (and the shards a reshard makes)."""

    stream_name: Annotated[str | None, doc("stream; defaults to the source query")] = None
    region: Annotated[str | None, doc("AWS region")] = None
    endpoint: Annotated[str | None, doc("endpoint URL (local server / VPC)")] = None
    access_key_id: Annotated[str | None, doc("AWS access key id")] = None
    secret_access_key: Annotated[str | None, doc("AWS secret access key (secret)")] = None
    payload_format: Annotated[
        Literal["json", "raw_bytes"], doc("(ours) how record data decodes")
    ] = "json"
    start_position: Annotated[
        Literal["trim_horizon", "latest"],
        doc("(ours) where a shard without a stored position starts"),
    ] = "trim_horizon"
    position_file: Annotated[
        str | None,
        doc(
            "(ours) JSON file of the per-shard sequence numbers committed; defaults to "
            "$SLUICE_STATE_DIR/<pipeline>.kinesis.<stream>.json (positions a SQL target "
            "or state store holds win over it)"
        ),
    ] = None
    shard_refresh_ms: Annotated[
        PositiveMs, doc("(ours) how often the shard list is read again (new shards)")
    ] = 10_000


class KinesisTarget(EncodedTargetSpec, tag="kinesis", tag_field="kind", frozen=True, kw_only=True):
    """An AWS Kinesis stream, one record per row (JSON by default)."""

    stream_name: Annotated[NonEmptyStr, doc("stream to put records to")]
    partition_key_prefix: Annotated[str | None, doc("prefix of each record's partition key")] = None
    partition_key_column: Annotated[
        str | None, doc("(ours) column whose value is each record's partition key")
    ] = None
    region: Annotated[str | None, doc("AWS region")] = None
    endpoint: Annotated[str | None, doc("endpoint URL")] = None
    access_key_id: Annotated[str | None, doc("AWS access key id")] = None
    secret_access_key: Annotated[str | None, doc("AWS secret access key (secret)")] = None
