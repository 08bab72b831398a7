"""The write modes (append, truncate, merge, scd2) on every SQL target and
Delta: batch loads (:mod:`sluice.connectors.sql.load`) and streaming
targets, against hand-computed tables, on the real services."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pymysql
import pytest

from sluice.api.connections import Connection
from sluice.connectors import registry
from sluice.connectors.api import Target
from sluice.connectors.sql.load import LoadSpec, insert_select, open_load
from sluice.connectors.sql.positions import RecordsPositions
from sluice.errors import ConfigError, ConnectorError
from sluice.testing import TargetHarness
from sluice.testing.harness import load_pipeline, unique
from tests import endpoints

pytestmark = pytest.mark.integration

KINDS = ["postgres", "mysql", "sqlite", "duckdb", "delta_local"]
SQL_KINDS = KINDS[:4]


@pytest.fixture(params=KINDS)
def h(request: pytest.FixtureRequest) -> TargetHarness:
    harness: TargetHarness = request.getfixturevalue(f"{request.param}_harness")
    return harness


@pytest.fixture(params=SQL_KINDS)
def sql_h(request: pytest.FixtureRequest) -> TargetHarness:
    harness: TargetHarness = request.getfixturevalue(f"{request.param}_harness")
    return harness


def connection(h: TargetHarness, table: str) -> Connection:
    """The connection a load of ``table`` uses (the harness's target keys, less the table)."""
    keys = {k: v for k, v in h.target(table).items() if k not in ("kind", "mode", "table")}
    kind = h.target(table)["kind"]
    if kind == "delta_local":  # the table is a folder under the connection's path
        keys["path"] = str(Path(keys["path"]).parent)
    if kind == "delta_s3":  # ... or the connection's prefix (here the bucket's root)
        keys.pop("prefix")
    return Connection(kind=kind, **keys)


def load(h: TargetHarness, table: str, spec: LoadSpec, *batches: pa.Table) -> int:
    """One load of ``batches`` (a schema from the first, or id / name); its row count."""
    schema = (
        batches[0].schema if batches else pa.schema([("id", pa.int64()), ("name", pa.string())])
    )
    with open_load(connection(h, table), spec, schema) as run:
        for b in batches:
            run.write(b)
        return run.commit()


def rows(h: TargetHarness, table: str, columns: list[str]) -> list[tuple[Any, ...]]:
    """``columns`` of every row of ``table``, normalised (UTC datetimes, bools), sorted."""
    data = h.read_back(table)
    assert data is not None, f"{h.name}: no table {table}"
    out = []
    for r in data.select(columns).to_pylist():
        out.append(tuple(_norm(c, r[c]) for c in columns))
    return _sorted(out)


def _sorted(items: Any) -> list[tuple[Any, ...]]:
    return sorted(items, key=lambda t: tuple((v is None, str(v)) for v in t))


def _norm(column: str, value: Any) -> Any:
    if value is None:
        return None
    if column in ("valid_from", "valid_to", "updated_at"):
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        if value.tzinfo is None:  # MySQL DATETIME holds UTC wall time
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC)
    if column == "is_current":
        return bool(value)
    if column == "id":
        return int(value)
    return value


def named(*pairs: tuple[int, str]) -> pa.Table:
    return pa.table(
        {"id": pa.array([p[0] for p in pairs], pa.int64()), "name": [p[1] for p in pairs]}
    )


# -- batch loads ------------------------------------------------------------------

FIRST = named((1, "a"), (2, "b"))
SECOND = named((2, "B"), (3, "c"), (3, "C"))
EXPECTED = {
    "append": ([(1, "a"), (2, "b"), (2, "B"), (3, "c"), (3, "C")], 3),
    "truncate": ([(2, "B"), (3, "c"), (3, "C")], 3),
    "merge": ([(1, "a"), (2, "B"), (3, "C")], 2),  # the last row of a key wins
}


