"""CDC through real ``flow consume`` processes: Kafka in, real databases out.

Full-size histories (10k keys, 200k events plus tombstones) in Debezium form
into Postgres and in Maxwell form into MariaDB; every message delivered a
second time; SIGKILL mid-stream three times; the schema + payload form into
two embedded targets at once; undecodable envelopes under ``on_error``. The
expected tables are folded from the generated events in plain Python
(:mod:`tests.integration.cdc_history`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
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
from tests.integration.conftest import Flow, committed, produce, unique, wait_until

from sluice.connectors.mysql.target import parse_url

pytestmark = pytest.mark.integration

PG_MIRROR = (
    "CREATE TABLE {t} (id bigint PRIMARY KEY, name text, amount double precision, "
    "qty bigint, active boolean, note text)"
)
MY_MIRROR = (
    "CREATE TABLE `{t}` (id bigint PRIMARY KEY, name longtext, amount double, qty bigint, "
    "active boolean, note longtext) DEFAULT CHARSET utf8mb4"
)


def config(
    name: str,
    topic: str,
    targets: str,
    envelope: str,
    *,
    group: str | None = None,
    batch_rows: int = 50_000,
    session_ms: int = 2_000,
    transform_extra: str = "",
    top_extra: str = "",
) -> str:
    cdc_envelope = "maxwell" if envelope == "maxwell" else "debezium"
    return f"""
pipeline_name = "{name}"
source_query = "{topic}"
idle_pause_ms = 100
{top_extra}

[source]
kind = "kafka"
bootstrap_servers = "{endpoints.KAFKA_BOOTSTRAP}"
group_id = "{group or name}"
session_timeout_ms = {session_ms}
max_batch_rows = {batch_rows}

{targets}

[transform]
{transform_extra}

[transform.cdc]
envelope = "{cdc_envelope}"
key_field = "{hist.key_field(envelope)}"
"""


def pg_target(table: str) -> str:
    return f"""[[targets]]
kind = "postgres"
url = "{endpoints.POSTGRES_URL}"
[targets.table]
name = "{table}"
"""


def pg_rows(table: str) -> dict[int, dict[str, Any]]:
    with psycopg.connect(endpoints.POSTGRES_URL, autocommit=True) as conn:
        cur = conn.execute(f"SELECT {', '.join(hist.COLUMNS)} FROM {table}")
        return hist.normalise([dict(zip(hist.COLUMNS, r, strict=True)) for r in cur.fetchall()])


def pg(statement: str) -> None:
    with psycopg.connect(endpoints.POSTGRES_URL, autocommit=True) as conn:
        conn.execute(statement)


def pg_drop(table: str) -> None:
    """Drop a mirror and the gate rows its pipelines kept."""
    pg(f"DROP TABLE IF EXISTS {table}")
    pg(f"DELETE FROM _sluice_cdc_gate WHERE tbl = 'public.{table}'")


def mysql(statement: str) -> list[tuple[Any, ...]]:
    url = parse_url(endpoints.MYSQL_URL)
    conn = pymysql.connect(
        host=url.host, port=url.port, user=url.user, database=url.database, autocommit=True
    )
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
            return list(cur.fetchall())
    finally:
        conn.close()


def load(topic: str, messages: list[tuple[bytes, bytes | None]]) -> None:
    produce(topic, [v for _, v in messages], keys=[k for k, _ in messages])  # type: ignore[misc]


def drained(group: str, topic: str, partitions: int, total: int) -> Callable[[], bool]:
    return lambda: committed(group, topic, partitions) >= total


def cdc_metrics(f: Flow) -> dict[str, float]:
    return {
        n: f.metric(f"sluice_cdc_{n}_total")
        for n in ("creates", "updates", "deletes", "skipped", "idempotent_skipped")
    }


def test_debezium_200k_into_postgres_then_every_message_again(
    kafka_topic: Callable[..., str], flow: Callable[..., Flow]
) -> None:
    h = hist.generate(10_000, 200_000, snapshot=2_000, seed=1)
    messages = hist.debezium(h)
    topic = kafka_topic(3)
    load(topic, messages)
    table = unique("cdc_pg")
    pg(PG_MIRROR.format(t=table))
    try:
        f = flow(config(table, topic, pg_target(table), "debezium"))
        wait_until(drained(table, topic, 3, len(messages)), 180, "every message committed")
        got, want = pg_rows(table), hist.expected(h.events)
        assert got == want, hist.diff(got, want)
        counts = h.counts()
        assert cdc_metrics(f) == {
            **{k: float(v) for k, v in counts.items()},
            "skipped": float(len(h.tombstones)),
            "idempotent_skipped": 0.0,
        }
        assert f.stop() == 0, f.output()

        # Every message again (a new consumer group of the same pipeline): all gated.
        again = f"{table}_again"
        f = flow(config(table, topic, pg_target(table), "debezium", group=again))
        wait_until(drained(again, topic, 3, len(messages)), 180, "every message committed again")
        assert cdc_metrics(f) == {
            "creates": 0.0,
            "updates": 0.0,
            "deletes": 0.0,
            "skipped": float(len(h.tombstones)),
            "idempotent_skipped": float(len(h.events)),
        }
        assert f.stop() == 0, f.output()
        assert pg_rows(table) == want
    finally:
        pg_drop(table)


def test_maxwell_200k_into_mariadb(
    kafka_topic: Callable[..., str], flow: Callable[..., Flow]
) -> None:
    h = hist.generate(10_000, 200_000, snapshot=1_000, seed=2)
    messages = hist.maxwell(h)
    topic = kafka_topic(1)  # Maxwell's default partitioning: by database
    load(topic, messages)
    table = unique("cdc_my")
    mysql(MY_MIRROR.format(t=table))
    target = f"""[[targets]]
