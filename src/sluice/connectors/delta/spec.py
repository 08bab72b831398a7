"""The Delta Lake keys of pipeline.toml: ``kind = "delta_local"`` / ``"delta_s3"``."""

from __future__ import annotations

from typing import Annotated

import msgspec

from sluice.config.base import (
    LocalPath,
    ModalTarget,
    NonEmptyStr,
    PositiveInt,
    SourceSpec,
    TableSpec,
    WriteMode,
    doc,
)


class DeltaLocalSource(SourceSpec, tag="delta_local", tag_field="kind", frozen=True, kw_only=True):
    """(ours) A local Delta table; each new version read once."""

    path: Annotated[LocalPath, doc("table folder")]


class DeltaS3Source(SourceSpec, tag="delta_s3", tag_field="kind", frozen=True, kw_only=True):
    """(ours) A Delta table on S3; each new version read once."""

    bucket: Annotated[NonEmptyStr, doc("bucket")]
    prefix: Annotated[str | None, doc("table prefix inside the bucket")] = None
    endpoint: Annotated[str | None, doc("endpoint URL")] = None
    region: Annotated[str | None, doc("AWS region")] = None
    access_key_id: Annotated[str | None, doc("AWS access key id")] = None
    secret_access_key: Annotated[str | None, doc("AWS secret access key (secret)")] = None


class DeltaTable(TableSpec, frozen=True, kw_only=True):
    """A Delta table's identity and key: [target.table] on a Delta target."""

    name: Annotated[str | None, doc("table name (informational)")] = None
    schema: Annotated[str | None, doc("schema (informational)")] = None
    primary_key: Annotated[
        list[NonEmptyStr] | None, doc("key columns for merge / CDC (Delta has no PK metadata)")
    ] = None


class DeltaLocalTarget(ModalTarget, tag="delta_local", tag_field="kind", frozen=True, kw_only=True):
    """A local Delta Lake table."""

    path: Annotated[LocalPath, doc("table folder")]
    partition_by: Annotated[list[NonEmptyStr], doc("partition columns")] = msgspec.field(
        default_factory=list
    )
    table: Annotated[DeltaTable | None, doc("key declaration for merge / CDC")] = None
    mode: Annotated[WriteMode, doc("(ours) append, merge, scd2, truncate")] = "append"
    flush_rows: Annotated[
        PositiveInt | None, doc("(ours) commit once this many rows wait (default: every batch)")
    ] = None
    flush_interval_ms: Annotated[
        PositiveInt | None, doc("(ours) commit at least this often (default: every batch)")
    ] = None


class DeltaS3Target(ModalTarget, tag="delta_s3", tag_field="kind", frozen=True, kw_only=True):
    """A Delta Lake table on S3."""

    bucket: Annotated[NonEmptyStr, doc("bucket")]
    prefix: Annotated[str | None, doc("table prefix inside the bucket")] = None
    endpoint: Annotated[str | None, doc("endpoint URL")] = None
    region: Annotated[str | None, doc("AWS region")] = None
    access_key_id: Annotated[str | None, doc("AWS access key id")] = None
    secret_access_key: Annotated[str | None, doc("AWS secret access key (secret)")] = None
    partition_by: Annotated[list[NonEmptyStr], doc("partition columns")] = msgspec.field(
        default_factory=list
    )
    table: Annotated[DeltaTable | None, doc("key declaration for merge / CDC")] = None
    mode: Annotated[WriteMode, doc("(ours) append, merge, scd2, truncate")] = "append"
    flush_rows: Annotated[
        PositiveInt | None, doc("(ours) commit once this many rows wait (default: every batch)")
    ] = None
    flush_interval_ms: Annotated[
        PositiveInt | None, doc("(ours) commit at least this often (default: every batch)")
    ] = None
