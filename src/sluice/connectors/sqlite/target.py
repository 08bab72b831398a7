"""SQLite target: the zero-setup default (every mode of :mod:`sluice.connectors.sql.modes`).

SQLite has no bulk Arrow path in the standard library: rows are handed to
``executemany`` as tuples built by C-level ``zip`` over columns, the cheapest
route sqlite3 offers. ``scd2`` goes through a temporary stage table; its
``row_hash`` is md5 by a function registered on the connection (SQLite has none).

The source positions the commit policy stages go to ``_sluice_positions`` in
the same database file, in the transaction of the rows
(:mod:`sluice.connectors.sql.positions`).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from sluice.connectors.api import Position
from sluice.connectors.registry import Context
from sluice.connectors.sql import modes, positions
from sluice.connectors.sql.embedded import quote, require_key
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


_STAGE = quote("_sluice_stage")


def _md5(*parts: str | None) -> str:
    """md5 of the non-null ``parts`` joined by U+001F (SQLite has no md5 nor,
    before 3.44, concat_ws): :func:`sluice.connectors.sql.modes.hash_parts`."""
    return hashlib.md5("\x1f".join(p for p in parts if p is not None).encode()).hexdigest()


def _arrow_of(declared: str) -> pa.DataType:
    """The Arrow type of a column SQLite declared (CREATE TABLE AS: INT, REAL, TEXT, NUM, "")."""
    d = declared.upper()
    if "INT" in d:
        return pa.int64()
    if "REAL" in d or "FLOA" in d or "DOUB" in d:
        return pa.float64()
    if "BLOB" in d:
        return pa.binary()
    return pa.string()


class SQLiteTarget(modes.Unit):
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
        modes.check(self.id, spec, self._key)
        self._open_unit()
        #: Whether open() creates the positions table (a batch load keeps no positions).
        self.positions_table = True

    @property
    def database(self) -> str | None:
        """A file: no state store shares it."""
        return None

    def _run(self, statement: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return list(self._require().execute(statement, params).fetchall())

    def open(self) -> None:
        """Open the database file (created when missing) and reflect the table."""
        conn = connect(self.spec.path, isolation_level="DEFERRED")
        conn.create_function("sluice_md5", -1, _md5, deterministic=True)
        self._conn = conn
        info = conn.execute(f"PRAGMA table_info({quote(self.table)})").fetchall()
        self._columns = [r[1] for r in info] or None
        if info and not self._key:
            self._key = [r[1] for r in sorted(info, key=lambda r: r[5]) if r[5] > 0]
        if self._columns is not None:
            require_key(self.id, self.spec.mode, self._key, creating=False)
        if self.positions_table:
            self._ledger.create(self._run)
        conn.commit()

    def close(self) -> None:
        """Close; an uncommitted batch is rolled back."""
        conn, self._conn = self._conn, None
        self._unit_done()
        if conn is not None:
            conn.close()

    def write(self, data: pa.Table) -> None:
        """Insert ``data`` in the open transaction."""
        if data.num_rows == 0:
            return
        conn = self._require()
        names = [n for n in data.column_names if data.schema.field(n).type != pa.null()]
        data = data.select(names)
        self._begin(data.schema)
        cols = ", ".join(quote(n) for n in names)
        marks = ", ".join("?" for _ in names)
        if self.spec.mode == "scd2":
            self._new_stage(names)
            conn.executemany(
                f"INSERT INTO {_STAGE} ({cols}) VALUES ({marks})",
                zip(*_sqlite_columns(data), strict=True),
            )
            self._scd2(names)
            return
        stmt = f"INSERT INTO {quote(self.table)} ({cols}) VALUES ({marks})"
        if self.spec.mode == "merge":
            stmt += self._upsert(names)
            self._rows += data.group_by(self._key).aggregate([]).num_rows
        else:
            self._rows += data.num_rows
        # Rows apply in order, so within a batch the last row of a key wins.
        conn.executemany(stmt, zip(*_sqlite_columns(data), strict=True))

    def _upsert(self, names: list[str]) -> str:
        others = [n for n in names if n not in self._key]
        keys = ", ".join(quote(k) for k in self._key)
        if others:
            sets = ", ".join(f"{quote(n)} = excluded.{quote(n)}" for n in others)
            return f" ON CONFLICT ({keys}) DO UPDATE SET {sets}"
        return f" ON CONFLICT ({keys}) DO NOTHING"

    # -- units and modes ------------------------------------------------------

    def prepare(self, schema: pa.Schema, *, create: bool = True) -> None:
        """Begin a unit for batches of ``schema``: create the table or add the
        columns it lacks (``create``; else refuse them), and in ``truncate``
        mode delete the old rows in the open transaction."""
        schema = pa.schema([f for f in schema if f.type != pa.null()])
        if not create:
            self._require_columns(schema, self._columns)
        self._begin(schema)

    def _begin(self, schema: pa.Schema) -> None:
        """Make the table fit ``schema``; at a unit's first write, begin it."""
        conn = self._require()
        schema = self._with_scd2(schema)
        if self._columns is None:
            require_key(self.id, self.spec.mode, self._key, creating=True)
            defs = [f"{quote(f.name)} {sqlite_type(f.type)}" for f in schema]
            if self._key and self.spec.mode != "scd2":  # scd2: several versions per key
                defs.append(f"PRIMARY KEY ({', '.join(quote(k) for k in self._key)})")
            conn.execute(f"CREATE TABLE IF NOT EXISTS {quote(self.table)} ({', '.join(defs)})")
            if self.spec.mode == "scd2":  # the statements find current versions by key
                keys = ", ".join(quote(k) for k in self._key)
                conn.execute(
                    f"CREATE INDEX IF NOT EXISTS {quote(self.table + '_current')} "
                    f"ON {quote(self.table)} ({keys}) WHERE is_current"
                )
            self._columns = list(schema.names)
        for f in schema:
            if f.name not in self._columns:
                conn.execute(
                    f"ALTER TABLE {quote(self.table)} ADD COLUMN {quote(f.name)} {sqlite_type(f.type)}"
                )
                self._columns.append(f.name)
        self._begin_unit(conn.execute, quote(self.table))

    def _new_stage(self, names: list[str]) -> None:
        conn = self._require()
        conn.execute(f"DROP TABLE IF EXISTS temp.{_STAGE}")
        conn.execute(f"CREATE TEMP TABLE {_STAGE} ({', '.join(quote(n) for n in names)})")

    def insert_select(self, select_sql: str, *, create: bool = True) -> None:
        """Write the rows of ``select_sql`` (run here) in the mode, inside the
        open transaction: they never leave the database."""
        conn = self._require()
        staged = self.spec.mode in ("merge", "scd2")  # the stage keys "last row wins" by rowid
        conn.execute(f"DROP TABLE IF EXISTS temp.{_STAGE}")
        conn.execute(
            f"CREATE TEMP TABLE {_STAGE} AS SELECT * FROM ({select_sql})"
            + ("" if staged else " LIMIT 0")  # else only its column types
        )
        info = conn.execute(f"PRAGMA temp.table_info({_STAGE})").fetchall()
        schema = pa.schema([pa.field(str(r[1]), _arrow_of(str(r[2]))) for r in info])
        self.prepare(schema, create=create)
        names = schema.names
        cols = ", ".join(quote(n) for n in names)
        if not staged:
            self._rows += conn.execute(
                f"INSERT INTO {quote(self.table)} ({cols}) SELECT {cols} FROM ({select_sql})"
            ).rowcount
            return
        if self.spec.mode == "scd2":
            self._scd2(names)
            return
        keys = ", ".join(quote(k) for k in self._key)
        last = f"rowid IN (SELECT max(rowid) FROM {_STAGE} GROUP BY {keys})"
        self._rows += conn.execute(
            f"INSERT INTO {quote(self.table)} ({cols}) SELECT {cols} FROM {_STAGE} "
            f"WHERE {last}{self._upsert(names)}"
        ).rowcount

    def _scd2(self, names: list[str]) -> None:
        """Apply the stage's rows (the last of each key) as scd2 versions
        (:mod:`sluice.connectors.sql.modes`)."""
        conn = self._require()
        rows = quote("_sluice_scd2")
        sql = modes.Scd2(quote(self.table), rows, self._key, names, quote)
        compare = sql.compare(self.spec.compare_columns)
        unknown = [c for c in compare if c not in names]
        if unknown:
            raise ConnectorError(f"{self.id}: compare_columns {unknown} are not in the rows")
        ts = self.spec.event_timestamp_column
        if ts is not None and ts not in names:
            raise ConnectorError(f"{self.id}: event_timestamp_column {ts!r} is not in the rows")
        # Timestamps are ISO text as _sqlite_columns writes them (UTC, "Z").
        now = f"'{modes.utc_text(self._now)}Z'"
        valid_from = f"d.{quote(ts)}" if ts else now
        parts = modes.hash_parts(compare, lambda c: f"CAST(d.{quote(c)} AS TEXT)")
        row_hash = f"sluice_md5({', '.join(parts)})"
        keys = ", ".join(quote(k) for k in self._key)
        conn.execute(f"DROP TABLE IF EXISTS temp.{rows}")
        conn.execute(
            f"CREATE TEMP TABLE {rows} AS SELECT d.*, {valid_from} AS valid_from, "
            f"{row_hash} AS row_hash FROM (SELECT {', '.join(quote(n) for n in names)} "
            f"FROM {_STAGE} WHERE rowid IN (SELECT max(rowid) FROM {_STAGE} GROUP BY {keys})) d"
        )
        self._rows += conn.execute(sql.close_changed()).rowcount
        if self.spec.ttl_seconds is not None:
            cutoff = self._now - timedelta(seconds=self.spec.ttl_seconds)
            self._rows += conn.execute(
                sql.close_stale(now, f"'{modes.utc_text(cutoff)}Z'")
            ).rowcount
        self._rows += conn.execute(sql.insert_new()).rowcount

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
        self._committed = self._rows
        self._unit_done()

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ConnectorError(f"{self.id} is not open")
        return self._conn


def build_target(spec: SQLiteTargetSpec, ctx: Context, index: int) -> SQLiteTarget:
    """Registry hook."""
    return SQLiteTarget(spec, ctx, index)
