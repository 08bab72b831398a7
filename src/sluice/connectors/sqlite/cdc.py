"""SQLite CDC apply: the shared SQL apply (:mod:`sluice.connectors.sql.cdc`) with
SQLite's connection, staging and ``json_extract`` conversions."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import pyarrow as pa

from sluice.config.spec import CdcSpec
from sluice.connectors.cdc_apply import GATE_TABLE
from sluice.connectors.registry import Context
from sluice.connectors.sql.cdc import EV_COLUMNS, EV_TABLE, Embedded
from sluice.connectors.sqlite.spec import SQLiteTarget as SQLiteTargetSpec
from sluice.connectors.sqlite.target import sqlite_type
from sluice.errors import ConnectorError


class SQLiteCdcTarget(Embedded):
    """CDC into a SQLite table; JSON converted by ``json_extract``.

    A batch holds the database's write lock from ``BEGIN IMMEDIATE`` to the
    commit (WAL, ``synchronous = FULL``).
    """

    def __init__(
        self, spec: SQLiteTargetSpec, ctx: Context, index: int, cdc: CdcSpec, *, count: bool
    ) -> None:
        super().__init__(cdc, ctx, spec.table.primary_key, count=count)
        self.spec = spec
        self.table = spec.table.name
        self.id = f"sqlite:{spec.path}:{self.table}"
        self._conn: sqlite3.Connection | None = None

    def q(self, name: str) -> str:
        return '"' + name.replace('"', '""') + '"'

    @property
    def ident(self) -> str:
        return self.q(self.table)

    @property
    def gate(self) -> str:
        return self.q(GATE_TABLE)

    @property
    def table_name(self) -> str:
        return f"main.{self.table}"

    def open(self) -> None:
        """Open the database file (created when missing), reflect, create the gate table."""
        Path(self.spec.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.spec.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        self._conn = conn
        try:
            self.prepare()
        except sqlite3.Error as exc:
            self.close()
            raise ConnectorError(f"{self.id}: {exc}") from exc

    def close(self) -> None:
        """Close; an uncommitted batch is rolled back."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ConnectorError(f"{self.id} is not open")
        return self._conn

    def run(self, statement: str) -> list[tuple[Any, ...]]:
        return list(self._require().execute(statement).fetchall())

    def begin(self) -> None:
        conn = self._require()
        if not conn.in_transaction:
            conn.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        conn = self._require()
        if conn.in_transaction:
            conn.execute("COMMIT")

    def reflect(self) -> tuple[dict[str, str] | None, list[str]]:
        info = self.run(f"PRAGMA table_info({self.q(self.table)})")
        if not info:
            return None, []
        columns = {str(r[1]): str(r[2]) for r in info}
        key = [str(r[1]) for r in sorted(info, key=lambda r: int(r[5])) if int(r[5]) > 0]
        return columns, key

    def stage(self, events: pa.Table) -> None:
        self.drop_temp(EV_TABLE)
        self.run(
            f"CREATE TEMP TABLE {EV_TABLE} (k TEXT, op TEXT, ts INTEGER, seq INTEGER, "
            "hash INTEGER, n INTEGER, img TEXT)"
        )
        marks = ", ".join("?" for _ in EV_COLUMNS)
        # executemany over C-level zip of the columns: sqlite3 has no bulk Arrow path.
        self._require().executemany(
            f"INSERT INTO {EV_TABLE} VALUES ({marks})",
            zip(*(c.to_pylist() for c in events.columns), strict=True),
        )

    def sql_type(self, t: pa.DataType, *, key: bool = False) -> str:

        return "BOOLEAN" if pa.types.is_boolean(t) else sqlite_type(t)

    def typed(self, column: str, image: str) -> str:
        return f"json_extract({image}, {self.json_path(column)})"

    def present(self, column: str, image: str) -> str:
        return f"(json_type({image}, {self.json_path(column)}) IS NOT NULL)"

    def now(self) -> str:
        return "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"

    def lock_gate(self) -> None:
        """BEGIN IMMEDIATE holds the database's write lock already."""

    def delete_from(self, source: str, where: str) -> str:
        return (
            f"DELETE FROM {self.ident} AS t WHERE EXISTS (SELECT 1 FROM {source} w WHERE {where})"
        )

    def gate_ddl(self) -> str:
        return (
            f"CREATE TABLE IF NOT EXISTS {self.gate} (pipeline TEXT NOT NULL, tbl TEXT NOT NULL, "
            "k TEXT NOT NULL, ts_ms INTEGER NOT NULL, seq INTEGER NOT NULL, "
            "hash INTEGER NOT NULL, PRIMARY KEY (pipeline, tbl, k)) WITHOUT ROWID"
        )

    def _driver_error(self) -> type[Exception]:
        return sqlite3.Error

    def _rollback(self) -> None:
        conn = self._conn
        if conn is not None and conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        with contextlib.suppress(sqlite3.Error, ConnectorError):
            self.columns, _ = self.reflect()  # an ALTER of the batch rolled back too
