"""CDC into a MySQL / MariaDB table: the shared apply
(:mod:`sluice.connectors.sql.cdc`) with MySQL's dialect and session.

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
committed with it. A lost connection, a deadlock or a lock wait timeout is a
:class:`~sluice.errors.TransientError`; anything else is fatal.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pymysql

from sluice.config.spec import CdcSpec
from sluice.connectors.mysql import target as mysql
from sluice.connectors.mysql.spec import MySQLTarget as MySQLTargetSpec
from sluice.connectors.registry import Context
from sluice.connectors.sql.cdc import (
    ACC_TABLE,
    EV_TABLE,
    IMAGE_COLUMN,
    OP_COLUMN,
    TYPED_TABLE,
    Dialect,
    Query,
    Rows,
    ServerSession,
    SqlCdcTarget,
)
from sluice.connectors.sql.embedded import check_cdc_mode
from sluice.errors import ConnectorError, TransientError


class MySQLSession(ServerSession):
    """One pymysql connection, ``LOAD DATA`` allowed for our own loads."""

    error = pymysql.Error

    def __init__(self, url: mysql.MySQLUrl, target_id: str) -> None:
        super().__init__(target_id)
        self._url = url
        #: The binary collation tables are created with (known once connected).
        self.collation = "utf8mb4_bin"

    def connect(self) -> None:
        self.close()
        try:
            self._conn = mysql.connect(self._url, local_infile=True)
            self.collation = mysql.binary_collation(self._conn)
            self._conn.commit()
        except pymysql.Error as exc:
            self.close()
            raise mysql.connect_error(self.id, exc) from exc

    def execute(self, statement: str, params: tuple[Any, ...] = ()) -> Rows:
        return [tuple(r) for r in mysql.query(self._require(), statement, params or None)]

    def load(self, name: str, data: pa.Table) -> None:
        mysql.load_csv(self._require(), mysql.csv_ready(data, self.id), name, self.id)

    def failure(self, exc: Exception, *, committing: bool) -> ConnectorError:
        assert isinstance(exc, pymysql.Error)
        if not mysql.alive(self._conn) or mysql.is_transient(exc):
            self.close()
            return TransientError(f"{self.id}: connection lost: {mysql.message(exc)}")
        return ConnectorError(f"{self.id}: {mysql.message(exc)}")


class MySQLDialect(Dialect):
    """MySQL spelling: backquotes, ``JSON_EXTRACT``, multi-table UPDATE / DELETE,
    InnoDB temporary tables in the session's binary collation."""

    gate_types = ("VARBINARY(255)", "VARBINARY(1024)", "BIGINT")
    gate_suffix = " ENGINE=InnoDB"

    casefold = True

    def __init__(self, schema: str, table: str, session: MySQLSession) -> None:
        self._session = session  # for the collation, known once connected
        super().__init__(schema, table)

    @property
    def _charset(self) -> str:
        return f"ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE={self._session.collation}"

    def q(self, name: str) -> str:
        return "`" + name.replace("`", "``") + "`"

    def literal(self, text: str) -> str:
        # Backslashes escape in MySQL string literals (unless NO_BACKSLASH_ESCAPES).
        return "'" + text.replace("\\", "\\\\").replace("'", "''") + "'"

    def sql_type(self, t: pa.DataType, *, key: bool = False) -> str:
        return mysql.mysql_type(t, key=key)

    def typed(self, column: str, column_type: str, image: str) -> str:
        value = f"JSON_EXTRACT({image}, {self.json_path(column)})"
        return (
            f"CASE JSON_TYPE({value}) WHEN 'NULL' THEN NULL WHEN 'BOOLEAN' THEN "
            f"({value} = 'true') ELSE JSON_UNQUOTE({value}) END"
        )

    def present(self, column: str, image: str) -> str:
        return f"JSON_CONTAINS_PATH({image}, 'one', {self.json_path(column)})"

    def now(self) -> str:
        return "UTC_TIMESTAMP(6)"

    def reflect(self, query: Query) -> tuple[dict[str, str] | None, list[str]]:
        where = (
            f"WHERE TABLE_SCHEMA = {self.literal(self.schema)} AND TABLE_NAME = "
            f"{self.literal(self.table)}"
        )
        rows = query(
            "SELECT COLUMN_NAME, COLUMN_TYPE, COLUMN_KEY FROM information_schema.COLUMNS "
            f"{where} ORDER BY ORDINAL_POSITION",
            (),
        )
        if not rows:
            return None, []
        keys = query(
            f"SELECT COLUMN_NAME FROM information_schema.STATISTICS {where} "
            "AND INDEX_NAME = 'PRIMARY' ORDER BY SEQ_IN_INDEX",
            (),
        )
        return {str(r[0]): str(r[1]) for r in rows}, [str(k[0]) for k in keys]

    def schema_exists(self) -> str | None:
        return "SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = " + self.literal(
            self.schema
        )

    def create_schema(self) -> str | None:
        return f"CREATE DATABASE IF NOT EXISTS {self.q(self.schema)}"

    def create_table(self, definitions: list[str]) -> str:
        return f"CREATE TABLE IF NOT EXISTS {self.ident} ({', '.join(definitions)}) {self._charset}"

    def add_columns(self, types: dict[str, str]) -> list[str]:
        clauses = ", ".join(f"ADD COLUMN {self.q(n)} {t}" for n, t in types.items())
        return [f"ALTER TABLE {self.ident} {clauses}"]

    def stage_events(self) -> list[str]:
        return [
            self.drop_temp(EV_TABLE),
            f"CREATE TEMPORARY TABLE {EV_TABLE} (k VARBINARY(1024) NOT NULL, op CHAR(1) NOT NULL, "
            "ts BIGINT NOT NULL, seq BIGINT NOT NULL, hash BIGINT NOT NULL, n BIGINT NOT NULL, "
            f"img LONGTEXT NOT NULL, KEY (k)) {self._charset}",
        ]

    def temp_table_as(self, name: str, select: str) -> str:
        return f"CREATE TEMPORARY TABLE {name} ENGINE=InnoDB AS {select}"

    def drop_temp(self, name: str) -> str:
        return f"DROP TEMPORARY TABLE IF EXISTS {name}"

    def insert_ignore(self, table: str, columns: str, select: str) -> str:
        # Not INSERT IGNORE: that would also turn a too-long key into a warning.
        return f"INSERT INTO {table} ({columns}) {select} ON DUPLICATE KEY UPDATE {table}.k = {table}.k"

    def lock_gate(self, scope: str) -> str | None:
        return (
            f"SELECT COUNT(*) FROM {self.gate} g JOIN {EV_TABLE} e ON g.k = e.k "
            f"WHERE {scope} ORDER BY g.k FOR UPDATE"
        )

    def update_gate(self, where: str) -> str:
        return (
            f"UPDATE {self.gate} g JOIN {ACC_TABLE} a ON {where} "
            "SET g.ts_ms = a.ts, g.seq = a.seq, g.hash = a.hash"
        )

    def create_typed(self, columns: list[str], types: dict[str, str]) -> list[str]:
        cols = ", ".join(self.q(c) for c in columns)
        values = ", ".join(self.typed(c, types[c], "a.img") for c in columns)
        return [
            # A copy of the table's column types (no keys, no defaults to fill in).
            f"CREATE TEMPORARY TABLE {TYPED_TABLE} ({OP_COLUMN} CHAR(1), {IMAGE_COLUMN} LONGTEXT) "
            f"{self._charset} SELECT {cols} FROM {self.ident} LIMIT 0",
            f"INSERT INTO {TYPED_TABLE} ({cols}, {OP_COLUMN}, {IMAGE_COLUMN}) SELECT {values}, a.op, a.img "
            f"FROM {ACC_TABLE} a WHERE a.rk = 1",
        ]

    def update_from(self, sets: list[str], source: str, where: str) -> str:
        return f"UPDATE {self.ident} t JOIN {source} w ON {where} SET {', '.join(sets)}"

    def set_target(self, column: str) -> str:
        return f"t.{self.q(column)}"

    def delete_from(self, source: str, where: str) -> str:
        return f"DELETE t FROM {self.ident} t JOIN {source} w ON {where}"


class MySQLCdcTarget(SqlCdcTarget):
    """CDC into one MySQL / MariaDB table, one transaction per batch (the registry's
    entry point)."""

    def __init__(
        self, spec: MySQLTargetSpec, ctx: Context, index: int, cdc: CdcSpec, *, count: bool
    ) -> None:
        url, schema, target_id = mysql.resolve_table(spec)
        check_cdc_mode(target_id, spec.mode)
        session = MySQLSession(url, target_id)
        super().__init__(
            target_id,
            MySQLDialect(schema, spec.table.name, session),
            session,
            cdc,
            ctx,
            spec.table.primary_key,
            count=count,
        )
