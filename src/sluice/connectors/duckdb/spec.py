"""The DuckDB keys of pipeline.toml: ``kind = "duckdb"`` targets and lookups."""

from __future__ import annotations

from typing import Annotated

from sluice.config.base import (
    DbTable,
    LocalPath,
    LookupSpec,
    ModalTarget,
    WriteMode,
    doc,
)


class DuckDBTarget(ModalTarget, tag="duckdb", tag_field="kind", frozen=True, kw_only=True):
    """A DuckDB table, written by Arrow scan."""

    path: Annotated[LocalPath, doc("database file (':memory:' for tests)")]
    table: Annotated[DbTable, doc("the table")]
    mode: Annotated[WriteMode, doc("(ours) append, merge, scd2, truncate")] = "append"


class DuckDBLookup(LookupSpec, tag="duckdb", tag_field="kind", frozen=True, kw_only=True):
    """A lookup table loaded from DuckDB."""

    path: Annotated[LocalPath, doc("database file")]
