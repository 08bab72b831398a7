"""The local object-store keys of pipeline.toml: ``kind = "object_store_local"``.

The file formats, read options and the keys every object-store target
takes are shared with :mod:`sluice.connectors.object_store_s3`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from sluice.config.base import (
    LocalPath,
    PositiveInt,
    SourceSpec,
    Spec,
    TargetSpec,
    doc,
)

FileFormat = Literal["parquet", "csv", "json_lines", "jsonl", "orc"]


class ObjectStoreLocalSource(
    SourceSpec, tag="object_store_local", tag_field="kind", frozen=True, kw_only=True
):
    """(ours) New files under a local folder prefix, each read once."""

    path: Annotated[LocalPath, doc("root folder; source_query is the watched prefix")]
    format: Annotated[FileFormat, doc("file format")]


class CsvReadOptions(Spec, frozen=True, kw_only=True):
    """[target.read_options.csv]: how CSV written here is read back."""

    has_header: Annotated[bool | None, doc("first line is a header")] = None
    delimiter: Annotated[str | int | None, doc("one ASCII char, or its code (44 = ',')")] = None
    quote: Annotated[str | int | None, doc("quote char or its code")] = None
    escape: Annotated[str | int | None, doc("escape char or its code")] = None
    comment: Annotated[str | int | None, doc("lines starting with this are ignored")] = None
    null_regex: Annotated[str | None, doc("cells matching this read as null")] = None
    truncated_rows_ok: Annotated[bool | None, doc("allow rows with missing cells")] = None
    schema_infer_max_records: Annotated[PositiveInt | None, doc("rows read to infer types")] = None


class JsonReadOptions(Spec, frozen=True, kw_only=True):
    """[target.read_options.json]: how JSON lines written here are read back."""

    schema_infer_max_records: Annotated[PositiveInt | None, doc("rows read to infer types")] = None
    batch_size: Annotated[PositiveInt | None, doc("rows per decoded batch")] = None


class ReadOptions(Spec, frozen=True, kw_only=True):
    """[target.read_options]: per-format read options."""

    csv: Annotated[CsvReadOptions | None, doc("CSV read options")] = None
    json: Annotated[JsonReadOptions | None, doc("JSON read options")] = None


class ObjectStoreTargetSpec(TargetSpec, frozen=True, kw_only=True):
    """Keys every object-store target takes."""

    format: Annotated[FileFormat, doc("file format")]
    prefix: Annotated[str | None, doc("folder / key prefix new files go under")] = None
    parquet_compression: Annotated[
        Literal["snappy", "gzip", "zstd", "uncompressed"] | None, doc("parquet codec")
    ] = None
    csv_delimiter: Annotated[str | None, doc("one ASCII char (default ',')")] = None
    csv_header: Annotated[bool | None, doc("write a header line (default true)")] = None
    csv_quote: Annotated[str | None, doc("one ASCII char (default '\"')")] = None
    csv_escape: Annotated[str | None, doc("one ASCII char (default: doubled quote)")] = None
    csv_null_value: Annotated[str | None, doc("how null cells render (default '')")] = None
    read_options: Annotated[ReadOptions | None, doc("how files written here are read back")] = None


class ObjectStoreLocalTarget(
    ObjectStoreTargetSpec, tag="object_store_local", tag_field="kind", frozen=True, kw_only=True
):
    """Files (parquet / csv / json_lines / orc) under a local folder."""

    path: Annotated[LocalPath, doc("root folder")]
