"""MySQL / MariaDB target and lookup loader (pymysql).

**Bulk path.** Each batch is printed as CSV by pyarrow (C++) into a
temporary file and sent with ``LOAD DATA LOCAL INFILE`` inside the open
transaction; :meth:`MySQLTarget.flush` commits. Measured against MariaDB
10.11 on 2 cores, 200k rows of 6 columns (ints, text, double, timestamp):
``LOAD DATA`` 0.5 s, pymysql ``executemany`` (multi-row ``INSERT``) 2.2 s.

``LOCAL`` makes the server downgrade data errors to warnings (it cannot stop
the client mid-file): a value out of range would be clamped, a duplicate key
skipped. So every load reads the statement's warnings, and any warning fails
the batch (rolled back) with a :class:`ConnectorError` naming the table, the
column and the row within the batch (counted from 1).

**merge** loads the batch into a temporary stage table (the target's column
types plus a sequence number), then runs ``INSERT ... SELECT ... ORDER BY
seq ON DUPLICATE KEY UPDATE col = VALUES(col)``: rows apply in batch order,
so the last row of a key wins; an all-key table gets a no-op update. The key
is ``[target.table] primary_key`` (it must be the table's primary key or a
unique key) or the reflected primary key. ``ON DUPLICATE KEY`` fires on any
unique key of the table, not only that one.

**Tables.** A missing table is created from the batch schema with the
configured primary key (key strings as ``VARCHAR(255)``, other strings
``LONGTEXT``), ``utf8mb4`` with a binary no-pad collation so keys compare
exactly as they do in Arrow (and Postgres); a column the table lacks is
added. MySQL commits DDL implicitly: rows written since the last flush are
committed when a table is created or altered (harmless: the engine flushes
every batch, and a crash before the offset commit redelivers them).

**Types.** Timestamps go to ``DATETIME(6)`` as UTC wall time (tz-aware
values converted, nanoseconds truncated); booleans ``BOOLEAN``; durations
``BIGINT`` counts of their unit; binary ``LONGBLOB`` (sent as hex);
lists / structs / maps as JSON text by :func:`~sluice.formats.jsontext.to_json_text`
(a MariaDB ``JSON`` column is ``LONGTEXT``). MySQL has no NaN: NaN becomes NULL; an infinite value fails
the batch.

**Failures.** A failure whose connection no longer answers (and a deadlock
or lock wait timeout) is a :class:`TransientError`: the engine reconnects and
retries the same batch (nothing was committed). Anything else is fatal.

**Positions.** The source positions the commit policy stages go to
``_sluice_positions`` in the target's database, in the transaction of the rows
(:mod:`sluice.connectors.sql.positions`).

The session runs with ``time_zone = '+00:00'`` and strict SQL mode. Tested
against MariaDB 10.11; MySQL 8 should work (``VALUES()`` in ``ON DUPLICATE
KEY UPDATE`` is deprecated there but still accepted).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, NoReturn
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from sluice.connectors.api import Position
from sluice.connectors.mysql.spec import MySQLTarget as MySQLTargetSpec
from sluice.connectors.registry import Context
from sluice.connectors.sql import modes, positions
from sluice.errors import ConnectorError, TransientError
from sluice.formats.jsontext import to_json_text

try:
    import pymysql
except ModuleNotFoundError as exc:  # pragma: no cover
    raise ModuleNotFoundError("pymysql", name="pymysql") from exc

_SEQ = "__sluice_seq"

#: Seconds to establish a connection.
_CONNECT_TIMEOUT_S = 10
#: Seconds one socket read / write may block: catches a server that stopped
#: answering, far above a statement's normal time (200k rows load in ~0.5 s).
_IO_TIMEOUT_S = 300
#: Rows the CSV writer converts at a time (its default, 1024, is slower).
_CSV_BATCH_ROWS = 16_384
#: Warnings quoted in the error of a rejected batch.
_WARNINGS_SHOWN = 5

#: Client error codes that mean the connection is gone (CR_CONN_HOST_ERROR,
#: CR_SERVER_GONE_ERROR, CR_SERVER_LOST, CR_SERVER_LOST_EXTENDED) and server
#: codes worth a retry on a fresh connection (ER_CON_COUNT_ERROR,
#: ER_SERVER_SHUTDOWN, ER_LOCK_WAIT_TIMEOUT, ER_LOCK_DEADLOCK,
#: ER_CONNECTION_KILLED).
_TRANSIENT_CODES = frozenset({2003, 2006, 2013, 2055, 1040, 1053, 1205, 1213, 1927})

_SESSION_INIT = "SET time_zone = '+00:00', sql_mode = 'STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION'"


# -- connection ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MySQLUrl:
    """The parts of ``mysql://user:password@host:port/db`` (``mariadb://`` too)."""

    host: str
    port: int
    user: str
    password: str
    database: str | None


