"""The SQL stage end to end: real broker, real Postgres, a real `flow consume`.

Every result is checked against the same SQL run by Postgres over the same
input, loaded into a plain table.
"""

from __future__ import annotations

import math
import random
import textwrap
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
from confluent_kafka import Consumer
from tests import endpoints
from tests.integration.conftest import (
    committed,
    events,
    kafka_pg_config,
    pg_count,
    produce,
    unique,
    wait_for_count,
    wait_until,
)

pytestmark = pytest.mark.integration

BASE_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def load_raw(pg: Any, table: str, columns: str, payloads: list[bytes]) -> None:
    """The same input as a Postgres table (``columns``: its column definitions)."""
    names = [c.split()[0] for c in columns.split(",")]
    pg.execute(f"CREATE TABLE {table} ({columns})")
    with pg.cursor() as cur, cur.copy(f"COPY {table} ({', '.join(names)}) FROM STDIN") as copy:
        for p in payloads:
            obj = msgspec.json.decode(p)
            copy.write_row([obj.get(n) for n in names])


def rows(pg: Any, query: str) -> list[tuple[Any, ...]]:
    return sorted(pg.execute(query).fetchall(), key=repr)


def with_transform(config: str, transform: str) -> str:
    return config + "\n" + textwrap.dedent(transform)


# -- the user guide's examples ----------------------------------------------------


def test_filter_and_lookup_join_equal_postgres_and_follow_a_refresh(
    kafka_topic: Any, flow: Any, pg: Any
) -> None:
    topic, table = kafka_topic(3), unique("enriched")
    users, raw = unique("users"), unique("raw")
    pg.execute(f"CREATE TABLE {users} (id int PRIMARY KEY, country text)")
    with pg.cursor() as cur, cur.copy(f"COPY {users} FROM STDIN") as copy:
        for i in range(990):  # users 990..996 have no row: the LEFT JOIN keeps them, null
            copy.write_row((i, f"c{i % 7}"))
    payloads = events(20_000)
    produce(topic, payloads)
    load_raw(pg, raw, "id int, user_id int, event_type text, amount float8", payloads)

    config = with_transform(
        kafka_pg_config(topic, table),
        f"""
        [transform]
        sql = '''
        SELECT s.id, s.user_id, s.event_type, s.amount, u.country, s._event_ts
        FROM source s
        LEFT JOIN users u ON s.user_id = u.id
        WHERE s.event_type IN ('click', 'view', 'purchase') AND s.amount > 0
          AND s.event_type <> 'view'
        '''
        [transform.lookups.users]
        kind = "postgres"
        url = "{endpoints.POSTGRES_URL}"
        schema = "public"
        table = "{users}"
        refresh_interval_ms = 300
        """,
    )
    f = flow(config)
    expected = rows(
        pg,
        f"SELECT s.id, s.user_id, s.event_type, s.amount, u.country FROM {raw} s "
        f"LEFT JOIN {users} u ON s.user_id = u.id "
        "WHERE s.event_type IN ('click', 'view', 'purchase') AND s.amount > 0 "
        "AND s.event_type <> 'view'",
    )
    wait_for_count(table, lambda c: c >= len(expected), 120, "the filtered rows")
    got = rows(pg, f"SELECT id, user_id, event_type, amount, country FROM {table}")
    assert got == expected
    assert any(r[4] is None for r in got)  # unmatched users kept by the LEFT JOIN
    assert pg_count(table, "count(*) FILTER (WHERE _event_ts IS NULL)") == 0

    # A lookup row changed in Postgres shows up without a restart.
    pg.execute(f"UPDATE {users} SET country = 'changed' WHERE id = 5")
    refreshes = f.metric("sluice_lookup_refreshes_total")
    wait_until(
        lambda: f.metric("sluice_lookup_refreshes_total") >= refreshes + 2, 30, "two refreshes"
    )
    later = [{**msgspec.json.decode(p), "user_id": 5} for p in events(30, 50_000)]
    produce(topic, [msgspec.json.encode(e) for e in later])
    kept = sum(1 for e in later if e["event_type"] != "view" and e["amount"] > 0)
    wait_for_count(
        table, lambda c: c == kept, 60, "later rows", "count(*) FILTER (WHERE id >= 50000)"
    )
    assert {r[0] for r in pg.execute(f"SELECT country FROM {table} WHERE id >= 50000")} == {
        "changed"
    }
    assert f.stop() == 0


