"""PostgreSQL target: COPY in bulk, durable on commit.

Each batch is rendered to CSV by Arrow's C++ writer and streamed with
``COPY ... FROM STDIN (FORMAT csv)`` inside one transaction; :meth:`flush`
commits it. Postgres itself coerces the text to each column's type, so an
int64 batch column lands in an ``integer`` column, a string in ``jsonb`` and
so on, with Postgres' own error naming line and column when a value does not
fit.

* A missing table is created from the batch schema (with the configured
  primary key); a batch column the table lacks is added (nullable).
* ``merge``: rows COPY into a temporary staging table, then one
  ``INSERT ... SELECT DISTINCT ON (key) ... ON CONFLICT (key) DO UPDATE``
  (last row of the batch wins; all-key tables use ``DO NOTHING``).
* Connection failures raise :class:`TransientError` (the engine reconnects
  and retries the same batch; nothing was committed).
"""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from sluice.config.spec import PostgresTarget as PostgresTargetSpec
from sluice.connectors.registry import Context
from sluice.errors import ConnectorError, TransientError

try:
    import psycopg
    from psycopg import sql
except ModuleNotFoundError as exc:  # pragma: no cover
    raise ModuleNotFoundError("psycopg", name="psycopg") from exc

log = logging.getLogger(__name__)

_SEQ = "__sluice_seq"
_CSV = pacsv.WriteOptions(include_header=False, quoting_style="needed")


def pg_type(t: pa.DataType) -> str:
    """The Postgres column type for an Arrow type (used when creating tables)."""
    if pa.types.is_boolean(t):
        return "boolean"
    if pa.types.is_int8(t) or pa.types.is_int16(t) or pa.types.is_uint8(t):
        return "smallint"
    if pa.types.is_int32(t) or pa.types.is_uint16(t):
        return "integer"
    if pa.types.is_integer(t):
        return "bigint"
    if pa.types.is_float16(t) or pa.types.is_float32(t):
        return "real"
    if pa.types.is_floating(t):
        return "double precision"
    if pa.types.is_decimal(t):
        return f"numeric({t.precision},{t.scale})"
    if pa.types.is_timestamp(t):
        return "timestamptz" if t.tz else "timestamp"
    if pa.types.is_date(t):
        return "date"
    if pa.types.is_time(t):
        return "time"
    if pa.types.is_duration(t):
        return "interval"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return "bytea"
    if pa.types.is_nested(t):
        return "jsonb"
    return "text"


def to_csv_ready(table: pa.Table) -> pa.Table:
    """Columns Arrow's CSV writer cannot render as Postgres reads them, converted.

    Nested values become JSON text and binary becomes ``\\x`` hex. These are
    per-row conversions, used only for such columns (not the JSON hot path).
    """
    columns = []
    changed = False
    for col in table.columns:
        t = col.type
        if pa.types.is_nested(t):
            values = [None if v is None else json.dumps(v, default=str) for v in col.to_pylist()]
            columns.append(pa.array(values, pa.string()))
            changed = True
        elif pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
            values = [None if v is None else "\\x" + v.hex() for v in col.to_pylist()]
            columns.append(pa.array(values, pa.string()))
            changed = True
        elif pa.types.is_duration(t):
            columns.append(pc.cast(pc.cast(col, pa.int64()), pa.string()))
            changed = True
        else:
            columns.append(col)
    return pa.table(columns, names=table.column_names) if changed else table


def csv_bytes(table: pa.Table) -> bytes:
    """The rows as CSV (no header), the format ``COPY ... (FORMAT csv)`` reads."""
    buf = io.BytesIO()
    pacsv.write_csv(to_csv_ready(table), buf, _CSV)
    return buf.getvalue()


