"""Kafka orders ⋈ payments (±5 min, inner) -> Postgres: sluice, the reference, Quix Streams.

    python -m benchmarks.kafka_join_to_postgres.run [--rows N] [--state-store postgres|in_memory]

1. Generate ``--rows`` events, half orders and half payments (deterministic
   from ``--seed``): most orders get a payment within ±5 min of event time,
   some two, some one outside the window, some none, and some payments name
   no order. Each topic is up to 4 s out of order. Produce them to two new
   3-partition topics with explicit message timestamps (the event time) and
   the order_id as message key, then one closing event per partition and
   topic, two hours later, that moves every watermark past every buffered row.
2. Compute the expected rows with DuckDB: the same interval join over the
   generated events.
3. For each engine, one after the other: create its own table, start it
   (sluice and the reference on the rendered ``pipeline.toml.tmpl``, Quix
   Streams on ``quix_join.py``) and poll ``count(*)`` of its table until every
   expected row landed, or it consumed every message and its table stopped
   growing, or it failed.
4. Verify each table against DuckDB's rows (the exact multiset of pairs and
   every column), print the tables and write
   ``benchmarks/results/kafka_join_to_postgres-<date>.{md,json}``.

The polling, CPU and memory accounting is ``kafka_to_postgres``'s
(``watch_engine``). The figures are per *input* event, orders and payments
together. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import adbc_driver_postgresql.dbapi as adbc
import confluent_kafka as ck
import duckdb
import psycopg
import pyarrow as pa
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
)

from benchmarks import common
from benchmarks.common import Dataset, EngineResult
from benchmarks.kafka_to_postgres import run as k2pg
from benchmarks.kafka_to_postgres.run import Settings
from benchmarks.kafka_tumbling_to_postgres import run as tumbling

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "pipeline.toml.tmpl"
QUIX_PROGRAM = HERE / "quix_join.py"
BENCHMARK = "kafka_join_to_postgres"
#: Prefix of the topics, the schema, the pipeline_name, the group ids and the work dir.
PREFIX = "bench-join"
ENGINES = ("sluice", "reference", "quix")
#: The packages of this environment that the results record.
PACKAGES = ("sluice", "confluent-kafka", "psycopg", "pyarrow", "adbc-driver-postgresql", "duckdb")
STATE_STORES = ("postgres", "in_memory")

#: Where ``benchmarks/setup_peers.sh`` installs the peers, one venv each.
PEERS_DIR = Path(os.environ.get("PEERS_DIR", "/opt/peers"))
QUIX_PYTHON = PEERS_DIR / "quixstreams" / "bin" / "python"

# ---------------------------------------------------------------- the events

#: Order ``i`` (1-based) happens at ``T0_MS + i * ORDER_STEP_MS``: 500k orders
#: span 2.8 hours of event time, a ±5 min window holds ~30k orders.
T0_MS = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp() * 1000)
ORDER_STEP_MS = 20
#: Each topic is produced in order of event time plus a random 0..DISORDER_MS
#: (the test's "arrival"), so it is up to 4 s out of order; this must stay
#: below the template's lateness_ms (checked at start).
DISORDER_MS = 4_000
#: What happens to an order (cumulative shares): one payment inside the
#: window; two (a split payment), both inside; one outside it (6 to 20 min
#: away, before or after: neither side matches); else none. The payments left
#: to make up half of --rows name orders that do not exist (order_id past the
#: last order), at random times in the same span.
P_ONE, P_SPLIT, P_OUTSIDE = 0.78, 0.83, 0.90
OUTSIDE_MS = (360_000, 1_200_000)
USERS = 10_000
CURRENCIES = ("EUR", "USD", "GBP", "JPY", "CHF")
METHODS = ("card", "paypal", "bank_transfer", "wallet")
#: One closing event per partition and topic this long after the last event:
#: it moves every partition's watermark past every buffered row. Closing
#: orders have order_id -1 - p, closing payments -101 - p: they match nothing.
CLOSE_AFTER_MS = 2 * 3_600_000

#: The JSON fields of an order and a payment, in the order of the generated
#: tuples; every payload also has ``ts``, the event time in ISO 8601 (ms, UTC).
ORDER_FIELDS = ("order_id", "user_id", "amount", "currency")
PAYMENT_FIELDS = ("payment_id", "order_id", "amount", "method")
#: The Arrow types of those fields, for an order and a payment alike.
FIELD_TYPES = (pa.int64(), pa.int64(), pa.float64(), pa.string())

#: Each engine's table: sluice's join output for these payloads, in its order
#: (left columns, then right ones, each prefixed, ``_event_ts`` last).
OUTPUT_COLUMNS = (
    ("left_order_id", "bigint"),
    ("left_user_id", "bigint"),
    ("left_amount", "double precision"),
    ("left_currency", "text"),
    ("left_ts", "text"),
    ("left__event_ts", "timestamptz"),
    ("right_payment_id", "bigint"),
    ("right_order_id", "bigint"),
    ("right_amount", "double precision"),
    ("right_method", "text"),
    ("right_ts", "text"),
    ("right__event_ts", "timestamptz"),
)

#: sluice's Prometheus metrics kept from each scrape (summed over label sets).
#: The ones the behaviour table shows, in its order.
SHOWN_METRICS = (
    "rows_consumed_total",
    "rows_written_total",
    "late_rows_dropped_total",
    "join_buffer_rows",
    "checkpoints_total",
    "state_bytes",
)
METRICS = (*SHOWN_METRICS, "errors_total")
#: A table counts as final once it did not grow for this long and the engine
#: consumed every message (sluice: its rows-consumed counter; the others:
#: their group's committed offsets on the broker at the end of both topics).
SETTLE_S = 5.0


@dataclass
class Events:
    """The generated events in production order, as tuples in the order of
    ``ORDER_FIELDS`` / ``PAYMENT_FIELDS`` with the event time (ms) last."""

    orders: list[tuple[int, int, float, str, int]]
    payments: list[tuple[int, int, float, str, int]]
    orphan_payments: int = 0
    outside_payments: int = 0
    split_orders: int = 0


def generate(rows: int, seed: int) -> Events:
    """``rows // 2`` orders and ``rows - rows // 2`` payments; the same for the same seed."""
    n_orders, n_payments = rows // 2, rows - rows // 2
    rng = random.Random(f"join:{seed}")
    w = 300_000
    orders: list[tuple[int, int, float, str, int]] = []
    pays: list[tuple[int, float, str, int]] = []  # order_id, amount, method, ts
    ev = Events([], [])
    for i in range(1, n_orders + 1):
        ts = T0_MS + i * ORDER_STEP_MS
        amount = round(rng.uniform(5.0, 500.0), 2)
        orders.append((i, rng.randint(1, USERS), amount, rng.choice(CURRENCIES), ts))
        r = rng.random()
        if r < P_ONE:
            pays.append((i, amount, rng.choice(METHODS), ts + rng.randint(-w, w)))
        elif r < P_SPLIT:
            ev.split_orders += 1
            for _ in range(2):
                pays.append((i, round(amount / 2, 2), rng.choice(METHODS), ts + rng.randint(-w, w)))
        elif r < P_OUTSIDE:
            ev.outside_payments += 1
            delta = rng.randint(*OUTSIDE_MS) * rng.choice((-1, 1))
            pays.append((i, amount, rng.choice(METHODS), ts + delta))
    while len(pays) < n_payments:
        ev.orphan_payments += 1
        ts = T0_MS + rng.randint(1, max(n_orders, 1)) * ORDER_STEP_MS
        amount = round(rng.uniform(5.0, 500.0), 2)
        pays.append((n_orders + ev.orphan_payments, amount, rng.choice(METHODS), ts))
    del pays[n_payments:]  # only at a few hundred rows can the orders bring more

    def arrival(ts_ms: int) -> int:
        return ts_ms + rng.randint(0, DISORDER_MS)

    orders.sort(key=lambda o: arrival(o[-1]))
    pays.sort(key=lambda p: arrival(p[-1]))
    ev.orders = orders
    ev.payments = [(k, *p) for k, p in enumerate(pays, start=1)]
    return ev