def test_per_minute_array_agg_of_named_structs_lands_in_jsonb(
    kafka_topic: Any, flow: Any, pg: Any
) -> None:
    topic, table, raw = kafka_topic(1), unique("chain"), unique("raw")
    rnd = random.Random(7)
    payloads = [
        msgspec.json.encode(
            {
                "ts": BASE_MS + i * 1_500,
                "underlying": "SPXW" if i % 4 else "NDX",
                "days_to_expiry": i % 2,
                "strike": 4000 + 5 * (i % 50),
                "bid": round(rnd.uniform(0.1, 9.9), 2),
                "ask": round(rnd.uniform(10, 20), 2),
            }
        )
        for i in range(3_000)
    ]
    produce(topic, payloads, partition=0)
    load_raw(
        pg,
        raw,
        "ts bigint, underlying text, days_to_expiry int, strike int, bid float8, ask float8",
        payloads,
    )
    pg.execute(f"CREATE TABLE {table} (minute timestamptz NOT NULL, strikes_json jsonb NOT NULL)")
    config = with_transform(
        kafka_pg_config(topic, table),
        """
        [transform]
        sql = '''
        SELECT date_trunc('minute', to_timestamp_millis(ts)) AS minute,
               array_agg(named_struct('strike', strike, 'bid', bid, 'ask', ask)) AS strikes_json
        FROM source
        WHERE underlying = 'SPXW' AND days_to_expiry = 0
        GROUP BY 1
        '''
        """,
    )
    f = flow(config, "--stop-after-idle-ms", "2000")
    assert f.proc.wait(timeout=180) == 0, f.output()
    # Batches split minutes: each output row is one minute of one batch. The
    # elements, flattened, are exactly the filtered input rows.
    got = rows(
        pg,
        f"SELECT minute, (e->>'strike')::int, (e->>'bid')::float8, (e->>'ask')::float8 "
        f"FROM {table}, jsonb_array_elements(strikes_json) e",
    )
    expected = rows(
        pg,
        f"SELECT date_trunc('minute', to_timestamp(ts / 1000.0)), strike, bid, ask FROM {raw} "
        "WHERE underlying = 'SPXW' AND days_to_expiry = 0",
    )
    assert got == expected
    assert pg_count(table, "count(DISTINCT minute)") == len({r[0] for r in expected})
    assert pg_count(table, "count(*) FILTER (WHERE jsonb_typeof(strikes_json) <> 'array')") == 0


UDFS = """
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import sluice


@sluice.udf(args=("Float64", "Float64", "Float64", "Float64", "Float64"), returns="Float64")
def bs_call_delta(strike, spot, vol, rate, expiry):
    k = strike.to_numpy(zero_copy_only=False)
    s = spot.to_numpy(zero_copy_only=False)
    v = vol.to_numpy(zero_copy_only=False)
    r = rate.to_numpy(zero_copy_only=False)
    t = expiry.to_numpy(zero_copy_only=False)
    d1 = (np.log(s / k) + (r + 0.5 * v * v) * t) / (v * np.sqrt(t))
    cdf = 0.5 * (1.0 + np.vectorize(math.erf)(d1 / np.sqrt(2)))
    return pa.array(cdf, type=pa.float64())


@sluice.udaf(args=("Float64", "Float64"), state=("Float64", "Float64"), returns="Float64", name="vwap")
class Vwap:
    def __init__(self):
        self.num = 0.0
        self.den = 0.0

    def update_batch(self, prices, qtys):
        self.num += pc.sum(pc.multiply(prices, qtys)).as_py() or 0.0
        self.den += pc.sum(qtys).as_py() or 0.0

    def merge_batch(self, num_states, den_states):
        self.num += pc.sum(num_states).as_py() or 0.0
        self.den += pc.sum(den_states).as_py() or 0.0

    def evaluate(self):
        if self.den == 0:
            return pa.array([None], type=pa.float64())
        return pa.array([self.num / self.den], type=pa.float64())

    def state(self):
        return (pa.array([self.num], type=pa.float64()), pa.array([self.den], type=pa.float64()))
"""


