"""Lookup tables for the SQL stage: loaded at start, refreshed in the background.

Each ``[transform.lookups.NAME]`` is read whole (``SELECT * FROM
schema.table``) into Arrow and registered under NAME. With
``refresh_interval_ms`` a daemon thread reloads it on that period and parks
the new table; the SQL stage swaps it in between two batches, so a batch
never sees half a refresh. A failed refresh keeps the old table, counts an
error and logs it; the next period tries again.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from sluice.config.spec import (
    DuckDBLookup,
    Lookup,
    MySQLLookup,
    PostgresLookup,
    SQLiteLookup,
)
from sluice.engine import metrics as m
from sluice.errors import ConnectorError, SluiceError

log = logging.getLogger("sluice")


def _qualified(schema: str | None, table: str, quote: str = '"') -> str:
    def q(name: str) -> str:
        return quote + name.replace(quote, quote * 2) + quote

    return f"{q(schema)}.{q(table)}" if schema else q(table)


def _load_postgres(spec: PostgresLookup) -> pa.Table:
    import adbc_driver_postgresql.dbapi as adbc

    with adbc.connect(spec.url) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT * FROM {_qualified(spec.schema, spec.table)}")
        table: pa.Table = cur.fetch_arrow_table()
        return table


_SQLITE_AFFINITY = (
    ("INT", pa.int64()),
    ("CHAR", pa.string()),
    ("CLOB", pa.string()),
    ("TEXT", pa.string()),
    ("BLOB", pa.binary()),
    ("REAL", pa.float64()),
    ("FLOA", pa.float64()),
    ("DOUB", pa.float64()),
)


def _sqlite_type(declared: str) -> pa.DataType | None:
    """The Arrow type of a declared SQLite column type (SQLite's affinity rules)."""
    upper = declared.upper()
    for needle, arrow in _SQLITE_AFFINITY:
        if needle in upper:
            return arrow
    return None


def _load_sqlite(spec: SQLiteLookup) -> pa.Table:
    name = _qualified(spec.schema, spec.table)
    conn = sqlite3.connect(f"file:{spec.path}?mode=ro", uri=True)
    try:
        cur = conn.execute(f"SELECT * FROM {name}")
        names = [d[0] for d in cur.description]
        rows = cur.fetchall()
        prefix = f"{_qualified(None, spec.schema)}." if spec.schema else ""
        info = conn.execute(f"PRAGMA {prefix}table_info({_qualified(None, spec.table)})").fetchall()
    except sqlite3.Error as exc:
        raise ConnectorError(f"sqlite lookup {spec.path} {name}: {exc}") from exc
    finally:
        conn.close()
    declared = {row[1]: row[2] or "" for row in info}
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in names]
    arrays = []
    for col_name, values in zip(names, columns, strict=True):
        arrow = _sqlite_type(declared.get(col_name, ""))
        try:
            arrays.append(pa.array(list(values), arrow))
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arrays.append(pa.array(list(values)))  # mixed affinity: let Arrow infer
    return pa.Table.from_arrays(arrays, names=names)


def _load_duckdb(spec: DuckDBLookup) -> pa.Table:
    import duckdb

    conn = duckdb.connect(spec.path, read_only=True)
    try:
        table: pa.Table = conn.sql(
            f"SELECT * FROM {_qualified(spec.schema, spec.table)}"
        ).to_arrow_table()
        return table
    except duckdb.Error as exc:
        raise ConnectorError(f"duckdb lookup {spec.path}: {exc}") from exc
    finally:
        conn.close()


def _load_mysql(spec: MySQLLookup) -> pa.Table:
    from sluice.connectors.mysql import target as mysql

    return mysql.load_table(spec.url, spec.schema, spec.table)


_LOADERS: dict[type, Callable[[Any], pa.Table]] = {
    PostgresLookup: _load_postgres,
    SQLiteLookup: _load_sqlite,
    DuckDBLookup: _load_duckdb,
    MySQLLookup: _load_mysql,
}


def load(spec: Lookup) -> pa.Table:
    """Read one lookup table whole. Any failure is a :class:`ConnectorError`."""
    try:
        return _LOADERS[type(spec)](spec)
    except SluiceError:
        raise
    except Exception as exc:  # every driver has its own error tree
        raise ConnectorError(
            f"{spec.kind} lookup {_qualified(spec.schema, spec.table)}: {exc}"
        ) from exc


class LookupTables:
    """The pipeline's lookup tables, with background refresh."""

    def __init__(self, specs: dict[str, Lookup], pipeline: str) -> None:
        self.specs = specs
        self.pipeline = pipeline
        self._pending: dict[str, pa.Table] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def load_all(self) -> dict[str, pa.Table]:
        """Every table, loaded now (at start: a failure stops the pipeline)."""
        tables = {}
        for name, spec in self.specs.items():
            tables[name] = load(spec)
            m.LOOKUP_REFRESHES.labels(self.pipeline, name, "ok").inc()
        return tables

    def start(self) -> None:
        """Start a refresh thread for each lookup with ``refresh_interval_ms``."""
        self._stop.clear()
        for name, spec in self.specs.items():
            if spec.refresh_interval_ms is None:
                continue
            thread = threading.Thread(
                target=self._refresh_loop,
                args=(name, spec),
                name=f"sluice-lookup-{name}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop the refresh threads (a load in progress finishes in the background)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=1)
        self._threads.clear()

    def take_updates(self) -> dict[str, pa.Table]:
        """Tables reloaded since the last call, by name (each handed out once)."""
        with self._lock:
            updates, self._pending = self._pending, {}
        return updates

    def _refresh_loop(self, name: str, spec: Lookup) -> None:
        interval = (spec.refresh_interval_ms or 0) / 1000
        while not self._stop.wait(interval):
            try:
                table = load(spec)
            except ConnectorError as exc:
                m.LOOKUP_REFRESHES.labels(self.pipeline, name, "error").inc()
                m.ERRORS.labels(self.pipeline, "lookup").inc()
                log.error("lookup %s: refresh failed, keeping the previous table: %s", name, exc)
                continue
            m.LOOKUP_REFRESHES.labels(self.pipeline, name, "ok").inc()
            with self._lock:
                self._pending[name] = table
