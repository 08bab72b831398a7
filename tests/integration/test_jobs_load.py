"""Batch jobs' data paths: cross-database Arrow streaming with bounded memory,
the same-database ``INSERT … SELECT``, normalisers, table migration, the
watermark, fan-out; and every run log backend's claim / compare-and-set."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import duckdb
import psycopg
import pytest
from tests import endpoints

import sluice
from sluice.api.connections import Connection, register_connection
from sluice.jobs import clear, registry
from sluice.jobs.orchestrate import Orchestrator
from sluice.jobs.runlog import open_raw, open_run_log
from sluice.normalize import lower, parse_timestamp, trim
from sluice.types import BigInt, Text, TimestampTZ

pytestmark = pytest.mark.integration

SCHEMA = "sluice_jobs_test"


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class PeakRss:
    """The peak resident set while the block runs, sampled every 10 ms."""

    def __enter__(self) -> PeakRss:
        self.base = self.peak = _rss_kb()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss_kb())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.base) / 1024


@pytest.fixture
def pg_source() -> Iterator[tuple[str, str]]:
    """A Postgres connection name and a fresh source table in schema sluice_jobs_test."""
    name = f"pg_{uuid.uuid4().hex[:8]}"
    table = f"src_{uuid.uuid4().hex[:8]}"
    register_connection(Connection(name, kind="postgres", url=endpoints.POSTGRES_URL))
    with psycopg.connect(endpoints.POSTGRES_URL, autocommit=True) as c:
        c.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        yield name, table
        c.execute(f"DROP TABLE IF EXISTS {SCHEMA}.{table}")


def _fill(table: str, rows: int, width: int) -> None:
    with psycopg.connect(endpoints.POSTGRES_URL, autocommit=True) as c:
        c.execute(
            f"CREATE TABLE {SCHEMA}.{table} AS SELECT g::bigint AS id, "
            f"'  Name ' || g || repeat('x', {width}) AS name, "
            "timestamptz '2026-01-01 00:00:00+00' + g * interval '1 second' AS at "
            f"FROM generate_series(1, {rows}) g"
        )


def _cross(tmp_path: Path, pg: str, src: str, rows: int, width: int) -> tuple[Path, float, Any]:
    clear()
    duck = f"duck_{uuid.uuid4().hex[:8]}"
    path = tmp_path / "warehouse.duckdb"
    register_connection(Connection(duck, kind="duckdb", path=str(path)))

    @sluice.table(schema="lake")
    class Events:
        id: Annotated[BigInt, sluice.pk()]
        name: Annotated[Text | None, trim(), lower()]
        at: TimestampTZ

    @sluice.job(
        name="copy_events",
        target=Events,
        source_connection=pg,
        target_connection=duck,
        event_timestamp_column="at",
    )
    def copy_events(conn: Any) -> str:
        return f"SELECT id, name, at FROM {SCHEMA}.{src} WHERE at > $watermark"

    @sluice.job(name="warm_up", target=Events, source_connection=pg, target_connection=duck)
    def warm_up(conn: Any) -> Any:
        return f"SELECT id, name, at FROM {SCHEMA}.{src} LIMIT 10"

    _fill(src, rows, width)
    orch = Orchestrator(registry(), open_run_log("memory://"))
    # One-time costs out of the measurement: drivers loaded, the table made,
    # the first batches through every layer; then the ten rows dropped.
    assert [f.status for f in orch.run_now("warm_up")] == ["success"]
    with duckdb.connect(str(path)) as c:
        c.execute("DELETE FROM lake.events")
    with PeakRss() as rss:
        fired = orch.run_now("copy_events")
    return path, rss.growth_mb, (orch, fired)


def test_cross_database_job_of_a_million_rows_streams_arrow_with_bounded_memory(
    tmp_path: Path, pg_source: tuple[str, str]
) -> None:
    pg, src = pg_source
    rows, width = 1_000_000, 150  # ~170 MB of text through the job
    path, growth_mb, (orch, fired) = _cross(tmp_path, pg, src, rows, width)
    assert [(f.status, f.rows, f.path) for f in fired] == [("success", rows, "arrow")]
    print(f"RSS growth {growth_mb:.0f} MB for {rows} rows")
    with duckdb.connect(str(path)) as c:
        n, distinct, first = c.execute(
            "SELECT count(*), count(DISTINCT id), min(name) FROM lake.events"
        ).fetchone()
    assert (n, distinct) == (rows, rows)
    assert first.startswith("name 1") and first == first.strip()  # trim() then lower()
    # Streamed: ~4 MB batches, never the whole result in one piece.
    run = orch.runlog.runs("copy_events")[0]
    assert run["metrics"]["batches"] >= 15
    # ~170 MB of rows went through; the process grew by less: a few ~4 MB
    # batches in flight and DuckDB's buffer, capped at 64 MB while loading.
    assert growth_mb < 120, f"RSS grew {growth_mb:.0f} MB"
    # The watermark moved to the newest row, after the commit.
    st = {s["job"]: s for s in orch.status()}["copy_events"]
    assert st["watermark"].startswith("2026-01-12T13:46:40")  # 1,000,000 s after New Year
    # Run again: nothing newer than the watermark, nothing written.
    assert [f.rows for f in orch.run_now("copy_events")] == [0]


def test_same_database_job_uses_insert_select(pg_source: tuple[str, str]) -> None:
    pg, src = pg_source
    _fill(src, 1000, 0)
    clear()
    target = f"dst_{uuid.uuid4().hex[:8]}"

    @sluice.table(schema=SCHEMA, name=target)
    class Copy:
        id: Annotated[BigInt, sluice.pk()]
        name: Annotated[Text | None, trim(), lower()]
        at: Annotated[TimestampTZ, parse_timestamp()]

    @sluice.job(name="copy_in_place", target=Copy, source_connection=pg, target_connection=pg)
    def copy_in_place(conn: Any) -> str:
        return f"SELECT id, name, at::text AS at FROM {SCHEMA}.{src}"

    orch = Orchestrator(registry(), open_run_log("memory://"))
    try:
        fired = orch.run_now("copy_in_place")
        assert [(f.status, f.rows, f.path) for f in fired] == [("success", 1000, "insert_select")]
        run = orch.runlog.runs("copy_in_place")[0]
        assert run["metrics"]["path"] == "insert_select"
        with psycopg.connect(endpoints.POSTGRES_URL) as c:
            # The rows never left the database: the statement Postgres ran is one INSERT … SELECT.
            n, lo, ts = c.execute(
                f"SELECT count(*), min(name), pg_typeof(min(at))::text FROM {SCHEMA}.{target}"
            ).fetchone()
        assert (n, lo, ts) == (1000, "name 1", "timestamp with time zone")
    finally:
        with psycopg.connect(endpoints.POSTGRES_URL, autocommit=True) as c:
            c.execute(f"DROP TABLE IF EXISTS {SCHEMA}.{target}")


def test_table_gains_declared_columns_and_fan_out_writes_every_target(tmp_path: Path) -> None:
    clear()
    duck = f"duck_{uuid.uuid4().hex[:8]}"
    lite = f"lite_{uuid.uuid4().hex[:8]}"
    register_connection(Connection(duck, kind="duckdb", path=str(tmp_path / "a.duckdb")))
    register_connection(Connection(lite, kind="sqlite", path=str(tmp_path / "b.sqlite")))
    with duckdb.connect(str(tmp_path / "a.duckdb")) as c:
        c.execute("CREATE TABLE main.people (id BIGINT PRIMARY KEY)")

    @sluice.table(name="people")
    class People:
        id: Annotated[BigInt, sluice.pk()]
        email: Annotated[Text | None, lower(), trim()]

    @sluice.table(name="people_copy")
    class PeopleCopy:
        id: Annotated[BigInt, sluice.pk()]
        email: Text | None

    import pyarrow as pa

    @sluice.job(
        name="fan",
        targets=[People, PeopleCopy],
        target_connection={"people": duck, "people_copy": lite},
    )
    def fan() -> Any:
        for i in range(3):
            yield pa.record_batch({"id": [i * 2, i * 2 + 1], "email": [f" A{i}@X ", None]})

    orch = Orchestrator(registry(), open_run_log("memory://"))
    assert [(f.status, f.rows) for f in orch.run_now("fan")] == [("success", 6)]
    with duckdb.connect(str(tmp_path / "a.duckdb")) as c:
        assert c.execute("SELECT count(*), min(email) FROM people").fetchone() == (6, "a0@x")
    import sqlite3

    with sqlite3.connect(tmp_path / "b.sqlite") as c:
        assert c.execute("SELECT count(*), min(email) FROM people_copy").fetchone() == (6, " A0@X ")


def _s3_url() -> str:
    import boto3

    bucket = f"runlog-{uuid.uuid4().hex[:8]}"
    boto3.client(
        "s3",
        endpoint_url=endpoints.AWS_ENDPOINT,
        region_name=endpoints.AWS_REGION,
        aws_access_key_id=endpoints.AWS_ACCESS_KEY_ID,
        aws_secret_access_key=endpoints.AWS_SECRET_ACCESS_KEY,
    ).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/flow?endpoint_url={endpoints.AWS_ENDPOINT}&region={endpoints.AWS_REGION}"


@pytest.mark.parametrize("kind", ["sqlite", "memory", "postgres", "duckdb", "mysql", "s3"])
def test_run_log_backends_claim_once_and_compare_and_set(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", endpoints.AWS_ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", endpoints.AWS_SECRET_ACCESS_KEY)
    url = {
        "sqlite": f"sqlite://{tmp_path}/rl.db",
        "memory": "memory://",
        "postgres": endpoints.POSTGRES_URL,
        "duckdb": f"duckdb://{tmp_path}/rl.duckdb",
        "mysql": endpoints.MYSQL_URL,
        "s3": _s3_url() if kind == "s3" else "",
    }[kind]
    log = open_raw(url)
    k = uuid.uuid4().hex
    assert log.claim(f"{k}@t1", "a") is True
    assert log.claim(f"{k}@t1", "b") is False
    assert log.get_state(k) is None
    assert log.put_state(k, {"attempts": 1}, None) is True
    assert log.put_state(k, {"attempts": 9}, None) is False  # someone created it first
    assert log.get_state(k) == ({"attempts": 1}, 1)
    assert log.put_state(k, {"attempts": 2}, 1) is True
    assert log.put_state(k, {"attempts": 3}, 1) is False  # stale version
    assert log.get_state(k) == ({"attempts": 2}, 2)
    log.append_run(
        {
            "run_id": k,
            "job": f"j{k}",
            "workflow": None,
            "tick": "t1",
            "attempt": 1,
            "status": "success",
            "started_at": "2026-01-01T00:00:00+00:00",
            "finished_at": "2026-01-01T00:00:01+00:00",
            "rows": 5,
            "error": None,
            "metrics": {"path": "arrow"},
        }
    )
    runs = log.runs(f"j{k}")
    assert [(r["run_id"], r["rows"], r["metrics"]) for r in runs] == [(k, 5, {"path": "arrow"})]
    assert log.states()[k] == {"attempts": 2}
    log.close()
    if kind not in {"memory"}:  # durable: a second process sees it
        again = open_raw(url)
        assert again.get_state(k) == ({"attempts": 2}, 2)
        assert again.claim(f"{k}@t1", "c") is False
        again.close()


def test_unwritable_run_log_warns_and_orchestration_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "ro"
    blocked.write_text("a file where a folder should be")
    log = open_run_log(f"sqlite://{blocked}/sub/run_log.db")
    assert log.degraded
    assert "going on without a durable run log" in caplog.text
    assert log.claim("x@1", "me") and not log.claim("x@1", "me")


def test_jobs_write_in_merge_truncate_and_scd2_modes(tmp_path: Path) -> None:
    """The modes themselves are proven per database by the load tests; here a
    job drives each through both paths (Arrow into DuckDB, INSERT … SELECT in it)."""
    import pyarrow as pa

    clear()
    duck = f"duck_{uuid.uuid4().hex[:8]}"
    path = tmp_path / "dim.duckdb"
    register_connection(Connection(duck, kind="duckdb", path=str(path)))
    feed: dict[str, Any] = {}

    @sluice.table(name="cust_merge")
    class CustMerge:
        id: Annotated[BigInt, sluice.pk()]
        email: Annotated[Text | None, lower()]

    @sluice.table(name="cust_full")
    class CustFull:
        id: Annotated[BigInt, sluice.pk()]
        email: Text | None

    @sluice.table(name="cust_dim")
    class CustDim:
        id: Annotated[BigInt, sluice.pk()]
        email: Text | None

    def rows() -> Any:
        yield pa.record_batch({"id": feed["ids"], "email": feed["emails"]})

    sluice.job(name="m", target=CustMerge, target_connection=duck, mode="merge")(rows)
    sluice.job(name="t", target=CustFull, target_connection=duck, mode="truncate")(rows)
    sluice.job(
        name="d", target=CustDim, target_connection=duck, mode="scd2", compare_columns=["email"]
    )(rows)
    orch = Orchestrator(registry(), open_run_log("memory://"))
    for ids, emails in (([1, 2], ["A@x", "b@x"]), ([2, 3], ["B2@x", "c@x"])):
        feed.update(ids=ids, emails=emails)
        for name in ("m", "t", "d"):
            assert [f.status for f in orch.run_now(name)] == ["success"], name
    with duckdb.connect(str(path)) as c:
        assert c.execute("SELECT id, email FROM cust_merge ORDER BY id").fetchall() == [
            (1, "a@x"),
            (2, "b2@x"),
            (3, "c@x"),
        ]
        assert c.execute("SELECT id, email FROM cust_full ORDER BY id").fetchall() == [
            (2, "B2@x"),
            (3, "c@x"),
        ]
        assert c.execute(
            "SELECT id, email, is_current FROM cust_dim ORDER BY id, valid_from"
        ).fetchall() == [
            (1, "A@x", True),
            (2, "b@x", False),
            (2, "B2@x", True),
            (3, "c@x", True),
        ]


def test_mysql_target_by_arrow_and_by_insert_select() -> None:
    import pyarrow as pa
    import pymysql

    from sluice.jobs.db import _mysql

    clear()
    my = f"my_{uuid.uuid4().hex[:8]}"
    register_connection(Connection(my, kind="mysql", url=endpoints.MYSQL_URL))
    suffix = uuid.uuid4().hex[:8]

    @sluice.table(name=f"people_{suffix}")
    class People:
        id: Annotated[BigInt, sluice.pk()]
        email: Annotated[Text | None, trim(), lower()]
        seen_at: TimestampTZ

    @sluice.table(name=f"people_copy_{suffix}")
    class PeopleCopy:
        id: Annotated[BigInt, sluice.pk()]
        email: Annotated[Text | None, lower()]

    @sluice.job(name="arrive", target=People, target_connection=my)
    def arrive() -> Any:
        yield pa.record_batch(
            {
                "id": [1, 2],
                "email": [" Ann@X ", "BOB@x"],
                "seen_at": ["2026-01-01T10:00:00+00:00", "2026-01-02T11:30:00+00:00"],
            }
        )

    @sluice.job(name="copy", target=PeopleCopy, source_connection=my, target_connection=my)
    def copy(conn: Any) -> str:
        return f"SELECT id, upper(email) AS email FROM people_{suffix}"

    orch = Orchestrator(registry(), open_run_log("memory://"))
    conn: pymysql.Connection[Any] = _mysql(endpoints.MYSQL_URL)
    try:
        assert [(f.status, f.rows, f.path) for f in orch.run_now("arrive")] == [
            ("success", 2, "arrow")
        ]
        assert [(f.status, f.rows, f.path) for f in orch.run_now("copy")] == [
            ("success", 2, "insert_select")
        ]
        cur = conn.cursor()
        cur.execute(f"SELECT id, email, seen_at FROM people_{suffix} ORDER BY id")
        got = [(r[0], r[1], str(r[2])) for r in cur.fetchall()]
        assert got == [(1, "ann@x", "2026-01-01 10:00:00"), (2, "bob@x", "2026-01-02 11:30:00")]
        cur.execute(f"SELECT id, email FROM people_copy_{suffix} ORDER BY id")
        assert list(cur.fetchall()) == [(1, "ann@x"), (2, "bob@x")]
    finally:
        cur = conn.cursor()
        cur.execute(f"DROP TABLE IF EXISTS people_{suffix}, people_copy_{suffix}")
        conn.commit()
        conn.close()


def test_fan_out_to_duckdb_and_a_delta_table(tmp_path: Path) -> None:
    """One read, two targets: a DuckDB table (append) and a Delta table (merge)."""
    import pyarrow as pa
    from deltalake import DeltaTable

    clear()
    duck, lake = f"duck_{uuid.uuid4().hex[:8]}", f"lake_{uuid.uuid4().hex[:8]}"
    register_connection(Connection(duck, kind="duckdb", path=str(tmp_path / "w.duckdb")))
    register_connection(Connection(lake, kind="delta_local", path=str(tmp_path / "lake")))
    feed: dict[str, Any] = {}

    @sluice.table(name="events_log")
    class EventsLog:
        id: BigInt
        name: Text | None

    @sluice.table(schema="archive", name="events")
    class Archive:
        id: Annotated[BigInt, sluice.pk()]
        name: Annotated[Text | None, lower()]

    @sluice.job(
        name="fan_delta",
        targets=[sluice.target(EventsLog), sluice.target(Archive, mode="merge")],
        target_connection={"events_log": duck, "events": lake},
    )
    def fan_delta() -> Any:
        yield pa.record_batch({"id": feed["ids"], "name": feed["names"]})

    orch = Orchestrator(registry(), open_run_log("memory://"))
    for ids, names in (([1, 2], ["A", "B"]), ([2, 3], ["B2", "C"])):
        feed.update(ids=ids, names=names)
        assert [(f.status, f.rows) for f in orch.run_now("fan_delta")] == [("success", 2)]
    with duckdb.connect(str(tmp_path / "w.duckdb")) as c:
        assert c.execute("SELECT count(*) FROM events_log").fetchone() == (4,)
    got = DeltaTable(str(tmp_path / "lake" / "archive" / "events")).to_pyarrow_table()
    assert sorted(zip(got["id"].to_pylist(), got["name"].to_pylist(), strict=True)) == [
        (1, "a"),
        (2, "b2"),
        (3, "c"),
    ]
