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

import logging
from abc import ABC, abstractmethod
from typing import Any

import msgspec
import pyarrow as pa

from sluice.config.spec import CdcSpec
from sluice.connectors.cdc_apply import (
    GATE_TABLE,
    NEVER,
    Applied,
    Evolution,
    changes_of,
    image_columns,
    infer_types,
    key_columns,
)
from sluice.connectors.registry import Context
from sluice.errors import ConnectorError
from sluice.formats import cdc as env

log = logging.getLogger(__name__)

EV_TABLE = "_sluice_cdc_ev"  # the batch's events
ACC_TABLE = "_sluice_cdc_acc"  # the events the gate accepted, ranked per key
TYPED_TABLE = "_sluice_cdc_tw"  # the newest accepted event per key, typed as the table
OP_COLUMN = "_sluice_op"
IMAGE_COLUMN = "_sluice_img"

EV_COLUMNS = ["k", "op", "ts", "seq", "hash", "n", "img"]


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


class SqlCdcTarget(ABC):
    """The apply steps shared by the SQL databases; each subclass says how its
    database connects, quotes, converts JSON and reports errors."""

    id: str
    #: Column names compare case-insensitively (MySQL).
    casefold = False

    def __init__(self, cdc: CdcSpec, ctx: Context, key: list[str] | None, *, count: bool) -> None:
        """``key``: [target.table] primary_key (None: the table's, by reflection)."""
        self.cdc = cdc
        self._declared = list(key or [])
        self.pipeline = ctx.pipeline.pipeline_name
        self._decoder = env.EnvelopeDecoder(cdc, self.pipeline)
        self._key_column = self._decoder.layout.key_column
        self._evolution: Evolution | None = None
        self._count = count
        self._pending: Applied | None = None
        self.pk: list[str] = []
        #: name -> the database's type name; None while the table does not exist.
        self.columns: dict[str, str] | None = None

    # -- what each database provides -----------------------------------------------

    @abstractmethod
    def q(self, name: str) -> str:
        """``name`` quoted as an identifier."""

    @property
    @abstractmethod
    def ident(self) -> str:
        """The mirror table, qualified and quoted."""

    @property
    @abstractmethod
    def gate(self) -> str:
        """The gate table, qualified and quoted."""

    @property
    @abstractmethod
    def table_name(self) -> str:
        """The mirror table as the gate rows name it (``schema.table``)."""

    @abstractmethod
    def run(self, statement: str) -> list[tuple[Any, ...]]:
        """Execute one statement in the open transaction; its rows, if any."""

    @abstractmethod
    def stage(self, events: pa.Table) -> None:
        """Load ``events`` into the temporary table ``EV_TABLE`` (replacing it)."""

    @abstractmethod
    def reflect(self) -> tuple[dict[str, str] | None, list[str]]:
        """The table's columns (name -> type) or None when missing, and its primary key."""

    @abstractmethod
    def sql_type(self, t: pa.DataType, *, key: bool = False) -> str:
        """The column type to create for an Arrow type."""

    @abstractmethod
    def typed(self, column: str, image: str) -> str:
        """``column``'s value in the JSON ``image``, converted to the column's type."""

    @abstractmethod
    def present(self, column: str, image: str) -> str:
        """True when the JSON ``image`` has the key ``column``."""

    @abstractmethod
    def now(self) -> str:
        """The current time, for a soft delete."""

    def literal(self, text: str) -> str:
        """``text`` as a SQL string literal."""
        return "'" + text.replace("'", "''") + "'"

    def json_path(self, column: str) -> str:
        """The JSON path of a top-level key, as a SQL literal (``'$."col"'``)."""
        return self.literal("$." + msgspec.json.encode(column).decode())

    def is_boolean(self, sql_type: str) -> bool:
        """Whether a column of this type takes true / false (a boolean soft delete column)."""
        return sql_type.lower() in ("boolean", "bool", "tinyint(1)")

    def begin(self) -> None:  # noqa: B027 - a hook: most drivers begin on their own
        """Start the batch's transaction (when the driver does not on its own)."""

    def analyze(self, name: str) -> None:  # noqa: B027 - a hook: only Postgres needs it
        """Give the planner statistics of a temporary table just filled."""

    def lock_gate(self) -> None:
        """Lock the batch's gate rows until the commit, in key order (two
        processes owning the same keys for a moment, during a rebalance, then
        wait for each other instead of deadlocking)."""
        self.run(
            f"SELECT COUNT(*) FROM (SELECT 1 FROM {self.gate} g WHERE {self._gate_scope('g')} "
            f"AND g.k IN (SELECT k FROM {EV_TABLE}) ORDER BY g.k FOR UPDATE) x"
        )

    def insert_ignore(self, table: str, columns: str, select: str) -> str:
        """INSERT of ``select`` that skips rows whose key exists."""
        return f"INSERT INTO {table} ({columns}) {select} ON CONFLICT DO NOTHING"

    def add_keys(self, select: str) -> None:
        """Insert a gate row (version :data:`NEVER`) for each new key ``select`` gives."""
        self.run(self.insert_ignore(self.gate, "pipeline, tbl, k, ts_ms, seq, hash", select))

    def temp_table_as(self, name: str, select: str) -> str:
        """CREATE a temporary table from a query (dropped by :meth:`drop_temp`)."""
        return f"CREATE TEMP TABLE {name} AS {select}"

    def drop_temp(self, name: str) -> None:
        """Drop a temporary table if it exists."""
        self.run(f"DROP TABLE IF EXISTS {name}")

    def update_from(self, sets: list[str], source: str, where: str) -> str:
        """UPDATE the mirror table (alias t) from ``source`` (alias w)."""
        return f"UPDATE {self.ident} AS t SET {', '.join(sets)} FROM {source} w WHERE {where}"

    def update_gate(self, where: str) -> str:
        """Move the gate rows of the applied keys to their new version."""
        return (
            f"UPDATE {self.gate} AS g SET ts_ms = a.ts, seq = a.seq, hash = a.hash "
            f"FROM {ACC_TABLE} a WHERE {where}"
        )

    def delete_from(self, source: str, where: str) -> str:
        """DELETE the mirror rows matching ``source`` (alias w)."""
        return f"DELETE FROM {self.ident} AS t USING {source} w WHERE {where}"

    def set_target(self, column: str) -> str:
        """A column on the left of SET in :meth:`update_from`."""
        return self.q(column)

    @abstractmethod
    def gate_ddl(self) -> str:
        """CREATE TABLE IF NOT EXISTS of the gate table."""

    def create_typed(self, columns: list[str]) -> None:
        """Create ``TYPED_TABLE`` from ``ACC_TABLE``'s newest events: the table's columns typed
        (``columns`` from the images, the rest null) plus ``OP_COLUMN`` and ``IMAGE_COLUMN``."""
        values = ", ".join(f"{self.typed(c, 'a.img')} AS {self.q(c)}" for c in columns)
        self.run(
            self.temp_table_as(
                TYPED_TABLE,
                f"SELECT {values}, a.op AS {OP_COLUMN}, a.img AS {IMAGE_COLUMN} FROM {ACC_TABLE} a WHERE a.rk = 1",
            )
        )

    # -- lifecycle --------------------------------------------------------------

    def prepare(self) -> None:
        """Reflect the table and key, create the gate table, add a missing soft
        delete column. Called by ``open`` after connecting; commits."""
        self.columns, reflected = self.reflect()
        declared = self._declared
        if self.columns is not None:
            self.pk = key_columns(
                self.id,
                declared,
                reflected,
                self.columns,
                self._key_column,
                casefold=self.casefold,
            )
            self._check_key_field()
        else:
            self.pk = key_columns(self.id, declared, [], None, self._key_column)
        self._evolution = Evolution(self.cdc, self.id, casefold=self.casefold)
        self.run(self.gate_ddl())
        column = self.cdc.soft_delete_column
        if self.columns is not None and column and self._find(column) is None:
            self.add_columns({column: pa.timestamp("us", tz="UTC")})
        self.commit()

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
        if self.casefold:
            for column in self.columns:
                if column.lower() == name.lower():
                    return column
        return None

    @abstractmethod
    def commit(self) -> None:
        """Commit the open transaction."""

    # -- one batch ----------------------------------------------------------------

    def write(self, data: pa.Table) -> None:
        """Apply the change events of ``data`` in the open transaction (committed
        by ``flush``). On a failure the transaction is rolled back and the
        error raised as the target classifies it (:meth:`_failed`)."""
        try:
            self._write_changes(data)
        except ConnectorError:
            self._rollback()
            raise
        except self._driver_error() as exc:
            self._failed(exc)

    @abstractmethod
    def _driver_error(self) -> type[Exception]:
        """The base class of the database driver's errors."""

    @abstractmethod
    def _rollback(self) -> None:
        """Roll the open transaction back; never raises."""

    def _failed(self, exc: Exception) -> None:
        """A driver error during :meth:`write`: roll back, raise a ConnectorError."""
        self._rollback()
        raise ConnectorError(f"{self.id}: {exc}") from exc

    def _write_changes(self, data: pa.Table) -> None:
        changes = changes_of(data, self._decoder, self.id)
        if changes.num_rows == 0:
            return
        assert self._evolution is not None
        if self.columns is None:
            self._create(changes)
        assert self.columns is not None
        present, added = self._evolution.check(changes, self.columns)
        if added:
            self.add_columns(added)
            present = [*present, *added]
        self.begin()
        self.stage(_events(changes))
        applied = Applied()
        self._apply(present, changes.num_rows, applied)
        self._pending = applied

    def _create(self, changes: pa.Table) -> None:
        """Create the missing table from the images of ``changes``: their columns,
        typed from their JSON values, keyed on :attr:`pk`."""
        images = changes[env.IMAGE].combine_chunks()
        types = infer_types(images, image_columns(images))
        missing = [k for k in self.pk if k not in types]
        if missing:
            raise ConnectorError(
                f"{self.id}: cannot create the table: primary key column(s) {missing} are not "
                "in the change events"
            )
        column = self.cdc.soft_delete_column
        if column and column not in types:
            types[column] = pa.timestamp("us", tz="UTC")
        defs = [f"{self.q(n)} {self.sql_type(t, key=n in self.pk)}" for n, t in types.items()]
        defs.append(f"PRIMARY KEY ({', '.join(self.q(k) for k in self.pk)})")
        self.create_table(defs)
        # A new table holds nothing: versions kept for a table of that name
        # (dropped to be rebuilt from the topic's start) would gate out its rows.
        self.run(f"DELETE FROM {self.gate} WHERE {self._gate_scope()}")
        self.columns, _ = self.reflect()
        if self.columns is None:
            raise ConnectorError(f"{self.id}: the table was created but cannot be found")

    def create_table(self, definitions: list[str]) -> None:
        """CREATE the mirror table with these column / key definitions."""
        self.run(f"CREATE TABLE IF NOT EXISTS {self.ident} ({', '.join(definitions)})")

    def add_columns(self, types: dict[str, pa.DataType]) -> None:
        """ALTER the mirror table: add nullable columns."""
        for name, t in types.items():
            self.run(f"ALTER TABLE {self.ident} ADD COLUMN {self.q(name)} {self.sql_type(t)}")
        self.columns, _ = self.reflect()

    def _gate_scope(self, alias: str = "") -> str:
        """The condition selecting this pipeline's gate rows of this table."""
        at = f"{alias}." if alias else ""
        return (
            f"{at}pipeline = {self.literal(self.pipeline)} "
            f"AND {at}tbl = {self.literal(self.table_name)}"
        )

    def _apply(self, present: list[str], total: int, applied: Applied) -> None:
        """Gate, rank and apply the staged events (steps 2-5 of the module docstring)."""
        counts = self._gate()
        applied.add_ops(counts, total)
        if counts:
            self._write_newest(present, counts)
            self.run(self.update_gate(f"{self._gate_scope('g')} AND g.k = a.k AND a.rk = 1"))

    def _gate(self) -> dict[str, int]:
        """Fill ``ACC_TABLE`` with the events newer than their key's gate row,
        ranked per key (1 = newest); the accepted events by op letter."""
        self.analyze(EV_TABLE)
        self.add_keys(
            f"SELECT DISTINCT {self.literal(self.pipeline)}, {self.literal(self.table_name)}, "
            f"k, {NEVER}, -1, 0 FROM {EV_TABLE} ORDER BY k"
        )
        self.lock_gate()
        self.drop_temp(ACC_TABLE)
        newer = "e.ts > g.ts_ms OR (e.ts = g.ts_ms AND e.seq > g.seq AND e.hash <> g.hash)"
        self.run(
            self.temp_table_as(
                ACC_TABLE,
                "SELECT e.k, e.op, e.ts, e.seq, e.hash, e.img, ROW_NUMBER() OVER "
                "(PARTITION BY e.k ORDER BY e.ts DESC, e.seq DESC, e.n DESC) AS rk "
                f"FROM {EV_TABLE} e JOIN {self.gate} g ON {self._gate_scope('g')} AND g.k = e.k "
                f"WHERE {newer}",
            )
        )
        self.analyze(ACC_TABLE)
        rows = self.run(f"SELECT op, COUNT(*) FROM {ACC_TABLE} GROUP BY op")
        return {str(op): int(n) for op, n in rows}

    def _write_newest(self, present: list[str], counts: dict[str, int]) -> None:
        """Delete, update and insert the newest accepted event of each key.

        ``present``: the table columns some upsert image of the batch has;
        only they (and the key, and the soft delete column) are written.
        """
        assert self.columns is not None
        q = self.q
        pk = [self._find(k) or k for k in self.pk]
        soft = self._find(self.cdc.soft_delete_column) if self.cdc.soft_delete_column else None
        wanted = list(dict.fromkeys([*pk, *(self._find(c) or c for c in present)]))
        if soft and soft not in wanted:
            wanted.append(soft)
        self.drop_temp(TYPED_TABLE)
        self.create_typed([c for c in self.columns if c in wanted])
        match = " AND ".join(f"t.{q(k)} = w.{q(k)}" for k in pk)
        is_delete = f"w.{OP_COLUMN} = 'd'"
        if counts.get("d"):
            if self.cdc.delete_mode == "soft":
                assert soft is not None
                mark = "TRUE" if self.is_boolean(self.columns[soft]) else self.now()
                sets = [f"{self.set_target(soft)} = {mark}"]
                self.run(self.update_from(sets, TYPED_TABLE, f"{match} AND {is_delete}"))
            else:
                self.run(self.delete_from(TYPED_TABLE, f"{match} AND {is_delete}"))
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
                kept = "FALSE" if self.is_boolean(self.columns[c]) else "NULL"
            given = self.present(c, f"w.{IMAGE_COLUMN}")
            sets.append(f"{self.set_target(c)} = CASE WHEN {given} THEN w.{q(c)} ELSE {kept} END")
        if sets:
            self.run(self.update_from(sets, TYPED_TABLE, f"{match} AND NOT {is_delete}"))
        cols = ", ".join(q(c) for c in wanted)
        self.run(
            f"INSERT INTO {self.ident} ({cols}) SELECT {', '.join('w.' + q(c) for c in wanted)} "
            f"FROM {TYPED_TABLE} w WHERE NOT {is_delete} AND NOT EXISTS "
            f"(SELECT 1 FROM {self.ident} t WHERE {match})"
        )

    def done(self) -> None:
        """After the commit: count what the batch did."""
        applied, self._pending = self._pending, None
        if applied is not None and self._count:
            applied.record(self.pipeline)