def payload(names: Sequence[str], event: Sequence[Any]) -> bytes:
    """The JSON of one generated event (``names`` with its values, then ``ts``)."""
    obj = dict(zip(names, event[:-1], strict=True))
    obj["ts"] = tumbling.iso_ms(event[-1])
    return json.dumps(obj, separators=(",", ":")).encode()


def order_messages(ev: Events) -> Iterator[k2pg.Message]:
    """``(order_id, payload, timestamp)``: ``k2pg.produce`` keys by the first item."""
    for o in ev.orders:
        yield o[0], payload(ORDER_FIELDS, o), o[-1]


def payment_messages(ev: Events) -> Iterator[k2pg.Message]:
    for p in ev.payments:
        yield p[1], payload(PAYMENT_FIELDS, p), p[-1]


def produce_closers(settings: Settings, orders_topic: str, payments_topic: str, ts_ms: int) -> None:
    """One closing event per partition of each topic, at ``ts_ms``, each with
    every field of its side (a join side's schema is fixed by its first rows)."""
    producer = ck.Producer({"bootstrap.servers": settings.bootstrap_servers})
    for p in range(settings.partitions):
        order = (-1 - p, 0, 0.0, "XXX", ts_ms)
        pay = (-1 - p, -101 - p, 0.0, "close", ts_ms)
        for topic, names, values in (
            (orders_topic, ORDER_FIELDS, order),
            (payments_topic, PAYMENT_FIELDS, pay),
        ):
            key = str(values[0] if names is ORDER_FIELDS else values[1]).encode()
            producer.produce(topic, payload(names, values), key=key, partition=p, timestamp=ts_ms)
    if producer.flush(60):
        raise SystemExit("producing the closing events: not all delivered")


def keep_forever(admin: AdminClient, topics: Sequence[str]) -> None:
    """Set ``retention.ms = -1`` on ``topics``.

    Their event times are months old: a broker that enforces the default 7
    days of retention by message timestamp would delete them. And Quix
    Streams derives its changelog topics' config from the source topics'
    ``retention.ms``, which tansu reports only when it was set
    (``KeyError: 'retention.ms'`` otherwise).
    """
    for topic in topics:
        res = ConfigResource(
            ConfigResource.Type.TOPIC,
            topic,
            incremental_configs=[
                ConfigEntry("retention.ms", "-1", incremental_operation=AlterConfigOpType.SET)
            ],
        )
        admin.incremental_alter_configs([res])[res].result(timeout=30)


# ---------------------------------------------------------------- expected rows


