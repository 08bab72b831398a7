"""Where a job's rows land: the table made ready, then a load in the job's mode.

``append`` is written here (:class:`~sluice.jobs.db.AppendLoad`, and one
``INSERT … SELECT`` on the same-database path). ``truncate``, ``merge`` /
``scd1`` and ``scd2`` go through the SQL targets' load modes
(:mod:`sluice.connectors.sql.load`), in one transaction per run as well.
"""

from __future__ import annotations

from typing import Any, Protocol

import pyarrow as pa

from sluice.api.connections import Connection
from sluice.jobs.db import Database
from sluice.jobs.declare import Job, TargetBinding
from sluice.jobs.tables import ManagedTable, quote_for


class Load(Protocol):
    """One target's writes for one run: visible all at once on ``commit``."""

    def write(self, batch: pa.RecordBatch) -> None: ...

    def commit(self) -> Any: ...

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


def _spec(t: TargetBinding, job: Job, dialect: str) -> Any:
    from sluice.connectors.sql.load import LoadSpec

    table = t.table
    name = (
        f"{table.schema}.{table.name}"
        if table.schema and dialect in {"postgres", "duckdb", "delta"}
        else table.name
    )
    return LoadSpec(
        table=name,
        mode="merge" if t.mode == "scd1" else t.mode,  # type: ignore[arg-type]  # MODES checked at declaration
        primary_key=tuple(table.primary_key),
        compare_columns=tuple(job.compare_columns) if job.compare_columns else None,
        event_timestamp_column=job.event_timestamp_column,
        ttl_seconds=job.ttl_seconds,
    )


def _connection(db: Database, t: TargetBinding) -> Connection:
    from sluice.api.connections import resolve

    conn = t.connection
    return conn if isinstance(conn, Connection) else resolve(str(conn or db.name))


#: Connection kinds a job writes through the loads alone (no SQL of ours).
DELTA_KINDS = ("delta_local", "delta_s3")


def resolve_target(t: TargetBinding) -> Connection:
    """The connection ``t`` names."""
    from sluice.api.connections import resolve

    conn = t.connection
    return conn if isinstance(conn, Connection) else resolve(str(conn))


def target_database(t: TargetBinding) -> Database | None:
    """The SQL database ``t`` writes to, or None for a Delta table."""
    conn = resolve_target(t)
    return None if conn.kind in DELTA_KINDS else Database.of(conn)


def open_delta(t: TargetBinding, job: Job) -> Load:
    """A load into the Delta table ``t`` names (folder ``schema/name`` under
    the connection's path or prefix), in the job's mode."""
    from sluice.connectors.sql.load import open_load

    load: Load = open_load(resolve_target(t), _spec(t, job, "delta"), t.table.arrow_schema)
    return load


def open_target(db: Database, t: TargetBinding, job: Job) -> Load:
    """A load for ``t``'s table on ``db``, the table created or migrated first.

    ``append`` writes here; the other modes open the SQL targets' load
    (:func:`sluice.connectors.sql.load.open_load`), which adds the mode's
    columns (scd2's ``valid_from`` / ``valid_to`` / ``is_current`` /
    ``row_hash``) and keys. An scd2 table is created there, not from the
    declaration: its key is the business key plus ``valid_from``.
    """
    if t.mode != "scd2":
        ensure(db, t.table)
    if t.mode == "append":
        return db.open_append(t.table)
    from sluice.connectors.sql.load import open_load

    load: Load = open_load(_connection(db, t), _spec(t, job, db.dialect), t.table.arrow_schema)
    return load


def insert_select(db: Database, t: TargetBinding, job: Job, sql: str) -> tuple[int, str]:
    """Load ``sql``'s rows into ``t`` inside the database; (rows, the statement run)."""
    if t.mode != "append":
        from sluice.connectors.sql.load import insert_select as load_select

        if t.mode != "scd2":
            ensure(db, t.table)
        select = t.table.select_sql(db.dialect, sql)
        rows = load_select(_connection(db, t), _spec(t, job, db.dialect), select)
        return int(rows), select
    ensure(db, t.table)
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