def parse_url(url: str) -> MySQLUrl:
    """Split a MySQL URL; raises :class:`ConnectorError` (without the password)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mysql", "mariadb"):
        raise ConnectorError(
            f"mysql url must start with mysql:// or mariadb://, got {parts.scheme or 'no'} scheme"
        )
    if parts.query or parts.fragment:
        raise ConnectorError("mysql url: query parameters are not supported")
    try:
        port = parts.port or 3306
    except ValueError as exc:
        raise ConnectorError(f"mysql url: invalid port: {exc}") from exc
    database = unquote(parts.path.lstrip("/")) or None
    return MySQLUrl(
        host=parts.hostname or "127.0.0.1",
        port=port,
        user=unquote(parts.username or "root"),
        password=unquote(parts.password or ""),
        database=database,
    )


def connect(url: MySQLUrl, *, local_infile: bool) -> Any:
    """A pymysql connection to ``url`` (autocommit off, UTC, strict SQL mode)."""
    conn = pymysql.connect(
        host=url.host,
        port=url.port,
        user=url.user,
        password=url.password,
        database=url.database,
        charset="utf8mb4",
        autocommit=False,
        local_infile=local_infile,
        connect_timeout=_CONNECT_TIMEOUT_S,
        read_timeout=_IO_TIMEOUT_S,
        write_timeout=_IO_TIMEOUT_S,
        init_command=_SESSION_INIT,
    )
    if local_infile:
        # pymysql sends whatever local file the server asks for, whenever it
        # asks. Allow it only while our own LOAD DATA runs (see load_csv); the
        # server still names the file then, so the url must be a server the
        # pipeline trusts (as it trusts it with its data).
        conn._local_infile = False
    return conn


def _code(exc: BaseException) -> int | None:
    """The MySQL error number of a pymysql error, if it has one."""
    args = exc.args
    return args[0] if args and isinstance(args[0], int) else None


def message(exc: BaseException) -> str:
    """The first line of a pymysql error's text (its args are (code, text))."""
    args = exc.args
    if len(args) >= 2 and isinstance(args[1], str):
        text = args[1]
    else:
        text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0] if text else type(exc).__name__