def _delta(k: float, s: float, v: float, r: float, t: float) -> float:
    d1 = (math.log(s / k) + (r + 0.5 * v * v) * t) / (v * math.sqrt(t))
    return 0.5 * (1.0 + math.erf(d1 / math.sqrt(2)))


def test_python_udf_and_vwap_udaf_from_udf_modules(
    kafka_topic: Any, flow: Any, pg: Any, tmp_path: Path
) -> None:
    (tmp_path / "pricing_udfs.py").write_text(UDFS)  # `flow` runs in tmp_path
    topic = kafka_topic(2)
    deltas, vwaps, raw = unique("deltas"), unique("vwap"), unique("raw")
    rnd = random.Random(11)
    payloads = [
        msgspec.json.encode(
            {
                "id": i,
                "ts": BASE_MS + i * 700,
                "strike": rnd.choice([90.0, 100.0, 110.0]),
                "spot": rnd.uniform(80, 120),
                "vol": rnd.uniform(0.1, 0.6),
                "rate": 0.03,
                "expiry": rnd.uniform(0.05, 2.0),
                "price": round(rnd.uniform(10, 11), 4),
                "qty": float(rnd.randint(1, 100)),
            }
        )
        for i in range(5_000)
    ]
    produce(topic, payloads)
    load_raw(pg, raw, "id int, ts bigint, price float8, qty float8", payloads)

    def config(table: str, sql: str) -> str:
        return with_transform(
            kafka_pg_config(topic, table),
            f"""
            [transform]
            udf_modules = ["pricing_udfs"]
            sql = '''{sql}'''
            """,
        )

    f1 = flow(
        config(
            deltas,
            "SELECT id, bs_call_delta(strike, spot, vol, rate, expiry) AS delta FROM source",
        ),
        "--stop-after-idle-ms",
        "2000",
        name="deltas",
    )
    f2 = flow(
        config(
            vwaps,
            "SELECT date_trunc('minute', to_timestamp_millis(ts)) AS minute, "
            "vwap(price, qty) AS vwap, sum(qty) AS qty FROM source GROUP BY 1",
        ),
        "--stop-after-idle-ms",
        "2000",
        name="vwap",
    )
    assert f1.proc.wait(timeout=180) == 0, f1.output()
    assert f2.proc.wait(timeout=180) == 0, f2.output()

    got = dict(pg.execute(f"SELECT id, delta FROM {deltas}").fetchall())
    assert len(got) == len(payloads)
    for p in payloads:
        e = msgspec.json.decode(p)
        want = _delta(e["strike"], e["spot"], e["vol"], e["rate"], e["expiry"])
        assert got[e["id"]] == pytest.approx(want, rel=1e-12), e

    # Per-batch VWAPs recombine (weighted by their qty) into the per-minute VWAP.
    combined = dict(
        pg.execute(
            f"SELECT minute, sum(vwap * qty) / sum(qty) FROM {vwaps} GROUP BY minute"
        ).fetchall()
    )
    expected = dict(
        pg.execute(
            # to_timestamp_millis gives a zone-less timestamp: a `timestamp` column.
            "SELECT date_trunc('minute', to_timestamp(ts / 1000.0) AT TIME ZONE 'UTC'), "
            f"sum(price * qty) / sum(qty) FROM {raw} GROUP BY 1"
        ).fetchall()
    )
    assert combined.keys() == expected.keys()
    for minute, value in expected.items():
        assert combined[minute] == pytest.approx(value, rel=1e-9)


# -- on_error ---------------------------------------------------------------------

CAST_SQL = """
[transform]
on_error = "{policy}"
sql = "SELECT id, CAST(code AS INT) AS code, _event_ts FROM source"
"""


def _coded(start: int, n: int, bad: int | None = None) -> list[bytes]:
    """Events with a numeric-string ``code``; ``bad`` gets a code that is not a number."""
    return [
        msgspec.json.encode({"id": i, "code": "x" if i == bad else str(i)})
        for i in range(start, start + n)
    ]


def test_fail_exits_naming_the_offsets_of_a_batch_that_fails_in_sql(
    kafka_topic: Any, flow: Any
) -> None:
    topic, table = kafka_topic(1), unique("sqlfail")
    produce(topic, _coded(0, 50), partition=0)
    f = flow(with_transform(kafka_pg_config(topic, table), CAST_SQL.format(policy="fail")))
    wait_for_count(table, lambda c: c == 50, 60, "the first rows")
    produce(topic, _coded(50, 10, bad=55), partition=0)
    code = f.proc.wait(timeout=60)
    out = f.output()
    assert code == 1, out
    assert "Cannot cast string 'x'" in out
    assert f"topic {topic} partition 0 offsets 50-59" in out
    assert committed(table, topic, 1) == 50
    assert pg_count(table) == 50


