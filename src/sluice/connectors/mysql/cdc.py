"""CDC into a MySQL / MariaDB table (see :mod:`sluice.connectors.sql.cdc` for the steps).

The events are staged with ``LOAD DATA LOCAL INFILE`` (the MySQL target's
bulk path). Each image is converted column by column: ``JSON_EXTRACT``, JSON
``null`` to SQL ``NULL``, ``true`` / ``false`` to 1 / 0, everything else
``JSON_UNQUOTE``-d, then stored into a temporary copy of the table's columns,
so the server converts to the column types in strict mode and an
unconvertible value fails the batch naming the column. The gate table is
``<database>._sluice_cdc_gate`` (binary strings: keys compare byte for
byte; a key of more than 1024 bytes fails the batch).

MySQL commits DDL implicitly: a new column (``add_columns``) or a missing
table is created before the batch writes anything, so no half batch is ever
committed with it.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pyarrow as pa
import pymysql

from sluice.config.spec import CdcSpec
from sluice.connectors.cdc_apply import GATE_TABLE
from sluice.connectors.mysql import target as mysql
from sluice.connectors.mysql.spec import MySQLTarget as MySQLTargetSpec
from sluice.connectors.registry import Context
from sluice.connectors.sql.cdc import (
    ACC_TABLE,
    EV_TABLE,
    IMAGE_COLUMN,
    OP_COLUMN,
    TYPED_TABLE,
    SqlCdcTarget,
)
from sluice.errors import ConnectorError


class MySQLCdcTarget(SqlCdcTarget, mysql.MySQLTarget):
    """CDC into one MySQL / MariaDB table, one transaction per batch.

    Connection handling and failure classification are the MySQL target's
    (a lost connection, a deadlock or a lock wait timeout is transient).
    """

    casefold = True

    def __init__(
        self, spec: MySQLTargetSpec, ctx: Context, index: int, cdc: CdcSpec, *, count: bool
    ) -> None:
        mysql.MySQLTarget.__init__(self, spec, ctx, index)
        SqlCdcTarget.__init__(self, cdc, ctx, spec.table.primary_key, count=count)

    def q(self, name: str) -> str:
        return "`" + name.replace("`", "``") + "`"

    @property
    def ident(self) -> str:
        return self._ident

    @property
    def gate(self) -> str:
        return f"{self.q(self.schema)}.{self.q(GATE_TABLE)}"

    @property
    def table_name(self) -> str:
        return f"{self.schema}.{self.table}"

    def literal(self, text: str) -> str:
        # Backslashes escape in MySQL string literals (unless NO_BACKSLASH_ESCAPES).
        return "'" + text.replace("\\", "\\\\").replace("'", "''") + "'"

    def open(self) -> None:
        """Connect, reflect the table and its key, create the gate table."""
        mysql.MySQLTarget.open(self)
        try:
            if not self.run(
                "SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = "
                + self.literal(self.schema)
            ):
                self.run(f"CREATE DATABASE IF NOT EXISTS {self.q(self.schema)}")
            self.prepare()
        except pymysql.Error as exc:
            self._fail(exc)

    def run(self, statement: str) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self._query(statement)]

    def commit(self) -> None:
        self._require().commit()

    def reflect(self) -> tuple[dict[str, str] | None, list[str]]:
        rows = self.run(
            "SELECT COLUMN_NAME, COLUMN_TYPE, COLUMN_KEY FROM information_schema.COLUMNS "
            f"WHERE TABLE_SCHEMA = {self.literal(self.schema)} AND TABLE_NAME = "
            f"{self.literal(self.table)} ORDER BY ORDINAL_POSITION"
        )
        if not rows:
            return None, []
        keys = self.run(
            "SELECT COLUMN_NAME FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = "
            f"{self.literal(self.schema)} AND TABLE_NAME = {self.literal(self.table)} "
            "AND INDEX_NAME = 'PRIMARY' ORDER BY SEQ_IN_INDEX"
        )
        self._columns = {str(r[0]).lower(): str(r[0]) for r in rows}
        return {str(r[0]): str(r[1]) for r in rows}, [str(k[0]) for k in keys]

    def stage(self, events: pa.Table) -> None:
        self.drop_temp(EV_TABLE)
        self.run(
            f"CREATE TEMPORARY TABLE {EV_TABLE} (k VARBINARY(1024) NOT NULL, op CHAR(1) NOT NULL, "
            "ts BIGINT NOT NULL, seq BIGINT NOT NULL, hash BIGINT NOT NULL, n BIGINT NOT NULL, "
            "img LONGTEXT NOT NULL, KEY (k)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 "
            f"COLLATE={self._collation}"
        )
        self._load(mysql.csv_ready(events, self.id), EV_TABLE)

    def sql_type(self, t: pa.DataType, *, key: bool = False) -> str:
        return mysql.mysql_type(t, key=key)

    def typed(self, column: str, image: str) -> str:
        value = f"JSON_EXTRACT({image}, {self.json_path(column)})"
        return (
            f"CASE JSON_TYPE({value}) WHEN 'NULL' THEN NULL WHEN 'BOOLEAN' THEN "
            f"({value} = 'true') ELSE JSON_UNQUOTE({value}) END"
        )

    def present(self, column: str, image: str) -> str:
        return f"JSON_CONTAINS_PATH({image}, 'one', {self.json_path(column)})"

    def now(self) -> str:
        return "UTC_TIMESTAMP(6)"

    def lock_gate(self) -> None:
        self.run(
            f"SELECT COUNT(*) FROM {self.gate} g JOIN {EV_TABLE} e ON g.k = e.k "
            f"WHERE {self._gate_scope('g')} ORDER BY g.k FOR UPDATE"
        )

    def insert_ignore(self, table: str, columns: str, select: str) -> str:
        # Not INSERT IGNORE: that would also turn a too-long key into a warning.
        return f"INSERT INTO {table} ({columns}) {select} ON DUPLICATE KEY UPDATE {table}.k = {table}.k"

    def temp_table_as(self, name: str, select: str) -> str:
        return f"CREATE TEMPORARY TABLE {name} ENGINE=InnoDB AS {select}"

    def drop_temp(self, name: str) -> None:
        self.run(f"DROP TEMPORARY TABLE IF EXISTS {name}")

    def update_from(self, sets: list[str], source: str, where: str) -> str:
        return f"UPDATE {self.ident} t JOIN {source} w ON {where} SET {', '.join(sets)}"

    def set_target(self, column: str) -> str:
        return f"t.{self.q(column)}"

    def update_gate(self, where: str) -> str:
        return (
            f"UPDATE {self.gate} g JOIN {ACC_TABLE} a ON {where} "
            "SET g.ts_ms = a.ts, g.seq = a.seq, g.hash = a.hash"
        )

    def delete_from(self, source: str, where: str) -> str:
        return f"DELETE t FROM {self.ident} t JOIN {source} w ON {where}"

    def create_table(self, definitions: list[str]) -> None:
        self.run(
            f"CREATE TABLE IF NOT EXISTS {self.ident} ({', '.join(definitions)}) "
            f"ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE={self._collation}"
        )

    def gate_ddl(self) -> str:
        return (
            f"CREATE TABLE IF NOT EXISTS {self.gate} (pipeline VARBINARY(255) NOT NULL, "
            "tbl VARBINARY(255) NOT NULL, k VARBINARY(1024) NOT NULL, ts_ms BIGINT NOT NULL, "
            "seq BIGINT NOT NULL, hash BIGINT NOT NULL, PRIMARY KEY (pipeline, tbl, k)) "
            "ENGINE=InnoDB"
        )

    def create_typed(self, columns: list[str]) -> None:
        cols = ", ".join(self.q(c) for c in columns)
        # A copy of the table's column types (no keys, no defaults to fill in).
        self.run(
            f"CREATE TEMPORARY TABLE {TYPED_TABLE} ({OP_COLUMN} CHAR(1), {IMAGE_COLUMN} LONGTEXT) "
            f"ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE={self._collation} "
            f"SELECT {cols} FROM {self.ident} LIMIT 0"
        )
        values = ", ".join(self.typed(c, "a.img") for c in columns)
        self.run(
            f"INSERT INTO {TYPED_TABLE} ({cols}, {OP_COLUMN}, {IMAGE_COLUMN}) SELECT {values}, a.op, a.img "
            f"FROM {ACC_TABLE} a WHERE a.rk = 1"
        )

    def add_columns(self, types: dict[str, pa.DataType]) -> None:
        clauses = ", ".join(f"ADD COLUMN {self.q(n)} {self.sql_type(t)}" for n, t in types.items())
        self.run(f"ALTER TABLE {self.ident} {clauses}")
        self.columns, _ = self.reflect()

    def _driver_error(self) -> type[Exception]:
        return pymysql.Error  # type: ignore[no-any-return]

    def _rollback(self) -> None:
        with contextlib.suppress(pymysql.Error, ConnectorError):
            self._require().rollback()

    def _failed(self, exc: Exception) -> None:
        assert isinstance(exc, pymysql.Error)
        self._fail(exc)

    def flush(self) -> None:
        """Commit, then count."""
        mysql.MySQLTarget.flush(self)
        self.done()


def build_target(
    spec: MySQLTargetSpec, ctx: Context, index: int, cdc: CdcSpec, *, count: bool = True
) -> MySQLCdcTarget:
    """A CDC target for ``spec``."""
    return MySQLCdcTarget(spec, ctx, index, cdc, count=count)
