"""The SQLite keys of pipeline.toml: ``kind = "sqlite"`` targets and lookups."""

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


class SQLiteTarget(ModalTarget, tag="sqlite", tag_field="kind", frozen=True, kw_only=True):
    """A SQLite table (the embedded default)."""

    path: Annotated[LocalPath, doc("database file")]
    table: Annotated[DbTable, doc("the table")]
    mode: Annotated[WriteMode, doc("(ours) append, merge, scd2, truncate")] = "append"


class SQLiteLookup(LookupSpec, tag="sqlite", tag_field="kind", frozen=True, kw_only=True):
    """A lookup table loaded from SQLite."""

    path: Annotated[LocalPath, doc("database file")]
