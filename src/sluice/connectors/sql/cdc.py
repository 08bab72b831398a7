"""CDC apply into SQL tables: Postgres, MySQL / MariaDB, SQLite, DuckDB.

One batch is one transaction of the target database, set-based from start to
end (no statement per row):

1. The change events are bulk-loaded into a temporary table (Postgres: ADBC
   binary COPY; MySQL: ``LOAD DATA``; DuckDB: Arrow scan; SQLite:
   ``executemany``).
2. The gate table (``_sluice_cdc_gate``, beside the mirror table, keyed by
   pipeline, table and key) gets a row for each new key, and the batch's gate
   rows are locked (``SELECT ... FOR UPDATE``; SQLite takes the database lock
   at ``BEGIN IMMEDIATE``), so two processes never apply the same key at once.
3. The events newer than their key's gate row are kept, ranked per key
   (:mod:`sluice.connectors.cdc_apply` has the rules); counted by op.
4. The newest event per key is converted to the table's column types by the
   database's JSON functions — Postgres ``jsonb_populate_record``, MySQL
   ``JSON_EXTRACT``, SQLite ``json_extract``, DuckDB ``json_extract`` plus a
   cast — into a typed temporary table, and applied: delete (or set the soft
   delete column), update the existing rows (the columns present in each
   image), insert the missing ones.
5. The gate rows take the applied versions; :meth:`flush` commits.

The primary key is ``[target.table] primary_key`` or reflected from the table.
A missing table is created from the first batch's images (types inferred from
the JSON values) with that key, or the ``key_field`` column, and the gate rows
a former table of that name left are forgotten. A missing
``soft_delete_column`` is added (a timestamp). MySQL commits DDL implicitly,
so columns are added before the batch touches anything else.

The gate keeps one row per key ever seen, deleted keys included (that is what
stops an old create from bringing a deleted row back). To rebuild a mirror
from the start of its topic, drop the table (sluice creates it again) or
delete its rows from ``_sluice_cdc_gate`` along with the table's.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any, Protocol

import msgspec
import pyarrow as pa

from sluice.config.spec import CdcSpec
from sluice.connectors.cdc_apply import (
    GATE_TABLE,
    NEVER,
    Applied,
    Evolution,
    changes_of,
    key_columns,
    table_types,
)
from sluice.connectors.registry import Context
from sluice.errors import ConnectorError, SluiceError, TransientError
from sluice.formats import cdc as env

log = logging.getLogger(__name__)

EV_TABLE = "_sluice_cdc_ev"  # the batch's events
ACC_TABLE = "_sluice_cdc_acc"  # the events the gate accepted, ranked per key
TYPED_TABLE = "_sluice_cdc_tw"  # the newest accepted event per key, typed as the table
OP_COLUMN = "_sluice_op"
IMAGE_COLUMN = "_sluice_img"

EV_COLUMNS = ["k", "op", "ts", "seq", "hash", "n", "img"]
_GATE_COLUMNS = "pipeline, tbl, k, ts_ms, seq, hash"

#: New gate keys that trigger an ANALYZE of the gate table (see :meth:`SqlCdcTarget._gate`).
_ANALYZE_AFTER_KEYS = 1000

Rows = list[tuple[Any, ...]]
#: Runs one statement (with its parameters) in the open transaction: its rows, if any.
Query = Callable[[str, tuple[Any, ...]], Rows]


def _events(changes: pa.Table) -> pa.Table:
    """The change table as the staged events: short names plus read order ``n``."""
    return pa.table(
        [
            changes[env.KEY],
            changes[env.OP],
            changes[env.TS],
            changes[env.SEQ],
            changes[env.HASH],
            pa.array(range(changes.num_rows), pa.int64()),
            changes[env.IMAGE],
        ],
        names=EV_COLUMNS,
    )


# -- the two parts a system provides ------------------------------------------------


class Session(Protocol):
    """One connection to the database, owned by one CDC target.

    Every method but :meth:`connect` needs a connected session; a driver
    failure raises :attr:`error` (classified by :meth:`failure`).
    """

    @property
    def error(self) -> type[Exception]:
        """The base class of the driver's errors."""

    def connect(self) -> None:
        """Connect (replacing a previous connection). Raises :class:`TransientError`
        when the database cannot be reached and a retry may succeed."""

    def close(self) -> None:
        """Drop the connection; an uncommitted batch is rolled back. Never raises."""

    def execute(self, statement: str, params: tuple[Any, ...] = ()) -> Rows:
        """Run one statement in the open transaction; its rows, if any."""

    def load(self, name: str, data: pa.Table) -> None:
        """Bulk-load ``data`` into the temporary table ``name``: into the table the
        dialect's :meth:`Dialect.stage_events` statements just created or, when they
        create none, a new one replacing any table of that name."""

    def begin(self) -> None:
        """Start the batch's transaction (a no-op where the driver begins on its own)."""

    def commit(self) -> None:
        """Commit the open transaction, if any."""

    def rollback(self) -> None:
        """Roll the open transaction back. Never raises."""

    def failure(self, exc: Exception, *, committing: bool) -> ConnectorError:
        """Roll back after the driver error ``exc`` and say what to raise:
        :class:`TransientError` when a retry of the batch may succeed (a lost
        connection is closed), :class:`ConnectorError` otherwise. ``committing``:
        ``exc`` came from :meth:`commit`."""