@pytest.mark.parametrize("mode", ["append", "truncate", "merge"])
def test_load_mode(h: TargetHarness, mode: Any) -> None:
    table = h.new_table()
    spec = LoadSpec(table, mode, primary_key=("id",) if mode == "merge" else ())
    assert load(h, table, spec, FIRST) == 2
    want, count = EXPECTED[mode]
    assert load(h, table, spec, SECOND) == count
    assert rows(h, table, ["id", "name"]) == _sorted(want)
    if mode == "truncate":  # a run that reads nothing leaves an empty table
        assert load(h, table, spec) == 0
        assert rows(h, table, ["id", "name"]) == []


@pytest.fixture(params=[*KINDS, "delta_s3"])
def scd2_h(request: pytest.FixtureRequest) -> TargetHarness:
    harness: TargetHarness = request.getfixturevalue(f"{request.param}_harness")
    return harness


def test_load_scd2_three_runs(scd2_h: TargetHarness) -> None:
    """valid_from from updated_at; ttl one hour; compare on name only.

    run 1: 1 a, 2 b, 3 c (5 h ago)          -> three current versions
    run 2: 1 a (unchanged), 2 B (2 h ago), 3 c (unchanged), 4 d (30 min ago)
           -> 2 b closed at 2 h ago; 2 B and 4 d inserted
    run 3: 1 a, 2 B (unchanged); 3 and 4 not carried
           -> 3 (5 h old) closed by the ttl at the load time; 4 (30 min) stays
    """
    h = scd2_h
    table = h.new_table()
    now = datetime.now(UTC).replace(microsecond=0)
    h5, h2, m30 = now - timedelta(hours=5), now - timedelta(hours=2), now - timedelta(minutes=30)
    spec = LoadSpec(
        table,
        "scd2",
        primary_key=("id",),
        compare_columns=("name",),
        event_timestamp_column="updated_at",
        ttl_seconds=3600,
    )

    def batch(*r: tuple[int, str, datetime]) -> pa.Table:
        return pa.table(
            {
                "id": pa.array([x[0] for x in r], pa.int64()),
                "name": [x[1] for x in r],
                "updated_at": pa.array([x[2] for x in r], pa.timestamp("us", tz="UTC")),
            }
        )

    assert load(h, table, spec, batch((1, "a", h5), (2, "b", h5), (3, "c", h5))) == 3
    assert load(h, table, spec, batch((1, "a", h5), (2, "B", h2), (3, "c", h5), (4, "d", m30))) == 3
    started = datetime.now(UTC)
    assert load(h, table, spec, batch((1, "a", h5), (2, "B", h2))) == 1
    ended = datetime.now(UTC)

    got = rows(h, table, ["id", "name", "valid_from", "valid_to", "is_current"])
    closed_by_ttl = [r for r in got if r[0] == 3]
    assert len(closed_by_ttl) == 1 and closed_by_ttl[0][4] is False
    assert started - timedelta(seconds=1) <= closed_by_ttl[0][3] <= ended + timedelta(seconds=1)
    assert got == _sorted(
        [
            (1, "a", h5, None, True),
            (2, "b", h5, h2, False),
            (2, "B", h2, None, True),
            (3, "c", h5, closed_by_ttl[0][3], False),
            (4, "d", m30, None, True),
        ]
    )
    hashes = {(r[0], r[1]): r[2] for r in rows(h, table, ["id", "name", "row_hash"])}
    assert all(hashes.values()) and hashes[(2, "b")] != hashes[(2, "B")]


def test_load_scd2_valid_from_is_the_load_time_and_unchanged_rows_write_nothing(
    h: TargetHarness,
) -> None:
    table = h.new_table()
    spec = LoadSpec(table, "scd2", primary_key=("id",))
    before = datetime.now(UTC)
    assert load(h, table, spec, FIRST) == 2
    after = datetime.now(UTC)
    assert load(h, table, spec, FIRST) == 0  # unchanged: no new version
    got = rows(h, table, ["id", "name", "valid_from", "valid_to", "is_current"])
    assert [(r[0], r[1], r[3], r[4]) for r in got] == [(1, "a", None, True), (2, "b", None, True)]
    assert all(before - timedelta(seconds=1) <= r[2] <= after + timedelta(seconds=1) for r in got)
    # row_hash: md5 of name=value of the non-null compare columns, alike in every dialect
    assert rows(h, table, ["id", "row_hash"]) == _sorted(
        [(1, hashlib.md5(b"name=a").hexdigest()), (2, hashlib.md5(b"name=b").hexdigest())]
    )


