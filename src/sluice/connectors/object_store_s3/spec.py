"""The S3 object-store keys of pipeline.toml: ``kind = "object_store_s3"``."""

from __future__ import annotations

from typing import Annotated

from sluice.config.base import NonEmptyStr, SourceSpec, doc
from sluice.connectors.files.spec import FileFormat, ObjectStoreTargetSpec


class ObjectStoreS3Source(
    SourceSpec, tag="object_store_s3", tag_field="kind", frozen=True, kw_only=True
):
    """(ours) New objects under an S3 prefix, each read once."""

    bucket: Annotated[NonEmptyStr, doc("bucket")]
    format: Annotated[FileFormat, doc("file format")]
    endpoint: Annotated[str | None, doc("endpoint URL")] = None
    region: Annotated[str | None, doc("AWS region")] = None
    access_key_id: Annotated[str | None, doc("AWS access key id")] = None
    secret_access_key: Annotated[str | None, doc("AWS secret access key (secret)")] = None


class ObjectStoreS3Target(
    ObjectStoreTargetSpec, tag="object_store_s3", tag_field="kind", frozen=True, kw_only=True
):
    """Objects (parquet / csv / json_lines / orc) under an S3 prefix."""

    bucket: Annotated[NonEmptyStr, doc("bucket")]
    endpoint: Annotated[str | None, doc("endpoint URL")] = None
    region: Annotated[str | None, doc("AWS region")] = None
    access_key_id: Annotated[str | None, doc("AWS access key id")] = None
    secret_access_key: Annotated[str | None, doc("AWS secret access key (secret)")] = None
