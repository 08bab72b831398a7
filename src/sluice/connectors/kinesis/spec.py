"""The AWS Kinesis keys of pipeline.toml: ``kind = "kinesis"`` sources and targets."""

from __future__ import annotations

from typing import Annotated

from sluice.config.base import NonEmptyStr, SourceSpec, TargetSpec, doc


class KinesisSource(SourceSpec, tag="kinesis", tag_field="kind", frozen=True, kw_only=True):
    """An AWS Kinesis stream, every shard."""

    stream_name: Annotated[str | None, doc("stream; defaults to the source query")] = None
    region: Annotated[str | None, doc("AWS region")] = None
    endpoint: Annotated[str | None, doc("endpoint URL (local server / VPC)")] = None
    access_key_id: Annotated[str | None, doc("AWS access key id")] = None
    secret_access_key: Annotated[str | None, doc("AWS secret access key (secret)")] = None


class KinesisTarget(TargetSpec, tag="kinesis", tag_field="kind", frozen=True, kw_only=True):
    """An AWS Kinesis stream."""

    stream_name: Annotated[NonEmptyStr, doc("stream to put records to")]
    partition_key_prefix: Annotated[str | None, doc("prefix of each record's partition key")] = None
    region: Annotated[str | None, doc("AWS region")] = None
    endpoint: Annotated[str | None, doc("endpoint URL")] = None
    access_key_id: Annotated[str | None, doc("AWS access key id")] = None
    secret_access_key: Annotated[str | None, doc("AWS secret access key (secret)")] = None
