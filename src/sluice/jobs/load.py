"""Where a job's rows land: the table made ready, then a load in the job's mode.

``append`` is written here (:class:`~sluice.jobs.db.AppendLoad`, and one
``INSERT … SELECT`` on the same-database path). ``truncate``, ``merge`` /
``scd1`` and ``scd2`` go through the SQL targets' load modes
(:mod:`sluice.connectors.sql.load`) where that module provides them.
"""

from __future__ import annotations

from typing import Protocol

import pyarrow as pa

from sluice.jobs.db import Database, JobError
from sluice.jobs.declare import Job, TargetBinding
from sluice.jobs.tables import ManagedTable, quote_for


class Load(Protocol):
    """One target's writes for one run: visible all at once on ``commit``."""

    def write(self, batch: pa.RecordBatch) -> None: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


_ENSURED: set[tuple[tuple[str, ...], str, tuple[str, ...]]] = set()


def ensure(db: Database, table: ManagedTable) -> None:
    """Create ``table`` or add its missing declared columns (committed at once).

    Once per process per database and table shape; on Postgres under an
    advisory lock, since two processes racing ``CREATE … IF NOT EXISTS`` can
    both try to create it.
    """
    key = (db.identity, table.qualified(db.dialect), tuple(c.name for c in table.columns))
    if key in _ENSURED:
        return
    conn = db.connect()
    try:
        db.begin(conn)
        if db.dialect == "postgres":
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (key[1],))
        db.ensure(conn, table)
        if db.dialect in {"duckdb", "sqlite"}:
            conn.execute("COMMIT")
        else:
            conn.commit()
    finally:
        conn.close()
    _ENSURED.add(key)


def _unsupported(t: TargetBinding) -> JobError:
    return JobError(
        f"mode {t.mode!r} on {t.table.name}: not implemented yet for batch jobs "
        "(append is; the other modes come with sluice.connectors.sql.load)"
    )


def open_target(db: Database, t: TargetBinding, job: Job) -> Load:
    """A load for ``t``'s table on ``db``, the table created or migrated first."""
    ensure(db, t.table)
    if t.mode == "append":
        return db.open_append(t.table)
    raise _unsupported(t)


def insert_select(db: Database, t: TargetBinding, job: Job, sql: str) -> tuple[int, str]:
    """Load ``sql``'s rows into ``t`` inside the database; (rows, the statement run)."""
    if t.mode != "append":
        raise _unsupported(t)
    q = quote_for(db.dialect)
    cols = ", ".join(q(c.name) for c in t.table.columns)
    statement = (
        f"INSERT INTO {t.table.qualified(db.dialect)} ({cols}) "
        f"{t.table.select_sql(db.dialect, sql)}"
    )
    conn = db.connect()
    try:
        db.begin(conn)
        rows = db.execute(conn, statement)
        if db.dialect in {"duckdb", "sqlite"}:
            conn.execute("COMMIT")
        else:
            conn.commit()
    except BaseException:
        try:
            if db.dialect in {"duckdb", "sqlite"}:
                conn.execute("ROLLBACK")
            else:
                conn.rollback()
        finally:
            conn.close()
        raise
    conn.close()
    return rows, statement