class PostgresTarget:
    """Writes batches into one Postgres table."""

    def __init__(self, spec: PostgresTargetSpec, ctx: Context, index: int) -> None:
        self.spec = spec
        self.schema = spec.table.schema or "public"
        self.table = spec.table.name
        self.id = f"postgres:{self.schema}.{self.table}"
        self._conn: psycopg.Connection[Any] | None = None
        self._columns: dict[str, str] | None = None
        self._key: list[str] = list(spec.table.primary_key or [])
        self._staged = False
        if spec.mode not in ("append", "merge"):
            raise ConnectorError(
                f"mode '{spec.mode}' on a streaming postgres target is not implemented yet "
                "(use append or merge)"
            )

    @property
    def _ident(self) -> sql.Composed:
        return sql.SQL("{}.{}").format(sql.Identifier(self.schema), sql.Identifier(self.table))

    # -- lifecycle ----------------------------------------------------------

    def open(self) -> None:
        """Connect and reflect the table (its columns and primary key)."""
        try:
            self._conn = psycopg.connect(self.spec.url, autocommit=False, connect_timeout=10)
            self._reflect()
            self._conn.commit()
        except psycopg.OperationalError as exc:
            self.close()
            raise TransientError(f"{self.id}: cannot connect: {exc}") from exc

    def close(self) -> None:
        """Drop the connection; an uncommitted batch is rolled back by the server."""
        conn, self._conn = self._conn, None
        self._staged = False
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                pass

    def _reflect(self) -> None:
        conn = self._require()
        rows = conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position",
            (self.schema, self.table),
        ).fetchall()
        self._columns = {r[0]: r[1] for r in rows} if rows else None
        if self._columns is not None and not self._key:
            keys = conn.execute(
                "SELECT a.attname FROM pg_index i JOIN pg_attribute a "
                "ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
                "WHERE i.indrelid = %s::regclass AND i.indisprimary "
                "ORDER BY array_position(i.indkey, a.attnum)",
                (f'"{self.schema}"."{self.table}"',),
            ).fetchall()
            self._key = [k[0] for k in keys]
        if self.spec.mode == "merge" and self._columns is not None and not self._key:
            raise ConnectorError(
                f"{self.id}: mode = \"merge\" needs a primary key: the table has none; "
                "set [target.table] primary_key"
            )

    # -- writing --------------------------------------------------------------

    def write(self, data: pa.Table) -> None:
        """COPY ``data`` inside the open transaction (committed by :meth:`flush`)."""
        if data.num_rows == 0:
            return
        try:
            self._write(data)
        except psycopg.OperationalError as exc:
            self.close()
            raise TransientError(f"{self.id}: {exc}") from exc
        except psycopg.Error as exc:
            self._rollback()
            raise ConnectorError(f"{self.id}: {exc}") from exc

    def _write(self, data: pa.Table) -> None:
        conn = self._require()
        self._ensure_table(data.schema)
        names = data.column_names
        cols = sql.SQL(", ").join(sql.Identifier(n) for n in names)
        payload = csv_bytes(data)
        if self.spec.mode == "merge":
            self._merge(conn, names, cols, payload)
            return
        copy = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv)").format(self._ident, cols)
        with conn.cursor() as cur, cur.copy(copy) as cp:
            cp.write(payload)

    def _merge(self, conn: psycopg.Connection[Any], names: list[str], cols: sql.Composable, payload: bytes) -> None:
        stage = sql.Identifier(f"_sluice_stage_{self.table}")
        if not self._staged:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(stage))
            conn.execute(
                sql.SQL("CREATE TEMP TABLE {} (LIKE {} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS").format(
                    stage, self._ident
                )
            )
            conn.execute(
                sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} bigserial").format(
                    stage, sql.Identifier(_SEQ)
                )
            )
            self._staged = True
        missing_key = [k for k in self._key if k not in names]
        if missing_key:
            raise ConnectorError(f"{self.id}: merge key column(s) {missing_key} missing from the batch")
        with conn.cursor() as cur, cur.copy(
            sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv)").format(stage, cols)
        ) as cp:
            cp.write(payload)
        key = sql.SQL(", ").join(sql.Identifier(k) for k in self._key)
        others = [n for n in names if n not in self._key]
        if others:
            action = sql.SQL("DO UPDATE SET ") + sql.SQL(", ").join(
                sql.SQL("{} = EXCLUDED.{}").format(sql.Identifier(n), sql.Identifier(n)) for n in others
            )
        else:
            action = sql.SQL("DO NOTHING")
        conn.execute(
            sql.SQL(
                "INSERT INTO {t} ({cols}) SELECT DISTINCT ON ({key}) {cols} FROM {s} "
                "ORDER BY {key}, {seq} DESC ON CONFLICT ({key}) {action}"
            ).format(t=self._ident, cols=cols, key=key, s=stage, seq=sql.Identifier(_SEQ), action=action)
        )
        # The staging table would otherwise keep its rows until commit, and
        # a second batch in the same transaction would merge them twice.
        conn.execute(sql.SQL("DELETE FROM {}").format(stage))

    def _ensure_table(self, schema: pa.Schema) -> None:
        conn = self._require()
        if self._columns is None:
            defs = [
                sql.SQL("{} {}").format(sql.Identifier(f.name), sql.SQL(pg_type(f.type)))
                for f in schema
                if f.type != pa.null()
            ]
            if self._key:
                defs.append(
                    sql.SQL("PRIMARY KEY ({})").format(
                        sql.SQL(", ").join(sql.Identifier(k) for k in self._key)
                    )
                )
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
            conn.execute(
                sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(self._ident, sql.SQL(", ").join(defs))
            )
            self._columns = {f.name: pg_type(f.type) for f in schema if f.type != pa.null()}
            if self.spec.mode == "merge" and not self._key:
                raise ConnectorError(
                    f"{self.id}: mode = \"merge\" needs [target.table] primary_key to create the table"
                )
            return
        for f in schema:
            if f.name not in self._columns and f.type != pa.null():
                conn.execute(
                    sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
                        self._ident, sql.Identifier(f.name), sql.SQL(pg_type(f.type))
                    )
                )
                self._columns[f.name] = pg_type(f.type)
                self._staged = False  # the staging table must gain the column too

    def flush(self) -> None:
        """Commit the transaction holding every batch written since the last flush."""
        conn = self._require()
        try:
            conn.commit()
        except psycopg.OperationalError as exc:
            self.close()
            raise TransientError(f"{self.id}: commit failed: {exc}") from exc

    def _rollback(self) -> None:
        if self._conn is not None:
            try:
                self._conn.rollback()
            except psycopg.Error:
                self.close()
        self._staged = False
        self._columns = None  # DDL may have rolled back: reflect again on next write
        if self._conn is not None:
            self._reflect()

    def _require(self) -> psycopg.Connection[Any]:
        if self._conn is None:
            raise TransientError(f"{self.id}: not connected")
        return self._conn


def build_target(spec: PostgresTargetSpec, ctx: Context, index: int) -> PostgresTarget:
    """Registry hook."""
    return PostgresTarget(spec, ctx, index)