def test_drop_lets_the_other_batches_through_and_counts(kafka_topic: Any, flow: Any) -> None:
    topic, table = kafka_topic(1), unique("sqldrop")
    f = flow(with_transform(kafka_pg_config(topic, table), CAST_SQL.format(policy="drop")))
    produce(topic, _coded(0, 100), partition=0)
    wait_for_count(table, lambda c: c == 100, 90, "round 1")
    produce(topic, [*_coded(100, 10, bad=105), b"{not json"], partition=0)
    wait_until(
        lambda: f.metric("sluice_rows_dropped_total") >= 2,  # the bad JSON + the failed batch
        60,
        "the failing batch to be dropped",
    )
    produce(topic, _coded(200, 100), partition=0)
    wait_for_count(table, lambda c: c == 100, 60, "round 3", "count(*) FILTER (WHERE id >= 200)")
    scrape = f.scrape()
    assert f'sluice_rows_dropped_total{{pipeline="{table}",reason="decode"}} 1.0' in scrape
    dropped = f.metric("sluice_rows_dropped_total") - 1
    kept = pg_count(table, "count(*) FILTER (WHERE id BETWEEN 100 AND 109)")
    assert pg_count(table, "count(*) FILTER (WHERE id = 105)") == 0
    assert dropped >= 1 and dropped + kept == 10
    assert f.stop() == 0
    assert committed(table, topic, 1) == 211


def test_dlq_topic_receives_raw_payloads_with_their_provenance(
    kafka_topic: Any, flow: Any, pg: Any
) -> None:
    topic, dead, table = kafka_topic(1), kafka_topic(1, prefix="dead"), unique("sqldlq")
    config = with_transform(
        kafka_pg_config(topic, table, extra_source=f'dead_letter_topic = "{dead}"'),
        CAST_SQL.format(policy="dlq"),
    )
    f = flow(config)
    produce(topic, _coded(0, 100), partition=0)
    wait_for_count(table, lambda c: c == 100, 90, "round 1")
    produce(topic, [*_coded(100, 10, bad=105), b"{not json"], partition=0)
    produce(topic, _coded(200, 100), partition=0)
    wait_until(lambda: committed(table, topic, 1) == 211, 60, "every offset committed")
    letters = _read_topic(dead, expect_at_least=2)
    by_stage: dict[str, list[Any]] = {}
    for msg in letters:
        headers = {k: v.decode() for k, v in msg.headers()}
        assert headers["sluice.pipeline"] == table
        assert headers["sluice.partition"] == f"{topic}:0"
        by_stage.setdefault(headers["sluice.stage"], []).append((headers, msg.value()))
    (decode_headers, decode_value), *_ = by_stage["decode"]
    assert decode_value == b"{not json"
    assert decode_headers["sluice.offset"] == "110"
    assert "invalid JSON" in decode_headers["sluice.error"]
    transformed = {v for _, v in by_stage["transform"]}
    assert msgspec.json.encode({"id": 105, "code": "x"}) in transformed
    assert all("Cannot cast" in h["sluice.error"] for h, _ in by_stage["transform"])
    # Every decodable row after round 1 is either in the target or in the DLQ.
    dead_ids = {msgspec.json.decode(v)["id"] for v in transformed}
    stored = {r[0] for r in pg.execute(f"SELECT id FROM {table} WHERE id >= 100")}
    assert not dead_ids & stored
    assert dead_ids | stored == {*range(100, 110), *range(200, 300)}
    assert f.metric("sluice_dlq_writes_total") == len(letters)
    assert f.stop() == 0


def _read_topic(topic: str, expect_at_least: int) -> list[Any]:
    c = Consumer(
        {
            "bootstrap.servers": endpoints.KAFKA_BOOTSTRAP,
            "group.id": unique("reader"),
            "auto.offset.reset": "earliest",
        }
    )
    c.subscribe([topic])
    got: list[Any] = []
    try:
        wait_until(
            lambda: (
                got.extend(m for m in c.consume(100, 0.5) if not m.error())
                or len(got) >= expect_at_least
            ),
            60,
            f"{expect_at_least} dead letters in {topic}",
        )
        got.extend(m for m in c.consume(100, 1.0) if not m.error())
    finally:
        c.close()
    return got


