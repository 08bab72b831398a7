"""CDC into a DuckDB table: the shared apply (:mod:`sluice.connectors.sql.cdc`)
with DuckDB's dialect (``json_extract`` plus a cast to the column's type) and
session (the events staged by an Arrow scan).

One process holds a DuckDB file: the gate needs no lock. The gate table is
``<schema>._sluice_cdc_gate``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pyarrow as pa

from sluice.config.spec import CdcSpec
from sluice.connectors.duckdb import target as duck
from sluice.connectors.duckdb.spec import DuckDBTarget as DuckDBTargetSpec
from sluice.connectors.registry import Context
from sluice.connectors.sql.cdc import (
    EmbeddedDialect,
    Query,
    Rows,
    SqlCdcTarget,
    embedded_failure,
)
from sluice.errors import ConnectorError

_BATCH_VIEW = "_sluice_cdc_batch"


class DuckDBSession:
    """One DuckDB connection; transactions begin only at :meth:`begin`."""

    def __init__(self, path: str, target_id: str) -> None:
        self._path = path
        self.id = target_id
        self._conn: Any = None
        self._in_tx = False

    @property
    def error(self) -> type[Exception]:
        import duckdb

        return duckdb.Error

    def connect(self) -> None:
        try:
            self._conn = duck.connect(self._path)
        except self.error as exc:
            self.close()
            raise ConnectorError(f"{self.id}: {exc}") from exc

    def close(self) -> None:
        conn, self._conn = self._conn, None
        self._in_tx = False
        if conn is not None:
            conn.close()

    def execute(self, statement: str, params: tuple[Any, ...] = ()) -> Rows:
        conn = self._require()
        cursor = conn.execute(statement, list(params)) if params else conn.execute(statement)
        return list(cursor.fetchall())

    def load(self, name: str, data: pa.Table) -> None:
        conn = self._require()
        conn.register(_BATCH_VIEW, data)
        try:
            self.execute(f"CREATE OR REPLACE TEMP TABLE {name} AS SELECT * FROM {_BATCH_VIEW}")
        finally:
            conn.unregister(_BATCH_VIEW)

    def begin(self) -> None:
        if not self._in_tx:
            self.execute("BEGIN TRANSACTION")
            self._in_tx = True

    def commit(self) -> None:
        if self._in_tx:
            self.execute("COMMIT")
            self._in_tx = False

    def rollback(self) -> None:
        if self._in_tx:
            self._in_tx = False
            with contextlib.suppress(self.error, ConnectorError):
                self.execute("ROLLBACK")

    def failure(self, exc: Exception, *, committing: bool) -> ConnectorError:
        self.rollback()
        return embedded_failure(self.id, exc, committing=committing)

    def _require(self) -> Any:
        if self._conn is None:
            raise ConnectorError(f"{self.id} is not open")
        return self._conn


class DuckDBDialect(EmbeddedDialect):
    """DuckDB spelling: schema-qualified names, JSON cast to each column's type."""

    gate_types = ("VARCHAR", "VARCHAR", "BIGINT")

    def sql_type(self, t: pa.DataType, *, key: bool = False) -> str:
        return duck.duck_type(t)

    def typed(self, column: str, column_type: str, image: str) -> str:
        kind, path = column_type, self.json_path(column)
        if kind == "VARCHAR":
            return f"json_extract_string({image}, {path})"
        if kind == "JSON":
            return f"json_extract({image}, {path})"
        if kind.endswith("]") or kind.startswith(("STRUCT", "MAP", "UNION")):
            return f"CAST(json_extract({image}, {path}) AS {kind})"
        return f"CAST(json_extract_string({image}, {path}) AS {kind})"

    def present(self, column: str, image: str) -> str:
        return f"json_exists({image}, {self.json_path(column)})"

    def now(self) -> str:
        return "now()"

    def reflect(self, query: Query) -> tuple[dict[str, str] | None, list[str]]:
        where = f"{self.literal(self.schema)} AND table_name = {self.literal(self.table)}"
        rows = query(
            "SELECT column_name, data_type FROM information_schema.columns WHERE "
            f"table_schema = {where} ORDER BY ordinal_position",
            (),
        )
        if not rows:
            return None, []
        cons = query(
            "SELECT constraint_column_names FROM duckdb_constraints() WHERE "
            f"schema_name = {where} AND constraint_type = 'PRIMARY KEY'",
            (),
        )
        return {str(r[0]): str(r[1]) for r in rows}, list(cons[0][0]) if cons else []


class DuckDBCdcTarget(SqlCdcTarget):
    """CDC into one DuckDB table (the registry's entry point)."""

    def __init__(
        self, spec: DuckDBTargetSpec, ctx: Context, index: int, cdc: CdcSpec, *, count: bool
    ) -> None:
        schema = spec.table.schema or "main"
        target_id = f"duckdb:{spec.path}:{schema}.{spec.table.name}"
        super().__init__(
            target_id,
            DuckDBDialect(schema, spec.table.name),
            DuckDBSession(spec.path, target_id),
            cdc,
            ctx,
            spec.table.primary_key,
            count=count,
        )
