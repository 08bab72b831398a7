"""PostgreSQL target: binary COPY from Arrow (ADBC), durable on commit.

Each batch goes to Postgres by ADBC's bulk ingest (binary ``COPY`` written in
C++ straight from the Arrow buffers) inside one transaction that
:meth:`flush` commits. Two routes:

* **native**: every batch column casts cleanly (in Arrow) to the Arrow twin
  of its table column's type (``integer`` -> int32, ``timestamptz`` ->
  timestamp[us, UTC], ``numeric(p,s)`` -> decimal128 from integers and
  decimals, ...): ingest straight into the table.
* **staged**: otherwise (``jsonb``, ``numeric`` without a precision or
  from floats or text, enums, a value Arrow cannot cast exactly, or ``merge``
  / ``scd2`` mode) ingest into a temporary table and run one
  ``INSERT ... SELECT col::type`` so Postgres does the conversion and names
  the offending value on error. ``merge`` adds ``DISTINCT ON (key)`` (last
  row of the batch wins) and ``ON CONFLICT (key) DO UPDATE`` (all-key tables:
  ``DO NOTHING``); ``scd2`` runs the statements of
  :mod:`sluice.connectors.sql.modes` from it.
* **merge by COPY**: a ``merge`` batch that is the first of its transaction,
  whose keys are distinct and which takes the native route is first copied
  straight into the table when a unique index on exactly the key guards it:
  the common case of a merge target, every key new (windows closing, a
  first load), is then a plain COPY. A key the table holds already fails the
  COPY on that index (``unique_violation``; or ``deadlock_detected`` with
  another writer inserting the same keys in another order): the
  transaction, which held nothing else, is rolled back and the batch takes
  the staged route, and the next ``2**k`` batches (k conflicts in a
  row, at most 64) go there directly, so a stream of updates does not pay
  for a COPY it rolls back. On the tumbling benchmark's 752k windows
  Postgres spends 4.4 CPU-s on the staged upsert and about 1 on the COPY.

``truncate`` deletes the old rows at the first write of a transaction (a
flush, or a whole load), so readers see the old table until the commit.

A missing table is created from the batch schema (with the configured
primary key); a column the table lacks is added. A nested column (list,
struct, map) is written as JSON text (:mod:`sluice.formats.jsontext`,
which documents the exact JSON) and may only go to a ``json`` or ``jsonb``
column (or a domain over one); a new one is created as ``jsonb``. A batch
giving nested values to any other column is refused before anything of it
is written, naming the table, the column and its type. A failure whose connection
no longer answers is a :class:`TransientError` (the engine reconnects and
retries the same batch; nothing was committed); any other is fatal.

**Positions.** The source positions the commit policy stages go to
``<schema>._sluice_positions`` (the target table's schema) in the transaction
of the rows (:mod:`sluice.connectors.sql.positions`).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, NoReturn
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc

from sluice.connectors.api import Position
from sluice.connectors.postgres.driver import adbc, adbc_driver_manager
from sluice.connectors.postgres.spec import PostgresTarget as PostgresTargetSpec
from sluice.connectors.registry import Context
from sluice.connectors.sql import modes, positions
from sluice.connectors.sql.types import pg_type
from sluice.errors import ConnectorError, TransientError
from sluice.formats.jsontext import to_json_text

log = logging.getLogger(__name__)

_SEQ = "__sluice_seq"

#: Postgres types (as format_type() prints them) ADBC's COPY writer takes
#: directly, with the Arrow type to cast a batch column to first.
NATIVE: dict[str, pa.DataType] = {
    "smallint": pa.int16(),
    "integer": pa.int32(),
    "bigint": pa.int64(),
    "real": pa.float32(),
    "double precision": pa.float64(),
    "boolean": pa.bool_(),
    "text": pa.string(),
    "character varying": pa.string(),
    "timestamp with time zone": pa.timestamp("us", tz="UTC"),
    "timestamp without time zone": pa.timestamp("us"),
    "date": pa.date32(),
    "bytea": pa.binary(),
}


#: SQLSTATEs after which a merge by COPY is rolled back and the batch
#: upserted instead: a key a unique index holds already; a deadlock with
#: another writer of the same keys (a COPY inserts in batch order, the
#: upsert in key order, which two upserts cannot deadlock on).
COPY_FALLBACK = ("23505", "40P01")

#: Type oids of ``json`` and ``jsonb``: the only homes of nested columns.
JSON_OIDS = (114, 3802)


#: ``numeric(p,s)`` as format_type() prints it; ADBC's COPY writes a
#: decimal128 column into it (p <= 38).
_NUMERIC = re.compile(r"numeric\((\d+),(\d+)\)")


def _native_type(pg: str, origin: pa.DataType) -> pa.DataType | None:
    """The Arrow type ADBC's COPY writes into a column of Postgres type ``pg``
    (format_type()) for a batch column of type ``origin``; None: the staged
    route (Postgres converts).

    ``numeric(p,s)`` only takes exact values, integers (a session's ``uint64``
    id) and decimals; a cast that would round fails, and Postgres rounds it
    on the staged route instead."""
    m = _NUMERIC.fullmatch(pg)
    if m is None:
        return NATIVE.get(pg.split("(", 1)[0])
    precision, scale = int(m[1]), int(m[2])
    exact = pa.types.is_integer(origin) or pa.types.is_decimal(origin)
    if precision > 38 or not exact:
        return None
    return pa.decimal128(precision, scale)


def ingestable(table: pa.Table) -> pa.Table:
    """Columns ADBC cannot send, converted: nested values to JSON text
    (vectorised, :func:`to_json_text`), durations to text Postgres reads as
    intervals, unsigned 64-bit to text (no Postgres twin), null-typed
    columns dropped.

    The duration conversion is still per row.
    """
    names, columns = [], []
    for name, col in zip(table.column_names, table.columns, strict=True):
        t = col.type
        if t == pa.null():
            continue
        if pa.types.is_nested(t):
            col = to_json_text(col)
        elif pa.types.is_duration(t):
            col = pa.array(
                [None if v is None else f"{v.total_seconds()} seconds" for v in col.to_pylist()],
                pa.string(),
            )
        elif pa.types.is_large_string(t):
            col = pc.cast(col, pa.string())
        elif pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
            col = pc.cast(col, pa.binary())
        elif pa.types.is_uint64(t):
            col = pc.cast(col, pa.string())
        elif pa.types.is_uint32(t):
            col = pc.cast(col, pa.int64())
        elif pa.types.is_uint16(t) or pa.types.is_uint8(t) or pa.types.is_int8(t):
            col = pc.cast(col, pa.int32())
        names.append(name)
        columns.append(col)
    return pa.table(columns, names=names)


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class PostgresTarget(modes.Unit):
    """Writes batches into one Postgres table."""

    def __init__(self, spec: PostgresTargetSpec, ctx: Context, index: int) -> None:
        self.spec = spec
        self.schema = spec.table.schema or "public"
        self.table = spec.table.name
        self.id = f"postgres:{self.schema}.{self.table}"
        self._ident = f"{_q(self.schema)}.{_q(self.table)}"
        self._stage = _q(f"_sluice_stage_{index}")
        self._conn: Any = None
        self._columns: dict[str, str] | None = None  # name -> format_type()
        self._json: set[str] = set()  # columns of type json / jsonb (or a domain over one)
        self._key: list[str] = list(spec.table.primary_key or [])
        # merge by COPY (module docstring): whether a unique index on exactly
        # the key guards the table, and the batches to stage before trying again.
        self._unique_key = False
        self._conflicts = 0  # merges by COPY that met a key in a row
        self._stage_next = 0
        #: Merge batches written by a COPY straight into the table, and the
        #: COPYs rolled back because the table held a key of theirs.
        self.merged_by_copy = 0
        self.merge_copies_rolled_back = 0
        self._ledger = positions.Ledger(
            positions.POSTGRES,
            f"{_q(self.schema)}.{_q(positions.TABLE)}",
            ctx.pipeline.pipeline_name,
            self.id,
        )
        modes.check(self.id, spec, self._key)
        self._open_unit()
        #: Whether open() creates the positions table (a batch load keeps no positions).
        self.positions_table = True

    @property
    def database(self) -> str | None:
        """``postgres://host:port/database`` of :attr:`spec`'s url (no credentials)."""
        return database_of(self.spec.url)

    # -- lifecycle ----------------------------------------------------------

    def open(self) -> None:
        """Connect and reflect the table (its columns and primary key)."""
        try:
            self._conn = adbc.connect(self.spec.url)
            self._reflect()
            self._query("SELECT pg_advisory_xact_lock(hashtext($1))", (self._ident,))
            if not self._query("SELECT 1 FROM pg_namespace WHERE nspname = $1", (self.schema,)):
                self._execute(f"CREATE SCHEMA IF NOT EXISTS {_q(self.schema)}")
            if self.positions_table:
                self._ledger.create(self._query)
            self._conn.commit()
        except adbc_driver_manager.Error as exc:
            self.close()
            raise TransientError(f"{self.id}: cannot connect: {first_line(exc)}") from exc

    def close(self) -> None:
        """Drop the connection; an uncommitted batch is rolled back by the server."""
        conn, self._conn = self._conn, None
        self._unit_done()
        if conn is not None:
            with contextlib.suppress(adbc_driver_manager.Error):
                conn.close()

    def _query(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return query(self._require(), statement, params)

    def _execute(self, statement: str) -> int:
        """Run one statement; the rows it changed (-1 when it does not say)."""
        with self._require().cursor() as cur:
            cur.execute(statement)
            return int(cur.rowcount)

    def _reflect(self) -> None:
        rows = column_rows(self._query, self.schema, self.table)
        self._columns = {r[0]: r[1] for r in rows} if rows else None
        self._json = {r[0] for r in rows if r[2]}
        if self._columns is not None and not self._key:
            self._key = primary_key(self._query, self.schema, self.table)
        if self.spec.mode == "merge" and self._columns is not None and not self._key:
            raise ConnectorError(
                f'{self.id}: mode = "merge" needs a primary key: the table has none; '
                "set [target.table] primary_key"
            )
        self._unique_key = (
            self.spec.mode == "merge"
            and self._columns is not None
            and set(self._key) in unique_indexes(self._query, self.schema, self.table)
        )

    # -- writing --------------------------------------------------------------

    def write(self, data: pa.Table) -> None:
        """Send ``data`` inside the open transaction (committed by :meth:`flush`)."""
        if data.num_rows == 0:
            return
        self._check_nested(data.schema)
        try:
            self._write(ingestable(data), data)
        except adbc_driver_manager.Error as exc:
            self._fail(exc)

    def _check_nested(self, schema: pa.Schema) -> None:
        """Refuse a nested column bound for an existing column that is not json/jsonb.

        Runs before the batch touches the connection, so none of it is written.
        """
        if self._columns is None:
            return  # the table is created with jsonb for every nested column
        for f in schema:
            if pa.types.is_nested(f.type) and f.name in self._columns and f.name not in self._json:
                raise ConnectorError(
                    f'{self.id}: column "{f.name}" is {self._columns[f.name]} in Postgres but '
                    f"the batch gives it nested values ({f.type}); a list, struct or map column "
                    "can only be written to a json or jsonb column: change the column's type "
                    "or convert the value in the pipeline"
                )

    def _write(self, data: pa.Table, batch: pa.Table) -> None:
        """Write ``data`` (:func:`ingestable` of ``batch``)."""
        first = self._fresh  # nothing of this transaction written yet
        schema = _create_schema(data.schema, batch.schema)
        self._begin(schema)
        if self.spec.mode in ("append", "truncate"):
            native = self._native(data, batch)
            if native is not None:
                self._copy_in(native)
                return
        if self.spec.mode == "merge" and first and self._merged_by_copy(data, batch):
            return
        self._staged(data)

    def _merged_by_copy(self, data: pa.Table, batch: pa.Table) -> bool:
        """Merge ``data``, the first batch of the transaction, by a COPY
        straight into the table when it can (see the module docstring); False
        when it must take the staged route (then the transaction is as it was
        before the COPY)."""
        if not self._unique_key:
            return False
        if self._stage_next:
            self._stage_next -= 1
            return False
        if any(k not in data.column_names for k in self._key):
            return False  # the staged route names the missing key
        native = self._native(data, batch)
        if native is None or _repeats_a_key(native, self._key):
            return False
        try:
            self._copy_in(native)
        except adbc_driver_manager.Error as exc:
            if getattr(exc, "sqlstate", None) not in COPY_FALLBACK:
                raise
            # The transaction held this COPY alone (and the DDL that made the
            # table fit the batch): roll it back and begin again. ADBC cannot
            # roll back to a savepoint once a statement failed.
            self._require().rollback()
            self._unit_done()
            self._reflect()
            self._begin(_create_schema(data.schema, batch.schema))
            self._stage_next = min(2**self._conflicts, 64)
            self._conflicts += 1
            self.merge_copies_rolled_back += 1
            return False
        self._conflicts = 0
        self.merged_by_copy += 1
        return True

    def _copy_in(self, native: pa.Table) -> None:
        """COPY ``native`` (:meth:`_native` of a batch) straight into the table."""
        with self._require().cursor() as cur:
            cur.adbc_ingest(self.table, native, mode="append", db_schema_name=self.schema)
        self._rows += native.num_rows

    # -- units and modes ------------------------------------------------------

    def prepare(self, schema: pa.Schema, *, create: bool = True) -> None:
        """Begin a unit for batches of ``schema``: create the table or add the
        columns it lacks (``create``; else refuse them), and in ``truncate``
        mode delete the old rows in the open transaction."""
        if not create:
            self._reflect()
            self._require_columns(schema, self._columns)
        try:
            self._begin(_create_schema(ingestable(schema.empty_table()).schema, schema))
        except adbc_driver_manager.Error as exc:
            self._fail(exc)

    def _begin(self, schema: pa.Schema) -> None:
        """Make the table fit ``schema``; at a unit's first write, begin it."""
        schema = self._with_scd2(schema)
        self._ensure_table(schema)
        self._begin_unit(self._execute, self._ident)

    def insert_select(self, select_sql: str, *, create: bool = True) -> None:
        """Write the rows of ``select_sql`` (run here) in the mode, inside the
        open transaction: they never leave the database."""
        try:
            with self._require().cursor() as cur:
                cur.execute(f"SELECT * FROM ({select_sql}) AS _sluice_q LIMIT 0")
                schema = cur.fetch_arrow_table().schema
            self.prepare(schema, create=create)
            # Straight from the query (a query's row order is its own: no sequence).
            self._apply(schema.names, f"({select_sql}) AS _sluice_q", ordered=False)
        except adbc_driver_manager.Error as exc:
            self._fail(exc)

    def _native(self, data: pa.Table, batch: pa.Table) -> pa.Table | None:
        """``data`` (:func:`ingestable` of ``batch``) cast to the table's exact
        column types, or None if it cannot be. A ``numeric(p,s)`` column is
        cast from the batch's own integers or decimals, not from the text
        :func:`ingestable` makes of a ``uint64``."""
        assert self._columns is not None
        columns = []
        for name, col in zip(data.column_names, data.columns, strict=True):
            want = _native_type(self._columns[name], batch.schema.field(name).type)
            if want is None:
                return None
            if pa.types.is_decimal(want):
                col = batch[name]
            if col.type != want:
                try:
                    col = pc.cast(col, want)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    return None
            columns.append(col)
        return pa.table(columns, names=data.column_names)

    def _staged(self, data: pa.Table) -> None:
        """Ingest into a temporary table; Postgres casts (and merges) into the target."""
        if self.spec.mode in ("merge", "scd2"):
            missing = [k for k in self._key if k not in data.column_names]
            if missing:
                raise ConnectorError(
                    f"{self.id}: {self.spec.mode} key column(s) {missing} missing from the batch"
                )
        data = data.append_column(_SEQ, pa.array(range(data.num_rows), pa.int64()))
        with self._require().cursor() as cur:
            cur.adbc_ingest(self._stage.strip('"'), data, mode="replace", temporary=True)
        self._apply(data.column_names[:-1], self._stage, ordered=True)

    def _apply(self, names: list[str], source: str, *, ordered: bool) -> None:
        """Write the rows of ``source`` (a relation with columns ``names``, and
        the sequence when ``ordered``: the last row of a key wins) in the mode."""
        assert self._columns is not None
        cols = ", ".join(_q(n) for n in names)
        select = ", ".join(f"{_q(n)}::{self._columns[n]}" for n in names)
        key = ", ".join(_q(k) for k in self._key)
        order = f"{key}, {_q(_SEQ)} DESC" if ordered else key
        last = f"SELECT DISTINCT ON ({key}) {select} FROM {source} ORDER BY {order}"
        if self.spec.mode == "merge":
            others = [n for n in names if n not in self._key]
            action = (
                "DO UPDATE SET " + ", ".join(f"{_q(n)} = EXCLUDED.{_q(n)}" for n in others)
                if others
                else "DO NOTHING"
            )
            self._rows += self._execute(
                f"INSERT INTO {self._ident} ({cols}) {last} ON CONFLICT ({key}) {action}"
            )
        elif self.spec.mode == "scd2":
            self._scd2(names, last)
        else:
            self._rows += self._execute(
                f"INSERT INTO {self._ident} ({cols}) SELECT {select} FROM {source}"
            )

    def _scd2(self, names: list[str], last: str) -> None:
        """Apply the stage's rows (the last of each key) as scd2 versions
        (:mod:`sluice.connectors.sql.modes`)."""
        rows = _q("_sluice_scd2")
        sql = modes.Scd2(self._ident, rows, self._key, names, _q)
        compare = sql.compare(self.spec.compare_columns)
        unknown = [c for c in compare if c not in names]
        if unknown:
            raise ConnectorError(f"{self.id}: compare_columns {unknown} are not in the rows")
        now = f"TIMESTAMPTZ '{modes.utc_text(self._now)}+00'"
        ts = self.spec.event_timestamp_column
        if ts is not None and ts not in names:
            raise ConnectorError(f"{self.id}: event_timestamp_column {ts!r} is not in the rows")
        valid_from = f"d.{_q(ts)}::timestamptz" if ts else now
        parts = modes.hash_parts(compare, lambda c: f"d.{_q(c)}::text")
        row_hash = f"md5(concat_ws(chr(31){''.join(', ' + p for p in parts)}))"
        self._execute(f"DROP TABLE IF EXISTS pg_temp.{rows}")
        self._execute(
            f"CREATE TEMP TABLE {rows} AS SELECT d.*, {valid_from} AS valid_from, "
            f"{row_hash} AS row_hash FROM ({last}) AS d"
        )
        self._rows += self._execute(sql.close_changed())
        if self.spec.ttl_seconds is not None:
            cutoff = self._now - timedelta(seconds=self.spec.ttl_seconds)
            self._rows += self._execute(
                sql.close_stale(now, f"TIMESTAMPTZ '{modes.utc_text(cutoff)}+00'")
            )
        self._rows += self._execute(sql.insert_new())

    def _ddl_lock(self) -> None:
        """Serialise this table's DDL with other writers' (replicas starting
        together): two concurrent ``CREATE TABLE IF NOT EXISTS`` of one name
        can fail on Postgres's catalog unique index. Held to the end of the
        transaction; then the table is reflected again under it."""
        self._query("SELECT pg_advisory_xact_lock(hashtext($1))", (self._ident,))
        self._reflect()

    def _ensure_table(self, schema: pa.Schema) -> None:
        if self._columns is None or any(f.name not in self._columns for f in schema):
            self._ddl_lock()
        if self._columns is None:
            if self.spec.mode == "merge" and not self._key:
                raise ConnectorError(
                    f'{self.id}: mode = "merge" needs [target.table] primary_key to create the table'
                )
            defs = [f"{_q(f.name)} {pg_type(f.type)}" for f in schema]
            if self._key and self.spec.mode != "scd2":  # scd2: several versions per key
                defs.append(f"PRIMARY KEY ({', '.join(_q(k) for k in self._key)})")
            self._execute(f"CREATE SCHEMA IF NOT EXISTS {_q(self.schema)}")
            self._execute(f"CREATE TABLE IF NOT EXISTS {self._ident} ({', '.join(defs)})")
            if self.spec.mode == "scd2":  # the statements find current versions by key
                keys = ", ".join(_q(k) for k in self._key)
                self._execute(
                    f"CREATE INDEX IF NOT EXISTS {_q(self.table + '_current')} "
                    f"ON {self._ident} ({keys}) WHERE is_current"
                )
            self._reflect()
            return
        added = False
        for f in schema:
            if f.name not in self._columns:
                self._execute(
                    f"ALTER TABLE {self._ident} ADD COLUMN IF NOT EXISTS {_q(f.name)} {pg_type(f.type)}"
                )
                added = True
        if added:
            self._reflect()

    def held_positions(self) -> dict[str, Position]:
        """See :class:`~sluice.connectors.sql.positions.RecordsPositions`."""
        return self._ledger.held_committed(
            self._query, self._require(), (adbc_driver_manager.Error,), self._fail
        )

    def stage_positions(
        self, positions: Mapping[str, Position], also: Callable[[Any], None] | None = None
    ) -> None:
        """See :class:`~sluice.connectors.sql.positions.RecordsPositions`."""
        self._ledger.stage(positions, also)

    def flush(self) -> None:
        """Record the staged positions, then commit the transaction holding
        every batch written since the last flush and them (see
        :meth:`~sluice.connectors.sql.positions.Ledger.flush`)."""
        self._ledger.flush(
            self._query, self._require(), (adbc_driver_manager.Error,), self._fail, self._reflect
        )
        self._committed = self._rows
        self._unit_done()

    def _fail(self, exc: Exception) -> NoReturn:
        """Classify a failure: a dead connection is transient, anything else fatal."""
        self._unit_done()
        if not alive(self._conn):
            self.close()
            raise TransientError(f"{self.id}: connection lost: {first_line(exc)}") from exc
        self._reflect()  # DDL of the failed transaction rolled back too
        raise ConnectorError(f"{self.id}: {first_line(exc)}") from exc

    def _require(self) -> Any:
        if self._conn is None:
            raise TransientError(f"{self.id}: not connected")
        return self._conn


def _create_schema(data: pa.Schema, batch: pa.Schema) -> pa.Schema:
    """The schema a table is created from: ``data``'s (:func:`ingestable` of a
    batch whose schema is ``batch``), a nested or ``uint64`` column from its own
    type (jsonb, numeric(20,0)) rather than the text it is sent as."""
    own = {f.name: f for f in batch}

    def sent_as_text(t: pa.DataType) -> bool:
        return bool(pa.types.is_nested(t) or pa.types.is_uint64(t))

    return pa.schema([own[f.name] if sent_as_text(own[f.name].type) else f for f in data])


# -- connection helpers (shared with the CDC session) ---------------------------

Query = Callable[[str, tuple[Any, ...]], list[tuple[Any, ...]]]


def query(conn: Any, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement on ``conn``; its rows (none for a statement without)."""
    with conn.cursor() as cur:
        cur.execute(statement, params or None)
        try:
            return list(cur.fetchall())
        except adbc_driver_manager.Error:
            return []


def alive(conn: Any) -> bool:
    """Roll ``conn``'s transaction back; whether the connection still answers."""
    if conn is None:
        return False
    try:
        conn.rollback()
        query(conn, "SELECT 1")
    except adbc_driver_manager.Error:
        return False
    return True


def column_rows(run: Query, schema: str, table: str) -> list[tuple[Any, ...]]:
    """(name, format_type(), is json / jsonb) of each column of ``schema.table``, in
    order; none when the table does not exist."""
    return run(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod), "
        f"COALESCE(NULLIF(t.typbasetype, 0), t.oid) IN {JSON_OIDS} FROM pg_attribute a "
        "JOIN pg_type t ON t.oid = a.atttypid "
        "JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped "
        "ORDER BY a.attnum",
        (schema, table),
    )


def primary_key(run: Query, schema: str, table: str) -> list[str]:
    """The primary key columns of ``schema.table``, in key order."""
    keys = run(
        "SELECT a.attname FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
        "WHERE n.nspname = $1 AND c.relname = $2 AND i.indisprimary "
        "ORDER BY array_position(i.indkey, a.attnum)",
        (schema, table),
    )
    return [str(k[0]) for k in keys]


def unique_indexes(run: Query, schema: str, table: str) -> list[set[str]]:
    """The column sets of ``schema.table``'s unique indexes that ``ON
    CONFLICT`` can name (not partial, no expressions, not deferred)."""
    rows = run(
        "SELECT i.indexrelid::bigint, a.attname FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
        "WHERE n.nspname = $1 AND c.relname = $2 AND i.indisunique AND i.indimmediate "
        "AND i.indpred IS NULL AND i.indexprs IS NULL",
        (schema, table),
    )
    sets: dict[int, set[str]] = {}
    for index, column in rows:
        sets.setdefault(int(index), set()).add(str(column))
    return list(sets.values())


def _repeats_a_key(data: pa.Table, key: list[str]) -> bool:
    """Whether two rows of ``data`` share a key (the staged route keeps the last)."""
    if len(key) == 1:
        return bool(pc.count_distinct(data[key[0]], mode="all").as_py() != data.num_rows)
    return bool(data.select(key).group_by(key).aggregate([]).num_rows != data.num_rows)


def database_of(url: str) -> str:
    """``postgres://host:port/database`` of a Postgres url: what two urls must
    share to reach the same database (credentials and options left out)."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    return f"postgres://{host}:{parts.port or 5432}/{parts.path.lstrip('/') or 'postgres'}"


def first_line(exc: BaseException) -> str:
    """The first line of an error's text (the driver adds detail lines)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def build_target(spec: PostgresTargetSpec, ctx: Context, index: int) -> PostgresTarget:
    """Registry hook."""
    return PostgresTarget(spec, ctx, index)