kind = "mysql"
url = "{endpoints.MYSQL_URL}"
[targets.table]
name = "{table}"
"""
    try:
        f = flow(config(table, topic, target, "maxwell"), "--stop-after-idle-ms", "2000")
        assert f.proc.wait(timeout=240) == 0, f.output()
        rows = mysql(f"SELECT {', '.join(hist.COLUMNS)} FROM `{table}`")
        got = hist.normalise([dict(zip(hist.COLUMNS, r, strict=True)) for r in rows])
        want = hist.expected(h.events)
        assert got == want, hist.diff(got, want)
    finally:
        mysql(f"DROP TABLE IF EXISTS `{table}`")
        mysql(f"DELETE FROM _sluice_cdc_gate WHERE tbl = 'sluice.{table}'")


@pytest.mark.parametrize("kind", ["postgres", "delta_local"])
def test_sigkill_three_times_mid_stream_then_restart_gives_the_same_table(
    kind: str, kafka_topic: Callable[..., str], flow: Callable[..., Flow], tmp_path: Path
) -> None:
    h = hist.generate(2_000, 20_000, snapshot=500, seed=3)
    messages = hist.debezium(h)
    topic = kafka_topic(3)
    load(topic, messages)
    table = unique("cdc_kill")
    if kind == "postgres":
        pg(PG_MIRROR.format(t=table))
        target = pg_target(table)
    else:
        target = f"""[[targets]]
kind = "delta_local"
path = "{tmp_path / table}"
[targets.table]
primary_key = ["id"]
"""
    # A short session: each restart waits for the killed member to time out.
    cfg = config(table, topic, target, "debezium", batch_rows=500, session_ms=1_000)
    try:
        total = len(messages)
        for i in range(1, 4):
            f = flow(cfg)
            mark = total * i // 4
            wait_until(drained(table, topic, 3, mark), 120, f"{mark} messages committed")
            f.kill()
            assert committed(table, topic, 3) < total, "the kill must land mid-stream"
        f = flow(cfg, "--stop-after-idle-ms", "2000")
        assert f.proc.wait(timeout=180) == 0, f.output()
        if kind == "postgres":
            got = pg_rows(table)
        else:
            rows = pa.table(DeltaTable(str(tmp_path / table)).scan(columns=hist.COLUMNS))
            got = hist.normalise(rows.to_pylist())
        want = hist.expected(h.events)
        assert got == want, hist.diff(got, want)
    finally:
        if kind == "postgres":
            pg_drop(table)


def test_schema_and_payload_form_into_duckdb_and_sqlite_at_once(
    kafka_topic: Callable[..., str], flow: Callable[..., Flow], tmp_path: Path
) -> None:
    h = hist.generate(1_000, 20_000, snapshot=100, seed=4)
    messages = hist.debezium(h, wrapped=True)
    topic = kafka_topic(2)
    load(topic, messages)
    name = unique("cdc_fan")
    duck, lite = tmp_path / "mirror.duckdb", tmp_path / "mirror.sqlite"
    targets = f"""[[targets]]
