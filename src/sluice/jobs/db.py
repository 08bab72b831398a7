"""The SQL databases jobs read and write: Postgres, MySQL/MariaDB, SQLite, DuckDB.

One :class:`Database` per resolved connection. Reads stream: Postgres through
ADBC (binary COPY, batches of bounded bytes), DuckDB through its record-batch
reader, SQLite and MySQL through server-side cursors ``fetchmany``-ed into
Arrow batches of ``batch_rows``. No reader materialises a whole result.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from sluice.api.connections import Connection, resolve
from sluice.config.interpolate import interpolate
from sluice.errors import ConfigError, ConfigProblem, SluiceError
from sluice.jobs.tables import ManagedTable, quote_for

#: Rows per Arrow batch where the reader chooses (SQLite, MySQL, DuckDB).
BATCH_ROWS = 50_000
#: Bytes per Arrow batch read from Postgres (the ADBC driver's hint).
BATCH_BYTES = 4 * 1024 * 1024
#: DuckDB's memory cap while a job loads into it (its default is 80 % of RAM,
#: which it fills with the rows of the open transaction).
DUCKDB_MEMORY_LIMIT = "64MB"


class JobError(SluiceError):
    """A job's run failed (its query, its write, or its body raised)."""


@dataclass(frozen=True)
class Database:
    """A resolved SQL connection: its dialect and where it points."""

    name: str
    dialect: str
    url: str | None = None
    path: str | None = None

    @staticmethod
    def of(conn: str | Connection) -> Database:
        """Resolve a connection name (or take a :class:`Connection`)."""
        c = conn if isinstance(conn, Connection) else resolve(conn)
        keys, problems = interpolate(dict(c.keys), os.environ, f"connections.{c.name}")
        if problems:
            raise ConfigError([ConfigProblem(at, "", msg) for at, msg in problems])
        if c.kind in {"postgres", "mysql"}:
            return Database(str(c.name), c.kind, url=str(keys["url"]))
        if c.kind in {"sqlite", "duckdb"}:
            return Database(str(c.name), c.kind, path=str(keys["path"]))
        raise ConfigError(
            [
                ConfigProblem(
                    f"connections.{c.name}",
                    "kind",
                    f"a job reads and writes SQL databases (postgres, mysql, sqlite, duckdb), "
                    f"not {c.kind}",
                )
            ]
        )

    @property
    def identity(self) -> tuple[str, ...]:
        """Equal for two connections to the same database (the fast-path test)."""
        if self.path is not None:
            p = self.path if self.path == ":memory:" else str(Path(self.path).resolve())
            return (self.dialect, p)
        u = urllib.parse.urlsplit(self.url or "")
        return (self.dialect, u.hostname or "", str(u.port or ""), u.path.strip("/"))

    # -- connections -------------------------------------------------------

    def connect(self) -> Any:
        """A DB-API connection, not in autocommit (the caller commits)."""
        if self.dialect == "postgres":
            import psycopg

            return psycopg.connect(self.url or "")
        if self.dialect == "duckdb":
            from sluice.connectors.duckdb.target import connect

            return connect(self.path or ":memory:")
        if self.dialect == "sqlite":
            if self.path != ":memory:":
                Path(self.path or "").parent.mkdir(parents=True, exist_ok=True)
            return sqlite3.connect(self.path or ":memory:", isolation_level=None)
        return _mysql(self.url or "")

    # -- reads -------------------------------------------------------------

    def stream(self, sql: str, batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
        """The rows of ``sql`` as Arrow batches, streamed (bounded memory)."""
        if self.dialect == "postgres":
            with adbc_connect(self.url or "") as conn, conn.cursor() as cur:
                # Batches of about 4 MB (the driver's default is 16 MB).
                cur.adbc_statement.set_options(
                    **{"adbc.postgresql.batch_size_hint_bytes": str(BATCH_BYTES)}
                )
                cur.execute(sql)
                reader = cur.fetch_record_batch()
                for batch in reader:
                    yield _plain(batch)
            return
        if self.dialect == "duckdb":
            conn = self.connect()
            try:
                rel = conn.sql(sql)
                # duckdb 2.x: to_arrow_reader; 1.x: fetch_arrow_reader.
                reader = getattr(rel, "to_arrow_reader", None) or rel.fetch_arrow_reader
                yield from reader(batch_rows)
            finally:
                conn.close()
            return
        conn = self.connect()
        try:
            if self.dialect == "mysql":
                import pymysql.cursors

                cur = conn.cursor(pymysql.cursors.SSCursor)
            else:
                cur = conn.cursor()
            cur.execute(sql)
            names = [d[0] for d in cur.description]
            while rows := cur.fetchmany(batch_rows):
                cols = list(zip(*rows, strict=True))
                yield pa.RecordBatch.from_arrays([pa.array(c) for c in cols], names=names)
            cur.close()
        finally:
            conn.close()

    def explain(self, sql: str) -> str:
        """The database's plan for ``sql`` (checks it against the real schema)."""
        prefix = "EXPLAIN QUERY PLAN " if self.dialect == "sqlite" else "EXPLAIN "
        conn = self.connect()
        try:
            cur = conn.cursor()
            cur.execute(prefix + sql)
            return "\n".join(" ".join(str(v) for v in row) for row in cur.fetchall())
        finally:
            conn.close()

    # -- writes ------------------------------------------------------------

    def ensure(self, conn: Any, table: ManagedTable) -> None:
        """Create ``table`` (and its schema) or add its declared columns that are missing."""
        cur = conn.cursor()
        for stmt in table.create_sql(self.dialect):
            cur.execute(stmt)
        for stmt in table.add_column_sql(self.dialect, self.columns(conn, table)):
            cur.execute(stmt)

    def columns(self, conn: Any, table: ManagedTable) -> list[str]:
        cur = conn.cursor()
        if self.dialect == "sqlite":
            cur.execute(f"PRAGMA table_info({quote_for('sqlite')(table.name)})")
            return [r[1] for r in cur.fetchall()]
        if self.dialect == "mysql":
            cur.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = DATABASE() AND table_name = %s",
                (table.name,),
            )
            return [r[0] for r in cur.fetchall()]
        schema = table.schema or ("public" if self.dialect == "postgres" else "main")
        ph = "%s" if self.dialect == "postgres" else "?"
        cur.execute(
            "SELECT column_name FROM information_schema.columns "
            f"WHERE table_schema = {ph} AND table_name = {ph}",
            (schema, table.name),
        )
        return [r[0] for r in cur.fetchall()]

    def begin(self, conn: Any) -> None:
        if self.dialect in {"duckdb", "sqlite"}:
            conn.execute("BEGIN")

    def execute(self, conn: Any, sql: str) -> int:
        """Run one statement in the open transaction; the rows it touched."""
        if self.dialect == "duckdb":
            row = conn.execute(sql).fetchone()
            return int(row[0]) if row else 0
        cur = conn.cursor()
        cur.execute(sql)
        return int(cur.rowcount if cur.rowcount is not None else -1)

    def open_append(self, table: ManagedTable) -> AppendLoad:
        """An append writer for ``table`` (already ensured): write / commit / abort."""
        return AppendLoad(self, table)


