"""Batch jobs under ``run-due`` with a fake clock (issue 19's acceptance).

A DAG of four jobs across two workflows — ``ingest`` (extract -> load, daily
09:00 America/New_York, retries with backoff) and ``report`` (rollup ->
publish, triggered by ``ingest``) — writing real rows into DuckDB, with the
run log in SQLite (a "restart" is a new orchestrator on the same file).
Then two concurrent ``run-due`` on one Postgres run log over 50 ticks.
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from pathlib import Path
from typing import Any

import duckdb
import psycopg
import pyarrow as pa
import pytest
from tests import endpoints

import sluice
from sluice.api.connections import Connection, register_connection
from sluice.jobs import clear, registry
from sluice.jobs.notify import AlertEvent, RunRecord
from sluice.jobs.orchestrate import Orchestrator
from sluice.jobs.runlog import open_run_log
from sluice.types import BigInt, Text

pytestmark = pytest.mark.integration

UTC = dt.UTC


class Recorder:
    """An alerter and metrics sink that keeps what it is given."""

    def __init__(self) -> None:
        self.events: list[AlertEvent] = []
        self.records: list[RunRecord] = []

    def notify(self, event: AlertEvent) -> None:
        self.events.append(event)

    def record(self, run: RunRecord) -> None:
        self.records.append(run)

    def close(self) -> None:
        pass


class Clock:
    def __init__(self, t: dt.datetime) -> None:
        self.t = t

    def __call__(self) -> dt.datetime:
        return self.t


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC)


def _declare_dag(db_path: Path, fails: dict[str, int]) -> None:
    clear()
    conn = f"duck_{uuid.uuid4().hex[:8]}"
    register_connection(Connection(conn, kind="duckdb", path=str(db_path)))

    @sluice.table(name="stage_rows")
    class Stage:
        job: Text
        n: BigInt

    def body(name: str) -> Any:
        def make() -> Any:
            if fails.get(name, 0) > 0:
                fails[name] -= 1
                raise RuntimeError(f"{name} broke")
            yield pa.record_batch({"job": [name], "n": [1]})

        make.__name__ = name
        return make

    retry = {"max_attempts": 3, "backoff_seconds": 60, "backoff_factor": 2}
    extract = sluice.job(name="extract", target=Stage, target_connection=conn, retry=retry)(
        body("extract")
    )
    load = sluice.job(name="load", target=Stage, target_connection=conn, depends_on=[extract])(
        body("load")
    )
    rollup = sluice.job(name="rollup", target=Stage, target_connection=conn)(body("rollup"))
    publish = sluice.job(name="publish", target=Stage, target_connection=conn, depends_on=[rollup])(
        body("publish")
    )
    sluice.workflow(
        "ingest", jobs=[extract, load], schedule="0 9 * * *", timezone="America/New_York"
    )
    sluice.workflow("report", jobs=[rollup, publish], triggered_by=["ingest"])


def _orch(url: str, clock: Clock, rec: Recorder) -> Orchestrator:
    return Orchestrator(registry(), open_run_log(url), alerters=rec, sink=rec, clock=clock)


def _rows(db_path: Path) -> list[tuple[str, int]]:
    with duckdb.connect(str(db_path)) as c:
        return [
            (r[0], int(r[1]))
            for r in c.execute(
                "SELECT job, count(*) FROM stage_rows GROUP BY 1 ORDER BY 1"
            ).fetchall()
        ]


def test_dag_of_four_jobs_across_two_workflows(tmp_path: Path) -> None:
    db_path = tmp_path / "target.duckdb"
    url = f"sqlite://{tmp_path / 'run_log.db'}"
    fails: dict[str, int] = {}
    _declare_dag(db_path, fails)
    rec = Recorder()
    clock = Clock(at("2026-03-06T13:59:00"))
    orch = _orch(url, clock, rec)

    # Before 09:00 New York (14:00 UTC in winter): nothing.
    assert orch.run_due(60) == []

    # 09:00:30 EST: all four, in order: the DAG in ingest, then report (triggered).
    clock.t = at("2026-03-06T14:00:30")
    fired = orch.run_due(60)
    assert [(f.job, f.status) for f in fired] == [
        ("extract", "success"),
        ("load", "success"),
        ("rollup", "success"),
        ("publish", "success"),
    ]
    assert orch.run_due(60) == []  # the same tick never twice

    # Next day extract fails: load is skipped (and the skip recorded), report waits.
    fails["extract"] = 1
    clock.t = at("2026-03-07T14:00:10")
    fired = orch.run_due(60)
    assert [(f.job, f.status) for f in fired] == [("extract", "failed"), ("load", "skipped")]
    assert [e.kind for e in rec.events] == ["failure"]
    skips = [r for r in orch.runlog.runs("load") if r["status"] == "skipped"]
    assert len(skips) == 1 and skips[0]["error"] == "upstream extract failed"
    status = {r["job"]: r for r in orch.status()}
    assert status["extract"]["status"] == "failed" and status["extract"]["attempts"] == 1
    assert status["load"]["waiting_on"] == "upstream extract failed"

    # A restart: a new process (orchestrator) on the same run log. The backoff
    # (60 s after the failure) is honoured across it.
    orch.runlog.close()
    rec2 = Recorder()
    clock.t = at("2026-03-07T14:00:40")
    orch = _orch(url, clock, rec2)
    assert orch.run_due(60) == []
    clock.t = at("2026-03-07T14:01:11")
    fired = orch.run_due(60)
    assert [(f.job, f.status, f.attempt) for f in fired] == [
        ("extract", "success", 2),
        ("load", "success", 1),
        ("rollup", "success", 1),
        ("publish", "success", 1),
    ]
    assert [(e.kind, e.job, e.attempt) for e in rec2.events] == [("recovery", "extract", 2)]
    assert orch.run_due(60) == []

    # DST: on 2026-03-08 New York moves to EDT; 09:00 is now 13:00 UTC.
    clock.t = at("2026-03-08T12:59:30")
    assert orch.run_due(60) == []
    clock.t = at("2026-03-08T13:00:20")
    assert [f.job for f in orch.run_due(60)] == ["extract", "load", "rollup", "publish"]
    clock.t = at("2026-03-08T14:00:20")  # the old (EST) hour: nothing
    assert orch.run_due(60) == []

    # Three ticks missed (nothing ran 9th-11th): caught up once, not three times.
    before = dict(_rows(db_path))
    clock.t = at("2026-03-11T20:00:00")
    assert [f.job for f in orch.run_due(60)] == ["extract", "load", "rollup", "publish"]
    clock.t = at("2026-03-11T20:01:00")
    assert orch.run_due(60) == []
    after = dict(_rows(db_path))
    assert {k: after[k] - before[k] for k in after} == {
        "extract": 1,
        "load": 1,
        "rollup": 1,
        "publish": 1,
    }
    # Every run wrote exactly one row: 4 successful firings of each job.
    assert after == {"extract": 4, "load": 4, "rollup": 4, "publish": 4}
    orch.runlog.close()


def test_gives_up_after_max_attempts_and_keeps_downstream_skipped(tmp_path: Path) -> None:
    db_path = tmp_path / "target.duckdb"
    url = f"sqlite://{tmp_path / 'run_log.db'}"
    fails = {"extract": 5}
    _declare_dag(db_path, fails)
    rec = Recorder()
    clock = Clock(at("2026-01-05T14:00:05"))
    orch = _orch(url, clock, rec)
    seen = [(f.job, f.status, f.attempt) for f in orch.run_due(60)]
    for t in ("14:01:06", "14:03:07", "14:07:08", "14:20:00"):  # backoff 60, 120 s
        clock.t = at(f"2026-01-05T{t}")
        seen += [(f.job, f.status, f.attempt) for f in orch.run_due(60)]
    assert seen == [
        ("extract", "failed", 1),
        ("load", "skipped", 0),
        ("extract", "failed", 2),
        ("extract", "failed", 3),
    ]
    assert [e.kind for e in rec.events] == ["failure"] * 3
    assert {r["job"]: r["status"] for r in orch.status()}["extract"] == "gave_up"
    assert _rows(db_path) == []
    orch.runlog.close()


def _declare_concurrent(table: str, ticks: dict[str, str]) -> None:
    clear()
    conn = f"pg_{uuid.uuid4().hex[:8]}"
    register_connection(Connection(conn, kind="postgres", url=endpoints.POSTGRES_URL))

    @sluice.table(schema="sluice_jobs_test", name=table)
    class Fires:
        job: Text
        tick: Text

    def body(name: str) -> Any:
        def make() -> Any:
            yield pa.record_batch({"job": [name], "tick": [ticks["now"]]})

        make.__name__ = name
        return make

    a = sluice.job(name="a", target=Fires, target_connection=conn)(body("a"))
    b = sluice.job(name="b", target=Fires, target_connection=conn, depends_on=["a"])(body("b"))
    sluice.workflow("w", jobs=[a, b], schedule="every 1 minutes")
    sluice.job(name="c", target=Fires, target_connection=conn, schedule="* * * * *")(body("c"))


def test_two_run_due_on_one_postgres_run_log_fire_each_job_once_per_tick() -> None:
    table = f"fires_{uuid.uuid4().hex[:8]}"
    ticks: dict[str, str] = {}
    _declare_concurrent(table, ticks)
    prefix = uuid.uuid4().hex[:8]
    # One Postgres run log (its own schema per test run through the claim keys'
    # uniqueness: fresh job names would collide across runs, so a fresh database
    # schema is not needed: the tables are shared, the unit names are prefixed).
    url = endpoints.POSTGRES_URL
    start = at("2026-05-01T00:00:00")
    clock_a, clock_b = Clock(start), Clock(start)
    orchs = [
        Orchestrator(registry(), open_run_log(url), clock=clock_a, owner=f"{prefix}-a"),
        Orchestrator(registry(), open_run_log(url), clock=clock_b, owner=f"{prefix}-b"),
    ]
    # Keep this test's state apart from earlier runs on the shared run log.
    for o in orchs:
        o.runlog.inner.put_state  # noqa: B018 - the log opened (not degraded)
        assert not o.runlog.degraded
    _namespace(orchs, prefix)
    fired: list[list[Any]] = [[], []]
    for i in range(50):
        t = start + dt.timedelta(minutes=i, seconds=5)
        ticks["now"] = t.isoformat()
        clock_a.t = clock_b.t = t
        barrier = threading.Barrier(2)

        def go(k: int, t: dt.datetime = t, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            fired[k] += orchs[k].run_due(60, t)

        threads = [threading.Thread(target=go, args=(k,)) for k in (0, 1)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
    ran = [(f.job, f.tick) for side in fired for f in side if f.status == "success"]
    assert len(ran) == 150 and len(set(ran)) == 150
    with psycopg.connect(endpoints.POSTGRES_URL) as c:
        rows = c.execute(
            f"SELECT job, tick, count(*) FROM sluice_jobs_test.{table} GROUP BY 1, 2"
        ).fetchall()
        c.execute(f"DROP TABLE sluice_jobs_test.{table}")
    assert len(rows) == 150 and all(r[2] == 1 for r in rows)
    assert {r[0] for r in rows} == {"a", "b", "c"}
    for o in orchs:
        o.runlog.close()


def _namespace(orchs: list[Orchestrator], prefix: str) -> None:
    """Prefix every state and claim key: the shared Postgres run log outlives this test."""
    for o in orchs:
        inner = o.runlog.inner
        get, put, claim = inner.get_state, inner.put_state, inner.claim

        def g(name: str, get: Any = get) -> Any:
            return get(f"{prefix}/{name}")

        def p(name: str, data: Any, version: Any, put: Any = put) -> bool:
            return bool(put(f"{prefix}/{name}", data, version))

        def c(key: str, owner: str, claim: Any = claim) -> bool:
            return bool(claim(f"{prefix}/{key}", owner))

        inner.get_state, inner.put_state, inner.claim = g, p, c  # type: ignore[method-assign]


PROCESS_SCRIPT = """
import datetime as dt, sys
import pyarrow as pa
import sluice
from sluice.api.connections import Connection, register_connection
from sluice.jobs import registry
from sluice.jobs.orchestrate import Orchestrator
from sluice.jobs.runlog import open_run_log
from sluice.types import Text