class ServerSession:
    """What the sessions of a database server (Postgres, MySQL) share: one
    connection, autocommit off (the driver begins each transaction on its own),
    and a lost connection is a :class:`TransientError`."""

    #: The base class of the driver's errors.
    error: type[Exception] = Exception

    def __init__(self, target_id: str) -> None:
        self.id = target_id
        self._conn: Any = None

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(self.error, OSError):
                conn.close()

    def begin(self) -> None:
        """The driver begins a transaction on its own."""

    def commit(self) -> None:
        self._require().commit()

    def rollback(self) -> None:
        with contextlib.suppress(self.error, ConnectorError):
            self._require().rollback()

    def _require(self) -> Any:
        if self._conn is None:
            raise TransientError(f"{self.id}: not connected")
        return self._conn


class Dialect:
    """The SQL text of one database: quoting, types, DDL and DML.

    Pure text, no connection. The defaults are the Postgres / DuckDB spelling
    (double-quoted, schema-qualified names); each system overrides what differs.
    The mirror table is ``ident``, the gate table ``gate`` (beside it), and the
    gate rows name the table ``table_name``.
    """

    #: Column names compare case-insensitively (MySQL).
    casefold = False

    def __init__(self, schema: str, table: str) -> None:
        self.schema = schema
        self.table = table
        self.ident = self.qualify(table)
        self.gate = self.qualify(GATE_TABLE)
        self.table_name = f"{schema}.{table}"

    # -- names and values

    def q(self, name: str) -> str:
        """``name`` quoted as an identifier."""
        return '"' + name.replace('"', '""') + '"'

    def qualify(self, name: str) -> str:
        """The table ``name`` in the mirror table's schema, quoted."""
        return f"{self.q(self.schema)}.{self.q(name)}"

    def literal(self, text: str) -> str:
        """``text`` as a SQL string literal."""
        return "'" + text.replace("'", "''") + "'"

    def json_path(self, column: str) -> str:
        """The JSON path of a top-level key, as a SQL literal (``'$."col"'``)."""
        return self.literal("$." + msgspec.json.encode(column).decode())

    def is_boolean(self, sql_type: str) -> bool:
        """Whether a column of this type takes true / false (a boolean soft delete column)."""
        return sql_type.lower() in ("boolean", "bool", "tinyint(1)")

    # -- what each system must say

    def sql_type(self, t: pa.DataType, *, key: bool = False) -> str:
        """The column type to create for an Arrow type."""
        raise NotImplementedError

    def typed(self, column: str, column_type: str, image: str) -> str:
        """``column``'s value in the JSON ``image``, converted to ``column_type``."""
        raise NotImplementedError

    def present(self, column: str, image: str) -> str:
        """True when the JSON ``image`` has the key ``column``."""
        raise NotImplementedError

    def now(self) -> str:
        """The current time, for a soft delete."""
        raise NotImplementedError

    #: The gate table's column types: (pipeline and table names, keys, integers),
    #: and what follows its column list (e.g. a storage engine).
    gate_types: tuple[str, str, str] = ("text", "text", "bigint")
    gate_suffix = ""

    def gate_ddl(self) -> str:
        """CREATE TABLE IF NOT EXISTS of the gate table."""
        name, key, num = self.gate_types
        return (
            f"CREATE TABLE IF NOT EXISTS {self.gate} (pipeline {name} NOT NULL, "
            f"tbl {name} NOT NULL, k {key} NOT NULL, ts_ms {num} NOT NULL, "
            f"seq {num} NOT NULL, hash {num} NOT NULL, PRIMARY KEY (pipeline, tbl, k))"
            f"{self.gate_suffix}"
        )

    def reflect(self, query: Query) -> tuple[dict[str, str] | None, list[str]]:
        """The table's columns (name -> type) or None when missing, and its primary key."""
        raise NotImplementedError

    # -- schema and table

    def schema_exists(self) -> str | None:
        """A query giving a row when the schema exists (None: create it unconditionally)."""
        return None

    def create_schema(self) -> str | None:
        """CREATE of the mirror table's schema, if missing (None: the system has none)."""
        return f"CREATE SCHEMA IF NOT EXISTS {self.q(self.schema)}"

    def create_table(self, definitions: list[str]) -> str:
        """CREATE the mirror table with these column / key definitions."""
        return f"CREATE TABLE IF NOT EXISTS {self.ident} ({', '.join(definitions)})"

    def add_columns(self, types: dict[str, str]) -> list[str]:
        """ALTER the mirror table: add nullable columns (name -> SQL type)."""
        return [f"ALTER TABLE {self.ident} ADD COLUMN {self.q(n)} {t}" for n, t in types.items()]

    # -- staging and the gate

    def stage_events(self) -> list[str]:
        """The statements creating ``EV_TABLE`` before :meth:`Session.load` fills it
        (none: the load creates it)."""
        return []

    def temp_table_as(self, name: str, select: str) -> str:
        """CREATE a temporary table from a query (dropped by :meth:`drop_temp`)."""
        return f"CREATE TEMP TABLE {name} AS {select}"

    def drop_temp(self, name: str) -> str:
        """Drop a temporary table if it exists."""
        return f"DROP TABLE IF EXISTS {name}"

    def analyze(self, name: str) -> str | None:
        """Statistics for the planner of a table just filled (None: not needed)."""
        return None

    def gate_rows(self) -> str | None:
        """A query giving the gate table's estimated row count, when the gate is
        re-analyzed as it grows (:meth:`add_keys` then returns the keys added)."""
        return None

    def insert_ignore(self, table: str, columns: str, select: str) -> str:
        """INSERT of ``select`` that skips rows whose key exists."""
        return f"INSERT INTO {table} ({columns}) {select} ON CONFLICT DO NOTHING"

    def add_keys(self, select: str) -> str:
        """Insert a gate row (version :data:`NEVER`) for each new key ``select`` gives."""
        return self.insert_ignore(self.gate, _GATE_COLUMNS, select)

    def lock_gate(self, scope: str) -> str | None:
        """Lock the batch's gate rows (alias g, ``scope`` selects this table's) until the
        commit, in key order: two processes owning the same keys for a moment, during a
        rebalance, then wait for each other instead of deadlocking. None: the
        transaction holds the database already."""
        return (
            f"SELECT COUNT(*) FROM (SELECT 1 FROM {self.gate} g WHERE {scope} "
            f"AND g.k IN (SELECT k FROM {EV_TABLE}) ORDER BY g.k FOR UPDATE) x"
        )

    def update_gate(self, where: str) -> str:
        """Move the gate rows of the applied keys to their new version."""
        return (
            f"UPDATE {self.gate} AS g SET ts_ms = a.ts, seq = a.seq, hash = a.hash "
            f"FROM {ACC_TABLE} a WHERE {where}"
        )

    # -- writing the mirror table

    def create_typed(self, columns: list[str], types: dict[str, str]) -> list[str]:
        """Create ``TYPED_TABLE`` from ``ACC_TABLE``'s newest events: the table's columns
        typed (``columns`` from the images, the rest null) plus ``OP_COLUMN`` and
        ``IMAGE_COLUMN``; ``types``: the table's column types."""
        values = ", ".join(f"{self.typed(c, types[c], 'a.img')} AS {self.q(c)}" for c in columns)
        return [
            self.temp_table_as(
                TYPED_TABLE,
                f"SELECT {values}, a.op AS {OP_COLUMN}, a.img AS {IMAGE_COLUMN} FROM {ACC_TABLE} a WHERE a.rk = 1",
            )
        ]

    def update_from(self, sets: list[str], source: str, where: str) -> str:
        """UPDATE the mirror table (alias t) from ``source`` (alias w)."""
        return f"UPDATE {self.ident} AS t SET {', '.join(sets)} FROM {source} w WHERE {where}"

    def set_target(self, column: str) -> str:
        """A column on the left of SET in :meth:`update_from`."""
        return self.q(column)

    def delete_from(self, source: str, where: str) -> str:
        """DELETE the mirror rows matching ``source`` (alias w)."""
        return f"DELETE FROM {self.ident} AS t USING {source} w WHERE {where}"