class AppendLoad:
    """Appends batches to one table in one transaction; ``commit`` makes them visible.

    Postgres goes through ADBC bulk ingest (binary COPY, no per-row Python)
    in one open transaction. DuckDB keeps an open transaction's rows in
    memory, so its batches are staged in a Parquet file beside (a bounded
    writer) and inserted in one statement at ``commit``, with the database's
    memory capped (:data:`DUCKDB_MEMORY_LIMIT`): memory stays flat however
    many rows the run loads. SQLite and MySQL take ``executemany``.
    """

    def __init__(self, db: Database, table: ManagedTable) -> None:
        self.db = db
        self.table = table
        self.rows = 0
        self._stage: Any = None
        self._writer: Any = None
        if db.dialect == "postgres":
            self._conn: Any = adbc_connect(db.url or "")
        elif db.dialect == "duckdb":
            import tempfile

            self._conn = db.connect()
            self._conn.execute(f"SET memory_limit = '{DUCKDB_MEMORY_LIMIT}'")
            self._stage = tempfile.TemporaryDirectory(prefix="sluice-load-")
        else:
            self._conn = db.connect()
            db.begin(self._conn)

    def write(self, batch: pa.RecordBatch) -> None:
        """Insert ``batch`` (normalised to the table) inside the open transaction."""
        if batch.num_rows == 0:
            return
        db, table = self.db, self.table
        q = quote_for(db.dialect)
        cols = ", ".join(q(n) for n in batch.schema.names)
        ident = table.qualified(db.dialect)
        if db.dialect == "postgres":
            with self._conn.cursor() as cur:
                cur.adbc_ingest(
                    table.name,
                    batch,
                    mode="append",
                    db_schema_name=table.schema or "public",
                )
        elif db.dialect == "duckdb":
            import pyarrow.parquet as pq

            if self._writer is None:
                self._writer = pq.ParquetWriter(f"{self._stage.name}/rows.parquet", batch.schema)
            self._writer.write_batch(batch)
        else:
            if db.dialect == "mysql":
                batch = _naive_utc(batch)
            ph = ", ".join(["%s" if db.dialect == "mysql" else "?"] * batch.num_columns)
            arrays = _sqlite_ready(batch, db.dialect)
            rows = list(zip(*(c.to_pylist() for c in arrays), strict=True))
            self._conn.cursor().executemany(f"INSERT INTO {ident} ({cols}) VALUES ({ph})", rows)
        self.rows += batch.num_rows

    def _insert_staged(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        q = quote_for("duckdb")
        cols = ", ".join(q(c.name) for c in self.table.columns)
        path = f"{self._stage.name}/rows.parquet".replace("'", "''")
        self._conn.execute("BEGIN")
        self._conn.execute(
            f"INSERT INTO {self.table.qualified('duckdb')} ({cols}) "
            f"SELECT {cols} FROM read_parquet('{path}')"
        )

    def _cleanup(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):  # aborting: the first error is the one to tell
                self._writer.close()
            self._writer = None
        if self._stage is not None:
            self._stage.cleanup()
            self._stage = None

    def commit(self) -> None:
        """Make every written batch visible at once, then close."""
        try:
            if self.db.dialect == "duckdb":
                self._insert_staged()
                if self.rows:
                    self._conn.execute("COMMIT")
            elif self.db.dialect == "sqlite":
                self._conn.execute("COMMIT")
            else:
                self._conn.commit()
        except BaseException:
            self.abort()
            raise
        self._cleanup()
        self._conn.close()

    def abort(self) -> None:
        """Drop every written batch; close."""
        try:
            if self.db.dialect in {"duckdb", "sqlite"}:
                self._conn.execute("ROLLBACK")
            else:
                self._conn.rollback()
        except Exception:
            pass
        finally:
            self._cleanup()
            with contextlib.suppress(Exception):  # closing after a failure: nothing left to tell
                self._conn.close()


_ADBC_ROOTS: dict[str, Any] = {}
_ADBC_LOCK = threading.Lock()


def adbc_connect(url: str) -> Any:
    """An ADBC Postgres connection. Opening the driver's database costs about
    half a second (it loads the server's types), so one is kept per URL and
    each use clones a connection from it (milliseconds)."""
    from sluice.connectors.postgres.driver import adbc

    with _ADBC_LOCK:
        root = _ADBC_ROOTS.get(url)
        if root is None:
            if not _ADBC_ROOTS:
                atexit.register(_close_roots)
            root = _ADBC_ROOTS[url] = adbc.connect(url)
        return root.adbc_clone()


def _close_roots() -> None:
    """Close the kept ADBC connections before the interpreter tears down the
    driver (closing them from ``__del__`` at exit raises)."""
    with _ADBC_LOCK:
        for root in _ADBC_ROOTS.values():
            with contextlib.suppress(Exception):  # exiting: nothing left to tell
                root.close()
        _ADBC_ROOTS.clear()


def _mysql(url: str) -> Any:
    import pymysql

    u = urllib.parse.urlsplit(url)
    return pymysql.connect(
        host=u.hostname or "127.0.0.1",
        port=u.port or 3306,
        user=urllib.parse.unquote(u.username or "root"),
        password=urllib.parse.unquote(u.password or ""),
        database=u.path.strip("/") or None,
        autocommit=False,
    )


def _plain(batch: pa.RecordBatch) -> pa.RecordBatch:
    """``batch`` without the driver's field metadata."""
    return pa.RecordBatch.from_arrays(
        batch.columns, schema=pa.schema([pa.field(f.name, f.type) for f in batch.schema])
    )


def _naive_utc(batch: pa.RecordBatch) -> pa.RecordBatch:
    arrays = []
    for a in batch.columns:
        if pa.types.is_timestamp(a.type) and a.type.tz:
            a = a.cast(pa.timestamp(a.type.unit))
        arrays.append(a)
    return pa.RecordBatch.from_arrays(arrays, names=batch.schema.names)


def _sqlite_ready(batch: pa.RecordBatch, dialect: str) -> list[pa.Array]:
    if dialect != "sqlite":
        return list(batch.columns)
    out = []
    for a in batch.columns:
        if pa.types.is_timestamp(a.type) or pa.types.is_date(a.type):
            a = a.cast(pa.string())
        elif pa.types.is_decimal(a.type):
            a = a.cast(pa.float64())
        out.append(a)
    return out