import time
import pathlib
table, prefix, pg = sys.argv[1], sys.argv[2], sys.argv[3]
me, other, folder = sys.argv[4], sys.argv[5], pathlib.Path(sys.argv[6])
register_connection(Connection("pg", kind="postgres", url=pg))
now = {}

@sluice.table(schema="sluice_jobs_test", name=table)
class Fires:
    job: Text
    tick: Text

def body(name):
    def make():
        yield pa.record_batch({"job": [name], "tick": [now["t"]]})
    make.__name__ = name
    return make

a = sluice.job(name=prefix + "a", target=Fires, target_connection="pg")(body("a"))
b = sluice.job(name=prefix + "b", target=Fires, target_connection="pg", depends_on=[a])(body("b"))
sluice.workflow(prefix + "w", jobs=[a, b], schedule="every 1 minutes")
sluice.job(name=prefix + "c", target=Fires, target_connection="pg", schedule="* * * * *")(body("c"))
orch = Orchestrator(registry(), open_run_log(pg))
assert not orch.runlog.degraded
start = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
for i in range(50):
    # As cron wakes both hosts each minute, after the last minute's work: both
    # processes start tick i together (a file barrier), then race.
    (folder / f"{me}-{i}").touch()
    deadline = time.time() + 60
    while not (folder / f"{other}-{i}").exists() and time.time() < deadline:
        time.sleep(0.002)
    t = start + dt.timedelta(minutes=i, seconds=5)
    now["t"] = t.isoformat()
    for f in orch.run_due(60, t):
        print(f.job, f.tick, f.status, flush=True)
