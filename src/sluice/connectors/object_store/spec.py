"""The object-store keys of pipeline.toml: ``kind = "object_store_local"`` and
``kind = "object_store_s3"``, as sources (new files under a prefix) and as
targets (files written under a prefix)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from sluice.config.base import (
    LocalPath,
    NonEmptyStr,
    PositiveInt,
    SourceSpec,
    Spec,
    TargetSpec,
    doc,
)

FileFormat = Literal["parquet", "csv", "json_lines", "jsonl", "orc"]


class CsvReadOptions(Spec, frozen=True, kw_only=True):
    """[read_options.csv]: how CSV files are read."""

    has_header: Annotated[bool | None, doc("first line is a header (default true)")] = None
    delimiter: Annotated[str | int | None, doc("one ASCII char, or its code (44 = ',')")] = None
    quote: Annotated[str | int | None, doc("quote char or its code")] = None
    escape: Annotated[str | int | None, doc("escape char or its code")] = None
    comment: Annotated[str | int | None, doc("lines starting with this are ignored")] = None
    null_regex: Annotated[str | None, doc("cells matching this read as null")] = None
    truncated_rows_ok: Annotated[bool | None, doc("allow rows with missing cells")] = None
    schema_infer_max_records: Annotated[
        PositiveInt | None,
        doc("record lines the types are inferred from (default: the first batch's), then locked"),
    ] = None


class JsonReadOptions(Spec, frozen=True, kw_only=True):
    """[read_options.json]: how JSON lines are read."""

    schema_infer_max_records: Annotated[
        PositiveInt | None,
        doc("record lines the types are inferred from (default: the first batch's), then locked"),
    ] = None
    batch_size: Annotated[PositiveInt | None, doc("rows per decoded batch")] = None


class ReadOptions(Spec, frozen=True, kw_only=True):
    """[read_options]: per-format read options."""

    csv: Annotated[CsvReadOptions | None, doc("CSV read options")] = None
    json: Annotated[JsonReadOptions | None, doc("JSON read options")] = None


class ObjectStoreSourceSpec(SourceSpec, frozen=True, kw_only=True):
    """Keys every object-store source takes."""

    format: Annotated[
        FileFormat | None,
        doc(
            "file format; default: from each file's extension (.parquet, .csv, .jsonl / "
            ".ndjson / .json, .orc, each optionally .gz / .bz2 / .zst / .lz4)"
        ),
    ] = None
    read_options: Annotated[ReadOptions | None, doc("(ours) CSV / JSON read options")] = None
    max_batch_bytes: Annotated[
        PositiveInt, doc("(ours) most bytes of a text file read into one batch")
    ] = 8 << 20
    max_record_bytes: Annotated[
        PositiveInt, doc("(ours) longest line of a text file; a longer one is a bad record")
    ] = 64 << 20
    rescan_interval_ms: Annotated[
        PositiveInt,
        doc(
            "(ours) how often the whole prefix is listed again, to find files arriving "
            "with an earlier name and files that grew; between, S3 lists after the last key"
        ),
    ] = 60_000
    state_dir: Annotated[
        str | None,
        doc(
            "(ours) absolute folder of the source's own position file; default "
            "$SLUICE_STATE_DIR, else $XDG_STATE_HOME/sluice (~/.local/state/sluice)"
        ),
    ] = None


class ObjectStoreLocalSource(
    ObjectStoreSourceSpec, tag="object_store_local", tag_field="kind", frozen=True, kw_only=True
):
    """(ours) New files under a local folder prefix, each read once."""

    path: Annotated[LocalPath, doc("root folder; source_query is the watched prefix")]


class ObjectStoreS3Source(
    ObjectStoreSourceSpec, tag="object_store_s3", tag_field="kind", frozen=True, kw_only=True
):
    """(ours) New objects under an S3 prefix, each read once."""

    bucket: Annotated[NonEmptyStr, doc("bucket")]
    endpoint: Annotated[str | None, doc("endpoint URL")] = None
    region: Annotated[str | None, doc("AWS region")] = None
    access_key_id: Annotated[str | None, doc("AWS access key id")] = None
    secret_access_key: Annotated[str | None, doc("AWS secret access key (secret)")] = None


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
    partition_by: Annotated[
        list[NonEmptyStr], doc("(ours) columns that make hive folders (col=value/)")
    ] = msgspec.field(default_factory=list)
    max_file_rows: Annotated[PositiveInt, doc("(ours) most rows in one file")] = 1_000_000
    max_file_bytes: Annotated[PositiveInt, doc("(ours) most bytes (of Arrow data) in one file")] = (
        256 << 20
    )
    flush_rows: Annotated[
        PositiveInt | None,
        doc("(ours) write the files once this many rows wait (default: every batch)"),
    ] = None
    flush_interval_ms: Annotated[
        PositiveInt | None, doc("(ours) write the files at least this often (default: every batch)")
    ] = None


class ObjectStoreLocalTarget(
    ObjectStoreTargetSpec, tag="object_store_local", tag_field="kind", frozen=True, kw_only=True
):
    """Files (parquet / csv / json_lines / orc) under a local folder."""

    path: Annotated[LocalPath, doc("root folder")]


class ObjectStoreS3Target(
    ObjectStoreTargetSpec, tag="object_store_s3", tag_field="kind", frozen=True, kw_only=True
):
    """Objects (parquet / csv / json_lines / orc) under an S3 prefix."""

    bucket: Annotated[NonEmptyStr, doc("bucket")]
    endpoint: Annotated[str | None, doc("endpoint URL")] = None
    region: Annotated[str | None, doc("AWS region")] = None
    access_key_id: Annotated[str | None, doc("AWS access key id")] = None
    secret_access_key: Annotated[str | None, doc("AWS secret access key (secret)")] = None
