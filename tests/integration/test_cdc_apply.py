"""CDC apply into every target, against the real databases, batch by batch.

Each test builds the CDC targets from pipeline TOML as ``flow consume`` does
(``sluice.engine.cdc.build_targets``), feeds them the change tables the Kafka
source would hand over (the same decoder, with offsets), and compares the
mirror with the expected table computed independently from the generated
history (:mod:`tests.integration.cdc_history`). ``test_cdc_flow.py`` runs the
same through real ``flow consume`` processes.
"""

from __future__ import annotations

import logging
import random
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import psycopg
import pyarrow as pa
import pymysql
import pytest
from deltalake import DeltaTable
from tests import endpoints
from tests.integration import cdc_history as hist
from tests.integration.conftest import unique

from sluice.config import load_text
from sluice.connectors.mysql.target import parse_url
from sluice.engine import metrics as m
from sluice.engine.cdc import build_targets
from sluice.errors import ConnectorError
from sluice.formats.cdc import EnvelopeDecoder

pytestmark = pytest.mark.integration

KINDS = ["postgres", "mysql", "sqlite", "duckdb", "delta_local"]

# Pre-created mirror tables (Delta is created by the first batch, from the images).
DDL = {
    "postgres": "CREATE TABLE {t} (id bigint PRIMARY KEY, name text, amount double precision, "
    "qty bigint, active boolean, note text)",
    "mysql": "CREATE TABLE {t} (id bigint PRIMARY KEY, name longtext, amount double, qty bigint, "
    "active boolean, note longtext) DEFAULT CHARSET utf8mb4",
    "sqlite": "CREATE TABLE {t} (id INTEGER PRIMARY KEY, name TEXT, amount REAL, qty INTEGER, "
    "active BOOLEAN, note TEXT)",
    "duckdb": "CREATE TABLE {t} (id BIGINT PRIMARY KEY, name VARCHAR, amount DOUBLE, qty BIGINT, "
    "active BOOLEAN, note VARCHAR)",
}


def _mysql() -> Any:
    url = parse_url(endpoints.MYSQL_URL)
    return pymysql.connect(
        host=url.host,
        port=url.port,
        user=url.user,
        password=url.password,
        database=url.database,
        autocommit=True,
        charset="utf8mb4",
    )


@dataclass
class Mirror:
    """One mirror table in one real database."""

    kind: str
    name: str
    where: str  # database file / Delta folder (embedded kinds)

    def target_toml(self, primary_key: str = "") -> str:
        if self.kind == "postgres":
            conn = f'url = "{endpoints.POSTGRES_URL}"'
        elif self.kind == "mysql":
            conn = f'url = "{endpoints.MYSQL_URL}"'
        else:
            conn = f'path = "{self.where}"'
        table = f'name = "{self.name}"' if self.kind != "delta_local" else ""
        if self.kind == "delta_local" and not primary_key:
            primary_key = 'primary_key = ["id"]'
        return f'[target]\nkind = "{self.kind}"\n{conn}\n[target.table]\n{table}\n{primary_key}\n'

    def sql(self, statement: str) -> list[tuple[Any, ...]]:
        """Run SQL against the mirror's database (not for Delta)."""
        if self.kind == "postgres":
            with psycopg.connect(endpoints.POSTGRES_URL, autocommit=True) as c:
                cur = c.execute(statement)
                return list(cur.fetchall()) if cur.description else []
        if self.kind == "mysql":
            conn = _mysql()
            try:
                with conn.cursor() as cur:
                    cur.execute(statement)
                    return list(cur.fetchall())
            finally:
                conn.close()
        if self.kind == "sqlite":
            with sqlite3.connect(self.where) as c:
                return list(c.execute(statement).fetchall())
        con = duckdb.connect(self.where)
        try:
            return list(con.execute(statement).fetchall())
        finally:
            con.close()

    def create(self) -> None:
        if self.kind in DDL:
            self.sql(DDL[self.kind].format(t=self.name))

    def columns(self) -> list[str]:
        if self.kind == "delta_local":
            names = pa.schema(DeltaTable(self.where).schema().to_arrow()).names
            return [n for n in names if not n.startswith("_sluice_cdc_")]
        if self.kind == "sqlite":
            return [r[1] for r in self.sql(f"PRAGMA table_info({self.name})")]
        if self.kind == "duckdb":
            query = f"SELECT column_name FROM information_schema.columns WHERE table_name = '{self.name}' ORDER BY ordinal_position"
        else:
            schema = "public" if self.kind == "postgres" else "sluice"
            query = (
                "SELECT column_name FROM information_schema.columns WHERE table_schema = "
                f"'{schema}' AND table_name = '{self.name}' ORDER BY ordinal_position"
            )
        return [str(r[0]) for r in self.sql(query)]

    def rows(self, columns: list[str] | None = None) -> list[dict[str, Any]]:
        columns = columns or hist.COLUMNS
        if self.kind == "delta_local":
            # DeltaTable.scan, not to_pyarrow_dataset: a pyarrow dataset over
            # deltalake makes the process abort at exit.
            return pa.table(DeltaTable(self.where).scan(columns=columns)).to_pylist()
        quoted = ", ".join(f'"{c}"' if self.kind != "mysql" else f"`{c}`" for c in columns)
        return [
            dict(zip(columns, r, strict=True))
            for r in self.sql(f"SELECT {quoted} FROM {self.name}")
        ]

    def table(self) -> dict[int, dict[str, Any]]:
        return hist.normalise(self.rows())

    def drop(self) -> None:
        if self.kind == "postgres":
            self.sql(f"DROP TABLE IF EXISTS {self.name}")
            self.sql("DELETE FROM _sluice_cdc_gate WHERE tbl = 'public." + self.name + "'")
        elif self.kind == "mysql":
            self.sql(f"DROP TABLE IF EXISTS `{self.name}`")
            self.sql(f"DELETE FROM _sluice_cdc_gate WHERE tbl = 'sluice.{self.name}'")


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[Callable[[str], Mirror]]:
    """``mirror(kind)``: a fresh mirror table name in that kind's database."""
    made: list[Mirror] = []

    def make(kind: str) -> Mirror:
        name = unique("cdc")
        where = {
            "sqlite": str(tmp_path / f"{name}.sqlite"),
            "duckdb": str(tmp_path / f"{name}.duckdb"),
            "delta_local": str(tmp_path / name),
        }.get(kind, "")
        made.append(Mirror(kind, name, where))
        return made[-1]

    yield make
    for mm in made:
        mm.drop()