"""


def test_two_run_due_processes_on_one_postgres_run_log(tmp_path: Path) -> None:
    import subprocess
    import sys

    table = f"fires_{uuid.uuid4().hex[:8]}"
    prefix = f"p{uuid.uuid4().hex[:6]}_"  # job names unique to this run of the test
    repo = Path(__file__).resolve().parents[2]
    env = {**__import__("os").environ, "PYTHONPATH": str(repo / "src")}
    args = [sys.executable, "-c", PROCESS_SCRIPT, table, prefix, endpoints.POSTGRES_URL]
    procs = [
        subprocess.Popen(
            [*args, me, other, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for me, other in (("p", "q"), ("q", "p"))
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    fired = [line.split() for o in outs for line in o[0].splitlines()]
    ran = [(j, t) for j, t, status in fired if status == "success"]
    assert len(ran) == 150 and len(set(ran)) == 150
    assert all(status == "success" for _, _, status in fired)
    # Both processes did some of the work.
    assert all(o[0].strip() for o in outs)
    with psycopg.connect(endpoints.POSTGRES_URL) as c:
        rows = c.execute(
            f"SELECT job, tick, count(*) FROM sluice_jobs_test.{table} GROUP BY 1, 2"
        ).fetchall()
        c.execute(f"DROP TABLE sluice_jobs_test.{table}")
    assert len(rows) == 150 and all(r[2] == 1 for r in rows)
