"""SQLite target: the zero-setup default (append / merge).

SQLite has no bulk Arrow path in the standard library: rows are handed to
``executemany`` as tuples built by C-level ``zip`` over columns, the cheapest
route sqlite3 offers.

The source positions the commit policy stages go to ``_sluice_positions`` in
the same database file, in the transaction of the rows
(:mod:`sluice.connectors.sql.positions`).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from sluice.connectors.api import Position
from sluice.connectors.registry import Context
from sluice.connectors.sql import positions
from sluice.connectors.sql.embedded import check_mode, quote, require_key
from sluice.connectors.sqlite.spec import SQLiteTarget as SQLiteTargetSpec
from sluice.errors import ConnectorError, PositionsMoved


def sqlite_type(t: pa.DataType) -> str:
    """SQLite storage class for an Arrow type."""
    if pa.types.is_boolean(t) or pa.types.is_integer(t):
        return "INTEGER"
    if pa.types.is_floating(t):
        return "REAL"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "BLOB"
    return "TEXT"


def connect(
    path: str, *, isolation_level: Literal["DEFERRED", "EXCLUSIVE", "IMMEDIATE"] | None
) -> sqlite3.Connection:
    """Open the database file (created when missing, with its folder), durable on
    commit: WAL with ``synchronous = FULL``. ``isolation_level`` as :mod:`sqlite3`
    takes it (None: transactions begin only where the caller says BEGIN)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=isolation_level, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


def _sqlite_columns(table: pa.Table) -> list[list[Any]]:
    out = []
    for col in table.columns:
        t = col.type
        if (
            pa.types.is_timestamp(t)
            or pa.types.is_date(t)
            or pa.types.is_time(t)
            or pa.types.is_decimal(t)
        ):
            # ISO-8601 text, SQLite's documented date/time convention.
            col = pc.cast(col, pa.string())
        elif pa.types.is_nested(t):
            out.append([None if v is None else json.dumps(v, default=str) for v in col.to_pylist()])
            continue
        out.append(col.to_pylist())
    return out


class SQLiteTarget:
    """Writes batches into one SQLite table (schema is always ``main``)."""

    def __init__(self, spec: SQLiteTargetSpec, ctx: Context, index: int) -> None:
        self.spec = spec
        self.table = spec.table.name
        self.id = f"sqlite:{spec.path}:{self.table}"
        self._conn: sqlite3.Connection | None = None
        self._columns: list[str] | None = None
        self._key = list(spec.table.primary_key or [])
        self._ledger = positions.Ledger(
            positions.SQLITE, quote(positions.TABLE), ctx.pipeline.pipeline_name, self.id
        )
        check_mode("sqlite", spec.mode)

    @property
    def database(self) -> str | None:
        """A file: no state store shares it."""
        return None

    def _run(self, statement: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return list(self._require().execute(statement, params).fetchall())

    def open(self) -> None:
        """Open the database file (created when missing) and reflect the table."""
        conn = connect(self.spec.path, isolation_level="DEFERRED")
        self._conn = conn
        info = conn.execute(f"PRAGMA table_info({quote(self.table)})").fetchall()
        self._columns = [r[1] for r in info] or None
        if info and not self._key:
            self._key = [r[1] for r in sorted(info, key=lambda r: r[5]) if r[5] > 0]
        if self._columns is not None:
            require_key(self.id, self.spec.mode, self._key, creating=False)
        self._ledger.create(self._run)
        conn.commit()

    def close(self) -> None:
        """Close; an uncommitted batch is rolled back."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def write(self, data: pa.Table) -> None:
        """Insert ``data`` in the open transaction."""
        if data.num_rows == 0:
            return
        conn = self._require()
        names = [n for n in data.column_names if data.schema.field(n).type != pa.null()]
        data = data.select(names)
        if self._columns is None:
            require_key(self.id, self.spec.mode, self._key, creating=True)
            defs = [f"{quote(f.name)} {sqlite_type(f.type)}" for f in data.schema]
            if self._key:
                defs.append(f"PRIMARY KEY ({', '.join(quote(k) for k in self._key)})")
            conn.execute(f"CREATE TABLE IF NOT EXISTS {quote(self.table)} ({', '.join(defs)})")
            self._columns = list(names)
        for f in data.schema:
            if f.name not in self._columns:
                conn.execute(
                    f"ALTER TABLE {quote(self.table)} ADD COLUMN {quote(f.name)} {sqlite_type(f.type)}"
                )
                self._columns.append(f.name)
        cols = ", ".join(quote(n) for n in names)
        marks = ", ".join("?" for _ in names)
        stmt = f"INSERT INTO {quote(self.table)} ({cols}) VALUES ({marks})"
        if self.spec.mode == "merge":
            others = [n for n in names if n not in self._key]
            keys = ", ".join(quote(k) for k in self._key)
            if others:
                sets = ", ".join(f"{quote(n)} = excluded.{quote(n)}" for n in others)
                stmt += f" ON CONFLICT ({keys}) DO UPDATE SET {sets}"
            else:
                stmt += f" ON CONFLICT ({keys}) DO NOTHING"
        # Rows apply in order, so within a batch the last row of a key wins.
        conn.executemany(stmt, zip(*_sqlite_columns(data), strict=True))

    def held_positions(self) -> dict[str, Position]:
        """See :class:`~sluice.connectors.sql.positions.RecordsPositions`."""
        held = self._ledger.held(self._run)
        self._require().commit()
        return held

    def stage_positions(
        self, positions: Mapping[str, Position], also: Callable[[Any], None] | None = None
    ) -> None:
        """See :class:`~sluice.connectors.sql.positions.RecordsPositions`."""
        self._ledger.stage(positions, also)

    def flush(self) -> None:
        """Record the staged positions, then commit the rows and them (durable:
        WAL with synchronous=FULL)."""
        conn = self._require()
        if self._ledger.pending:
            try:
                self._ledger.write(self._run, conn)
            except PositionsMoved:
                self._ledger.drop()
                conn.rollback()
                raise
        conn.commit()
        self._ledger.done()

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ConnectorError(f"{self.id} is not open")
        return self._conn


def build_target(spec: SQLiteTargetSpec, ctx: Context, index: int) -> SQLiteTarget:
    """Registry hook."""
    return SQLiteTarget(spec, ctx, index)