def test_load_aborted_leaves_the_table_as_it_was(h: TargetHarness) -> None:
    table = h.new_table()
    spec = LoadSpec(table, "truncate")
    load(h, table, spec, FIRST)
    with pytest.raises(RuntimeError), open_load(connection(h, table), spec, FIRST.schema) as run:
        run.write(SECOND)
        raise RuntimeError("the job failed")
    assert rows(h, table, ["id", "name"]) == [(1, "a"), (2, "b")]


def test_load_refuses_scd2_without_a_key(h: TargetHarness) -> None:
    table = h.new_table()
    with pytest.raises(ConfigError, match=r'table\.primary_key: missing: mode = "scd2" needs'):
        load(h, table, LoadSpec(table, "scd2"), FIRST)


def test_insert_select_in_each_mode(sql_h: TargetHarness) -> None:
    """Same database: the rows go from a query into the table without leaving it."""
    h = sql_h
    src = h.new_table()
    conn = connection(h, src)
    load(h, src, LoadSpec(src, "append"), named((1, "a"), (2, "b")))
    query = f"SELECT id, name FROM {src}"
    for mode in ("truncate", "merge", "scd2"):  # append: only the second round
        dst = f"{src}_{mode}"
        key = ("id",) if mode in ("merge", "scd2") else ()
        assert insert_select(conn, LoadSpec(dst, mode, key), query) == 2, mode
    load(h, src, LoadSpec(src, "truncate"), named((2, "B"), (3, "c")))
    counts = {
        mode: insert_select(
            conn,
            LoadSpec(f"{src}_{mode}", mode, ("id",) if mode in ("merge", "scd2") else ()),
            query,
        )
        for mode in ("append", "truncate", "merge", "scd2")
    }
    assert counts == {"append": 2, "truncate": 2, "merge": 2, "scd2": 3}

    def read(mode: str, columns: list[str]) -> list[tuple[Any, ...]]:
        if h.name in ("sqlite", "duckdb"):  # one file per table name in these harnesses
            return _read_file(h, src, f"{src}_{mode}", columns)
        return rows(h, f"{src}_{mode}", columns)

    assert read("append", ["id", "name"]) == _sorted([(2, "B"), (3, "c")])
    assert read("truncate", ["id", "name"]) == _sorted([(2, "B"), (3, "c")])
    assert read("merge", ["id", "name"]) == _sorted([(1, "a"), (2, "B"), (3, "c")])
    assert read("scd2", ["id", "name", "is_current"]) == _sorted(
        [(1, "a", True), (2, "b", False), (2, "B", True), (3, "c", True)]
    )


def _read_file(h: TargetHarness, src: str, table: str, columns: list[str]) -> list[tuple[Any, ...]]:
    path = connection(h, src).keys["path"]
    cols = ", ".join(columns)
    if h.name == "sqlite":
        import sqlite3

        with sqlite3.connect(path) as db:
            got = db.execute(f"SELECT {cols} FROM {table}").fetchall()
    else:
        import duckdb

        with duckdb.connect(path) as db:
            got = db.execute(f"SELECT {cols} FROM {table}").fetchall()
    return _sorted(tuple(_norm(c, v) for c, v in zip(columns, r, strict=True)) for r in got)


# -- truncate is atomic -------------------------------------------------------------


def _counter(kind: str, table: str) -> tuple[Callable[[], int], Callable[[], None]]:
    """A row count of ``table`` on a connection of its own, and its close."""
    if kind == "postgres":
        pg = psycopg.connect(endpoints.POSTGRES_URL, autocommit=True)

        def count_pg() -> int:
            row = pg.execute(f'SELECT count(*) FROM public."{table}"'.encode()).fetchone()
            assert row is not None
            return int(row[0])

        return count_pg, pg.close
    my = pymysql.connect(autocommit=True, **_mysql_parts())

    def count_my() -> int:
        with my.cursor() as cur:
            cur.execute(f"SELECT COUNT(*) FROM `{table}`")
            return int(cur.fetchone()[0])

    return count_my, my.close


