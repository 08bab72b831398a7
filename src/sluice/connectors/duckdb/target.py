"""DuckDB target (every mode of :mod:`sluice.connectors.sql.modes`), written by
scanning the Arrow table.

The source positions the commit policy stages go to ``_sluice_positions`` in
the target table's schema, in the transaction of the rows
(:mod:`sluice.connectors.sql.positions`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa

from sluice.connectors.api import Position
from sluice.connectors.duckdb.spec import DuckDBTarget as DuckDBTargetSpec
from sluice.connectors.registry import Context
from sluice.connectors.sql import modes, positions
from sluice.connectors.sql.embedded import quote, require_key
from sluice.connectors.sql.types import pg_type
from sluice.errors import ConnectorError, PositionsMoved

_SEQ = "__sluice_seq"


class DuckDBTarget(modes.Unit):
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
        modes.check(self.id, spec, self._key)
        self._open_unit()
        #: Whether open() creates the positions table (a batch load keeps no positions).
        self.positions_table = True

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
        if self.positions_table:
            self._ledger.create(self._run)

    def close(self) -> None:
        """Close; an uncommitted batch is rolled back."""
        conn, self._conn = self._conn, None
        self._in_tx = False
        self._unit_done()
        if conn is not None:
            conn.close()

    def _tx(self) -> Any:
        """The connection, inside the open transaction (begun if need be)."""
        conn = self._require()
        if not self._in_tx:
            conn.execute("BEGIN TRANSACTION")
            self._in_tx = True
        return conn

    def write(self, data: pa.Table) -> None:
        """Insert ``data`` in the open transaction."""
        if data.num_rows == 0:
            return
        conn = self._tx()
        names = [n for n in data.column_names if data.schema.field(n).type != pa.null()]
        batch = data.select(names)
        self._begin(batch.schema)
        conn.register("_sluice_batch", batch)
        try:
            self._apply("_sluice_batch", names)
        finally:
            conn.unregister("_sluice_batch")

    def _apply(self, relation: str, names: list[str]) -> None:
        """Write the rows of ``relation`` (columns ``names``, in order) in the mode."""
        conn = self._require()
        cols = ", ".join(quote(n) for n in names)
        last = (
            f"SELECT {cols} FROM (SELECT {cols}, row_number() OVER () AS {_SEQ} FROM {relation}) "
            f"QUALIFY row_number() OVER (PARTITION BY {', '.join(quote(k) for k in self._key)} "
            f"ORDER BY {_SEQ} DESC) = 1"
        )
        if self.spec.mode == "merge":
            done = conn.execute(f"INSERT OR REPLACE INTO {self._ident} ({cols}) {last}")
        elif self.spec.mode == "scd2":
            self._scd2(last, names)
            return
        else:
            done = conn.execute(f"INSERT INTO {self._ident} ({cols}) SELECT {cols} FROM {relation}")
        self._rows += _count(done)

    # -- units and modes ------------------------------------------------------

    def prepare(self, schema: pa.Schema, *, create: bool = True) -> None:
        """Begin a unit for batches of ``schema``: create the table or add the
        columns it lacks (``create``; else refuse them), and in ``truncate``
        mode delete the old rows in the open transaction."""
        schema = pa.schema([f for f in schema if f.type != pa.null()])
        if not create:
            self._require_columns(schema, self._columns)
        self._tx()
        self._begin(schema)

    def _begin(self, schema: pa.Schema) -> None:
        """Make the table fit ``schema``; at a unit's first write, begin it."""
        conn = self._tx()
        schema = self._with_scd2(schema)
        if self._columns is None:
            require_key(self.id, self.spec.mode, self._key, creating=True)
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote(self.schema)}")
            conn.register("_sluice_shape", schema.empty_table())
            try:
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {self._ident} AS SELECT * FROM _sluice_shape"
                )
            finally:
                conn.unregister("_sluice_shape")
            if self._key and self.spec.mode != "scd2":  # scd2: several versions per key
                keys = ", ".join(quote(k) for k in self._key)
                conn.execute(f"ALTER TABLE {self._ident} ADD PRIMARY KEY ({keys})")
            self._columns = set(schema.names)
        for f in schema:
            if f.name not in self._columns:
                conn.execute(
                    f"ALTER TABLE {self._ident} ADD COLUMN {quote(f.name)} {duck_type(f.type)}"
                )
                self._columns.add(f.name)
        self._begin_unit(conn.execute, self._ident)

    def insert_select(self, select_sql: str, *, create: bool = True) -> None:
        """Write the rows of ``select_sql`` (run here) in the mode, inside the
        open transaction: they never leave the database."""
        conn = self._tx()
        schema = conn.sql(f"SELECT * FROM ({select_sql}) LIMIT 0").arrow().schema
        self.prepare(schema, create=create)
        self._apply(f"({select_sql}) AS _sluice_q", schema.names)

    def _scd2(self, last: str, names: list[str]) -> None:
        """Apply ``last`` (the rows, the last of each key) as scd2 versions
        (:mod:`sluice.connectors.sql.modes`)."""
        conn = self._require()
        rows = quote("_sluice_scd2")
        sql = modes.Scd2(self._ident, rows, self._key, names, quote)
        compare = sql.compare(self.spec.compare_columns)
        unknown = [c for c in compare if c not in names]
        if unknown:
            raise ConnectorError(f"{self.id}: compare_columns {unknown} are not in the rows")
        ts = self.spec.event_timestamp_column
        if ts is not None and ts not in names:
            raise ConnectorError(f"{self.id}: event_timestamp_column {ts!r} is not in the rows")
        now = f"TIMESTAMPTZ '{modes.utc_text(self._now)}+00'"
        valid_from = f"CAST(d.{quote(ts)} AS TIMESTAMPTZ)" if ts else now
        parts = modes.hash_parts(compare, lambda c: f"CAST(d.{quote(c)} AS VARCHAR)")
        row_hash = f"md5(concat_ws(chr(31), {', '.join(parts)}))" if parts else "md5('')"
        conn.execute(
            f"CREATE OR REPLACE TEMP TABLE {rows} AS SELECT d.*, {valid_from} AS valid_from, "
            f"{row_hash} AS row_hash FROM ({last}) AS d"
        )
        self._rows += _count(conn.execute(sql.close_changed()))
        if self.spec.ttl_seconds is not None:
            cutoff = self._now - timedelta(seconds=self.spec.ttl_seconds)
            self._rows += _count(
                conn.execute(sql.close_stale(now, f"TIMESTAMPTZ '{modes.utc_text(cutoff)}+00'"))
            )
        self._rows += _count(conn.execute(sql.insert_new()))
        conn.execute(f"DROP TABLE {rows}")

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
        self._committed = self._rows
        self._unit_done()

    def _require(self) -> Any:
        if self._conn is None:
            raise ConnectorError(f"{self.id} is not open")
        return self._conn


def _count(result: Any) -> int:
    """The row count a DuckDB INSERT / UPDATE returns."""
    row = result.fetchone()
    return int(row[0]) if row else 0


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