EXPECTED_SQL = """
SELECT o.order_id AS left_order_id, o.user_id AS left_user_id, o.amount AS left_amount,
       o.currency AS left_currency, o.ts AS left_ts, o.event_ms AS left_event_ms,
       p.payment_id AS right_payment_id, p.order_id AS right_order_id,
       p.amount AS right_amount, p.method AS right_method, p.ts AS right_ts,
       p.event_ms AS right_event_ms
FROM orders o JOIN payments p
  ON o.order_id = p.order_id AND abs(p.event_ms - o.event_ms) <= {window_ms}
"""
#: What an engine's table is compared as: ``_event_ts`` in ms since the epoch.
GOT_SQL = """
SELECT left_order_id, left_user_id, left_amount, left_currency, left_ts,
       (extract(epoch FROM left__event_ts) * 1000)::bigint AS left_event_ms,
       right_payment_id, right_order_id, right_amount, right_method, right_ts,
       (extract(epoch FROM right__event_ts) * 1000)::bigint AS right_event_ms
FROM {table}
"""


@dataclass
class Expected:
    """DuckDB's interval join over the generated events, and what the data holds."""

    window_ms: int
    lateness_ms: int
    pairs: int = 0
    orders: int = 0
    payments: int = 0
    orders_matched: int = 0
    orders_unmatched: int = 0
    payments_matched: int = 0
    payments_unmatched: int = 0
    split_orders: int = 0
    outside_payments: int = 0
    orphan_payments: int = 0
    pairs_within_5_s: int = 0  # |payment ts - order ts| <= DISORDER_MS + 1 s
    query_s: float = 0.0


def arrow_events(names: Sequence[str], events: Sequence[Sequence[Any]]) -> pa.Table:
    """Generated events (tuples in the order of ``names``, event time in ms
    last) as an Arrow table: ``names``, ``ts`` as in the payload, ``event_ms``."""
    cols: list[list[Any]] = [[e[k] for e in events] for k in range(len(names) + 1)]
    fields = zip(names, cols[:-1], FIELD_TYPES, strict=True)
    return pa.table(
        {
            **{name: pa.array(col, type_) for name, col, type_ in fields},
            "ts": pa.array([tumbling.iso_ms(t) for t in cols[-1]], pa.string()),
            "event_ms": pa.array(cols[-1], pa.int64()),
        }
    )


def expected_rows(con: duckdb.DuckDBPyConnection, ev: Events, exp: Expected) -> None:
    """Register the events in ``con`` and create its ``expected`` table."""
    started = time.monotonic()
    orders = arrow_events(ORDER_FIELDS, ev.orders)
    payments = arrow_events(PAYMENT_FIELDS, ev.payments)
    con.register("orders", orders)
    con.register("payments", payments)
    con.execute(
        "CREATE TABLE expected AS " + EXPECTED_SQL.format(window_ms=exp.window_ms)
    ).fetchall()
    row = con.execute(
        "SELECT count(*), count(DISTINCT left_order_id), count(DISTINCT right_payment_id), "
        f"count(*) FILTER (WHERE abs(right_event_ms - left_event_ms) <= {DISORDER_MS + 1000}) "
        "FROM expected"
    ).fetchall()[0]
    assert row is not None
    exp.pairs, exp.orders_matched, exp.payments_matched, exp.pairs_within_5_s = map(int, row)
    exp.orders, exp.payments = len(ev.orders), len(ev.payments)
    exp.orders_unmatched = exp.orders - exp.orders_matched
    exp.payments_unmatched = exp.payments - exp.payments_matched
    exp.split_orders, exp.outside_payments = ev.split_orders, ev.outside_payments
    exp.orphan_payments = ev.orphan_payments
    exp.query_s = time.monotonic() - started


def verify(
    con: duckdb.DuckDBPyConnection, settings: Settings, table: str, exp: Expected
) -> dict[str, Any]:
    """Compare ``table`` with DuckDB's ``expected`` rows: the multiset of
    (order_id, payment_id) pairs, and every column of every row."""
    with adbc.connect(settings.postgres_url) as pg, pg.cursor() as cur:
        cur.execute(GOT_SQL.format(table=table))
        got_rows = cur.fetch_arrow_table()
    con.register("got", got_rows)
    pair = "left_order_id, right_payment_id"
    q = f"""
    SELECT
      (SELECT count(*) FROM got),
      (SELECT count(*) FROM (SELECT {pair} FROM expected EXCEPT ALL SELECT {pair} FROM got)),
      (SELECT count(*) FROM (SELECT {pair} FROM got EXCEPT ALL SELECT {pair} FROM expected)),
      (SELECT count(*) - count(DISTINCT ({pair})) FROM got),
      (SELECT count(*) FROM (SELECT * FROM expected EXCEPT ALL SELECT * FROM got)),
      (SELECT count(*) FROM (SELECT * FROM got EXCEPT ALL SELECT * FROM expected))
    """
    row = con.execute(q).fetchall()[0]
    assert row is not None
    keys = (
        "rows",
        "pairs_missing",
        "pairs_unexpected",
        "duplicate_pairs",
        "rows_missing",
        "rows_unexpected",
    )
    got: dict[str, Any] = dict(zip(keys, map(int, row), strict=True))
    # A row whose pair is right but a value is not shows as one missing and
    # one unexpected row; count those apart from missing or extra pairs.
    got["rows_with_wrong_values"] = got["rows_missing"] - got["pairs_missing"]
    missing = con.execute(
        f"""SELECT count(*) FILTER (WHERE abs(right_event_ms - left_event_ms) <= {DISORDER_MS + 1000}),
                   min(abs(right_event_ms - left_event_ms)), max(abs(right_event_ms - left_event_ms))
            FROM (SELECT * FROM expected EXCEPT ALL SELECT * FROM got)"""
    ).fetchall()[0]
    assert missing is not None
    got["missing_within_5_s"] = int(missing[0])
    got["missing_min_abs_delta_ms"] = missing[1]
    got["missing_max_abs_delta_ms"] = missing[2]
    problems = [
        f"{k} = {got[k]:,}"
        for k in ("pairs_missing", "pairs_unexpected", "duplicate_pairs", "rows_with_wrong_values")
        if got[k]
    ]
    if got["rows"] != exp.pairs:
        problems.insert(0, f"rows = {got['rows']:,}, expected {exp.pairs:,}")
    examples = [
        str(r)
        for r in con.execute(
            "(SELECT 'missing', * FROM (SELECT * FROM expected EXCEPT ALL SELECT * FROM got) LIMIT 3)"
            " UNION ALL "
            "(SELECT 'unexpected', * FROM (SELECT * FROM got EXCEPT ALL SELECT * FROM expected) LIMIT 3)"
        ).fetchall()
    ]
    con.unregister("got")
    return {"ok": not problems, "problems": problems, "examples": examples, **got}