def pipeline(mirror: Mirror, envelope: str, cdc_extra: str = "", primary_key: str = "") -> str:
    cdc_envelope = "debezium" if envelope.startswith("debezium") else envelope
    return f"""
pipeline_name = "{unique("p")}"
source_query = "unused"
[source]
kind = "kafka"
bootstrap_servers = "{endpoints.KAFKA_BOOTSTRAP}"
{mirror.target_toml(primary_key)}
[transform.cdc]
envelope = "{cdc_envelope}"
key_field = "{hist.key_field(envelope)}"
{cdc_extra}
"""


class Feed:
    """Opens a pipeline's CDC target and hands it batches as the Kafka source would."""

    def __init__(self, toml: str) -> None:
        self.spec = load_text(toml)
        assert self.spec.transform is not None and self.spec.transform.cdc is not None
        self.decoder = EnvelopeDecoder(self.spec.transform.cdc, self.spec.pipeline_name)
        (self.target,) = build_targets(self.spec)
        self.target.open()
        self.next_offset = 0

    def send(self, values: list[bytes | None], offsets: list[int] | None = None) -> int:
        """Write and flush one batch (new offsets unless given); its change count."""
        if offsets is None:
            offsets = list(range(self.next_offset, self.next_offset + len(values)))
        self.next_offset = max(self.next_offset, offsets[-1] + 1) if offsets else self.next_offset
        decoded = self.decoder.decode(values, offsets)
        assert decoded.bad == [], decoded.bad[:3]
        self.target.write(decoded.table)
        self.target.flush()
        return int(decoded.table.num_rows)

    def metric(self, name: str) -> float:
        """``sluice_cdc_<name>_total`` of this pipeline: 0 before its first
        increment; a metric that is not declared at all (a typo) raises."""
        family = f"sluice_cdc_{name}"
        assert any(c.name == family for c in m.REGISTRY.collect()), f"no metric {family!r}"
        value = m.REGISTRY.get_sample_value(
            f"{family}_total", {"pipeline": self.spec.pipeline_name}
        )
        return value or 0.0

    def close(self) -> None:
        self.target.close()


def _one(event: hist.Event, envelope: str) -> bytes:
    """The message of one event (no tombstone)."""
    ((_, value),) = hist.encode(hist.History([event], frozenset()), envelope)
    assert value is not None
    return value


