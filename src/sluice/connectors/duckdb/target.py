"""DuckDB target (append / merge), written by scanning the Arrow table.

The source positions the commit policy stages go to ``_sluice_positions`` in
the target table's schema, in the transaction of the rows
(:mod:`sluice.connectors.sql.positions`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa

from sluice.connectors.api import Position
from sluice.connectors.duckdb.spec import DuckDBTarget as DuckDBTargetSpec
from sluice.connectors.registry import Context
from sluice.connectors.sql import positions
from sluice.connectors.sql.embedded import check_mode, quote, require_key
from sluice.connectors.sql.types import pg_type
from sluice.errors import ConnectorError, PositionsMoved

_SEQ = "__sluice_seq"


class DuckDBTarget:
    """Writes batches into one DuckDB table by scanning the Arrow table."""

    def __init__(self, spec: DuckDBTargetSpec, ctx: Context, index: int) -> None:
        self.spec = spec
        self.schema = spec.table.schema or "main"
        self.table = spec.table.name
        self.id = f"duckdb:{spec.path}:{self.schema}.{self.table}"
        self._conn: Any = None
        self._columns: set[str] | None = None  # reflected at open, kept as columns are added
        self._in_tx = False
        self._key = list(spec.table.primary_key or [])
        self._ledger = positions.Ledger(
            positions.DUCKDB,
            f"{quote(self.schema)}.{quote(positions.TABLE)}",
            ctx.pipeline.pipeline_name,
            self.id,
        )
        check_mode("duckdb", spec.mode)

    @property
    def database(self) -> str | None:
        """A file: no state store shares it."""
        return None

    def _run(self, statement: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return list(self._require().execute(statement, list(params)).fetchall())

    @property
    def _ident(self) -> str:
        return f"{quote(self.schema)}.{quote(self.table)}"

    def open(self) -> None:
        """Open the database and reflect the table."""
        self._conn = connect(self.spec.path)
        rows = self._conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = ? AND table_name = ?",
            [self.schema, self.table],
        ).fetchall()
        self._columns = {r[0] for r in rows} or None
        if self._columns is not None and not self._key:
            cons = self._conn.execute(
                "SELECT constraint_column_names FROM duckdb_constraints() "
                "WHERE schema_name = ? AND table_name = ? AND constraint_type = 'PRIMARY KEY'",
                [self.schema, self.table],
            ).fetchall()
            self._key = list(cons[0][0]) if cons else []
        if self._columns is not None:
            require_key(self.id, self.spec.mode, self._key, creating=False)
        self._conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote(self.schema)}")
        self._ledger.create(self._run)

    def close(self) -> None:
        """Close; an uncommitted batch is rolled back."""
        conn, self._conn = self._conn, None
        self._in_tx = False
        if conn is not None:
            conn.close()

    def write(self, data: pa.Table) -> None:
        """Insert ``data`` in the open transaction."""
        if data.num_rows == 0:
            return
        conn = self._require()
        if not self._in_tx:
            conn.execute("BEGIN TRANSACTION")
            self._in_tx = True
        names = [n for n in data.column_names if data.schema.field(n).type != pa.null()]
        batch = data.select(names)
        conn.register("_sluice_batch", batch)
        try:
            if self._columns is None:
                require_key(self.id, self.spec.mode, self._key, creating=True)
                conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote(self.schema)}")
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {self._ident} AS SELECT * FROM _sluice_batch LIMIT 0"
                )
                if self._key:
                    keys = ", ".join(quote(k) for k in self._key)
                    conn.execute(f"ALTER TABLE {self._ident} ADD PRIMARY KEY ({keys})")
                self._columns = set(names)
            for f in batch.schema:
                if f.name not in self._columns:
                    conn.execute(
                        f"ALTER TABLE {self._ident} ADD COLUMN {quote(f.name)} {duck_type(f.type)}"
                    )
                    self._columns.add(f.name)
            if self.spec.mode == "merge":
                keys = ", ".join(quote(k) for k in self._key)
                conn.execute(
                    f"INSERT OR REPLACE INTO {self._ident} BY NAME "
                    f"SELECT * EXCLUDE ({_SEQ}) FROM (SELECT *, row_number() OVER () AS {_SEQ} FROM _sluice_batch) "
                    f"QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY {_SEQ} DESC) = 1"
                )
            else:
                conn.execute(f"INSERT INTO {self._ident} BY NAME SELECT * FROM _sluice_batch")
        finally:
            conn.unregister("_sluice_batch")

    def held_positions(self) -> dict[str, Position]:
        """See :class:`~sluice.connectors.sql.positions.RecordsPositions`."""
        return self._ledger.held(self._run)

    def stage_positions(
        self, positions: Mapping[str, Position], also: Callable[[Any], None] | None = None
    ) -> None:
        """See :class:`~sluice.connectors.sql.positions.RecordsPositions`."""
        self._ledger.stage(positions, also)

    def flush(self) -> None:
        """Record the staged positions, then commit the open transaction (the
        rows and them)."""
        conn = self._require()
        if self._ledger.pending:
            if not self._in_tx:
                conn.execute("BEGIN TRANSACTION")
                self._in_tx = True
            try:
                self._ledger.write(self._run, conn)
            except PositionsMoved:
                self._ledger.drop()
                conn.execute("ROLLBACK")
                self._in_tx = False
                raise
        if self._in_tx:
            conn.execute("COMMIT")
            self._in_tx = False
        self._ledger.done()

    def _require(self) -> Any:
        if self._conn is None:
            raise ConnectorError(f"{self.id} is not open")
        return self._conn


def connect(path: str) -> Any:
    """Open the database (created when missing, with its folder; ``:memory:`` too)."""
    import duckdb

    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    return duckdb.connect(path)


def duck_type(t: pa.DataType) -> str:
    """The DuckDB column type for an Arrow type."""
    text = pg_type(t)
    return {
        "jsonb": "JSON",
        "bytea": "BLOB",
        "timestamptz": "TIMESTAMPTZ",
        "double precision": "DOUBLE",
    }.get(text, text.upper())


def build_target(spec: DuckDBTargetSpec, ctx: Context, index: int) -> DuckDBTarget:
    """Registry hook."""
    return DuckDBTarget(spec, ctx, index)