def _q(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def resolve_table(spec: MySQLTargetSpec) -> tuple[MySQLUrl, str, str]:
    """The url, the database and the target id of ``spec``; raises
    :class:`ConnectorError` when neither the url nor the table names a database."""
    url = parse_url(spec.url)
    schema = spec.table.schema or url.database
    target_id = f"mysql:{schema}.{spec.table.name}"
    if schema is None:
        raise ConnectorError(
            f"{target_id}: no database: put it in the url (mysql://host/db) "
            "or set [target.table] schema"
        )
    return url, schema, target_id


def query(conn: Any, statement: str, params: tuple[Any, ...] | None = None) -> list[Any]:
    """Run one statement on ``conn``; its rows."""
    with conn.cursor() as cur:
        cur.execute(statement, params)
        return list(cur.fetchall())


def binary_collation(conn: Any) -> str:
    """A binary collation without trailing-space padding where the server has one."""
    version = str(query(conn, "SELECT VERSION()")[0][0])
    if "mariadb" in version.lower():
        return "utf8mb4_nopad_bin"
    major = version.split(".", 1)[0]
    return "utf8mb4_0900_bin" if major.isdigit() and int(major) >= 8 else "utf8mb4_bin"


def connect_error(target_id: str, exc: pymysql.Error) -> ConnectorError:
    """What a failure to connect means: transient when the server cannot be reached."""
    if _code(exc) in _TRANSIENT_CODES or isinstance(exc, pymysql.InterfaceError):
        return TransientError(f"{target_id}: cannot connect: {message(exc)}")
    return ConnectorError(f"{target_id}: {message(exc)}")


def alive(conn: Any) -> bool:
    """Roll ``conn``'s transaction back; whether the connection still answers."""
    if conn is None:
        return False
    try:
        conn.rollback()
        conn.ping(reconnect=False)
    except (pymysql.Error, OSError):
        return False
    return True


def is_transient(exc: pymysql.Error) -> bool:
    """Whether a retry on a fresh connection may resolve ``exc`` (a deadlock, a lock
    wait timeout, a server going away)."""
    return _code(exc) in _TRANSIENT_CODES


# -- types --------------------------------------------------------------------


def mysql_type(t: pa.DataType, *, key: bool = False) -> str:
    """The MySQL column type for an Arrow type (used when creating tables).

    ``key`` columns get indexable types (``VARCHAR(255)`` instead of
    ``LONGTEXT``): InnoDB cannot index a whole TEXT / BLOB column.
    """
    if pa.types.is_dictionary(t):
        return mysql_type(t.value_type, key=key)
    if pa.types.is_boolean(t):
        return "BOOLEAN"
    if pa.types.is_integer(t):
        size = {8: "TINYINT", 16: "SMALLINT", 32: "INT", 64: "BIGINT"}[t.bit_width]
        return size + (" UNSIGNED" if pa.types.is_unsigned_integer(t) else "")
    if pa.types.is_float16(t) or pa.types.is_float32(t):
        return "FLOAT"
    if pa.types.is_floating(t):
        return "DOUBLE"
    if pa.types.is_decimal(t):
        if t.precision > 65 or t.scale > 30:
            raise ConnectorError(
                f"{t} does not fit a MySQL DECIMAL (at most 65 digits, 30 after the point)"
            )
        return f"DECIMAL({t.precision},{t.scale})"
    if pa.types.is_timestamp(t):
        return "DATETIME(6)"
    if pa.types.is_date(t):
        return "DATE"
    if pa.types.is_time(t):
        return "TIME(6)"
    if pa.types.is_duration(t):
        return "BIGINT"
    if _is_binary(t):
        return "VARBINARY(255)" if key else "LONGBLOB"
    if pa.types.is_nested(t):
        return "JSON"
    return "VARCHAR(255)" if key else "LONGTEXT"


def _is_binary(t: pa.DataType) -> bool:
    return bool(
        pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_fixed_size_binary(t)
        or pa.types.is_binary_view(t)
    )


@dataclass(frozen=True, slots=True)
class CsvBatch:
    """A batch as ``LOAD DATA`` reads it: text-friendly columns, and which of
    them are binary sent as hex (the server applies ``UNHEX``)."""

    table: pa.Table
    hex_columns: frozenset[str]


def csv_ready(data: pa.Table, target_id: str) -> CsvBatch:
    """Convert ``data`` to columns the CSV writer prints the way MySQL parses.

    Null-typed columns are dropped. Raises :class:`ConnectorError` for a
    value MySQL cannot store (infinity).
    """
    names: list[str] = []
    columns: list[pa.ChunkedArray | pa.Array] = []
    hex_columns: set[str] = set()
    for name, col in zip(data.column_names, data.columns, strict=True):
        t = col.type
        if pa.types.is_dictionary(t):
            col = col.cast(t.value_type)
            t = col.type
        if t == pa.null():
            continue
        if pa.types.is_boolean(t):
            col = pc.cast(col, pa.int8())
        elif pa.types.is_floating(t):
            if pa.types.is_float16(t):
                col = pc.cast(col, pa.float32())
            if pc.any(pc.is_inf(col)).as_py():
                raise ConnectorError(
                    f"{target_id}: column '{name}' holds an infinite value; MySQL cannot store it"
                )
            nan = pc.is_nan(col)
            if pc.any(nan).as_py():
                col = pc.if_else(nan, pa.scalar(None, col.type), col)
        elif pa.types.is_timestamp(t):
            # Drops the zone keeping the UTC instant: UTC wall time.
            col = pc.cast(col, pa.timestamp("us"), safe=False)
        elif pa.types.is_time(t):
            col = pc.cast(col, pa.time64("us"), safe=False)
        elif pa.types.is_date64(t):
            col = pc.cast(col, pa.date32())
        elif pa.types.is_duration(t):
            col = pc.cast(col, pa.int64())
        elif _is_binary(t):
            # Per row in Python, but only for binary columns (rare in streams).
            col = pa.array([None if v is None else v.hex() for v in col.to_pylist()], pa.string())
            hex_columns.add(name)
        elif pa.types.is_nested(t):
            col = to_json_text(col)
        elif pa.types.is_large_string(t) or pa.types.is_string_view(t):
            col = pc.cast(col, pa.string())
        names.append(name)
        columns.append(col)
    return CsvBatch(pa.table(columns, names=names), frozenset(hex_columns))


def _write_csv(batch: CsvBatch, path: str) -> None:
    # Every valid value quoted, NULL unquoted: LOAD DATA reads an unquoted
    # NULL as SQL NULL and "NULL" as the string. No escape character, so
    # backslashes are data; quotes inside values are doubled.
    options = pcsv.WriteOptions(
        include_header=False,
        null_string="NULL",
        quoting_style="all_valid",
        batch_size=_CSV_BATCH_ROWS,
    )
    pcsv.write_csv(batch.table, path, options)


_LOAD_FORMAT = (
    "CHARACTER SET utf8mb4 FIELDS TERMINATED BY ',' OPTIONALLY ENCLOSED BY '\"' "
    "ESCAPED BY '' LINES TERMINATED BY '\\n'"
)


def load_csv(conn: Any, batch: CsvBatch, into: str, target_id: str) -> None:
    """``LOAD DATA LOCAL INFILE`` ``batch`` into the table ``into`` in ``conn``'s open
    transaction; any warning rolls it back and raises :class:`ConnectorError`."""
    targets, sets = [], []
    for i, name in enumerate(batch.table.column_names):
        if name in batch.hex_columns:
            targets.append(f"@h{i}")
            sets.append(f"{_q(name)} = UNHEX(@h{i})")
        else:
            targets.append(_q(name))
    fd, path = tempfile.mkstemp(prefix="sluice-mysql-", suffix=".csv")
    os.close(fd)
    try:
        _write_csv(batch, path)
        statement = (
            f"LOAD DATA LOCAL INFILE {conn.escape(path)} INTO TABLE {into} {_LOAD_FORMAT} "
            f"({', '.join(targets)})" + (f" SET {', '.join(sets)}" if sets else "")
        )
        with conn.cursor() as cur:
            conn._local_infile = True
            try:
                cur.execute(statement)
            finally:
                conn._local_infile = False
            warnings = cur.warning_count
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    if warnings:
        _reject(conn, warnings, target_id)


def _reject(conn: Any, count: int, target_id: str) -> None:
    """Roll back a batch the server loaded with warnings, quoting them."""
    shown = [
        str(r[2])
        for r in query(conn, f"SHOW WARNINGS LIMIT {_WARNINGS_SHOWN}")
        if str(r[0]) in ("Warning", "Error")
    ]
    if not shown:
        return  # notes only
    conn.rollback()
    more = f" (and {count - len(shown)} more)" if count > len(shown) else ""
    raise ConnectorError(
        f"{target_id}: the table does not take the batch: {'; '.join(shown)}{more} "
        "(rows count from 1 within the batch)"
    )


# -- target -------------------------------------------------------------------


class MySQLTarget(modes.Unit):
    """Writes batches into one MySQL / MariaDB table."""

    def __init__(self, spec: MySQLTargetSpec, ctx: Context, index: int) -> None:
        self.spec = spec
        self._url, self.schema, self.id = resolve_table(spec)
        self.table = spec.table.name
        self._ident = f"{_q(self.schema)}.{_q(self.table)}"
        self._stage = _q(f"_sluice_stage_{index}")
        self._conn: Any = None
        self._columns: dict[str, str] | None = None  # lower-case name -> name
        self._key: list[str] = list(spec.table.primary_key or [])
        self._collation = "utf8mb4_bin"
        self._ledger = positions.Ledger(
            positions.MYSQL,
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
        """``mysql://host:port/database`` of the target (no credentials)."""
        return f"mysql://{self._url.host}:{self._url.port}/{self.schema}"

    # -- lifecycle ----------------------------------------------------------

    def open(self) -> None:
        """Connect and reflect the table (its columns and key).

        Raises :class:`TransientError` when the server cannot be reached,
        :class:`ConnectorError` when it refuses (credentials, database, key).
        """
        self.close()
        try:
            self._conn = connect(self._url, local_infile=True)
            self._collation = binary_collation(self._conn)
            self._reflect()
            if not self._query(
                "SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s", (self.schema,)
            ):
                self._query(f"CREATE DATABASE IF NOT EXISTS {_q(self.schema)}")
            if self.positions_table:
                self._ledger.create(self._query)
            self._conn.commit()
        except pymysql.Error as exc:
            self.close()
            raise connect_error(self.id, exc) from exc
        except ConnectorError:
            self.close()
            raise

    def close(self) -> None:
        """Drop the connection; an uncommitted batch is rolled back by the server."""
        conn, self._conn = self._conn, None
        self._unit_done()
        if conn is not None:
            with contextlib.suppress(pymysql.Error, OSError):
                conn.close()

    def _query(self, statement: str, params: tuple[Any, ...] | None = None) -> list[Any]:
        return query(self._require(), statement, params)

    def _execute(self, statement: str) -> int:
        """Run one statement; the rows it changed."""
        with self._require().cursor() as cur:
            return int(cur.execute(statement))

    def _reflect(self) -> None:
        rows = self._query(
            "SELECT COLUMN_NAME FROM information_schema.COLUMNS "
            "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s ORDER BY ORDINAL_POSITION",
            (self.schema, self.table),
        )
        self._columns = {str(r[0]).lower(): str(r[0]) for r in rows} if rows else None
        if self._columns is None or self.spec.mode != "merge":
            return
        unique: dict[str, list[str]] = {}
        for index, column in self._query(
            "SELECT INDEX_NAME, COLUMN_NAME FROM information_schema.STATISTICS "
            "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s AND NON_UNIQUE = 0 "
            "ORDER BY INDEX_NAME, SEQ_IN_INDEX",
            (self.schema, self.table),
        ):
            unique.setdefault(str(index), []).append(str(column))
        if not self._key:
            self._key = unique.get("PRIMARY", [])
            if not self._key:
                raise ConnectorError(
                    f'{self.id}: mode = "merge" needs a primary key: the table has none; '
                    "set [target.table] primary_key"
                )
            return
        wanted = {k.lower() for k in self._key}
        if not any({c.lower() for c in cols} == wanted for cols in unique.values()):
            raise ConnectorError(
                f"{self.id}: merge key {self._key} is neither the primary key nor a unique key "
                "of the table, so ON DUPLICATE KEY UPDATE would not merge on it"
            )

    # -- writing --------------------------------------------------------------

    def write(self, data: pa.Table) -> None:
        """Load ``data`` inside the open transaction (committed by :meth:`flush`).

        Raises :class:`TransientError` when the connection is lost,
        :class:`ConnectorError` for a batch the table does not take.
        """
        if data.num_rows == 0:
            return
        self._require()
        batch = csv_ready(data, self.id)
        if batch.table.num_columns == 0:
            return
        if self.spec.mode in ("merge", "scd2"):
            names = {n.lower() for n in batch.table.column_names}
            missing = [k for k in self._key if k.lower() not in names]
            if missing:
                raise ConnectorError(
                    f"{self.id}: {self.spec.mode} key column(s) {missing} missing from the batch"
                )
        try:
            self._begin(data.select(batch.table.column_names).schema)
            if self.spec.mode in ("merge", "scd2"):
                self._fill_stage(batch.table.column_names)
                self._load(batch, self._stage)
                self._from_stage(batch.table.column_names)
            else:
                self._load(batch, self._ident)
                self._rows += batch.table.num_rows
        except pymysql.Error as exc:
            self._fail(exc)

    # -- units and modes ------------------------------------------------------

    def prepare(self, schema: pa.Schema, *, create: bool = True) -> None:
        """Begin a unit for batches of ``schema``: create the table or add the
        columns it lacks (``create``; else refuse them), and in ``truncate``
        mode delete the old rows in the open transaction (after the DDL,
        which MySQL commits)."""
        schema = pa.schema([f for f in schema if f.type != pa.null()])
        try:
            if not create:
                self._reflect()
                self._require_columns(schema, self._columns, fold=True)
            self._begin(schema)
        except pymysql.Error as exc:
            self._fail(exc)

    def _begin(self, schema: pa.Schema) -> None:
        """Make the table fit ``schema``; at a unit's first write, begin it."""
        schema = self._with_scd2(schema)
        if not self._fresh and self.spec.mode in ("truncate", "scd2") and self._columns is not None:
            added = [f.name for f in schema if f.name.lower() not in self._columns]
            if added:  # DDL would commit the rows deleted / closed so far
                raise ConnectorError(
                    f"{self.id}: column(s) {added} appeared after the {self.spec.mode} unit "
                    "began; MySQL commits DDL, so they must be in the schema it opens with"
                )
        self._ensure_table(schema)
        self._begin_unit(self._execute, self._ident)

    def insert_select(self, select_sql: str, *, create: bool = True) -> None:
        """Write the rows of ``select_sql`` (run here) in the mode, inside the
        open transaction: they never leave the database."""
        probe = _q("_sluice_probe")
        try:
            self._query(f"DROP TEMPORARY TABLE IF EXISTS {probe}")
            self._query(f"CREATE TEMPORARY TABLE {probe} SELECT * FROM ({select_sql}) AS q LIMIT 0")
            fields = []
            for name, type_, *_ in self._query(f"SHOW COLUMNS FROM {probe}"):
                text = str(type_)
                base = text.split("(", maxsplit=1)[0].split(maxsplit=1)[0].lower()
                digits = text[text.find("(") + 1 : text.find(")")].split(",") if "(" in text else []
                precision = digits[0] if digits else 10
                scale = digits[1] if len(digits) > 1 else 0
                fields.append(
                    pa.field(str(name), _arrow_type(base, text, precision, scale) or pa.string())
                )
            self._query(f"DROP TEMPORARY TABLE {probe}")
            schema = pa.schema(fields)
            self.prepare(schema, create=create)
            cols = ", ".join(_q(n) for n in schema.names)
            if self.spec.mode in ("merge", "scd2"):
                self._fill_stage(schema.names)
                self._query(f"INSERT INTO {self._stage} ({cols}) SELECT * FROM ({select_sql}) AS q")
                self._from_stage(schema.names)
            else:
                self._rows += self._execute(
                    f"INSERT INTO {self._ident} ({cols}) SELECT * FROM ({select_sql}) AS q"
                )
        except pymysql.Error as exc:
            self._fail(exc)

    def _ensure_table(self, schema: pa.Schema) -> None:
        if self._columns is None:
            if self.spec.mode == "merge" and not self._key:
                raise ConnectorError(
                    f'{self.id}: mode = "merge" needs [target.table] primary_key to create the table'
                )
            names = {f.name.lower() for f in schema}
            missing = [k for k in self._key if k.lower() not in names]
            if missing:
                raise ConnectorError(
                    f"{self.id}: primary key column(s) {missing} missing from the batch"
                )
            keys = {k.lower() for k in self._key}
            defs = []
            for f in schema:
                key = f.name.lower() in keys
                type_ = self._column_type(f, key=key)
                defs.append(f"{_q(f.name)} {type_}{' NOT NULL' if key else ''}")
            if self._key and self.spec.mode == "scd2":  # several versions per key
                defs.append(f"KEY ({', '.join(_q(k) for k in self._key)})")
            elif self._key:
                defs.append(f"PRIMARY KEY ({', '.join(_q(k) for k in self._key)})")
            if not self._query(
                "SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s", (self.schema,)
            ):
                self._query(f"CREATE DATABASE IF NOT EXISTS {_q(self.schema)}")
            self._query(
                f"CREATE TABLE IF NOT EXISTS {self._ident} ({', '.join(defs)}) "
                f"ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE={self._collation}"
            )
            self._reflect()
            return
        added = [f for f in schema if f.name.lower() not in self._columns]
        if added:
            clauses = ", ".join(f"ADD COLUMN {_q(f.name)} {self._column_type(f)}" for f in added)
            try:
                self._query(f"ALTER TABLE {self._ident} {clauses}")
            except pymysql.Error as exc:
                if _code(exc) != 1060:  # ER_DUP_FIELDNAME: another writer added it first
                    raise
            self._reflect()

    def _column_type(self, f: pa.Field, *, key: bool = False) -> str:
        try:
            return mysql_type(f.type, key=key)
        except ConnectorError as exc:
            raise ConnectorError(f"{self.id}: column '{f.name}': {exc}") from exc

    def _load(self, batch: CsvBatch, into: str) -> None:
        load_csv(self._require(), batch, into, self.id)

    def _fill_stage(self, names: list[str]) -> None:
        """(Re)create the stage: the target's ``names`` columns plus a sequence."""
        cols = ", ".join(_q(n) for n in names)
        self._query(f"DROP TEMPORARY TABLE IF EXISTS {self._stage}")
        self._query(
            f"CREATE TEMPORARY TABLE {self._stage} "
            f"({_q(_SEQ)} BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY) ENGINE=InnoDB "
            f"SELECT {cols} FROM {self._ident} LIMIT 0"
        )

    def _from_stage(self, names: list[str]) -> None:
        """Apply the stage's rows (merge or scd2), then drop it."""
        if self.spec.mode == "scd2":
            self._scd2(names)
        else:
            self._merge(names)
        self._query(f"DROP TEMPORARY TABLE {self._stage}")

    def _merge(self, names: list[str]) -> None:
        cols = ", ".join(_q(n) for n in names)
        keys = {k.lower() for k in self._key}
        others = [n for n in names if n.lower() not in keys]
        # Qualified: the stage has the same column names.
        target = [f"{self._ident}.{_q(n)}" for n in (others or self._key[:1])]
        if others:
            updates = [f"{t} = VALUES({_q(n)})" for t, n in zip(target, others, strict=True)]
        else:
            updates = [f"{target[0]} = {target[0]}"]  # all-key table: keep the row
        key = ", ".join(_q(k) for k in self._key)
        counted = self._query(f"SELECT COUNT(*) FROM (SELECT DISTINCT {key} FROM {self._stage}) d")
        self._query(
            f"INSERT INTO {self._ident} ({cols}) SELECT {cols} FROM {self._stage} "
            f"ORDER BY {_q(_SEQ)} ON DUPLICATE KEY UPDATE {', '.join(updates)}"
        )
        self._rows += int(counted[0][0])

    def _scd2(self, names: list[str]) -> None:
        """Apply the stage's rows (the last of each key) as scd2 versions
        (:mod:`sluice.connectors.sql.modes`)."""
        rows = _q("_sluice_scd2")
        sql = modes.Scd2(self._ident, rows, self._key, names, _q, update_join=True)
        compare = sql.compare(self.spec.compare_columns)
        unknown = [c for c in compare if c not in names]
        if unknown:
            raise ConnectorError(f"{self.id}: compare_columns {unknown} are not in the rows")
        ts = self.spec.event_timestamp_column
        if ts is not None and ts not in names:
            raise ConnectorError(f"{self.id}: event_timestamp_column {ts!r} is not in the rows")
        now = f"TIMESTAMP '{modes.utc_text(self._now)}'"
        valid_from = f"CAST(d.{_q(ts)} AS DATETIME(6))" if ts else now
        # CONCAT (|| is OR here) is null when the value is; CONCAT_WS skips it.
        parts = [f"CONCAT({modes.label(c)}, CAST(d.{_q(c)} AS CHAR))" for c in compare]
        sep = "CHAR(31 USING utf8mb4)"
        row_hash = f"MD5(CONCAT_WS({sep}, {', '.join(parts)}))" if parts else "MD5('')"
        cols = ", ".join(_q(n) for n in names)
        key = ", ".join(_q(k) for k in self._key)
        self._query(f"DROP TEMPORARY TABLE IF EXISTS {rows}")
        self._query(
            f"CREATE TEMPORARY TABLE {rows} ENGINE=InnoDB SELECT d.*, {valid_from} AS valid_from, "
            f"{row_hash} AS row_hash FROM (SELECT {cols} FROM (SELECT s.*, ROW_NUMBER() OVER "
            f"(PARTITION BY {key} ORDER BY {_q(_SEQ)} DESC) AS _sluice_rn FROM {self._stage} s) x "
            "WHERE _sluice_rn = 1) d"
        )
        self._rows += self._execute(sql.close_changed())
        if self.spec.ttl_seconds is not None:
            cutoff = self._now - timedelta(seconds=self.spec.ttl_seconds)
            self._rows += self._execute(
                sql.close_stale(now, f"TIMESTAMP '{modes.utc_text(cutoff)}'")
            )
        self._rows += self._execute(sql.insert_new())
        self._query(f"DROP TEMPORARY TABLE {rows}")

    def held_positions(self) -> dict[str, Position]:
        """See :class:`~sluice.connectors.sql.positions.RecordsPositions`."""
        return self._ledger.held_committed(
            self._query, self._require(), (pymysql.Error,), self._fail
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
        self._ledger.flush(self._query, self._require(), (pymysql.Error,), self._fail)
        self._committed = self._rows
        self._unit_done()

    def _fail(self, exc: pymysql.Error) -> NoReturn:
        """Classify a failure: a dead connection (or a deadlock) is transient, anything else fatal."""
        self._unit_done()
        if not alive(self._conn) or _code(exc) in _TRANSIENT_CODES:
            self.close()
            raise TransientError(f"{self.id}: connection lost: {message(exc)}") from exc
        with contextlib.suppress(pymysql.Error, ConnectorError):
            self._reflect()  # a failed ALTER leaves the columns as they were
        raise ConnectorError(f"{self.id}: {message(exc)}") from exc

    def _require(self) -> Any:
        if self._conn is None:
            raise TransientError(f"{self.id}: not connected")
        return self._conn


def build_target(spec: MySQLTargetSpec, ctx: Context, index: int) -> MySQLTarget:
    """Registry hook."""
    return MySQLTarget(spec, ctx, index)


# -- lookups ------------------------------------------------------------------


def _arrow_type(data_type: str, column_type: str, precision: Any, scale: Any) -> pa.DataType | None:
    """The Arrow type of a column from information_schema (None: let Arrow infer)."""
    unsigned = "unsigned" in column_type.lower()
    if data_type == "bigint" and unsigned:
        return pa.uint64()
    if data_type in ("tinyint", "smallint", "mediumint", "int", "integer", "bigint", "year"):
        return pa.int64()
    if data_type == "bit":
        return pa.int64()
    if data_type in ("decimal", "numeric"):
        p, s = int(precision), int(scale)
        return pa.decimal128(p, s) if p <= 38 else pa.decimal256(p, s)
    if data_type == "float":
        return pa.float32()
    if data_type in ("double", "real"):
        return pa.float64()
    if data_type == "datetime":
        return pa.timestamp("us")
    if data_type == "timestamp":
        return pa.timestamp("us", tz="UTC")
    if data_type == "date":
        return pa.date32()
    if data_type == "time":
        return pa.duration("us")
    if data_type in ("char", "varchar", "tinytext", "text", "mediumtext", "longtext") or (
        data_type in ("enum", "set", "json", "uuid", "inet4", "inet6")
    ):
        return pa.string()
    if data_type in ("binary", "varbinary", "tinyblob", "blob", "mediumblob", "longblob"):
        return pa.binary()
    return None


def _column(values: list[Any], t: pa.DataType | None) -> pa.Array:
    """One lookup column; values the type cannot hold (zero dates) become NULL."""
    if t is None:
        return pa.array(values)
    if pa.types.is_integer(t):
        values = [int.from_bytes(v, "big") if isinstance(v, bytes) else v for v in values]
    elif pa.types.is_timestamp(t):
        values = [v if isinstance(v, datetime) else None for v in values]
    elif pa.types.is_date(t):
        values = [v if isinstance(v, date) else None for v in values]
    elif pa.types.is_duration(t):
        values = [v if isinstance(v, timedelta) else None for v in values]
    elif pa.types.is_string(t):
        values = [
            v
            if v is None or isinstance(v, str)
            else ",".join(sorted(v))
            if isinstance(v, set)
            else v.decode()
            if isinstance(v, bytes)
            else str(v)
            for v in values
        ]
    return pa.array(values, t)


def load_table(url: str, schema: str | None, table: str) -> pa.Table:
    """``SELECT * FROM schema.table`` as Arrow (``schema`` None: the URL's database).

    Types come from the table's definition, so an empty table has its
    schema too: integers int64 (``BIGINT UNSIGNED`` uint64), ``DECIMAL(p,s)``
    decimal128(p, s) (decimal256 above 38 digits: exact, never float),
    ``FLOAT`` float32, ``DOUBLE`` float64, ``DATETIME`` timestamp[us],
    ``TIMESTAMP`` timestamp[us, UTC], ``DATE`` date32, ``TIME`` duration[us]
    (MySQL TIME spans ±838 hours), text / enum / set / JSON string, binary
    types binary. Raises :class:`TransientError` when the server cannot be
    reached, :class:`ConnectorError` for anything else.
    """
    parts = parse_url(url)
    name = f"{_q(schema)}.{_q(table)}" if schema else _q(table)
    what = f"mysql lookup {schema + '.' if schema else ''}{table}"
    try:
        conn = connect(parts, local_infile=False)
    except pymysql.Error as exc:
        if _code(exc) in _TRANSIENT_CODES:
            raise TransientError(f"{what}: cannot connect: {message(exc)}") from exc
        raise ConnectorError(f"{what}: {message(exc)}") from exc
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT COLUMN_NAME, DATA_TYPE, COLUMN_TYPE, NUMERIC_PRECISION, NUMERIC_SCALE "
                "FROM information_schema.COLUMNS "
                "WHERE TABLE_SCHEMA = COALESCE(%s, DATABASE()) AND TABLE_NAME = %s",
                (schema, table),
            )
            types = {
                str(r[0]).lower(): _arrow_type(str(r[1]).lower(), str(r[2]), r[3], r[4])
                for r in cur.fetchall()
            }
            cur.execute(f"SELECT * FROM {name}")
            names = [d[0] for d in cur.description]
            rows = cur.fetchall()
        conn.commit()
    except pymysql.Error as exc:
        if _code(exc) in _TRANSIENT_CODES:
            raise TransientError(f"{what}: connection lost: {message(exc)}") from exc
        raise ConnectorError(f"{what}: {message(exc)}") from exc
    finally:
        with contextlib.suppress(pymysql.Error, OSError):
            conn.close()
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in names]
    arrays = [
        _column(list(values), types.get(col.lower()))
        for col, values in zip(names, columns, strict=True)
    ]
    return pa.Table.from_arrays(arrays, names=names)