def _mysql_parts() -> dict[str, Any]:
    from urllib.parse import urlsplit

    u = urlsplit(endpoints.MYSQL_URL)
    return {
        "host": u.hostname or "127.0.0.1",
        "port": u.port or 3306,
        "user": u.username or "root",
        "password": u.password or "",
        "database": u.path.lstrip("/"),
    }


class Poller:
    """Counts the table's rows in a loop on its own connection (each count a
    fresh snapshot), remembering every count seen."""

    def __init__(self, count: Callable[[], int], close: Callable[[], None]) -> None:
        self.count = count
        self.close = close
        self.seen: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                self.seen.append(self.count())
        finally:
            self.close()

    def wait_polls(self, n: int) -> None:
        """Wait until the reader has counted ``n`` more times."""
        target, deadline = len(self.seen) + n, time.monotonic() + 10
        while len(self.seen) < target:
            assert time.monotonic() < deadline, "the reader stopped polling"
            time.sleep(0.005)


@pytest.fixture
def poller_for() -> Iterator[Callable[[str, str], Poller]]:
    made: list[Poller] = []

    def make(kind: str, table: str) -> Poller:
        p = Poller(*_counter(kind, table))
        made.append(p)
        p.thread.start()
        return p

    yield make
    for p in made:
        p.stop.set()
        p.thread.join(10)


@pytest.mark.parametrize("kind", ["postgres", "mysql"])
def test_truncate_is_atomic_for_a_concurrent_reader(
    kind: str, request: pytest.FixtureRequest, poller_for: Callable[[str, str], Poller]
) -> None:
    """Three truncate loads of 2 x 300 rows over 600 rows, a reader counting
    throughout (and several times while each load's transaction is open):
    it only ever sees 600."""
    h: TargetHarness = request.getfixturevalue(f"{kind}_harness")
    table = h.new_table()
    spec = LoadSpec(table, "truncate")

    def half(run: int, part: int) -> pa.Table:
        start = run * 1000 + part * 300
        return named(*((i, f"r{run}") for i in range(start, start + 300)))

    load(h, table, spec, half(0, 0), half(0, 1))
    reader = poller_for(kind, table)
    reader.wait_polls(3)
    for run in (1, 2, 3):
        with open_load(connection(h, table), spec, half(run, 0).schema) as job:
            reader.wait_polls(3)  # the old rows are deleted in the open transaction
            job.write(half(run, 0))
            reader.wait_polls(3)
            job.write(half(run, 1))
            reader.wait_polls(3)
            assert job.commit() == 600
        reader.wait_polls(3)
    reader.stop.set()
    reader.thread.join(10)
    assert set(reader.seen) == {600}, f"the reader saw {sorted(set(reader.seen))} rows"
    assert rows(h, table, ["name"]) == [("r3",)] * 600


# -- streaming targets ----------------------------------------------------------------


def streaming(h: TargetHarness, table: str, pipeline: str, **keys: Any) -> Target:
    """The streaming target of ``table`` with extra ``[target]`` keys, built as flow consume does."""
    target = {**h.target(table, mode=keys.pop("mode"), key=keys.pop("key", ())), **keys}
    spec = load_pipeline(
        {
            "pipeline_name": pipeline,
            "source_query": "unused",
            "source": {"kind": "kafka", "bootstrap_servers": "unused:9092"},
            "target": target,
        }
    )
    return registry.build_target(spec.all_targets[0], registry.Context(spec), 0)


def test_streaming_truncate_each_flush_replaces_the_table(h: TargetHarness) -> None:
    """A streaming truncate target: each flush (one transaction, with the
    positions it stages) replaces the table."""
    table, pipeline = h.new_table(), unique("modes")
    target = streaming(h, table, pipeline, mode="truncate")
    target.open()
    try:
        target.write(FIRST)
        target.flush()
        assert rows(h, table, ["id", "name"]) == [(1, "a"), (2, "b")]
        if isinstance(target, RecordsPositions):
            target.stage_positions({"src": {"src:0": 7}})
        target.write(SECOND)
        target.flush()
        target.flush()  # nothing written: the table stays
    finally:
        target.close()
    assert rows(h, table, ["id", "name"]) == _sorted([(2, "B"), (3, "c"), (3, "C")])
    if isinstance(target, RecordsPositions):
        again = streaming(h, table, pipeline, mode="truncate")
        again.open()
        try:
            assert isinstance(again, RecordsPositions)
            assert again.held_positions() == {"src": {"src:0": 7}}
        finally:
            again.close()


