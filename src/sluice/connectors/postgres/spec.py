"""The PostgreSQL keys of pipeline.toml: ``kind = "postgres"`` targets and lookups."""

from __future__ import annotations

from typing import Annotated

from sluice.config.base import DbTable, LookupSpec, ModalTarget, NonEmptyStr, WriteMode, doc


class PostgresTarget(ModalTarget, tag="postgres", tag_field="kind", frozen=True, kw_only=True):
    """A PostgreSQL table, written with binary COPY."""

    url: Annotated[NonEmptyStr, doc("postgres://user:password@host:port/db")]
    table: Annotated[DbTable, doc("the table")]
    mode: Annotated[WriteMode, doc("(ours) append, merge (upsert on the key), scd2, truncate")] = (
        "append"
    )


class PostgresLookup(LookupSpec, tag="postgres", tag_field="kind", frozen=True, kw_only=True):
    """A lookup table loaded from PostgreSQL."""

    url: Annotated[NonEmptyStr, doc("postgres://user:password@host:port/db")]