class EmbeddedDialect(Dialect):
    """What the SQLite and DuckDB dialects share: one file, one process, no locks."""

    def insert_ignore(self, table: str, columns: str, select: str) -> str:
        return f"INSERT OR IGNORE INTO {table} ({columns}) {select}"

    def drop_temp(self, name: str) -> str:
        return f"DROP TABLE IF EXISTS temp.{name}"

    def lock_gate(self, scope: str) -> str | None:
        """SQLite's ``BEGIN IMMEDIATE`` holds the write lock; one process holds a DuckDB file."""
        return None


def embedded_failure(target_id: str, exc: Exception, *, committing: bool) -> ConnectorError:
    """What an embedded database's driver error means: always fatal (there is no
    connection to lose)."""
    if committing:
        return ConnectorError(f"{target_id}: commit failed: {exc}")
    return ConnectorError(f"{target_id}: {exc}")


# -- the apply ----------------------------------------------------------------------


class SqlCdcTarget:
    """CDC into one SQL table, one transaction per batch (the module docstring has
    the steps). ``dialect`` writes the SQL, ``session`` runs it."""

    def __init__(
        self,
        target_id: str,
        dialect: Dialect,
        session: Session,
        cdc: CdcSpec,
        ctx: Context,
        key: list[str] | None,
        *,
        count: bool,
    ) -> None:
        """``key``: [target.table] primary_key (None: the table's, by reflection).
        ``count``: add the batch's counts to the metrics (one target per pipeline does)."""
        self.id = target_id
        self.dialect = dialect
        self.session = session
        self.cdc = cdc
        self._declared = list(key or [])
        self.pipeline = ctx.pipeline.pipeline_name
        self._decoder = env.EnvelopeDecoder(cdc, self.pipeline)
        self._key_column = self._decoder.layout.key_column
        self._evolution = Evolution(cdc, target_id, casefold=dialect.casefold)
        self._count = count
        self._pending: Applied | None = None
        self.pk: list[str] = []
        #: name -> the database's type name; None while the table does not exist.
        self.columns: dict[str, str] | None = None
        self._gate_keys = 0  # keys in the gate when it was last analyzed (about)
        self._new_keys = 0  # keys added since

    # -- lifecycle --------------------------------------------------------------

    def open(self) -> None:
        """Connect; create the schema and the gate table; reflect the table and its
        key; add a missing soft delete column. Commits.

        Raises :class:`TransientError` when the database cannot be reached,
        :class:`ConnectorError` for a table CDC cannot apply to.
        """
        d = self.dialect
        self.session.connect()
        try:
            create, exists = d.create_schema(), d.schema_exists()
            if create is not None and not (exists is not None and self._run(exists)):
                self._run(create)
            self._prepare()
            gate_rows = d.gate_rows()
            if gate_rows is not None:
                rows = self._run(gate_rows)
                self._gate_keys = max(0, int(rows[0][0])) if rows else 0
                self._new_keys = 0
        except self.session.error as exc:
            error = self._failed(exc)
            self.session.close()
            raise error from exc

    def close(self) -> None:
        """Close the session; an uncommitted batch is rolled back."""
        self.session.close()

    def _prepare(self) -> None:
        self.columns, reflected = self._reflect()
        fold = self.dialect.casefold
        self._evolution = Evolution(self.cdc, self.id, casefold=fold)  # warns anew
        if self.columns is not None:
            self.pk = key_columns(
                self.id, self._declared, reflected, self.columns, self._key_column, casefold=fold
            )
            self._check_key_field()
        else:
            self.pk = key_columns(self.id, self._declared, [], None, self._key_column)
        self._run(self.dialect.gate_ddl())
        column = self.cdc.soft_delete_column
        if self.columns is not None and column and self._find(column) is None:
            self._add_columns({column: pa.timestamp("us", tz="UTC")})
        self.session.commit()

    # -- one batch ----------------------------------------------------------------

    def write(self, data: pa.Table) -> None:
        """Apply the change events of ``data`` in the open transaction (committed by
        :meth:`flush`). On a failure the transaction is rolled back and the error
        raised as the session classifies it (:meth:`Session.failure`)."""
        try:
            self._apply(data)
        except ConnectorError:
            self._rollback()
            raise
        except self.session.error as exc:
            raise self._failed(exc) from exc

    def _apply(self, data: pa.Table) -> None:
        d, run = self.dialect, self._run
        # 1. The change table; a batch without changes does nothing.
        changes = changes_of(data, self._decoder, self.id)
        if changes.num_rows == 0:
            return
        # 2. The table: created when missing, new image columns per
        #    schema_evolution. Before the batch's transaction: MySQL commits DDL.
        if self.columns is None:
            self._create(changes)
        assert self.columns is not None
        present, added = self._evolution.check(changes, self.columns)
        if added:
            self._add_columns(added)
            present = [*present, *added]
        # 3. The events into EV_TABLE, one bulk load.
        self.session.begin()
        for statement in d.stage_events():
            run(statement)
        self.session.load(EV_TABLE, _events(changes))
        # 4. The gate: the events newer than their key's version, ranked per key.
        counts = self._gate()
        applied = Applied()
        applied.add_ops(counts, changes.num_rows)
        # 5. The newest accepted event per key written, the gate moved to it.
        if counts:
            self._write_newest(present, counts)
            run(d.update_gate(f"{self._gate_scope('g')} AND g.k = a.k AND a.rk = 1"))
        self._pending = applied

    def flush(self) -> None:
        """Commit the batches written since the last flush, then count them."""
        try:
            self.session.commit()
        except self.session.error as exc:
            raise self._failed(exc, committing=True) from exc
        applied, self._pending = self._pending, None
        if applied is not None and self._count:
            applied.record(self.pipeline)

    # -- the steps ------------------------------------------------------------------

    def _gate(self) -> dict[str, int]:
        """Fill ``ACC_TABLE`` with the events newer than their key's gate row,
        ranked per key (1 = newest); the accepted events by op letter."""
        d, run = self.dialect, self._run
        self._analyze(EV_TABLE)
        added = run(
            d.add_keys(
                f"SELECT DISTINCT {d.literal(self.pipeline)}, {d.literal(d.table_name)}, "
                f"k, {NEVER}, -1, 0 FROM {EV_TABLE} ORDER BY k"
            )
        )
        if d.gate_rows() is not None:
            self._grown(int(added[0][0]) if added else 0)
        lock = d.lock_gate(self._gate_scope("g"))
        if lock is not None:
            run(lock)
        run(d.drop_temp(ACC_TABLE))
        newer = "e.ts > g.ts_ms OR (e.ts = g.ts_ms AND e.seq > g.seq AND e.hash <> g.hash)"
        run(
            d.temp_table_as(
                ACC_TABLE,
                "SELECT e.k, e.op, e.ts, e.seq, e.hash, e.img, ROW_NUMBER() OVER "
                "(PARTITION BY e.k ORDER BY e.ts DESC, e.seq DESC, e.n DESC) AS rk "
                f"FROM {EV_TABLE} e JOIN {d.gate} g ON {self._gate_scope('g')} AND g.k = e.k "
                f"WHERE {newer}",
            )
        )
        self._analyze(ACC_TABLE)
        rows = run(f"SELECT op, COUNT(*) FROM {ACC_TABLE} GROUP BY op")
        return {str(op): int(n) for op, n in rows}

    def _grown(self, keys: int) -> None:
        """``keys`` new gate keys. The gate joins are planned from the gate table's
        statistics; a gate that grew since autovacuum last analyzed it (a new
        pipeline grows by thousands of keys a second) would get nested loops over
        the whole scope. So it is analyzed once it grew by a fifth (at least
        :data:`_ANALYZE_AFTER_KEYS` keys)."""
        self._new_keys += keys
        if self._new_keys >= max(_ANALYZE_AFTER_KEYS, self._gate_keys // 5):
            self._analyze(self.dialect.gate)
            self._gate_keys += self._new_keys
            self._new_keys = 0

    def _analyze(self, name: str) -> None:
        statement = self.dialect.analyze(name)
        if statement is not None:
            self._run(statement)

    def _write_newest(self, present: list[str], counts: dict[str, int]) -> None:
        """Delete, update and insert the newest accepted event of each key.

        ``present``: the table columns some upsert image of the batch has;
        only they (and the key, and the soft delete column) are written.
        """
        assert self.columns is not None
        d, run, q = self.dialect, self._run, self.dialect.q
        pk = [self._find(k) or k for k in self.pk]
        soft = self._find(self.cdc.soft_delete_column) if self.cdc.soft_delete_column else None
        wanted = list(dict.fromkeys([*pk, *(self._find(c) or c for c in present)]))
        if soft and soft not in wanted:
            wanted.append(soft)
        run(d.drop_temp(TYPED_TABLE))
        for statement in d.create_typed([c for c in self.columns if c in wanted], self.columns):
            run(statement)
        match = " AND ".join(f"t.{q(k)} = w.{q(k)}" for k in pk)
        is_delete = f"w.{OP_COLUMN} = 'd'"
        if counts.get("d"):
            if self.cdc.delete_mode == "soft":
                assert soft is not None
                mark = "TRUE" if d.is_boolean(self.columns[soft]) else d.now()
                sets = [f"{d.set_target(soft)} = {mark}"]
                run(d.update_from(sets, TYPED_TABLE, f"{match} AND {is_delete}"))
            else:
                run(d.delete_from(TYPED_TABLE, f"{match} AND {is_delete}"))
        if sum(counts.values()) == counts.get("d", 0):
            return
        sets = []
        for c in wanted:
            if c in pk:
                continue
            # A key missing from the image keeps the column's value; a write
            # after a soft delete clears the mark.
            kept = f"t.{q(c)}"
            if c == soft:
                kept = "FALSE" if d.is_boolean(self.columns[c]) else "NULL"
            given = d.present(c, f"w.{IMAGE_COLUMN}")
            sets.append(f"{d.set_target(c)} = CASE WHEN {given} THEN w.{q(c)} ELSE {kept} END")
        if sets:
            run(d.update_from(sets, TYPED_TABLE, f"{match} AND NOT {is_delete}"))
        cols = ", ".join(q(c) for c in wanted)
        run(
            f"INSERT INTO {d.ident} ({cols}) SELECT {', '.join('w.' + q(c) for c in wanted)} "
            f"FROM {TYPED_TABLE} w WHERE NOT {is_delete} AND NOT EXISTS "
            f"(SELECT 1 FROM {d.ident} t WHERE {match})"
        )

    def _create(self, changes: pa.Table) -> None:
        """Create the missing table from the images of ``changes``: their columns,
        typed from their JSON values, keyed on :attr:`pk`."""
        d = self.dialect
        types = table_types(changes)
        missing = [k for k in self.pk if k not in types]
        if missing:
            raise ConnectorError(
                f"{self.id}: cannot create the table: primary key column(s) {missing} are not "
                "in the change events"
            )
        column = self.cdc.soft_delete_column
        if column and column not in types:
            types[column] = pa.timestamp("us", tz="UTC")
        defs = [f"{d.q(n)} {d.sql_type(t, key=n in self.pk)}" for n, t in types.items()]
        defs.append(f"PRIMARY KEY ({', '.join(d.q(k) for k in self.pk)})")
        self._run(d.create_table(defs))
        # A new table holds nothing: versions kept for a table of that name
        # (dropped to be rebuilt from the topic's start) would gate out its rows.
        self._run(f"DELETE FROM {d.gate} WHERE {self._gate_scope()}")
        self.columns, _ = self._reflect()
        if self.columns is None:
            raise ConnectorError(f"{self.id}: the table was created but cannot be found")

    def _add_columns(self, types: dict[str, pa.DataType]) -> None:
        d = self.dialect
        for statement in d.add_columns({n: d.sql_type(t) for n, t in types.items()}):
            self._run(statement)
        self.columns, _ = self._reflect()

    # -- helpers ----------------------------------------------------------------------

    def _run(self, statement: str) -> Rows:
        return self.session.execute(statement)

    def _reflect(self) -> tuple[dict[str, str] | None, list[str]]:
        return self.dialect.reflect(self.session.execute)

    def _gate_scope(self, alias: str = "") -> str:
        """The condition selecting this pipeline's gate rows of this table."""
        d, at = self.dialect, f"{alias}." if alias else ""
        return f"{at}pipeline = {d.literal(self.pipeline)} AND {at}tbl = {d.literal(d.table_name)}"

    def _check_key_field(self) -> None:
        column = self._key_column
        if column is not None and self.columns is not None and self._find(column) is None:
            raise ConnectorError(
                f"{self.id}: key_field '{self.cdc.key_field}' names column '{column}', which "
                f"the table does not have (it has {', '.join(self.columns)})"
            )

    def _find(self, name: str) -> str | None:
        """The table's spelling of column ``name`` (None when it has none)."""
        if self.columns is None:
            return None
        if name in self.columns:
            return name
        if self.dialect.casefold:
            for column in self.columns:
                if column.lower() == name.lower():
                    return column
        return None

    def _failed(self, exc: Exception, *, committing: bool = False) -> ConnectorError:
        """A driver error: rolled back, classified by the session; the columns
        reflected again (an ALTER of the batch rolled back too)."""
        error = self.session.failure(exc, committing=committing)
        if not isinstance(error, TransientError):  # a retry reopens, and reflects then
            self._refresh()
        return error

    def _rollback(self) -> None:
        self.session.rollback()
        self._refresh()

    def _refresh(self) -> None:
        with contextlib.suppress(self.session.error, SluiceError):
            self.columns, _ = self._reflect()