# -- Embedded (SQLite, DuckDB) ----------------------------------------------------


class Embedded(SqlCdcTarget):
    """What the SQLite and DuckDB targets share: one file, one process."""

    def insert_ignore(self, table: str, columns: str, select: str) -> str:
        return f"INSERT OR IGNORE INTO {table} ({columns}) {select}"

    def drop_temp(self, name: str) -> None:
        self.run(f"DROP TABLE IF EXISTS temp.{name}")

    def flush(self) -> None:
        """Commit (SQLite: durable, WAL with synchronous=FULL), then count."""
        try:
            self.commit()
        except self._driver_error() as exc:
            self._rollback()
            raise ConnectorError(f"{self.id}: commit failed: {exc}") from exc
        self.done()


# -- Schema-qualified names (Postgres, DuckDB) ---------------------------------------


class SchemaQualified:
    """Double-quoted, schema-qualified names (Postgres, DuckDB)."""

    schema: str
    table: str

    def q(self, name: str) -> str:
        return '"' + name.replace('"', '""') + '"'

    @property
    def ident(self) -> str:
        return f"{self.q(self.schema)}.{self.q(self.table)}"

    @property
    def gate(self) -> str:
        return f"{self.q(self.schema)}.{self.q(GATE_TABLE)}"

    @property
    def table_name(self) -> str:
        return f"{self.schema}.{self.table}"
