"""Embedded database targets: SQLite (the zero-setup default) and DuckDB.

Both create a missing table from the batch schema, add new columns, and in
``merge`` mode upsert on the primary key (last row of a batch wins). Writes
go into an open transaction that :meth:`flush` commits.

DuckDB scans the Arrow table directly. SQLite has no bulk Arrow path in the
standard library: rows are handed to ``executemany`` as tuples built by C-level
``zip`` over columns, the cheapest route sqlite3 offers.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from sluice.config.spec import DuckDBTarget as DuckDBTargetSpec
from sluice.config.spec import SQLiteTarget as SQLiteTargetSpec
from sluice.connectors.registry import Context
from sluice.connectors.sql.types import pg_type
from sluice.errors import ConnectorError

_SEQ = "__sluice_seq"


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _require_key(target_id: str, mode: str, key: list[str], creating: bool) -> None:
    """Merge upserts on a primary key: the table's, or the configured one to create it with."""
    if mode == "merge" and not key:
        where = "[target.table] primary_key to create the table" if creating else "a primary key"
        raise ConnectorError(f'{target_id}: mode = "merge" needs {where}')


def _check_mode(target_id: str, mode: str) -> None:
    if mode not in ("append", "merge"):
        raise ConnectorError(
            f"mode '{mode}' on a streaming {target_id} target is not implemented yet (use append or merge)"
        )


def sqlite_type(t: pa.DataType) -> str:
    """SQLite storage class for an Arrow type."""
    if pa.types.is_boolean(t) or pa.types.is_integer(t):
        return "INTEGER"
    if pa.types.is_floating(t):
        return "REAL"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "BLOB"
    return "TEXT"


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
        _check_mode("sqlite", spec.mode)

    def open(self) -> None:
        """Open the database file (created when missing) and reflect the table."""
        Path(self.spec.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.spec.path, isolation_level="DEFERRED", check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        self._conn = conn
        info = conn.execute(f"PRAGMA table_info({_q(self.table)})").fetchall()
        self._columns = [r[1] for r in info] or None
        if info and not self._key:
            self._key = [r[1] for r in sorted(info, key=lambda r: r[5]) if r[5] > 0]
        if self._columns is not None:
            _require_key(self.id, self.spec.mode, self._key, creating=False)

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
            _require_key(self.id, self.spec.mode, self._key, creating=True)
            defs = [f"{_q(f.name)} {sqlite_type(f.type)}" for f in data.schema]
            if self._key:
                defs.append(f"PRIMARY KEY ({', '.join(_q(k) for k in self._key)})")
            conn.execute(f"CREATE TABLE IF NOT EXISTS {_q(self.table)} ({', '.join(defs)})")
            self._columns = list(names)
        for f in data.schema:
            if f.name not in self._columns:
                conn.execute(
                    f"ALTER TABLE {_q(self.table)} ADD COLUMN {_q(f.name)} {sqlite_type(f.type)}"
                )
                self._columns.append(f.name)
        cols = ", ".join(_q(n) for n in names)
        marks = ", ".join("?" for _ in names)
        stmt = f"INSERT INTO {_q(self.table)} ({cols}) VALUES ({marks})"
        if self.spec.mode == "merge":
            others = [n for n in names if n not in self._key]
            keys = ", ".join(_q(k) for k in self._key)
            if others:
                sets = ", ".join(f"{_q(n)} = excluded.{_q(n)}" for n in others)
                stmt += f" ON CONFLICT ({keys}) DO UPDATE SET {sets}"
            else:
                stmt += f" ON CONFLICT ({keys}) DO NOTHING"
        # Rows apply in order, so within a batch the last row of a key wins.
        conn.executemany(stmt, zip(*_sqlite_columns(data), strict=True))

    def flush(self) -> None:
        """Commit (durable: WAL with synchronous=FULL)."""
        self._require().commit()

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ConnectorError(f"{self.id} is not open")
        return self._conn


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
        _check_mode("duckdb", spec.mode)

    @property
    def _ident(self) -> str:
        return f"{_q(self.schema)}.{_q(self.table)}"

    def open(self) -> None:
        """Open the database and reflect the table."""
        import duckdb

        if self.spec.path != ":memory:":
            Path(self.spec.path).parent.mkdir(parents=True, exist_ok=True)
        self._conn = duckdb.connect(self.spec.path)
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
            _require_key(self.id, self.spec.mode, self._key, creating=False)

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
                _require_key(self.id, self.spec.mode, self._key, creating=True)
                conn.execute(f"CREATE SCHEMA IF NOT EXISTS {_q(self.schema)}")
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {self._ident} AS SELECT * FROM _sluice_batch LIMIT 0"
                )
                if self._key:
                    keys = ", ".join(_q(k) for k in self._key)
                    conn.execute(f"ALTER TABLE {self._ident} ADD PRIMARY KEY ({keys})")
                self._columns = set(names)
            for f in batch.schema:
                if f.name not in self._columns:
                    conn.execute(
                        f"ALTER TABLE {self._ident} ADD COLUMN {_q(f.name)} {duck_type(f.type)}"
                    )
                    self._columns.add(f.name)
            if self.spec.mode == "merge":
                keys = ", ".join(_q(k) for k in self._key)
                conn.execute(
                    f"INSERT OR REPLACE INTO {self._ident} BY NAME "
                    f"SELECT * EXCLUDE ({_SEQ}) FROM (SELECT *, row_number() OVER () AS {_SEQ} FROM _sluice_batch) "
                    f"QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY {_SEQ} DESC) = 1"
                )
            else:
                conn.execute(f"INSERT INTO {self._ident} BY NAME SELECT * FROM _sluice_batch")
        finally:
            conn.unregister("_sluice_batch")

    def flush(self) -> None:
        """Commit the open transaction."""
        if self._in_tx:
            self._require().execute("COMMIT")
            self._in_tx = False

    def _require(self) -> Any:
        if self._conn is None:
            raise ConnectorError(f"{self.id} is not open")
        return self._conn


def duck_type(t: pa.DataType) -> str:
    """The DuckDB column type for an Arrow type."""
    text = pg_type(t)
    return {
        "jsonb": "JSON",
        "bytea": "BLOB",
        "timestamptz": "TIMESTAMPTZ",
        "double precision": "DOUBLE",
    }.get(text, text.upper())


def build_target(
    spec: SQLiteTargetSpec | DuckDBTargetSpec, ctx: Context, index: int
) -> SQLiteTarget | DuckDBTarget:
    """Registry hook."""
    if isinstance(spec, SQLiteTargetSpec):
        return SQLiteTarget(spec, ctx, index)
    return DuckDBTarget(spec, ctx, index)