def test_offsets_move_only_after_the_dead_letter_write(
    kafka_topic: Any, flow: Any, pg: Any
) -> None:
    topic, table = kafka_topic(1), unique("dlqorder")
    dlq_schema, dlq_table = unique("dlq"), "dead"
    # The DLQ table exists and refuses decode letters until the constraint goes.
    pg.execute(f"CREATE SCHEMA {dlq_schema}")
    pg.execute(
        f"CREATE TABLE {dlq_schema}.{dlq_table} (id bigserial PRIMARY KEY, pipeline text NOT NULL, "
        "source text NOT NULL, stage text NOT NULL CONSTRAINT no_decode CHECK (stage <> 'decode'), "
        'error text NOT NULL, partition text, "offset" text, source_timestamp timestamptz, '
        "key bytea, payload bytea, failed_at timestamptz NOT NULL DEFAULT now())"
    )
    config = with_transform(
        kafka_pg_config(topic, table).replace(
            "[source]", f'dlq_store = "postgres:{dlq_schema}.{dlq_table}"\n\n[source]'
        ),
        '[transform]\non_error = "dlq"\nsql = "SELECT * FROM source"\n',
    )
    produce(topic, events(20), partition=0)
    produce(topic, [b"{not json"], partition=0)
    produce(topic, events(20, 20), partition=0)
    f = flow(config)
    assert f.proc.wait(timeout=90) == 1, f.output()
    assert "no_decode" in f.output()
    assert committed(table, topic, 1) <= 20  # the batch holding the poison was not committed
    pg.execute(f"ALTER TABLE {dlq_schema}.{dlq_table} DROP CONSTRAINT no_decode")
    f2 = flow(config, name="again")
    wait_until(lambda: committed(table, topic, 1) == 41, 90, "all offsets committed")
    assert pg.execute(
        f"SELECT convert_from(payload, 'UTF8'), \"offset\" FROM {dlq_schema}.{dlq_table}"
    ).fetchall() == [("{not json", "20")]
    assert pg_count(table, "count(DISTINCT id)") == 40
    assert f2.stop() == 0


def test_sigkill_between_dead_letter_write_and_commit_loses_nothing(
    kafka_topic: Any, flow: Any, pg: Any
) -> None:
    topic, table = kafka_topic(3), unique("dlqcrash")
    payloads: list[bytes] = []
    poison_ids = set()
    for i, p in enumerate(events(30_000)):
        payloads.append(p)
        if i % 100 == 0:
            payloads.append(f'{{"id": "poison-{i}"'.encode())  # truncated JSON
            poison_ids.add(i)
    produce(topic, payloads)
    config = with_transform(
        kafka_pg_config(
            topic,
            table,
            mode="merge",
            batch_rows=1_000,
            primary_key='primary_key = ["id"]',
        ).replace("[source]", 'dlq_store = "table"\n\n[source]'),
        '[transform]\non_error = "dlq"\nsql = "SELECT * FROM source"\n',
    )
    for threshold in (5_000, 12_000, 20_000):
        f = flow(config)
        wait_for_count(table, lambda c, t=threshold: c >= t, 120, f"{threshold} rows")
        f.kill()
    f = flow(config, "--stop-after-idle-ms", "2000")
    assert f.proc.wait(timeout=180) == 0, f.output()
    assert pg_count(table) == 30_000
    assert pg_count(table, "count(DISTINCT id)") == 30_000
    dead = {
        r[0]
        for r in pg.execute(
            "SELECT convert_from(payload, 'UTF8') FROM public.sluice_dead_letters "
            "WHERE pipeline = %s",
            (table,),
        )
    }
    assert dead == {f'{{"id": "poison-{i}"' for i in poison_ids}
    with psycopg.connect(endpoints.POSTGRES_URL, autocommit=True) as conn:
        total = conn.execute(
            "SELECT count(*) FROM public.sluice_dead_letters WHERE pipeline = %s", (table,)
        ).fetchone()
    assert total is not None and total[0] >= len(poison_ids)  # at least once, maybe twice
