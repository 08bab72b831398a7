"""The MySQL / MariaDB keys of pipeline.toml: ``kind = "mysql"`` targets and lookups."""

from __future__ import annotations

from typing import Annotated

from sluice.config.base import DbTable, LookupSpec, ModalTarget, NonEmptyStr, WriteMode, doc


class MySQLTarget(ModalTarget, tag="mysql", tag_field="kind", frozen=True, kw_only=True):
    """A MySQL / MariaDB table."""

    url: Annotated[NonEmptyStr, doc("mysql://user:password@host:port/db")]
    table: Annotated[DbTable, doc("the table")]
    mode: Annotated[WriteMode, doc("(ours) append, merge, scd2, truncate")] = "append"


class MySQLLookup(LookupSpec, tag="mysql", tag_field="kind", frozen=True, kw_only=True):
    """A lookup table loaded from MySQL / MariaDB."""

    url: Annotated[NonEmptyStr, doc("mysql://user:password@host:port/db")]