def test_streaming_scd2_versions_per_flush(h: TargetHarness) -> None:
    table = h.new_table()
    target = streaming(h, table, unique("modes"), mode="scd2", key=["id"], compare_columns=["name"])
    target.open()
    try:
        target.write(FIRST)
        target.flush()
        target.write(named((1, "a"), (2, "x"), (2, "B")))  # 2 changes; the last row wins
        target.flush()
    finally:
        target.close()
    assert rows(h, table, ["id", "name", "is_current"]) == _sorted(
        [(1, "a", True), (2, "b", False), (2, "B", True)]
    )


def test_scd2_options_need_scd2(h: TargetHarness) -> None:
    with pytest.raises(ConfigError, match=r'target\.ttl_seconds: only with mode = "scd2"'):
        streaming(h, h.new_table(), unique("modes"), mode="merge", key=["id"], ttl_seconds=5)


def test_load_without_create_needs_the_table_and_its_columns(h: TargetHarness) -> None:
    table = h.new_table()
    spec = LoadSpec(table, "append", create=False)
    with pytest.raises(ConnectorError, match="does not exist"):
        load(h, table, spec, FIRST)
    load(h, table, LoadSpec(table, "append"), FIRST)
    wider = FIRST.append_column("extra", pa.array([1, 2], pa.int64()))
    with pytest.raises(ConnectorError, match=r"no column\(s\) \['extra'\]"):
        load(h, table, spec, wider)
    with (
        pytest.raises(ConnectorError, match=r"column\(s\) \['extra'\]"),
        open_load(connection(h, table), spec, FIRST.schema) as run,
    ):
        run.write(wider)
    assert load(h, table, spec, FIRST) == 2
    assert rows(h, table, ["id", "name"]) == _sorted([(1, "a"), (1, "a"), (2, "b"), (2, "b")])


def test_load_scd2_adds_a_new_column(h: TargetHarness) -> None:
    table = h.new_table()
    spec = LoadSpec(table, "scd2", primary_key=("id",))
    load(h, table, spec, FIRST)
    wider = named((1, "a"), (2, "b")).append_column("tier", pa.array(["x", None]))
    assert load(h, table, spec, wider) == 2  # 1 changes (tier x): closed and inserted
    got = rows(h, table, ["id", "name", "tier", "is_current"])
    assert got == _sorted([(1, "a", None, False), (1, "a", "x", True), (2, "b", None, True)])


@pytest.mark.parametrize("kind", ["sqlite", "duckdb"])  # a database of the test's own
def test_a_load_leaves_no_positions_table(kind: str, request: pytest.FixtureRequest) -> None:
    h: TargetHarness = request.getfixturevalue(f"{kind}_harness")
    table = h.new_table()
    load(h, table, LoadSpec(table, "append"), FIRST)
    path = connection(h, table).keys["path"]
    if kind == "sqlite":
        import sqlite3

        with sqlite3.connect(path) as lite:
            names = {r[0] for r in lite.execute("SELECT name FROM sqlite_master").fetchall()}
    else:
        import duckdb

        with duckdb.connect(path) as duck:
            names = {r[0] for r in duck.execute("SHOW TABLES").fetchall()}
    assert names == {table}


def test_mysql_truncate_refuses_a_column_after_it_began(
    mysql_harness: TargetHarness,
) -> None:
    """MySQL commits DDL: a column added mid-truncate would publish the delete."""
    h = mysql_harness
    table = h.new_table()
    spec = LoadSpec(table, "truncate")
    load(h, table, spec, FIRST)
    wider = SECOND.append_column("extra", pa.array([1, 2, 3], pa.int64()))
    with (
        pytest.raises(ConnectorError, match=r"column\(s\) \['extra'\] appeared after"),
        open_load(connection(h, table), spec, FIRST.schema) as run,
    ):
        run.write(SECOND)
        run.write(wider)
    assert rows(h, table, ["id", "name"]) == [(1, "a"), (2, "b")]