# ---------------------------------------------------------------- engines


def pipeline_name(run_id: str) -> str:
    return f"{PREFIX}-{run_id}"


def schema_name(run_id: str) -> str:
    return f"{PREFIX}_{run_id}".replace("-", "_")


def state_store_table(kind: str, settings: Settings, schema: str) -> str:
    """The TOML's ``[state_store]`` table for ``--state-store``."""
    if kind == "in_memory":
        return '[state_store]\nkind = "in_memory"'
    return k2pg.postgres_state_store(settings, f"{schema}_state")


def render_pipeline(
    settings: Settings,
    run_id: str,
    topics: tuple[str, str],
    group_id: str,
    schema: str,
    table: str,
    state_store: str,
) -> str:
    return k2pg.render_template(
        TEMPLATE,
        settings,
        pipeline_name(run_id),
        group_id,
        table,
        orders_topic=topics[0],
        payments_topic=topics[1],
        schema=schema,
        state_store=state_store_table(state_store, settings, schema),
    )


def pipeline_facts(settings: Settings) -> tuple[int, int]:
    """The template's join window and lateness (ms), checked to be the benchmark's join."""
    cfg = tomllib.loads(render_pipeline(settings, "x", ("o", "p"), "g", "s", "t", "in_memory"))
    join = cfg["transform"]["join"]
    assert join["kind"] == "inner" and join["left_keys"] == ["order_id"], join
    assert (join["left_source"], join["right_source"]) == ("o", "p"), join
    assert "sql" not in cfg["transform"] and "event_time_column" not in join, join
    return int(join["time_window_ms"]), int(cfg["watermark"]["lateness_ms"])


def quix_argv(
    settings: Settings, topics: tuple[str, str], group_id: str, schema: str, table: str
) -> list[str]:
    return [
        str(QUIX_PYTHON),
        str(QUIX_PROGRAM),
        "--bootstrap-servers",
        settings.bootstrap_servers,
        "--orders",
        topics[0],
        "--payments",
        topics[1],
        "--group",
        group_id,
        "--postgres-url",
        settings.postgres_url,
        "--schema",
        schema,
        "--table",
        table,
        "--state-dir",
        str(settings.work_dir / "quix-state"),
    ]


def check_engine(engine: str) -> str:
    """The engine's version; exits with a hint when it is not installed."""
    if engine in ("sluice", "reference"):
        return str(common.check_engine(engine))
    version = common.package_versions(QUIX_PYTHON, ["quixstreams"])["quixstreams"]
    if not version:
        raise SystemExit(
            f"Quix Streams is not importable from {QUIX_PYTHON}: "
            "run `bash benchmarks/setup_peers.sh` first"
        )
    return version


@dataclass
class Progress:
    """The ``count`` that ``watch_engine`` polls: ``count(*)`` of the engine's
    table, and :attr:`done_at` once it is final.

    Final means every expected row landed (for sluice: and its rows-written
    counter, moved once the batch and the state are committed, says so), or
    the engine consumed every message and its table did not grow for
    ``SETTLE_S`` (then it will never have them). ``consumed_all`` says whether it consumed every message.
    ``polls[k]`` belongs to ``watch_engine``'s ``timeline[k]``.
    """

    count_rows: Callable[[], int]
    expected: int
    consumed_all: Callable[[dict[str, float]], bool]
    port: int | None = None
    polls: list[int] = field(default_factory=list)  # count(*) at each poll
    last: dict[str, float] = field(default_factory=dict)  # sluice's last scrape
    done_by: str | None = None
    _since: tuple[int, float] = (-1, 0.0)  # (count, monotonic time first seen)
    _consumed_at: float | None = None  # monotonic time it was first seen to have consumed all

    @property
    def done_at(self) -> int:
        return self.expected + 1

    def __call__(self) -> int:
        n = self.count_rows()
        if self.port is not None:
            scraped = common.scrape_metrics(self.port, "sluice_", METRICS)
            if scraped is not None:  # keep the last answer once the engine exits
                self.last = scraped
        self.polls.append(n)
        now = time.monotonic()
        if n != self._since[0]:
            self._since = (n, now)
        # sluice counts a batch's rows as written once it committed them (with
        # the state, under a postgres store): done waits for that too.
        written = self.last.get("rows_written_total", n) if self.port is not None else n
        if self.done_by is None:
            if n >= self.expected and written >= self.expected:
                self.done_by = "every expected row in its table"
            elif now - self._since[1] >= SETTLE_S and self._settled(now):
                self.done_by = f"consumed every message; table unchanged for {SETTLE_S:.0f} s"
        return self.done_at if self.done_by else n

    def _settled(self, now: float) -> bool:
        """Whether the table has not changed for ``SETTLE_S`` since the engine
        was first seen to have consumed every message (an engine that writes
        everything in one commit at the end keeps it empty until then)."""
        if self._consumed_at is None:
            if not self.consumed_all(self.last):
                return False
            self._consumed_at = now
        return now - max(self._since[1], self._consumed_at) >= SETTLE_S