@pytest.mark.parametrize("envelope", ["debezium", "maxwell"])
@pytest.mark.parametrize("kind", KINDS)
def test_the_full_history_of_10k_keys_and_200k_events_equals_the_expected_table(
    kind: str, envelope: str, mirror: Callable[[str], Mirror]
) -> None:
    """The issue's full-size history, applied to every target in 20k-message batches."""
    mm = mirror(kind)
    mm.create()
    h = hist.generate(10_000, 200_000, snapshot=1_000, seed=29)
    values = [v for _, v in hist.encode(h, envelope)]
    feed = Feed(pipeline(mm, envelope))
    try:
        for start in range(0, len(values), 20_000):
            feed.send(values[start : start + 20_000])
        got, want = mm.table(), hist.expected(h.events)
        assert got == want, hist.diff(got, want)
        counts = h.counts()
        assert feed.metric("creates") == counts["creates"]
        assert feed.metric("deletes") == counts["deletes"]
    finally:
        feed.close()


@pytest.mark.parametrize("envelope", ["debezium", "maxwell"])
@pytest.mark.parametrize("kind", KINDS)
def test_history_twice_delivered_with_old_events_resent_equals_the_expected_table(
    kind: str, envelope: str, mirror: Callable[[str], Mirror]
) -> None:
    """Every batch delivered twice (same offsets: a consumer redelivery) and
    older events re-sent after newer ones (new offsets: an upstream re-send).

    "Older" in the envelope's clock: Maxwell's ``ts`` has whole seconds, and an
    event re-sent within the same second as the key's newest change cannot be
    told from a later change by its time (the gate then goes by offset)."""
    clock = 1000 if envelope == "maxwell" else 1  # ms per tick of the envelope's time
    mm = mirror(kind)
    mm.create()
    h = hist.generate(2_000, 20_000, snapshot=200, seed=11)
    messages = hist.encode(h, envelope)
    values = [v for _, v in messages]
    feed = Feed(pipeline(mm, envelope))
    rng = random.Random(3)
    latest: dict[int, int] = {}  # key -> newest change time sent so far
    sent: list[hist.Event] = []
    event_of = iter(h.events)
    redelivered = resent = 0
    batch = 2_500
    resend_base = 10**9  # upstream re-sends land after everything else in the partition
    try:
        for start in range(0, len(values), batch):
            chunk = values[start : start + batch]
            offsets = list(range(start, start + len(chunk)))
            changes = feed.send(chunk, offsets)
            redelivered += feed.send(chunk, offsets)  # the same messages again
            for _ in range(changes):
                e = next(event_of)
                sent.append(e)
                latest[e.key] = max(latest.get(e.key, 0), e.ts_ms // clock)
            older = [e for e in sent if e.ts_ms // clock < latest[e.key]]
            again = rng.sample(older, min(40, len(older)))
            if again:
                offsets = list(range(resend_base, resend_base + len(again)))
                resend_base += len(again)
                resent += feed.send([_one(e, envelope) for e in again], offsets)
        assert len(sent) == len(h.events)
        got, want = mm.table(), hist.expected(h.events)
        assert got == want, hist.diff(got, want)
        counts = h.counts()
        assert feed.metric("creates") == counts["creates"]
        assert feed.metric("updates") == counts["updates"]
        assert feed.metric("deletes") == counts["deletes"]
        assert feed.metric("idempotent_skipped") == redelivered + resent
        assert redelivered == len(h.events) and resent > 0
        if envelope == "debezium":
            assert feed.metric("skipped") == 2 * len(h.tombstones)
    finally:
        feed.close()


@pytest.mark.parametrize("kind", KINDS)
def test_a_delete_is_gated_too_an_old_create_does_not_bring_the_row_back(
    kind: str, mirror: Callable[[str], Mirror]
) -> None:
    mm = mirror(kind)
    mm.create()
    feed = Feed(pipeline(mm, "debezium"))
    row = {"id": 1, "name": "a", "amount": 1.5, "qty": 2, "active": True, "note": None}
    create = hist.Event("c", 1, 100, None, row)
    other = hist.Event("c", 2, 100, None, {**row, "id": 2})
    delete = hist.Event("d", 1, 101, row, None)
    try:
        feed.send([_one(create, "debezium"), _one(other, "debezium"), _one(delete, "debezium")])
        feed.send([_one(create, "debezium")])  # re-sent after the delete
        assert sorted(mm.table()) == [2]
        assert feed.metric("idempotent_skipped") == 1
    finally:
        feed.close()


@pytest.mark.parametrize("kind", KINDS)
def test_changes_within_one_millisecond_in_different_batches_are_all_applied(
    kind: str, mirror: Callable[[str], Mirror]
) -> None:
    """A transaction that inserts then updates a row gives both events the same
    time; a batch boundary between them must not lose the update. A re-published
    copy of the update (same time, same content, new offset) is a redelivery."""
    mm = mirror(kind)
    mm.create()
    feed = Feed(pipeline(mm, "debezium"))
    row = {"id": 5, "name": "first", "amount": 1.0, "qty": 1, "active": False, "note": None}
    later = {**row, "name": "second"}
    try:
        feed.send([_one(hist.Event("c", 5, 500, None, row), "debezium")])
        update = _one(hist.Event("u", 5, 500, row, later), "debezium")
        feed.send([update])
        assert mm.table()[5]["name"] == "second"
        feed.send([update])  # re-published: new offset, same event
        assert mm.table()[5]["name"] == "second"
        assert feed.metric("updates") == 1
        assert feed.metric("idempotent_skipped") == 1
    finally:
        feed.close()


def _change(op: str, after: dict[str, Any], ts_ms: int) -> bytes:
    return msgspec.json.encode({"op": op, "after": after, "source": {"ts_ms": ts_ms}})


#: A mirror of (id, name) only (Delta: created from the first change).
NARROW = {
    "postgres": "CREATE TABLE {t} (id bigint PRIMARY KEY, name text)",
    "mysql": "CREATE TABLE {t} (id bigint PRIMARY KEY, name longtext) DEFAULT CHARSET utf8mb4",
    "sqlite": "CREATE TABLE {t} (id INTEGER PRIMARY KEY, name TEXT)",
    "duckdb": "CREATE TABLE {t} (id BIGINT PRIMARY KEY, name VARCHAR)",
}


@pytest.mark.parametrize("policy", ["skip", "fail", "add_columns"])
@pytest.mark.parametrize("kind", KINDS)
def test_schema_drift_follows_the_policy(
    kind: str, policy: str, mirror: Callable[[str], Mirror], caplog: pytest.LogCaptureFixture
) -> None:
    mm = mirror(kind)
    if kind in NARROW:
        mm.sql(NARROW[kind].format(t=mm.name))
    feed = Feed(pipeline(mm, "debezium", f'schema_evolution = "{policy}"'))
    try:
        feed.send([_change("c", {"id": 1, "name": "a"}, 10)])
        assert mm.columns() == ["id", "name"]
        # A new column appears in the after images.
        batch = [
            _change("u", {"id": 1, "name": "a2", "extra": 7}, 20),
            _change("c", {"id": 2, "name": "b", "extra": 7}, 21),
        ]
        if policy == "fail":
            with pytest.raises(ConnectorError, match=r"column\(s\) 'extra' .* not in the table"):
                feed.send(batch)
            assert mm.rows(["id", "name"]) == [{"id": 1, "name": "a"}], "the batch must roll back"
            # Once the column exists, the same batch applies (the gate did not move).
            if kind == "delta_local":
                import deltalake
                from deltalake.schema import PrimitiveType

                DeltaTable(mm.where).alter.add_columns(
                    [deltalake.Field("extra", PrimitiveType("long"))]
                )
            else:
                mm.sql(f"ALTER TABLE {mm.name} ADD COLUMN extra bigint")
            feed.target.close()
            feed.target.open()
            feed.send(batch, offsets=[1, 2])
            assert sorted((r["id"], r["extra"]) for r in mm.rows(["id", "extra"])) == [
                (1, 7),
                (2, 7),
            ]
            return
        with caplog.at_level(logging.WARNING, logger="sluice.connectors.cdc_apply"):
            feed.send(batch)
            feed.send([_change("u", {"id": 2, "name": "b2", "extra": 8}, 30)])
        if policy == "skip":
            assert mm.columns() == ["id", "name"]
            assert sorted((r["id"], r["name"]) for r in mm.rows(["id", "name"])) == [
                (1, "a2"),
                (2, "b2"),
            ]
            warned = [r for r in caplog.records if "'extra'" in r.getMessage()]
            assert len(warned) == 1, "warned once per column"
        else:
            assert mm.columns() == ["id", "name", "extra"]
            got = sorted((r["id"], r["name"], r["extra"]) for r in mm.rows(["id", "name", "extra"]))
            assert got == [(1, "a2", 7), (2, "b2", 8)]
    finally:
        feed.close()


@pytest.mark.parametrize("kind", ["postgres", "sqlite", "delta_local"])
def test_soft_deletes_set_the_column_and_a_new_create_clears_it(
    kind: str, mirror: Callable[[str], Mirror]
) -> None:
    mm = mirror(kind)
    mm.create()
    feed = Feed(pipeline(mm, "debezium", 'delete_mode = "soft"\nsoft_delete_column = "deleted_at"'))
    row = {"id": 1, "name": "a", "amount": 1.0, "qty": 1, "active": True, "note": None}
    try:
        feed.send([_one(hist.Event("c", 1, 10, None, row), "debezium")])
        feed.send([_one(hist.Event("d", 1, 11, row, None), "debezium")])
        ((deleted_at,),) = [tuple(r.values()) for r in mm.rows(["deleted_at"])]
        assert deleted_at is not None, "the row stays, marked deleted"
        feed.send([_one(hist.Event("c", 1, 10, None, row), "debezium")])  # old create re-sent
        assert [r["deleted_at"] is not None for r in mm.rows(["deleted_at"])] == [True]
        feed.send([_one(hist.Event("c", 1, 12, None, {**row, "name": "again"}), "debezium")])
        assert mm.rows(["name", "deleted_at"]) == [{"name": "again", "deleted_at": None}]
        assert feed.metric("deletes") == 1
    finally:
        feed.close()


@pytest.mark.parametrize("kind", ["postgres", "mysql", "sqlite", "duckdb"])
def test_a_missing_table_is_created_keyed_on_key_field(
    kind: str, mirror: Callable[[str], Mirror]
) -> None:
    mm = mirror(kind)
    toml = pipeline(mm, "maxwell")
    feed = Feed(toml)
    h = hist.generate(50, 400, seed=5)
    values = [v for _, v in hist.maxwell(h)]
    want = hist.expected(h.events)
    try:
        feed.send(values)
        got = mm.table()
        assert got == want, hist.diff(got, want)
    finally:
        feed.close()
    # Dropped to be rebuilt from the topic's start: the new table is not gated
    # by the versions its predecessor left.
    mm.sql(f"DROP TABLE {mm.name}")
    feed = Feed(toml)
    try:
        feed.send(values)
        got = mm.table()
        assert got == want, hist.diff(got, want)
    finally:
        feed.close()


def test_postgres_converts_json_to_the_column_types(mirror: Callable[[str], Mirror]) -> None:
    mm = mirror("postgres")
    mm.sql(
        f"CREATE TABLE {mm.name} (id int PRIMARY KEY, at timestamptz, day date, "
        "price numeric(10,2), doc jsonb, tags text[], ok boolean, n smallint)"
    )
    feed = Feed(pipeline(mm, "debezium"))
    after = {
        "id": 1,
        "at": "2024-02-03T04:05:06.123456Z",
        "day": "2024-02-29",
        "price": 12.5,
        "doc": {"a": [1, {"b": None}], "s": 'é"\n'},
        "tags": ["x", "y z"],
        "ok": True,
        "n": 7,
    }
    try:
        feed.send([_change("c", after, 1)])
        (row,) = mm.sql(
            f"SELECT to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'), day::text, "
            f"price::text, doc, tags, ok, n FROM {mm.name}"
        )
        assert row == (
            "2024-02-03 04:05:06.123456",
            "2024-02-29",
            "12.50",
            {"a": [1, {"b": None}], "s": 'é"\n'},
            ["x", "y z"],
            True,
            7,
        )
    finally:
        feed.close()


def test_a_value_the_column_does_not_take_fails_the_batch_and_writes_nothing(
    mirror: Callable[[str], Mirror],
) -> None:
    mm = mirror("mysql")
    mm.create()
    feed = Feed(pipeline(mm, "debezium"))
    good = {"id": 1, "name": "ok", "amount": 1.0, "qty": 1, "active": True, "note": None}
    bad = {**good, "id": 2, "qty": "not a number"}
    try:
        with pytest.raises(ConnectorError, match="qty"):
            feed.send([_change("c", good, 1), _change("c", bad, 1)])
        assert mm.table() == {}
    finally:
        feed.close()


@pytest.mark.parametrize("kind", ["postgres", "mysql", "sqlite", "duckdb", "delta_local"])
def test_a_misspelt_key_column_fails_at_start_naming_it(
    kind: str, mirror: Callable[[str], Mirror]
) -> None:
    mm = mirror(kind)
    if kind == "delta_local":
        Feed(pipeline(mm, "debezium")).send([_change("c", {"id": 1}, 1)])
    else:
        mm.create()
    spec = load_text(pipeline(mm, "debezium", primary_key='primary_key = ["idd"]'))
    (target,) = build_targets(spec)
    with pytest.raises(ConnectorError, match=r"primary.key column\(s\) 'idd' are not columns"):
        target.open()
    target.close()
    if kind != "delta_local":
        bad_key = pipeline(mm, "debezium").replace(
            'key_field = "after.id"', 'key_field = "after.idd"'
        )
        (target,) = build_targets(load_text(bad_key))
        with pytest.raises(ConnectorError, match=r"key_field 'after\.idd' names column 'idd'"):
            target.open()
        target.close()
