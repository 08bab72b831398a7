"""DuckDB CDC apply: the shared SQL apply (:mod:`sluice.connectors.sql.cdc`) with
DuckDB's connection, Arrow staging and typed JSON conversions."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pyarrow as pa

from sluice.config.spec import CdcSpec
from sluice.connectors.duckdb.spec import DuckDBTarget as DuckDBTargetSpec
from sluice.connectors.duckdb.target import duck_type
from sluice.connectors.registry import Context
from sluice.connectors.sql.cdc import EV_TABLE, Embedded, SchemaQualified
from sluice.errors import ConnectorError


class DuckDBCdcTarget(SchemaQualified, Embedded):
    """CDC into a DuckDB table; JSON converted by ``json_extract`` and a cast to the
    column's type."""

    def __init__(
        self, spec: DuckDBTargetSpec, ctx: Context, index: int, cdc: CdcSpec, *, count: bool
    ) -> None:
        super().__init__(cdc, ctx, spec.table.primary_key, count=count)
        self.spec = spec
        self.schema = spec.table.schema or "main"
        self.table = spec.table.name
        self.id = f"duckdb:{spec.path}:{self.schema}.{self.table}"
        self._conn: Any = None
        self._in_tx = False

    def open(self) -> None:
        """Open the database (created when missing), reflect, create the gate table."""
        import duckdb

        if self.spec.path != ":memory:":
            Path(self.spec.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = duckdb.connect(self.spec.path)
            self.run(f"CREATE SCHEMA IF NOT EXISTS {self.q(self.schema)}")
            self.prepare()
        except duckdb.Error as exc:
            self.close()
            raise ConnectorError(f"{self.id}: {exc}") from exc

    def close(self) -> None:
        """Close; an uncommitted batch is rolled back."""
        conn, self._conn = self._conn, None
        self._in_tx = False
        if conn is not None:
            conn.close()

    def _require(self) -> Any:
        if self._conn is None:
            raise ConnectorError(f"{self.id} is not open")
        return self._conn

    def run(self, statement: str) -> list[tuple[Any, ...]]:
        return list(self._require().execute(statement).fetchall())

    def begin(self) -> None:
        if not self._in_tx:
            self.run("BEGIN TRANSACTION")
            self._in_tx = True

    def commit(self) -> None:
        if self._in_tx:
            self.run("COMMIT")
            self._in_tx = False

    def reflect(self) -> tuple[dict[str, str] | None, list[str]]:
        rows = self.run(
            "SELECT column_name, data_type FROM information_schema.columns WHERE "
            f"table_schema = {self.literal(self.schema)} AND table_name = {self.literal(self.table)} "
            "ORDER BY ordinal_position"
        )
        if not rows:
            return None, []
        cons = self.run(
            "SELECT constraint_column_names FROM duckdb_constraints() WHERE "
            f"schema_name = {self.literal(self.schema)} AND table_name = {self.literal(self.table)} "
            "AND constraint_type = 'PRIMARY KEY'"
        )
        return {str(r[0]): str(r[1]) for r in rows}, list(cons[0][0]) if cons else []

    def stage(self, events: pa.Table) -> None:
        conn = self._require()
        conn.register("_sluice_cdc_batch", events)
        try:
            self.run(f"CREATE OR REPLACE TEMP TABLE {EV_TABLE} AS SELECT * FROM _sluice_cdc_batch")
        finally:
            conn.unregister("_sluice_cdc_batch")

    def sql_type(self, t: pa.DataType, *, key: bool = False) -> str:
        return duck_type(t)

    def typed(self, column: str, image: str) -> str:
        assert self.columns is not None
        kind = self.columns[column]
        path = self.json_path(column)
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

    def lock_gate(self) -> None:
        """One process holds a DuckDB file: nothing to lock."""

    def gate_ddl(self) -> str:
        return (
            f"CREATE TABLE IF NOT EXISTS {self.gate} (pipeline VARCHAR NOT NULL, "
            "tbl VARCHAR NOT NULL, k VARCHAR NOT NULL, ts_ms BIGINT NOT NULL, "
            "seq BIGINT NOT NULL, hash BIGINT NOT NULL, PRIMARY KEY (pipeline, tbl, k))"
        )

    def _driver_error(self) -> type[Exception]:
        import duckdb

        return duckdb.Error

    def _rollback(self) -> None:
        import duckdb

        if self._in_tx:
            self._in_tx = False
            with contextlib.suppress(duckdb.Error, ConnectorError):
                self.run("ROLLBACK")
        with contextlib.suppress(duckdb.Error, ConnectorError):
            self.columns, _ = self.reflect()
