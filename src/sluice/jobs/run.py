"""Running one job once: read, normalise, write, commit, then the watermark.

Two paths:

- **same database** (the body returns SQL, the job has one target, and the
  source connection points at the target's database): one ``INSERT … SELECT``
  inside the database, the query wrapped in the table's normalisers;
- **Arrow** (anything else): the query's rows stream out of the source as
  Arrow batches (:meth:`Database.stream`), or the body yields them; each
  batch is normalised to each target's declared columns and written to every
  target (fan-out from one read), all inside each target's transaction. The
  batches are never collected: memory is bounded by a batch per target.

Every target commits only after the last batch was written; a failure
aborts them all. The watermark (``$watermark``) is returned for the caller
to store after the commit, never before.
"""

from __future__ import annotations

import datetime as dt
import types as pytypes
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from sluice.jobs.db import Database, JobError
from sluice.jobs.declare import Job, TargetBinding, takes_connection
from sluice.jobs.tables import quote_for

PLACEHOLDER = "$watermark"


@dataclass
class Outcome:
    """What a run did: rows written (per target summed), the path, the watermark."""

    rows: int = 0
    path: str = "arrow"
    batches: int = 0
    watermark: str | None = None
    sql: str | None = None
    per_target: dict[str, int] = field(default_factory=dict)


def source_db(job: Job) -> Database:
    """The database the job's SQL runs on (its first target's when unnamed)."""
    conn = job.source_connection or job.targets[0].connection
    assert conn is not None  # a binding always has a connection (declare checks it)
    return Database.of(conn)


def render(job: Job, sql: str, watermark: str | None, dialect: str) -> str:
    """``sql`` with ``$watermark`` replaced by the job's watermark as a literal
    (and ``$message`` by the message that fired the run, as a JSON string)."""
    from sluice.jobs import message

    sql = message.render(sql)
    if PLACEHOLDER not in sql:
        return sql
    if job.watermark_column is None:
        raise JobError(
            f"job {job.name}: the query uses $watermark but the job names no "
            "watermark_column (or event_timestamp_column)"
        )
    value = watermark if watermark is not None else job.watermark_initial
    literal = "'" + str(value).replace("'", "''") + "'"
    if dialect == "postgres" and _looks_like_ts(str(value)):
        literal += "::timestamptz"
    return sql.replace(PLACEHOLDER, literal)


def _looks_like_ts(v: str) -> bool:
    return len(v) >= 10 and v[4] == "-" and v[7] == "-"


def body(job: Job, conn: Any) -> str | Iterable[pa.RecordBatch]:
    """Call the job's body; a SQL string or an iterable of batches."""
    out = job.func(conn) if takes_connection(job.func) else job.func()
    if isinstance(out, str):
        return out
    if isinstance(out, pa.RecordBatch | pa.Table):
        return [out] if isinstance(out, pa.RecordBatch) else out.to_batches()
    if isinstance(out, pytypes.GeneratorType) or hasattr(out, "__iter__"):
        return out  # type: ignore[no-any-return]  # an iterable of batches, checked per item
    raise JobError(
        f"job {job.name}: the body returned {type(out).__name__}; expected a SQL string "
        "or an iterator of pyarrow.RecordBatch"
    )


def run(job: Job, watermark: str | None) -> Outcome:
    """Run ``job`` once; raises :class:`JobError` (or the body's error) on failure."""
    # A body that takes no connection (it yields batches from elsewhere) opens none.
    src = source_db(job) if takes_connection(job.func) or job.source_connection else None
    conn = src.connect() if src is not None else None
    try:
        produced = body(job, conn)
        if isinstance(produced, str):
            if src is None:
                src = source_db(job)
            sql = render(job, produced, watermark, src.dialect)
            from sluice.jobs.load import target_database

            only = job.targets[0]
            tdb = target_database(only)
            if len(job.targets) == 1 and tdb is not None and tdb.identity == src.identity:
                return _insert_select(job, only, tdb, sql)
            return _arrow(job, src.stream(sql), watermark, sql)
        return _arrow(job, iter(produced), watermark, None)
    finally:
        if conn is not None:
            conn.close()


def _wm_of(job: Job, batch: pa.RecordBatch, current: Any) -> Any:
    col = job.watermark_column
    if col is None or col not in batch.schema.names or batch.num_rows == 0:
        return current
    m: Any = pc.max(batch.column(col)).as_py()
    if m is None:
        return current
    return m if current is None or m > current else current


def _wm_text(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, dt.datetime):
        if v.tzinfo is None:
            v = v.replace(tzinfo=dt.UTC)
        return str(v.astimezone(dt.UTC).isoformat())
    return str(v)


def _arrow(job: Job, batches: Iterator[Any], watermark: str | None, sql: str | None) -> Outcome:
    from sluice.jobs.load import open_delta, open_target, target_database

    dbs = [target_database(t) for t in job.targets]
    loads = []
    out = Outcome(path="arrow", sql=sql)
    try:
        for t, db in zip(job.targets, dbs, strict=True):
            loads.append(open_target(db, t, job) if db is not None else open_delta(t, job))
        wm: Any = None
        for batch in batches:
            if isinstance(batch, pa.Table):
                parts = batch.to_batches()
            elif isinstance(batch, pa.RecordBatch):
                parts = [batch]
            else:
                raise JobError(
                    f"job {job.name}: the body yielded {type(batch).__name__}; "
                    "expected pyarrow.RecordBatch"
                )
            for part in parts:
                out.batches += 1
                wm = _wm_of(job, part, wm)
                for t, load in zip(job.targets, loads, strict=True):
                    load.write(t.table.normalise(part))
                    out.per_target[t.table.name] = (
                        out.per_target.get(t.table.name, 0) + part.num_rows
                    )
                out.rows += part.num_rows
        for load in loads:
            load.commit()
    except BaseException:
        for load in loads:
            load.abort()
        raise
    out.watermark = _wm_text(wm) or watermark
    return out


def _insert_select(job: Job, t: TargetBinding, db: Database, sql: str) -> Outcome:
    """The same-database path: one ``INSERT … SELECT`` (normalisers as SQL)."""
    from sluice.jobs.load import ensure, insert_select

    ensure(db, t.table)
    wm: Any = None
    conn = db.connect()
    try:
        if job.watermark_column:
            q = quote_for(db.dialect)
            cur = conn.cursor()
            cur.execute(f"SELECT max(s.{q(job.watermark_column)}) FROM ({sql}) AS s")
            row = cur.fetchone()
            wm = row[0] if row else None
            if db.dialect == "postgres":
                conn.rollback()
    finally:
        conn.close()
    rows, statement = insert_select(db, t, job, sql)
    return Outcome(
        rows=rows,
        path="insert_select",
        watermark=_wm_text(wm),
        sql=statement,
        per_target={t.table.name: rows},
    )