@dataclass
class JoinResult(EngineResult):
    """``kafka_to_postgres``'s result plus the join's figures (rates in input events)."""

    state_store: str = ""
    done_by: str | None = None
    done_s: float | None = None  # the first poll that saw the table at its final count
    cpu_s_at_done: float | None = None
    input_rows_per_s: float | None = None  # input events / (done_s - ready_s)
    rows_in_table: int = 0
    did_not_run: str | None = None  # why, when the engine failed before writing
    metrics_at_end: dict[str, float] = field(default_factory=dict)
    committed_at_end: int | None = None

    def cpu_s_per_million(self, rows: int) -> float | None:
        if self.cpu_s_at_done is None:
            return None
        return self.cpu_s_at_done * 1_000_000 / rows


def committed(settings: Settings, group_id: str, topics: tuple[str, str]) -> int | None:
    """Sum of ``group_id``'s committed offsets on both topics (None if unknown)."""
    parts = [tumbling.committed_offsets(settings, group_id, t) for t in topics]
    return None if None in parts else sum(p or 0 for p in parts)


#: The last line of a Python traceback in an engine's log: the error it died of.
_ERROR_LINE = re.compile(r"^(?:[A-Za-z_.]+(?:Error|Exception)|PanicException): .*$", re.M)


def failure_reason(log_path: Path) -> str:
    """The error an engine died of, from its log (its last error line)."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return "no log"
    found = _ERROR_LINE.findall(text)
    if found:
        return str(found[-1])
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "exited without output"


def run_engine(
    settings: Settings,
    conn: psycopg.Connection[Any],
    admin: AdminClient,
    con: duckdb.DuckDBPyConnection,
    topics: tuple[str, str],
    messages: int,
    exp: Expected,
    run_id: str,
    engine: str,
    version: str,
    state_store: str,
) -> JoinResult:
    """Run ``engine`` until its table is final (or it fails) and verify the table."""
    schema = schema_name(run_id)
    table = f"out_{engine}"
    group_id = f"{PREFIX}-{run_id}-{engine}"
    common.recreate_table(conn, f"{schema}.{table}", OUTPUT_COLUMNS)
    port: int | None = None
    env: dict[str, str] | None = None
    if engine == "quix":
        argv = quix_argv(settings, topics, group_id, schema, table)
    else:
        toml_path = settings.work_dir / f"{engine}.toml"
        toml_path.write_text(
            render_pipeline(settings, run_id, topics, group_id, schema, table, state_store)
        )
        port = tumbling.free_port()
        argv = common.engine_argv(engine, toml_path, metrics_port=port)
        # sluice keeps a timed pipeline's watermark under $SLUICE_STATE_DIR/<pipeline_name>.
        env = {**os.environ, "SLUICE_STATE_DIR": str(settings.work_dir / f"state-{engine}")}
    res = JoinResult(
        engine=engine,
        version=version,
        table=f"{schema}.{table}",
        command=argv,
        group_id=group_id,
        state_store=state_store if engine != "quix" else "RocksDB + changelog topics",
    )

    def consumed_all(metrics: dict[str, float]) -> bool:
        if engine == "sluice":
            return metrics.get("rows_consumed_total", 0) >= messages
        return committed(settings, group_id, topics) == messages

    progress = Progress(
        count_rows=lambda: common.count_rows(conn, f"{schema}.{table}"),
        expected=exp.pairs,
        consumed_all=consumed_all,
        port=port if engine == "sluice" else None,
    )
    what = "progress steps (joined rows, then one for done)"
    k2pg.watch_engine(settings, admin, res, progress, progress.done_at, what=what, env=env)
    summarise(res, progress, settings.rows)
    res.committed_at_end = committed(settings, group_id, topics)
    res.rows_in_table = common.count_rows(conn, f"{schema}.{table}")
    if res.outcome == "exited early" and not res.rows_in_table:
        res.did_not_run = failure_reason(settings.work_dir / f"{engine}.log")
    if res.rows_in_table or engine == "sluice":
        res.verification = verify(con, settings, f"{schema}.{table}", exp)
    else:
        res.verification = {"ok": None, "problems": []}
    common.print_problem(res)
    if not settings.keep:
        conn.execute(f"DROP TABLE IF EXISTS {schema}.{table}")
    return res


def summarise(res: JoinResult, progress: Progress, rows: int) -> None:
    """Fill ``res``'s done figures from the polls: done is the first poll that
    saw the table at its final count, once a later poll said it was final."""
    assert len(progress.polls) == len(res.timeline), "one Progress call per timeline entry"
    res.done_by, res.metrics_at_end = progress.done_by, progress.last
    if progress.done_by is None or not progress.polls:
        return
    final = progress.polls[-1]
    for (t, _, cpu), n in zip(res.timeline, progress.polls, strict=True):
        if n == final:
            res.done_s, res.cpu_s_at_done = t, cpu
            break
    print(f"[{res.engine}] done after {res.done_s:.1f} s: {res.done_by}", flush=True)
    ready, done = res.ready_s, res.done_s
    if res.outcome == "ok" and ready is not None and done is not None and done > ready:
        res.input_rows_per_s = rows / (done - ready)


def cleanup(settings: Settings, admin: AdminClient, run_id: str, topics: Sequence[str]) -> None:
    """Drop this run's schemas and offsets row, delete its topics and Quix's
    changelog topics (named after its consumer group)."""
    schema = schema_name(run_id)
    try:
        with psycopg.connect(settings.postgres_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            conn.execute(f"DROP SCHEMA IF EXISTS {schema}_state CASCADE")
            k2pg.forget_reference_offsets(conn, pipeline_name(run_id))
    except psycopg.Error as exc:
        print(f"note: could not drop schema {schema}(_state): {exc}", file=sys.stderr)
    try:
        names = admin.list_topics(timeout=10).topics
    except ck.KafkaException:
        names = {}
    quix = [t for t in names if t.startswith(f"changelog__{PREFIX}-{run_id}-quix")]
    for topic in [*topics, *quix]:
        k2pg.delete_topic(settings, topic)


# ---------------------------------------------------------------- report


SUMMARY_HEADERS = (
    "engine",
    "state store",
    "input rows/s",
    "CPU-s per 1M input rows",
    "done after (s)",
    "rows in its table",
    "peak RSS MB",
    "verified",
)


def _verdict(r: JoinResult) -> str:
    v = r.verification
    if r.did_not_run:
        return "did not run"
    if v.get("ok") is None:
        return "n/a: wrote nothing"
    return "yes" if v["ok"] else "NO: " + "; ".join(v["problems"])


def summary_rows(results: Sequence[JoinResult], rows: int) -> list[list[str]]:
    out = []
    for r in results:
        if r.did_not_run:
            out.append([r.engine, r.state_store, f"did not run: {r.did_not_run}", *["-"] * 5])
            continue
        out.append(
            [
                r.engine,
                r.state_store,
                common.num(r.input_rows_per_s, ",.0f"),
                common.num(r.cpu_s_per_million(rows), ".1f"),
                common.num(
                    None if r.done_s is None or r.ready_s is None else r.done_s - r.ready_s, ".1f"
                ),
                f"{r.rows_in_table:,}",
                common.num(r.peak_rss_bytes / 2**20 if r.peak_rss_bytes else None, ".0f"),
                _verdict(r),
            ]
        )
    by = {r.engine: r for r in results}
    s = by.get("sluice")
    for other in ("reference", "quix"):
        o = by.get(other)
        if s is None or o is None:
            continue
        if o.did_not_run:
            out.append([f"sluice/{other}", "-", f"n/a: {other} did not run", *["-"] * 5])
            continue
        out.append(
            [
                f"sluice/{other}",
                "-",
                common.ratio(s.input_rows_per_s, o.input_rows_per_s),
                common.ratio(s.cpu_s_per_million(rows), o.cpu_s_per_million(rows)),
                "-",
                "-",
                common.ratio(s.peak_rss_bytes or None, o.peak_rss_bytes or None),
                "-",
            ]
        )
    return out


DETAIL_HEADERS = (
    "engine",
    "group ready at (s)",
    "first row at (s)",
    "done at (s)",
    "done by",
    "busy from (s)",
    "CPU-s to ready",
    "CPU-s to done",
    "CPU-s whole run",
    "wall (s)",
    "stopped by",
    "outcome",
)


def detail_rows(results: Sequence[JoinResult]) -> list[list[str]]:
    return [
        [
            r.engine,
            common.num(r.ready_s, ".1f"),
            common.num(r.first_row_s, ".1f"),
            common.num(r.done_s, ".1f"),
            r.done_by or "n/a",
            common.num(r.busy_s, ".1f"),
            common.num(r.cpu_s_at_ready, ".2f"),
            common.num(r.cpu_s_at_done, ".2f"),
            common.num(r.cpu_s_whole_run, ".2f"),
            common.num(r.wall_s, ".1f"),
            ", ".join(r.signals) or f"itself (exit {r.returncode})",
            r.outcome,
        ]
        for r in results
    ]


VERIFY_HEADERS = (
    "engine",
    "expected rows",
    "rows in table",
    "pairs missing",
    "pairs unexpected",
    "duplicate pairs",
    "rows with a wrong value",
    "missing with |Δt| <= 5 s",
    "verified",
)


def verify_rows(results: Sequence[JoinResult], exp: Expected) -> list[list[str]]:
    out = []
    for r in results:
        v = r.verification
        cells = (
            "pairs_missing",
            "pairs_unexpected",
            "duplicate_pairs",
            "rows_with_wrong_values",
            "missing_within_5_s",
        )
        have = v.get("ok") is not None
        out.append(
            [
                r.engine,
                f"{exp.pairs:,}",
                f"{v['rows']:,}" if have else f"{r.rows_in_table:,}",
                *(f"{v[k]:,}" if have else "-" for k in cells),
                _verdict(r),
            ]
        )
    return out


BEHAVIOUR_HEADERS = (
    "engine",
    "rows consumed",
    "rows written",
    "late rows dropped",
    "join buffer rows at end",
    "checkpoints",
    "state bytes",
    "committed offsets at end",
)


def behaviour_rows(results: Sequence[JoinResult], messages: int) -> list[list[str]]:
    def count(m: dict[str, float], key: str) -> str:
        return f"{int(m[key]):,}" if key in m else "-"

    return [
        [
            r.engine,
            *(count(r.metrics_at_end, k) for k in SHOWN_METRICS),
            f"{common.num(r.committed_at_end, ',.0f')} of {messages:,}",
        ]
        for r in results
    ]


def methodology(settings: Settings, exp: Expected, state_store: str) -> list[str]:
    return [
        f"Events: {exp.orders:,} orders and {exp.payments:,} payments (JSON; `--seed` "
        f"{settings.seed}), each with an explicit Kafka message timestamp (its event time, "
        f"also in the payload's `ts`) and the order_id as message key, in two "
        f"{settings.partitions}-partition topics. Order i happens at i x {ORDER_STEP_MS} ms. "
        f"{P_ONE:.0%} of the orders get one payment within ±5 min (uniform, bounds included), "
        f"{P_SPLIT - P_ONE:.0%} two, {P_OUTSIDE - P_SPLIT:.0%} one 6-20 min away (neither "
        f"matches), the rest none; {exp.orphan_payments:,} payments name no order. Each "
        f"topic is produced in order of event time plus a random 0-{DISORDER_MS // 1000} s, "
        f"so up to {DISORDER_MS // 1000} s out of order; the watermark's lateness_ms = "
        f"{exp.lateness_ms} is above that, so no row is late. Then one closing event per "
        "partition and topic, 2 h later, moves every watermark past every buffered row "
        "(closing orders and payments match nothing).",
        f"Expected rows: DuckDB's `orders JOIN payments ON order_id = order_id AND "
        f"abs(p.ts - o.ts) <= {exp.window_ms}` over the generated events ({exp.pairs:,} rows). "
        "Each table is compared with them as multisets: of (order_id, payment_id) pairs, "
        "and of whole rows (every column, `_event_ts` in ms).",
        "input rows/s = input events (orders + payments) / (done - the engine's consumer "
        "group became Stable); done = the first poll that saw the engine's table at its "
        "final count: every expected row, or, for an engine that falls short, the count "
        f"it kept for {SETTLE_S:.0f} s after it consumed every message (sluice: its "
        "rows-consumed counter; the others: their group's committed offsets on the broker "
        "at the end of both topics). Startup and the group join are not counted.",
        "CPU-s per 1M input rows: user + system CPU of the engine's process tree from its "
        "start to that poll (startup and group join included), per 1M input events. 'CPU-s "
        "whole run' is the reaped process's rusage.",
        f"Every {settings.poll_interval_s} s the harness polls `count(*)` of the table, the "
        "state of the consumer group and the process's CPU and VmHWM; each time is known "
        f"to within {settings.poll_interval_s} s.",
        common.PEAK_RSS,
        f"sluice and the reference run the same TOML, with `[state_store] kind = "
        f'"{state_store}"` (`--state-store`; postgres: a schema of its own per run). sluice '
        "stops by itself (`--stop-after-idle-ms 3000`); the reference and Quix Streams run "
        "until SIGTERM, sent once done.",
        "The reference (ematix-flow 1.0.0) cannot run a join on a Kafka source: its Kafka "
        "source adds no `_event_ts`, its join wants an event_time_column of type "
        "Timestamp(Microsecond) where a JSON payload gives Int64 or Utf8, and a join "
        "refuses the `[transform] sql` that could convert one. It fails at its first batch; "
        "its error is quoted above.",
        "Quix Streams runs `quix_join.py` in its own venv (`benchmarks/setup_peers.sh`): "
        "`join_interval(how='inner', backward_ms=300000, forward_ms=300000, grace_ms=305000)` "
        "on the two topics (event time = message timestamp, key = order_id), written by "
        "the community `PostgreSQLSink` (psycopg2, INSERT ... VALUES per checkpoint, "
        "every 5 s by default) into the same pre-created table, with sluice's column names. "
        "Its state is RocksDB backed by changelog topics (its defaults). Its interval join "
        "matches a row only with rows of the other side already processed and no later in "
        "event time; it reads the two topics in timestamp order per partition, so a pair "
        "whose two rows arrive out of their event-time order is missed: the verification "
        "table counts those, most within the 4 s of disorder.",
    ]


def render_markdown(
    settings: Settings,
    sets: Sequence[Dataset],
    exp: Expected,
    state_store: str,
    results: Sequence[JoinResult],
    facts: dict[str, Any],
    date: str,
) -> str:
    orders, payments = sets
    lines = [
        f"# Kafka orders ⋈ payments (±5 min) -> Postgres: sluice vs the reference and "
        f"Quix Streams ({date})",
        "",
        f"{orders.rows:,} orders (avg {orders.payload_bytes_avg:.0f} bytes) and "
        f"{payments.rows:,} payments (avg {payments.payload_bytes_avg:.0f} bytes) in two "
        f"{settings.partitions}-partition topics (`{orders.topic}`, `{payments.topic}`), "
        "inner-joined on order_id within ±5 min of event time by each engine, one at a "
        f"time, into its own pre-created Postgres table: {exp.pairs:,} rows "
        f"({exp.orders_matched:,} orders matched, {exp.orders_unmatched:,} not; "
        f"{exp.payments_unmatched:,} payments unmatched). sluice's state store: "
        f"`{state_store}`.",
        "",
        common.markdown_table(SUMMARY_HEADERS, summary_rows(results, settings.rows)),
        "",
        common.markdown_table(DETAIL_HEADERS, detail_rows(results)),
        "",
        "Verified against DuckDB's interval join over the generated events:",
        "",
        common.markdown_table(VERIFY_HEADERS, verify_rows(results, exp)),
        "",
        "What each engine did (sluice's own metrics at its last poll; every engine's "
        "committed offsets on the broker after it stopped):",
        "",
        common.markdown_table(BEHAVIOUR_HEADERS, behaviour_rows(results, messages(sets))),
        "",
        *common.problems_section(results),
        *common.report_tail(methodology(settings, exp, state_store), facts, results),
    ]
    return "\n".join(lines)


def messages(sets: Sequence[Dataset]) -> int:
    """Every message in both topics: the events and the closing events."""
    return sum(ds.rows + ds.partitions for ds in sets)


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, str]:
    """``kafka_to_postgres``'s command line plus ``--state-store``."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--state-store", choices=STATE_STORES, default="postgres")
    extra, rest = pre.parse_known_args(argv)
    settings = k2pg.parse_settings(
        rest,
        benchmark=BENCHMARK,
        description=(
            "Kafka orders ⋈ payments (inner, ±5 min) -> Postgres: sluice vs ematix-flow "
            "1.0.0 and Quix Streams. --rows counts orders and payments together (half each). "
            "Also: --state-store {postgres,in_memory} (default postgres), the TOML's "
            "[state_store] for sluice and the reference."
        ),
        engines=ENGINES,
        keep_help="keep the schemas (tables, state), the topics and the offsets",
        stall_help="give up after this long without new joined rows",
    )
    return settings, extra.state_store


