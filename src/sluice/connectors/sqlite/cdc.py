"""CDC into a SQLite table: the shared apply (:mod:`sluice.connectors.sql.cdc`)
with SQLite's dialect (``json_extract`` conversions) and session.

A batch holds the database's write lock from ``BEGIN IMMEDIATE`` to the
commit (WAL, ``synchronous = FULL``). The gate table is ``_sluice_cdc_gate``
in the same file.
"""

from __future__ import annotations

import contextlib
import sqlite3
from typing import Any

import pyarrow as pa

from sluice.config.spec import CdcSpec
from sluice.connectors.registry import Context
from sluice.connectors.sql.cdc import (
    EV_TABLE,
    EmbeddedDialect,
    Query,
    Rows,
    SqlCdcTarget,
    embedded_failure,
)
from sluice.connectors.sqlite import target as sqlite
from sluice.connectors.sqlite.spec import SQLiteTarget as SQLiteTargetSpec
from sluice.errors import ConnectorError


class SQLiteSession:
    """One sqlite3 connection; transactions begin only at :meth:`begin`."""

    error = sqlite3.Error

    def __init__(self, path: str, target_id: str) -> None:
        self._path = path
        self.id = target_id
        self._conn: sqlite3.Connection | None = None

    def connect(self) -> None:
        self._conn = sqlite.connect(self._path, isolation_level=None)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def execute(self, statement: str, params: tuple[Any, ...] = ()) -> Rows:
        return list(self._require().execute(statement, params).fetchall())

    def load(self, name: str, data: pa.Table) -> None:
        marks = ", ".join("?" for _ in data.column_names)
        # executemany over C-level zip of the columns: sqlite3 has no bulk Arrow path.
        self._require().executemany(
            f"INSERT INTO {name} VALUES ({marks})",
            zip(*(c.to_pylist() for c in data.columns), strict=True),
        )

    def begin(self) -> None:
        conn = self._require()
        if not conn.in_transaction:
            conn.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        conn = self._require()
        if conn.in_transaction:
            conn.execute("COMMIT")

    def rollback(self) -> None:
        conn = self._conn
        if conn is not None and conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")

    def failure(self, exc: Exception, *, committing: bool) -> ConnectorError:
        self.rollback()
        return embedded_failure(self.id, exc, committing=committing)

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ConnectorError(f"{self.id} is not open")
        return self._conn


class SQLiteDialect(EmbeddedDialect):
    """SQLite spelling: unqualified names (schema ``main``), ``json_extract``."""

    gate_types = ("TEXT", "TEXT", "INTEGER")
    gate_suffix = " WITHOUT ROWID"

    def qualify(self, name: str) -> str:
        return self.q(name)

    def sql_type(self, t: pa.DataType, *, key: bool = False) -> str:
        return "BOOLEAN" if pa.types.is_boolean(t) else sqlite.sqlite_type(t)

    def typed(self, column: str, column_type: str, image: str) -> str:
        return f"json_extract({image}, {self.json_path(column)})"

    def present(self, column: str, image: str) -> str:
        return f"(json_type({image}, {self.json_path(column)}) IS NOT NULL)"

    def now(self) -> str:
        return "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"

    def reflect(self, query: Query) -> tuple[dict[str, str] | None, list[str]]:
        info = query(f"PRAGMA table_info({self.q(self.table)})", ())
        if not info:
            return None, []
        columns = {str(r[1]): str(r[2]) for r in info}
        key = [str(r[1]) for r in sorted(info, key=lambda r: int(r[5])) if int(r[5]) > 0]
        return columns, key

    def create_schema(self) -> str | None:
        return None

    def stage_events(self) -> list[str]:
        return [
            self.drop_temp(EV_TABLE),
            f"CREATE TEMP TABLE {EV_TABLE} (k TEXT, op TEXT, ts INTEGER, seq INTEGER, "
            "hash INTEGER, n INTEGER, img TEXT)",
        ]

    def delete_from(self, source: str, where: str) -> str:
        return (
            f"DELETE FROM {self.ident} AS t WHERE EXISTS (SELECT 1 FROM {source} w WHERE {where})"
        )


class SQLiteCdcTarget(SqlCdcTarget):
    """CDC into one SQLite table (the registry's entry point)."""

    def __init__(
        self, spec: SQLiteTargetSpec, ctx: Context, index: int, cdc: CdcSpec, *, count: bool
    ) -> None:
        target_id = f"sqlite:{spec.path}:{spec.table.name}"
        super().__init__(
            target_id,
            SQLiteDialect("main", spec.table.name),
            SQLiteSession(spec.path, target_id),
            cdc,
            ctx,
            spec.table.primary_key,
            count=count,
        )
