"""The write modes every SQL target shares: checks, the scd2 columns and statements.

``append`` inserts; ``truncate`` empties the table first, in the transaction
of the rows that replace it (``DELETE``, never ``TRUNCATE``: readers keep
seeing the old rows until the commit); ``merge`` upserts on the key;
``scd2`` keeps history (below). A *unit* is what one transaction writes: a
streaming flush, or one job run (:mod:`sluice.connectors.sql.load`).

**scd2.** The table carries the data columns and four more:

* ``valid_from`` (timestamp, UTC): ``event_timestamp_column`` of the row, or
  the load time of the unit;
* ``valid_to`` (timestamp, UTC): null while current; else when it was closed;
* ``is_current`` (boolean);
* ``row_hash`` (text): md5 of the ``compare_columns`` (default: every non-key
  data column) as ``name=text`` of each non-null one (:func:`hash_parts`).

A unit's rows (the last row of a key wins) are applied in three statements:

1. a current version whose ``row_hash`` differs from its row's is closed
   (``valid_to`` = the new row's ``valid_from``, ``is_current`` false);
2. with ``ttl_seconds``, a current version older than that (by
   ``valid_from``) whose key the unit does not carry is closed at the load time;
3. a row whose key has no current version (new, or just closed) is
   inserted as the current version. An unchanged row writes nothing.

The key (``primary_key``) is the business key: several versions share it,
so the table has no primary key constraint. Rows are taken to come in event-time order
per key: a row whose ``valid_from`` is older than its key's current version
still closes it and becomes the current one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from sluice.errors import ConnectorError

#: The columns scd2 adds to a table, with the Arrow types they are created from.
SCD2_FIELDS = (
    pa.field("valid_from", pa.timestamp("us", tz="UTC")),
    pa.field("valid_to", pa.timestamp("us", tz="UTC")),
    pa.field("is_current", pa.bool_()),
    pa.field("row_hash", pa.string()),
)
SCD2_COLUMNS = tuple(f.name for f in SCD2_FIELDS)

MODES = ("append", "truncate", "merge", "scd2")


def check(target_id: str, spec: Any, key: Sequence[str]) -> None:
    """Refuse a mode and options of a target ``spec`` (its ``mode``,
    ``compare_columns``, ``event_timestamp_column``, ``ttl_seconds``) that do
    not fit together with its business ``key`` (at build time)."""
    mode = spec.mode
    compare_columns = spec.compare_columns
    event_timestamp_column = spec.event_timestamp_column
    ttl_seconds = spec.ttl_seconds
    if mode not in MODES:
        raise ConnectorError(f"{target_id}: unknown mode {mode!r} (one of {', '.join(MODES)})")
    if mode == "scd2" and not key:
        raise ConnectorError(
            f'{target_id}: mode = "scd2" needs [target.table] primary_key (the business key; '
            "an scd2 table keeps several versions of a key, so it is not reflected)"
        )
    if mode != "scd2" and (
        compare_columns is not None or event_timestamp_column is not None or ttl_seconds is not None
    ):
        raise ConnectorError(
            f"{target_id}: compare_columns, event_timestamp_column and ttl_seconds "
            f'are for mode = "scd2" (mode is {mode!r})'
        )


def with_scd2(schema: pa.Schema) -> pa.Schema:
    """``schema`` with the scd2 columns it lacks appended."""
    for f in SCD2_FIELDS:
        if f.name not in schema.names:
            schema = schema.append(f)
    return schema


def data_columns(names: Sequence[str]) -> list[str]:
    """``names`` without the scd2 columns."""
    return [n for n in names if n not in SCD2_COLUMNS]


@dataclass(frozen=True)
class Scd2:
    """The scd2 statements of one unit, for one dialect.

    ``rows`` names a (temporary) table holding the unit's rows, one per key,
    with the data ``columns`` plus ``valid_from`` and ``row_hash``
    (:meth:`select_rows` builds its query).
    """

    target: str  #: quoted table
    rows: str  #: quoted table of the unit's rows
    key: Sequence[str]
    columns: Sequence[str]  #: data columns of the rows
    quote: Callable[[str], str]
    update_join: bool = False  #: MySQL: ``UPDATE t JOIN s`` (else ``UPDATE t ... FROM s``)

    def compare(self, compare_columns: Sequence[str] | None) -> list[str]:
        """The columns hashed into ``row_hash``."""
        if compare_columns is None:
            return [c for c in self.columns if c not in self.key]
        return list(compare_columns)

    def _key_match(self, a: str, b: str) -> str:
        q = self.quote
        return " AND ".join(f"{a}.{q(k)} = {b}.{q(k)}" for k in self.key)

    def close_changed(self) -> str:
        """Close the current versions whose row changed."""
        q = self.quote
        sets = f"{q('is_current')} = FALSE, {q('valid_to')} = s.{q('valid_from')}"
        if self.update_join:
            return (
                f"UPDATE {self.target} t JOIN {self.rows} s ON {self._key_match('t', 's')} "
                f"SET t.{q('is_current')} = FALSE, t.{q('valid_to')} = s.{q('valid_from')} "
                f"WHERE t.{q('is_current')} AND t.{q('row_hash')} <> s.{q('row_hash')}"
            )
        return (
            f"UPDATE {self.target} AS t SET {sets} FROM {self.rows} s "
            f"WHERE {self._key_match('t', 's')} AND t.{q('is_current')} "
            f"AND t.{q('row_hash')} <> s.{q('row_hash')}"
        )

    def close_stale(self, now: str, cutoff: str) -> str:
        """Close current versions older than ``cutoff`` the unit does not carry
        (``now``, ``cutoff``: timestamp literals of the dialect)."""
        q = self.quote
        return (
            f"UPDATE {self.target} AS t SET {q('is_current')} = FALSE, {q('valid_to')} = {now} "
            f"WHERE t.{q('is_current')} AND t.{q('valid_from')} < {cutoff} AND NOT EXISTS "
            f"(SELECT 1 FROM {self.rows} s WHERE {self._key_match('s', 't')})"
        )

    def insert_new(self) -> str:
        """Insert the rows whose key has no current version."""
        q = self.quote
        cols = ", ".join(q(c) for c in self.columns)
        scols = ", ".join(f"s.{q(c)}" for c in self.columns)
        return (
            f"INSERT INTO {self.target} ({cols}, {q('valid_from')}, {q('valid_to')}, "
            f"{q('is_current')}, {q('row_hash')}) "
            f"SELECT {scols}, s.{q('valid_from')}, NULL, TRUE, s.{q('row_hash')} FROM {self.rows} s "
            f"WHERE NOT EXISTS (SELECT 1 FROM {self.target} t WHERE {self._key_match('t', 's')} "
            f"AND t.{q('is_current')})"
        )


def hash_parts(compare: Sequence[str], text: Callable[[str], str]) -> list[str]:
    """The SQL parts ``'name=' || <text of name>`` of ``row_hash`` (``text(c)``:
    the dialect's expression for a column's text, null when it is null), to
    be joined by the dialect's null-skipping ``concat_ws(chr(31), ...)``.

    ``row_hash`` is the md5 of ``name=value`` for each compare column that is
    not null, joined by U+001F: a null column and a missing one hash alike,
    so adding a column changes no hash until it holds values.
    """
    return [f"{label(c)} || {text(c)}" for c in compare]


def label(column: str) -> str:
    """The SQL string literal ``'column='``."""
    return "'" + column.replace("'", "''") + "='"


def utc_text(at: datetime) -> str:
    """``at`` as ``YYYY-MM-DD HH:MM:SS.ffffff`` in UTC (for timestamp literals)."""
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


class Unit:
    """The bookkeeping of one write unit of a SQL target (a streaming flush,
    or a whole batch load): the load time scd2 stamps, a truncate's DELETE
    before the unit's first row (in the unit's transaction, so readers never
    see the table empty), and the rows it wrote or changed. Mixed into the
    targets; ``_open_unit`` is called from their ``__init__``."""

    spec: Any  # the target's spec: its ``mode``
    id: str

    def _open_unit(self) -> None:
        self._fresh = True  # no row of the open transaction (unit) written yet
        self._rows = 0  # rows written or changed by the open transaction
        self._committed = 0  # rows the last flush committed
        self._now = datetime.now(UTC)  # the load time of the unit

    def _begin_unit(self, execute: Callable[[str], object], table: str) -> None:
        """Before the unit's first row: its load time, and a truncate's DELETE."""
        if self._fresh:
            self._fresh = False
            self._now = datetime.now(UTC)
            if self.spec.mode == "truncate":
                execute(f"DELETE FROM {table}")

    def _require_columns(self, schema: pa.Schema, columns: Any, fold: bool = False) -> None:
        """A load that may not create (``create = false``): the table
        (``columns``: its column names, ``None`` when it does not exist) must
        have every column of ``schema`` (and scd2's); ``fold``: compare
        lower-cased names (MySQL)."""
        want = with_scd2(schema) if self.spec.mode == "scd2" else schema
        have = columns or ()
        missing = [f.name for f in want if (f.name.lower() if fold else f.name) not in have]
        if columns is None or missing:
            what = "the table does not exist" if columns is None else f"no column(s) {missing}"
            raise ConnectorError(
                f"{self.id}: {what} and the load may not create them (create = false)"
            )

    def _with_scd2(self, schema: pa.Schema) -> pa.Schema:
        """``schema`` with the columns scd2 maintains (refused in the rows)."""
        if self.spec.mode != "scd2":
            return schema
        clash = [n for n in SCD2_COLUMNS if n in schema.names]
        if clash:
            raise ConnectorError(f"{self.id}: the rows carry {clash}, which scd2 maintains itself")
        return with_scd2(schema)

    def _unit_done(self) -> None:
        self._fresh = True
        self._rows = 0

    def committed_rows(self) -> int:
        """Rows the last flush committed (append, truncate, merge: written;
        scd2: versions inserted and closed)."""
        return self._committed