def main(argv: Sequence[str] | None = None) -> int:
    settings, state_store = parse_args(argv)
    settings, run_id = common.start_run(settings, PREFIX)
    date = common.utc_date()
    window_ms, lateness_ms = pipeline_facts(settings)
    if lateness_ms <= DISORDER_MS:
        raise SystemExit(f"DISORDER_MS = {DISORDER_MS} must be below lateness_ms = {lateness_ms}")

    k2pg.check_services(settings)
    versions = {engine: check_engine(engine) for engine in settings.engines}
    facts = common.run_facts(date)
    facts["state_store"] = state_store
    packages = common.engine_packages(PACKAGES, settings.engines)
    if "quix" in settings.engines:
        packages[str(QUIX_PYTHON.parents[1])] = common.package_versions(
            QUIX_PYTHON, ["quixstreams", "confluent-kafka", "rocksdict", "psycopg2-binary"]
        )
    facts["packages"] = packages

    topics = (f"{PREFIX}-{run_id}-orders", f"{PREFIX}-{run_id}-payments")
    exp = Expected(window_ms=window_ms, lateness_ms=lateness_ms)
    started = time.monotonic()
    ev = generate(settings.rows, settings.seed)
    print(
        f"generated {len(ev.orders):,} orders and {len(ev.payments):,} payments in "
        f"{time.monotonic() - started:.1f} s; producing to {topics[0]}, {topics[1]}",
        flush=True,
    )
    con = duckdb.connect()
    con.execute("SET threads = 1").fetchall()  # the engines get the other core's worth
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    results: list[JoinResult] = []
    try:
        sets = (
            k2pg.produce(replace(settings, rows=len(ev.orders)), topics[0], order_messages(ev)),
            k2pg.produce(replace(settings, rows=len(ev.payments)), topics[1], payment_messages(ev)),
        )
        last_ms = max(e[-1] for e in [*ev.orders, *ev.payments])
        produce_closers(settings, *topics, last_ms + CLOSE_AFTER_MS)
        keep_forever(admin, topics)
        print(
            f"produced in {sum(ds.produce_s for ds in sets):.1f} s "
            f"({messages(sets):,} messages with the closing events)",
            flush=True,
        )
        expected_rows(con, ev, exp)
        print(f"expected {exp.pairs:,} joined rows (DuckDB, {exp.query_s:.1f} s)", flush=True)
        del ev
        with common.poller(settings.postgres_url, facts) as conn:
            conn.execute(f"CREATE SCHEMA {schema_name(run_id)}")
            for engine in settings.engines:
                results.append(
                    run_engine(
                        settings,
                        conn,
                        admin,
                        con,
                        topics,
                        messages(sets),
                        exp,
                        run_id,
                        engine,
                        versions[engine],
                        state_store,
                    )
                )
    finally:
        if not settings.keep:
            cleanup(settings, admin, run_id, topics)

    print()
    print(common.format_table(SUMMARY_HEADERS, summary_rows(results, settings.rows)))
    print()
    print(common.format_table(DETAIL_HEADERS, detail_rows(results)))
    print()
    print(common.format_table(VERIFY_HEADERS, verify_rows(results, exp)))
    print()
    print(common.format_table(BEHAVIOUR_HEADERS, behaviour_rows(results, messages(sets))))

    data = {
        "benchmark": BENCHMARK,
        "run_id": run_id,
        "date": date,
        "state_store": state_store,
        "settings": settings.as_json(),
        "datasets": [asdict(ds) for ds in sets],
        "events": {
            "t0_ms": T0_MS,
            "order_step_ms": ORDER_STEP_MS,
            "disorder_ms": DISORDER_MS,
            "shares": {"one": P_ONE, "split": P_SPLIT - P_ONE, "outside": P_OUTSIDE - P_SPLIT},
            "close_after_ms": CLOSE_AFTER_MS,
        },
        "expected": asdict(exp),
        "machine": facts,
        "methodology": methodology(settings, exp, state_store),
        "results": [
            {
                **asdict(r),
                "cpu_s_per_million_input_rows": r.cpu_s_per_million(settings.rows),
                "peak_rss_mb": r.peak_rss_bytes / 2**20,
            }
            for r in results
        ],
    }
    markdown = render_markdown(settings, sets, exp, state_store, results, facts, date)
    common.save_results(settings, BENCHMARK, date, markdown, data)
    # sluice must have run and verified; a peer may fall short (the tables say so),
    # and the reference cannot run this join at all.
    ok = all(
        r.outcome == "ok" and r.verification.get("ok") for r in results if r.engine == "sluice"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