kind = "duckdb"
path = "{duck}"
[targets.table]
name = "customers"
primary_key = ["id"]

[[targets]]
kind = "sqlite"
path = "{lite}"
[targets.table]
name = "customers"
primary_key = ["id"]
"""
    f = flow(config(name, topic, targets, "debezium"), "--stop-after-idle-ms", "2000")
    assert f.proc.wait(timeout=180) == 0, f.output()
    want = hist.expected(h.events)
    con = duckdb.connect(str(duck))
    try:
        cur = con.execute(f"SELECT {', '.join(hist.COLUMNS)} FROM customers")
        got = hist.normalise([dict(zip(hist.COLUMNS, r, strict=True)) for r in cur.fetchall()])
    finally:
        con.close()
    assert got == want, hist.diff(got, want)
    import sqlite3

    with sqlite3.connect(lite) as conn:
        rows = conn.execute(f"SELECT {', '.join(hist.COLUMNS)} FROM customers").fetchall()
    got = hist.normalise([dict(zip(hist.COLUMNS, r, strict=True)) for r in rows])
    assert got == want, hist.diff(got, want)


def _with_bad_envelopes(h: hist.History) -> tuple[list[tuple[bytes, bytes | None]], list[bytes]]:
    messages = hist.debezium(h)
    bad = [b"{not json", msgspec.json.encode({"op": "t", "source": {"ts_ms": 1}})]
    return [*messages[:50], (b"k1", bad[0]), *messages[50:], (b"k2", bad[1])], bad


def test_undecodable_envelopes_go_to_the_dead_letters_and_the_rest_applies(
    kafka_topic: Callable[..., str], flow: Callable[..., Flow], tmp_path: Path
) -> None:
    h = hist.generate(100, 1_000, seed=5)
    messages, bad = _with_bad_envelopes(h)
    topic = kafka_topic(1)
    load(topic, messages)
    table = unique("cdc_dlq")
    pg(PG_MIRROR.format(t=table))
    letters = tmp_path / "dead.jsonl"
    cfg = config(
        table,
        topic,
        pg_target(table),
        "debezium",
        transform_extra='on_error = "dlq"',
        top_extra=f'dlq_store = "{letters}"',
    )
    try:
        f = flow(cfg)
        wait_until(drained(table, topic, 1, len(messages)), 120, "every message committed")
        assert f.metric("sluice_cdc_skipped_total") == len(h.tombstones) + 2
        assert f.stop() == 0, f.output()
        got, want = pg_rows(table), hist.expected(h.events)
        assert got == want, hist.diff(got, want)
        dead = [json.loads(line) for line in letters.read_text().splitlines()]
        assert [d["payload"].encode() for d in dead] == bad
        assert [d["offset"] for d in dead] == [50, len(messages) - 1]
    finally:
        pg_drop(table)


def test_an_undecodable_envelope_stops_the_pipeline_naming_its_offset(
    kafka_topic: Callable[..., str], flow: Callable[..., Flow]
) -> None:
    h = hist.generate(100, 1_000, seed=6)
    messages, _ = _with_bad_envelopes(h)
    topic = kafka_topic(1)
    load(topic, messages)
    table = unique("cdc_fail")
    pg(PG_MIRROR.format(t=table))
    try:
        f = flow(config(table, topic, pg_target(table), "debezium"))
        assert f.proc.wait(timeout=60) == 1
        out = f.output()
        assert f"cannot decode message at topic {topic} partition 0 offset 50" in out, out
        assert "not a Debezium JSON envelope" in out
        assert committed(table, topic, 1) <= 50, "nothing at or after the bad message committed"
    finally:
        pg_drop(table)
