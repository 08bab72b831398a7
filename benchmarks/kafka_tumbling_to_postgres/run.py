"""Kafka -> event-time window -> Postgres: sluice against the reference engine.

    python -m benchmarks.kafka_tumbling_to_postgres.run [--rows N] [--engines ...]
        [--window tumbling|hopping|session]

``--window`` picks the window (see ``SHAPES``): 60 s tumbling (the default),
60 s hopping every 30 s, or sessions closed by 30 s without an event (with a
Postgres ``[state_store]``, which a session window needs, in a schema of its
own per run). Each writes ``SHAPES[kind].benchmark``'s results.

1. Produce ``--rows`` JSON events with ``kafka_to_postgres``'s generator and
   producer (imported from it), each with an explicit Kafka message timestamp:
   10 ms of event time apart, up to 4 s out of order (1M events span about
   2.8 hours of event time). The payload's ``ts`` is that same instant. Then
   one closing event per partition, two hours after the last event, so the
   watermark passes the end of every real window.
2. In a new Postgres schema, load the same events into a raw table and compute
   the expected windows there with SQL (count, exact decimal sum, avg, min,
   max per user_id and window: the minute; both 60 s windows holding the
   event, one every 30 s; the runs of a user's events at most 30 s apart).
3. For each engine, one after the other: create its own target table, render
   ``pipeline.toml.tmpl`` (only the group_id and table differ), start the
   engine with its Prometheus endpoint on, and poll its metrics until it
   consumed every message and is done with them: sluice with every expected
   window in its table, the reference with every event in its window state.
4. Verify each table against the expected windows, print the tables and write
   ``benchmarks/results/<SHAPES[kind].benchmark>-<date>.{md,json}``.

The reference's windows never emit, so the figures compared are *input*
rates: events consumed per second and CPU-seconds per million events, to
the poll that saw every message consumed and to the poll that saw the engine
done with them (see ``ASYMMETRY``). The polling, CPU and memory accounting
is ``kafka_to_postgres``'s (``watch_engine``). See benchmarks/README.md for
what each figure means.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import confluent_kafka as ck
import psycopg
from confluent_kafka.admin import AdminClient

from benchmarks import common
from benchmarks.common import Dataset, EngineResult
from benchmarks.kafka_to_postgres import run as k2pg
from benchmarks.kafka_to_postgres.run import Settings

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "pipeline.toml.tmpl"
BENCHMARK = "kafka_tumbling_to_postgres"  # the default window's; see SHAPES
#: Prefix of the topic, the schema, the pipeline_name, the group ids and the work dir.
PREFIX = "bench-tumb"
#: The packages of this environment that the results record.
PACKAGES = (
    "sluice", "confluent-kafka", "psycopg", "pyarrow", "adbc-driver-postgresql", "datafusion",
    "msgspec",
)  # fmt: skip

#: ``sluice`` and ``reference`` run the template as it is. ``sluice-kafka-ts``
#: is sluice on the template without its ``[transform] sql`` line: the window
#: then reads the ``_event_ts`` that sluice's Kafka source adds (the message
#: timestamp, the same instants as the payload's ``ts``). The reference cannot
#: run that variant (it has no ``_event_ts``), so only the first two compare.
ENGINES = ("sluice", "reference", "sluice-kafka-ts")
KAFKA_TS = "sluice-kafka-ts"

#: Event ``i`` (1-based) happens at ``T0_MS + i * EVENT_STEP_MS`` minus up to
#: ``DISORDER_MS``: produced in order of ``i``, so up to 4 s out of order,
#: which must stay under the template's ``lateness_ms`` (checked at start).
T0_MS = int(common.TS_BASE.timestamp() * 1000)
EVENT_STEP_MS = 10  # 1M events: 10,000 s of event time, about 2.8 hours
DISORDER_MS = 4_000
#: One closing event per partition this long after the last event: it moves
#: every partition's watermark past the end of every real window. Its own
#: window closes only when sluice's bounded run drains at the end of input,
#: so it is not among the expected windows (verify leaves it out).
CLOSE_AFTER_MS = 2 * 3_600_000
#: user_id of the closing event of partition p is CLOSER_USER_ID + p, outside
#: the generator's 1..USERS.
CLOSER_USER_ID = 1_000_000

#: The events as produced, for the expected windows.
RAW_TABLE = "events_raw"
RAW_COLUMNS = (("user_id", "bigint"), ("amount", "double precision"), ("event_ms", "bigint"))
EXPECTED_TABLE = "expected"

#: Each engine's table: the window columns both engines document, in their
#: order (window bounds, a session's id, group key, aggregates in
#: configuration order).
OUTPUT_COLUMNS = (
    ("window_start", "timestamptz NOT NULL"),
    ("window_end", "timestamptz"),
    ("user_id", "bigint NOT NULL"),
    ("n", "bigint"),
    ("amount_sum", "double precision"),
    ("amount_avg", "double precision"),
    ("amount_min", "double precision"),
    ("amount_max", "double precision"),
)
SESSION_ID = ("session_id", "numeric(20,0)")  # uint64


def output_columns(shape: Shape) -> tuple[tuple[str, str], ...]:
    if shape.kind != "session":
        return OUTPUT_COLUMNS
    return (*OUTPUT_COLUMNS[:2], SESSION_ID, *OUTPUT_COLUMNS[2:])


PRIMARY_KEY = ("user_id", "window_start")

#: How each engine's Prometheus metrics are named: ``<prefix><name>``.
METRIC_PREFIX = {"sluice": "sluice_", "reference": "ematix_streaming_"}
#: The metrics kept from each scrape (summed over their label sets).
METRICS = (
    "rows_consumed_total",
    "rows_written_total",
    "batches_total",
    "errors_total",
    "windows_emitted_total",
    "windows_active",
    "state_groups",  # sluice
    "state_groups_total",  # reference
    "late_rows_dropped_total",
)
AVG_TOLERANCE = 1e-9  # relative, for avg: the engines average doubles
#: The reference is done with its input once its window state stopped growing
#: for this long, should its state_groups_total never reach the expected count.
SETTLE_S = 30.0
#: What :func:`verify` counts, per window of the full join with the expected ones.
CHECKS = (
    "missing",
    "unexpected",
    "wrong_end",
    "wrong_n",
    "wrong_sum",
    "wrong_min",
    "wrong_max",
    "wrong_avg",
)


@dataclass(frozen=True)
class Shape:
    """One window the benchmark runs (``--window``)."""

    kind: str  # the TOML's [transform.window] kind
    benchmark: str  # the results' file stem
    title: str  # for the report: "60 s tumbling window"
    size: dict[str, int]  # the window's size keys in the TOML
    #: What each expected window is, for the report.
    means: str

    @property
    def size_toml(self) -> str:
        return "\n".join(f"{k} = {v}" for k, v in self.size.items())


#: The windows of ``--window``: 1M events of 10k users come about 100 s
#: apart per user, so a 30 s session gap splits most users' events.
SHAPES = {
    "tumbling": Shape(
        "tumbling",
        BENCHMARK,
        "60 s tumbling window",
        {"duration_ms": 60_000},
        "per user_id and minute",
    ),
    "hopping": Shape(
        "hopping",
        "kafka_hopping_to_postgres",
        "60 s hopping window every 30 s",
        {"duration_ms": 60_000, "hop_ms": 30_000},
        "per user_id and each of the two 60 s windows (one starts every 30 s) holding an event",
    ),
    "session": Shape(
        "session",
        "kafka_session_to_postgres",
        "session window (30 s gap)",
        # The cap is far above any session of this data (checked): no session is cut.
        {"gap_ms": 30_000, "max_session_duration_ms": 86_400_000},
        "per user_id and run of events at most 30 s apart (window_end = last event + 30 s)",
    ),
}


def engine_kind(engine: str) -> str:
    """Which engine program runs ``engine``: ``sluice`` or ``reference``."""
    return "reference" if engine == "reference" else "sluice"


# ---------------------------------------------------------------- data


def iso_ms(ts_ms: int) -> str:
    """``ts_ms`` as the generator writes ``ts``: ``2026-01-01T00:00:00.025Z``."""
    dt = datetime.fromtimestamp(ts_ms / 1000, UTC)
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def timed_events(rows: int, seed: int) -> Iterator[tuple[int, bytes, int]]:
    """``kafka_to_postgres``'s events with their event time: ``(user_id, payload,
    timestamp ms)``, the payload's ``ts`` set to that time. Deterministic."""
    rng = random.Random(f"disorder:{seed}")
    marker = b',"ts":"'
    for i, (user_id, payload) in enumerate(common.events(rows, seed), start=1):
        ts_ms = T0_MS + i * EVENT_STEP_MS - rng.randint(0, DISORDER_MS)
        # ``ts`` is the generator's last field, a fixed-width string: replace it
        # in place (same length) rather than decode and re-encode every event.
        head, sep, _ = payload.rpartition(marker)
        assert sep, payload
        yield user_id, b'%s%s%s"}' % (head, sep, iso_ms(ts_ms).encode()), ts_ms


def last_event_ms(rows: int) -> int:
    """An upper bound of the largest event time of ``rows`` events."""
    return T0_MS + rows * EVENT_STEP_MS


def produce_closers(settings: Settings, topic: str, rows: int) -> int:
    """One closing event per partition, ``CLOSE_AFTER_MS`` after the last event;
    returns their timestamp (ms)."""
    ts_ms = last_event_ms(rows) + CLOSE_AFTER_MS
    producer = ck.Producer({"bootstrap.servers": settings.bootstrap_servers})
    for p in range(settings.partitions):
        event = {
            "id": rows + 1 + p,
            "user_id": CLOSER_USER_ID + p,
            "event_type": "close",
            "amount": 0.0,
            "country": "XX",
            "session": "close",
            "ts": iso_ms(ts_ms),
        }
        producer.produce(
            topic,
            json.dumps(event, separators=(",", ":")).encode(),
            key=str(CLOSER_USER_ID + p).encode(),
            partition=p,
            timestamp=ts_ms,
        )
    if producer.flush(60):
        raise SystemExit(f"producing the closing events to {topic}: not all delivered")
    return ts_ms


def raw_rows(rows: int, seed: int) -> Iterator[tuple[int, float, int]]:
    """``(user_id, amount, event ms)`` of the produced events, decoded from the
    very payloads the topic holds (and their ``ts`` checked against the
    message timestamp)."""
    for _key, payload, ts_ms in timed_events(rows, seed):
        event = json.loads(payload)
        assert event["ts"] == iso_ms(ts_ms), (event, ts_ms)
        yield event["user_id"], event["amount"], ts_ms


@dataclass
class Expected:
    """The windows every engine must write, computed by Postgres over the raw events."""

    schema: str
    shape: Shape
    lateness_ms: int
    load_s: float = 0.0
    query_s: float = 0.0
    windows: int = 0
    events: int = 0
    closers_ts_ms: int = 0
    max_event_ms: int = 0


def prepare_postgres(conn: psycopg.Connection[Any], settings: Settings, exp: Expected) -> None:
    """Create ``exp.schema`` with the raw events and the expected windows."""
    schema = exp.schema
    started = time.monotonic()
    conn.execute(f"CREATE SCHEMA {schema}")
    common.create_table(conn, f"{schema}.{RAW_TABLE}", RAW_COLUMNS)
    common.copy_rows(
        conn, f"{schema}.{RAW_TABLE}", RAW_COLUMNS, raw_rows(settings.rows, settings.seed)
    )
    exp.load_s = time.monotonic() - started

    started = time.monotonic()
    conn.execute(f"CREATE TABLE {schema}.{EXPECTED_TABLE} AS {expected_query(exp)}")
    conn.execute(f"ALTER TABLE {schema}.{EXPECTED_TABLE} ADD PRIMARY KEY (user_id, ws_ms)")
    if exp.shape.kind == "session":
        row = conn.execute(f"SELECT max(we_ms - ws_ms) FROM {schema}.{EXPECTED_TABLE}").fetchone()
        longest = int(row[0]) if row and row[0] is not None else 0
        cap = exp.shape.size["max_session_duration_ms"]
        if longest >= cap:
            raise SystemExit(f"a session lasts {longest} ms: max_session_duration_ms {cap} cuts it")
    conn.execute(f"ANALYZE {schema}.{EXPECTED_TABLE}")
    row = conn.execute(
        f"SELECT (SELECT count(*) FROM {schema}.{EXPECTED_TABLE}), count(*), max(event_ms) "
        f"FROM {schema}.{RAW_TABLE}"
    ).fetchone()
    assert row is not None
    exp.windows, exp.events, exp.max_event_ms = int(row[0]), int(row[1]), int(row[2])
    exp.query_s = time.monotonic() - started


def expected_query(exp: Expected) -> str:
    """The SQL of the expected windows of ``exp.shape`` over the raw events:
    ``user_id, ws_ms, we_ms`` and the aggregates. The sum is exact in numeric:
    every amount has two decimals (the generator rounds it), so an engine's
    double sum, rounded to cents, must equal it."""
    raw, size = f"{exp.schema}.{RAW_TABLE}", exp.shape.size
    aggs = (
        "count(*) AS n, sum(amount::numeric) AS amount_sum, avg(amount::numeric) AS amount_avg, "
        "min(amount) AS amount_min, max(amount) AS amount_max"
    )
    if exp.shape.kind == "tumbling":
        d = size["duration_ms"]
        return (
            f"SELECT user_id, event_ms / {d} * {d} AS ws_ms, event_ms / {d} * {d} + {d} AS we_ms, "
            f"{aggs} FROM {raw} GROUP BY 1, 2, 3"
        )
    if exp.shape.kind == "hopping":
        # Windows start at multiples of hop_ms (event times are positive):
        # an event is in the ceil(d / h) windows starting at its hop and before
        # it whose end is after it.
        d, h = size["duration_ms"], size["hop_ms"]
        return (
            f"SELECT user_id, ws_ms, ws_ms + {d} AS we_ms, {aggs} FROM "
            f"(SELECT user_id, amount, event_ms, event_ms / {h} * {h} - k * {h} AS ws_ms "
            f"FROM {raw} CROSS JOIN generate_series(0, {-(-d // h) - 1}) AS k) w "
            f"WHERE event_ms < ws_ms + {d} GROUP BY 1, 2, 3"
        )
    # A user's session goes on while consecutive event times are at most gap_ms apart.
    gap = size["gap_ms"]
    return (
        f"SELECT user_id, min(event_ms) AS ws_ms, max(event_ms) + {gap} AS we_ms, {aggs} FROM "
        "(SELECT user_id, amount, event_ms, sum(opens) OVER (PARTITION BY user_id "
        "ORDER BY event_ms ROWS UNBOUNDED PRECEDING) AS session FROM "
        "(SELECT user_id, amount, event_ms, CASE WHEN event_ms - lag(event_ms) OVER "
        f"(PARTITION BY user_id ORDER BY event_ms) > {gap} THEN 1 ELSE 0 END AS opens "
        f"FROM {raw}) o) s GROUP BY user_id, session"
    )


# ---------------------------------------------------------------- engines


def pipeline_name(run_id: str) -> str:
    return f"{PREFIX}-{run_id}"


def schema_name(run_id: str) -> str:
    return f"{PREFIX}_{run_id}".replace("-", "_")


def state_schema(schema: str, engine: str) -> str:
    """Where ``engine``'s Postgres state store keeps a session window's tables:
    one schema per run, since the runs share the pipeline_name (and a run
    resumes from the checkpoint of that name it finds)."""
    return f"{schema}_state_{engine.replace('-', '_')}"


def render_pipeline(
    settings: Settings,
    shape: Shape,
    run_id: str,
    topic: str,
    group_id: str,
    schema: str,
    table: str,
    engine: str = "sluice",
) -> str:
    """The template for ``engine`` and ``shape``: as it is, or without its
    ``sql`` line for ``sluice-kafka-ts``."""
    store = ""
    if shape.kind == "session":
        store = "\n" + k2pg.postgres_state_store(settings, state_schema(schema, engine)) + "\n"
    text = k2pg.render_template(
        TEMPLATE,
        settings,
        pipeline_name(run_id),
        group_id,
        table,
        topic=topic,
        schema=schema,
        window_kind=shape.kind,
        window_size=shape.size_toml,
        state_store=store,
    )
    if engine != KAFKA_TS:
        return text
    lines = text.splitlines(keepends=True)
    kept = [line for line in lines if not line.startswith("sql = ")]
    assert len(kept) == len(lines) - 1, "the template must have exactly one `sql = ` line"
    return "".join(kept)


def pipeline_facts(settings: Settings, shape: Shape) -> tuple[str, int]:
    """The template's ``[transform] sql`` and lateness (ms) for ``shape``."""
    cfg = tomllib.loads(render_pipeline(settings, shape, "x", "x", "x", "x", "x"))
    window = cfg["transform"]["window"]
    assert window["kind"] == shape.kind and window["group_by"] == ["user_id"], window
    assert all(window[k] == v for k, v in shape.size.items()), window
    return cfg["transform"]["sql"], int(cfg["watermark"]["lateness_ms"])


def reference_offsets_row(conn: psycopg.Connection[Any], run_id: str) -> str | None:
    """This run's row of the reference's offsets table, as text, if any."""
    row = conn.execute("SELECT to_regclass(%s)", (k2pg.REFERENCE_OFFSETS,)).fetchone()
    if not (row and row[0]):
        return None
    found = conn.execute(
        f"SELECT offsets_json::text FROM {k2pg.REFERENCE_OFFSETS} WHERE pipeline_id = %s",
        (pipeline_name(run_id),),
    ).fetchone()
    return None if found is None else str(found[0])


def free_port() -> int:
    """A TCP port nobody listens on right now, for an engine's /metrics."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def committed_offsets(settings: Settings, group_id: str, topic: str) -> int | None:
    """Sum of ``group_id``'s committed offsets on ``topic``, as the broker holds them."""
    consumer = ck.Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": group_id})
    try:
        tps = consumer.committed(
            [ck.TopicPartition(topic, p) for p in range(settings.partitions)], timeout=10
        )
    except ck.KafkaException:
        return None
    finally:
        consumer.close()
    return sum(max(tp.offset, 0) for tp in tps)


@dataclass
class Poll:
    """What :class:`Progress` saw at one poll of ``watch_engine``."""

    consumed: int  # the engine's rows-consumed counter (input events, closers included)
    written: int  # its rows-written counter (window rows handed to Postgres)
    groups: int  # its (window, group) pairs in state (the reference's state_groups_total)
    landed: int | None  # count(*) of its table, once ``written`` says all windows were written


@dataclass
class Progress:
    """The ``count`` that ``watch_engine`` polls, from the engine's own metrics
    endpoint: the messages it consumed, plus one step for being done with them.
    ``watch_engine`` stops at :attr:`done_at`.

    Done means, for sluice (``windows`` set), every expected window in its
    table (``count(*)``, run once its rows-written counter says so); for the
    reference (``groups`` set), every event folded into its window state: its
    ``state_groups_total`` (distinct (window, group) pairs; it never drops
    one, since it never emits) at the expected windows plus the closing
    events' ones, or, should it count otherwise, unchanged for
    ``SETTLE_S`` after it consumed every message. Its rows-consumed counter
    moves before it folds the rows: at 50k events it read them all while its
    state held 26,636 of the 37,955 groups.

    ``watch_engine`` calls it once per timeline entry, so ``polls[k]`` belongs
    to ``timeline[k]``.
    """

    port: int
    prefix: str
    inputs: int  # messages in the topic: the events and the closing events
    windows: int  # sluice: expected windows to wait for in its table (0: none)
    groups: int  # reference: window-state groups to wait for (0: none)
    count_windows: Callable[[], int]  # count(*) of the engine's table
    polls: list[Poll] = field(default_factory=list)
    last: dict[str, float] = field(default_factory=dict)  # the last answered scrape
    done_by: str | None = None  # what said it was done
    _groups_since: tuple[int, float] = (-1, 0.0)  # (groups, monotonic time first seen)

    @property
    def done_at(self) -> int:
        return self.inputs + 1

    def __call__(self) -> int:
        scraped = common.scrape_metrics(self.port, self.prefix, METRICS)
        if scraped is not None:  # counters only grow: keep the last ones once it exits
            self.last = scraped
        consumed = int(self.last.get("rows_consumed_total", 0))
        written = int(self.last.get("rows_written_total", 0))
        groups = int(self.last.get("state_groups_total", 0))
        landed = self.count_windows() if self.windows and written >= self.windows else None
        self.polls.append(Poll(consumed, written, groups, landed))
        if groups != self._groups_since[0]:
            self._groups_since = (groups, time.monotonic())
        if self.done_by is None and consumed >= self.inputs:
            if self.windows and (landed or 0) >= self.windows:
                self.done_by = "every expected window in its table"
            elif self.groups and groups >= self.groups:
                self.done_by = "state_groups_total = expected windows + closing events"
            elif self.groups and time.monotonic() - self._groups_since[1] >= SETTLE_S:
                self.done_by = f"state_groups_total unchanged for {SETTLE_S:.0f} s"
        return min(consumed, self.inputs) + (self.done_by is not None)


@dataclass
class TumblingResult(EngineResult):
    """``kafka_to_postgres``'s result plus the input and window figures."""

    toml: str = "shared"  # shared | shared without [transform] sql
    metrics_port: int = 0
    first_input_s: float | None = None  # the consumed counter moved
    all_input_s: float | None = None  # every message (closers included) consumed
    done_s: float | None = None  # done with it (see Progress): windows in Postgres / in state
    done_by: str | None = None
    cpu_s_at_all_input: float | None = None
    cpu_s_at_done: float | None = None
    input_rows_per_s: float | None = None  # events / (all_input_s - ready_s)
    busy_input_rows_per_s: float | None = None  # events / (all_input_s - busy_s)
    done_rows_per_s: float | None = None  # events / (done_s - ready_s)
    metrics_at_end: dict[str, float] = field(default_factory=dict)
    committed_at_end: int | None = None  # sum of the group's committed offsets on the broker
    reference_offsets_row: str | None = None
    table_rows: int = 0
    polls: list[dict[str, Any]] = field(default_factory=list)

    @property
    def input_window_s(self) -> float | None:
        if self.ready_s is None or self.all_input_s is None:
            return None
        return self.all_input_s - self.ready_s

    @property
    def done_after_input_s(self) -> float | None:
        if self.all_input_s is None or self.done_s is None:
            return None
        return self.done_s - self.all_input_s

    def cpu_s_per_million_input(self, rows: int) -> float | None:
        if self.cpu_s_at_all_input is None:
            return None
        return self.cpu_s_at_all_input * 1_000_000 / rows

    def cpu_s_per_million_done(self, rows: int) -> float | None:
        if self.cpu_s_at_done is None:
            return None
        return self.cpu_s_at_done * 1_000_000 / rows


def verify(conn: psycopg.Connection[Any], exp: Expected, table: str) -> dict[str, Any]:
    """Compare ``table`` with the expected windows, window by window (full join
    on user_id and window start): count, window end, min and max exactly, sum
    rounded to cents exactly, avg within ``AVG_TOLERANCE`` (relative)."""
    s = exp.schema
    both = "a.user_id IS NOT NULL AND e.user_id IS NOT NULL"
    checks = {
        "missing": "a.user_id IS NULL",
        "unexpected": "e.user_id IS NULL",
        "wrong_end": f"{both} AND a.we_ms IS DISTINCT FROM e.we_ms",
        "wrong_n": f"{both} AND a.n IS DISTINCT FROM e.n",
        "wrong_sum": f"{both} AND round(a.amount_sum::numeric, 2) IS DISTINCT FROM e.amount_sum",
        "wrong_min": f"{both} AND a.amount_min IS DISTINCT FROM e.amount_min",
        "wrong_max": f"{both} AND a.amount_max IS DISTINCT FROM e.amount_max",
        "wrong_avg": f"{both} AND (a.amount_avg IS NULL OR abs(a.amount_avg::numeric - "
        f"e.amount_avg) > {AVG_TOLERANCE} * greatest(1, abs(e.amount_avg)))",
    }
    joined = (
        "FROM (SELECT user_id, (extract(epoch FROM window_start) * 1000)::bigint AS ws_ms, "
        "(extract(epoch FROM window_end) * 1000)::bigint AS we_ms, n, amount_sum, amount_avg, "
        f"amount_min, amount_max FROM {s}.{table} WHERE user_id < {CLOSER_USER_ID}) a "
        f"FULL JOIN {s}.{EXPECTED_TABLE} e ON a.user_id = e.user_id AND a.ws_ms = e.ws_ms"
    )
    assert tuple(checks) == CHECKS
    counts = ", ".join(f"count(*) FILTER (WHERE {cond})" for cond in checks.values())
    row = conn.execute(
        f"SELECT count(a.user_id), {counts}, "
        "max(abs(a.amount_sum::numeric - e.amount_sum)), "
        f"max(abs(a.amount_avg::numeric - e.amount_avg)) {joined}"
    ).fetchone()
    assert row is not None
    got: dict[str, Any] = {"windows": int(row[0])}
    got.update({k: int(v) for k, v in zip(checks, row[1 : 1 + len(checks)], strict=True)})
    got["max_sum_error"] = None if row[-2] is None else float(row[-2])
    got["max_avg_error"] = None if row[-1] is None else float(row[-1])
    problems = [f"{k} = {got[k]:,}" for k in checks if got[k]]
    if got["windows"] != exp.windows:
        problems.insert(0, f"windows = {got['windows']:,}, expected {exp.windows:,}")
    examples: list[str] = []
    if problems:
        cond = " OR ".join(f"({c})" for c in checks.values())
        examples = [
            str(r)
            for r in conn.execute(
                f"SELECT coalesce(a.user_id, e.user_id), coalesce(a.ws_ms, e.ws_ms), "
                f"a.n, e.n, a.amount_sum, e.amount_sum {joined} WHERE {cond} LIMIT 5"
            ).fetchall()
        ]
    return {"ok": not problems, "problems": problems, "examples": examples, **got}


def run_engine(
    settings: Settings,
    conn: psycopg.Connection[Any],
    admin: AdminClient,
    ds: Dataset,
    exp: Expected,
    run_id: str,
    engine: str,
    version: str,
) -> TumblingResult:
    """Run ``engine`` until it consumed every message and, for sluice, every
    expected window landed (or it fails); verify its table.

    The polling is ``kafka_to_postgres``'s (``watch_engine``) over a
    :class:`Progress`; the rates are in input events.
    """
    kind = engine_kind(engine)
    table = "out_" + engine.replace("-", "_")
    toml_path = settings.work_dir / f"{engine}.toml"
    group_id = f"{PREFIX}-{run_id}-{engine}"
    toml_path.write_text(
        render_pipeline(settings, exp.shape, run_id, ds.topic, group_id, exp.schema, table, engine)
    )
    common.recreate_table(conn, f"{exp.schema}.{table}", output_columns(exp.shape), PRIMARY_KEY)

    port = free_port()
    argv = common.engine_argv(kind, toml_path, metrics_port=port)
    res = TumblingResult(
        engine=engine,
        version=version,
        table=f"{exp.schema}.{table}",
        command=argv,
        group_id=group_id,
        toml="shared without [transform] sql" if engine == KAFKA_TS else "shared",
        metrics_port=port,
    )
    progress = Progress(
        port=port,
        prefix=METRIC_PREFIX[kind],
        inputs=ds.rows + ds.partitions,
        windows=exp.windows if kind == "sluice" else 0,
        # The reference never emits a window: wait for its input to be in its state.
        groups=exp.windows + ds.partitions if kind == "reference" else 0,
        count_windows=lambda: common.count_rows(conn, f"{exp.schema}.{table}"),
    )
    what = "progress steps (one per message consumed, one for done)"
    # sluice stores a window pipeline's watermark under $SLUICE_STATE_DIR/<pipeline_name>
    # (default ./.sluice-state) and starts the next run at it: two runs with the same
    # pipeline_name would find every event of the second one late. One directory per engine.
    env = {**os.environ, "SLUICE_STATE_DIR": str(settings.work_dir / f"state-{engine}")}
    k2pg.watch_engine(settings, admin, res, progress, progress.done_at, what=what, env=env)
    summarise(res, progress, ds)
    res.committed_at_end = committed_offsets(settings, group_id, ds.topic)
    res.reference_offsets_row = reference_offsets_row(conn, run_id)
    res.table_rows = common.count_rows(conn, f"{exp.schema}.{table}")
    if res.table_rows or kind == "sluice":
        res.verification = verify(conn, exp, table)
    else:
        res.verification = {"ok": None, "problems": [], "windows": 0}
    common.print_problem(res)
    if not settings.keep:
        conn.execute(f"DROP TABLE IF EXISTS {exp.schema}.{table}")
    return res


def summarise(res: TumblingResult, progress: Progress, ds: Dataset) -> None:
    """Fill ``res``'s input and done figures from the polls."""
    assert len(progress.polls) == len(res.timeline), "one Progress call per timeline entry"
    kind = engine_kind(res.engine)
    final_groups = progress.polls[-1].groups if progress.polls else 0
    for (t, _, cpu), poll in zip(res.timeline, progress.polls, strict=True):
        res.polls.append({"t": t, "cpu_s": cpu, **asdict(poll)})
        if res.first_input_s is None and poll.consumed:
            res.first_input_s = t
        if res.all_input_s is None and poll.consumed >= progress.inputs:
            res.all_input_s, res.cpu_s_at_all_input = t, cpu
        if res.all_input_s is None or res.done_s is not None or progress.done_by is None:
            continue
        # sluice: the poll that counted every window; the reference: the first
        # poll at which its state held as many groups as at the end.
        if (kind == "sluice" and (poll.landed or 0) >= progress.windows) or (
            kind == "reference" and poll.groups >= final_groups
        ):
            res.done_s, res.cpu_s_at_done = t, cpu
    res.done_by = progress.done_by
    res.metrics_at_end = progress.last
    if res.all_input_s is not None:
        print(f"[{res.engine}] every message consumed after {res.all_input_s:.1f} s", flush=True)
    if res.done_s is not None:
        print(f"[{res.engine}] done after {res.done_s:.1f} s: {res.done_by}", flush=True)
    if res.outcome != "ok" or res.ready_s is None:
        return
    if res.all_input_s is not None and res.all_input_s > res.ready_s:
        res.input_rows_per_s = ds.rows / (res.all_input_s - res.ready_s)
    if res.all_input_s is not None and res.busy_s is not None and res.all_input_s > res.busy_s:
        res.busy_input_rows_per_s = ds.rows / (res.all_input_s - res.busy_s)
    if res.done_s is not None and res.done_s > res.ready_s:
        res.done_rows_per_s = ds.rows / (res.done_s - res.ready_s)


# ---------------------------------------------------------------- report


def _count(value: float | None) -> str:
    return "n/a" if value is None else f"{int(value):,}"


SUMMARY_HEADERS = (
    "engine",
    "input rows/s",
    "CPU-s per 1M input rows",
    "done after (s)",
    "rows/s to done",
    "CPU-s per 1M rows to done",
    "peak RSS MB",
)
#: What "done" is for each engine, for the tables' readers.
DONE_MEANS = (
    "done = sluice: every expected window in its Postgres table; the reference: every event "
    "folded into its window state (it never emits a window)"
)


def summary_rows(results: Sequence[TumblingResult], rows: int) -> list[list[str]]:
    out = [
        [
            r.engine,
            common.num(r.input_rows_per_s, ",.0f"),
            common.num(r.cpu_s_per_million_input(rows), ".1f"),
            common.num(
                None if r.done_s is None or r.ready_s is None else r.done_s - r.ready_s, ".1f"
            ),
            common.num(r.done_rows_per_s, ",.0f"),
            common.num(r.cpu_s_per_million_done(rows), ".1f"),
            common.num(r.peak_rss_bytes / 2**20 if r.peak_rss_bytes else None, ".0f"),
        ]
        for r in results
    ]
    by = {r.engine: r for r in results}
    ref = by.get("reference")
    for name in ("sluice", KAFKA_TS):
        s = by.get(name)
        if s is None or ref is None:
            continue
        out.append(
            [
                f"{name}/reference" + (" (not the same TOML)" if name == KAFKA_TS else ""),
                common.ratio(s.input_rows_per_s, ref.input_rows_per_s),
                common.ratio(s.cpu_s_per_million_input(rows), ref.cpu_s_per_million_input(rows)),
                "-",
                common.ratio(s.done_rows_per_s, ref.done_rows_per_s),
                common.ratio(s.cpu_s_per_million_done(rows), ref.cpu_s_per_million_done(rows)),
                common.ratio(s.peak_rss_bytes or None, ref.peak_rss_bytes or None),
            ]
        )
    return out


DETAIL_HEADERS = (
    "engine",
    "group ready at (s)",
    "first input at (s)",
    "all input at (s)",
    "input window (s)",
    "busy from (s)",
    "input rows/s from busy",
    "done at (s)",
    "done after input (s)",
    "done by",
    "CPU-s to ready",
    "CPU-s to all input",
    "CPU-s to done",
    "CPU-s whole run",
    "wall (s)",
    "stopped by",
    "outcome",
)


def detail_rows(results: Sequence[TumblingResult]) -> list[list[str]]:
    return [
        [
            r.engine,
            common.num(r.ready_s, ".1f"),
            common.num(r.first_input_s, ".1f"),
            common.num(r.all_input_s, ".1f"),
            common.num(r.input_window_s, ".2f"),
            common.num(r.busy_s, ".1f"),
            common.num(r.busy_input_rows_per_s, ",.0f"),
            common.num(r.done_s, ".1f"),
            common.num(r.done_after_input_s, ".2f"),
            r.done_by or "n/a",
            common.num(r.cpu_s_at_ready, ".2f"),
            common.num(r.cpu_s_at_all_input, ".2f"),
            common.num(r.cpu_s_at_done, ".2f"),
            common.num(r.cpu_s_whole_run, ".2f"),
            common.num(r.wall_s, ".1f"),
            ", ".join(r.signals) or f"itself (exit {r.returncode})",
            r.outcome,
        ]
        for r in results
    ]


BEHAVIOUR_HEADERS = (
    "engine",
    "TOML",
    "rows consumed",
    "rows written",
    "windows emitted",
    "windows open at end",
    "state groups at end",
    "late rows dropped",
    "committed offsets at end",
    "_ematix_offsets row",
    "rows in its table",
)


def behaviour_rows(results: Sequence[TumblingResult], ds: Dataset) -> list[list[str]]:
    out = []
    for r in results:
        m = r.metrics_at_end
        groups = m.get("state_groups", m.get("state_groups_total"))
        out.append(
            [
                r.engine,
                r.toml,
                _count(m.get("rows_consumed_total")),
                _count(m.get("rows_written_total")),
                _count(m.get("windows_emitted_total")),
                _count(m.get("windows_active")),
                _count(groups),
                # A labelled counter has no sample until its first increment.
                _count(m["late_rows_dropped_total"]) if "late_rows_dropped_total" in m else "none",
                f"{_count(r.committed_at_end)} of {ds.rows + ds.partitions:,}",
                r.reference_offsets_row or "none",
                f"{r.table_rows:,}",
            ]
        )
    return out


VERIFY_HEADERS = (
    "engine",
    "expected windows",
    "windows in table",
    "missing",
    "unexpected",
    "wrong end",
    "wrong n",
    "wrong sum",
    "wrong min",
    "wrong max",
    "wrong avg",
    "verified",
)


def verify_rows(results: Sequence[TumblingResult], exp: Expected) -> list[list[str]]:
    out = []
    for r in results:
        v = r.verification
        if v.get("ok") is None:
            verdict = "n/a: wrote no window"
        else:
            verdict = "yes" if v["ok"] else "NO: " + "; ".join(v["problems"])
        out.append(
            [
                r.engine,
                f"{exp.windows:,}",
                _count(v.get("windows")),
                *(_count(v.get(k)) if v.get("ok") is not None else "-" for k in CHECKS),
                verdict,
            ]
        )
    return out


ASYMMETRY = (
    "The reference's windows never emit: it consumes the events, folds them into window "
    "state it never closes and writes nothing. So what compares is input: 'input rows/s' "
    "and its CPU run to the poll at which the engine's own rows-consumed counter reached "
    "every message, measured the same way for both; 'done' runs to the poll at which the "
    "engine was through with that input: for sluice every expected window in Postgres, for "
    "the reference every event in its window state (its counter moves before it folds the "
    "rows). In both intervals sluice does more work than the reference: it also emits "
    "every window the watermark closed and merges it into its Postgres table."
)


def methodology(settings: Settings, exp: Expected, sql: str) -> list[str]:
    hours = (exp.max_event_ms - T0_MS) / 3_600_000
    return [
        ASYMMETRY,
        f"Events: `kafka_to_postgres`'s {settings.rows:,} JSON events (10k users), each "
        f"with an explicit Kafka message timestamp {EVENT_STEP_MS} ms of event time after "
        f"the previous one minus up to {DISORDER_MS / 1000:.0f} s of disorder ({hours:.2f} h "
        f"of event time), and the payload's `ts` set to that same instant. Then one "
        f"closing event per partition, {CLOSE_AFTER_MS // 3_600_000} h after the last event, "
        f"moves every partition's watermark past every real window. The watermark's "
        f"lateness_ms = {exp.lateness_ms} is above the disorder, so no event is late.",
        f"The TOML's `[transform] sql` (`{sql}`) rebuilds `_event_ts` from the payload's "
        "`ts`: the reference's Kafka source has no `_event_ts` and without that line it "
        "fails at its first batch (``window: event_time_column `_event_ts` not found in input "
        "schema``). `sluice-kafka-ts` is sluice on the same TOML without that line, windowing "
        "on the Kafka message timestamp its source adds; it is not compared with the "
        "reference, which cannot run that TOML.",
        "input rows/s = events / (the poll that saw the engine's rows-consumed counter reach "
        "every message, closing events included - the engine's consumer group became "
        "Stable), the counter read from the engine's own Prometheus endpoint "
        "(`sluice_rows_consumed_total`, `ematix_streaming_rows_consumed_total`). Startup and "
        "the group join are not counted against either engine. 'rows/s to done' = events / "
        "(done at - group Stable), " + DONE_MEANS + ": its state_groups_total (distinct "
        "(window, group) pairs) at the expected windows plus the closing events' ones "
        f"(or unchanged for {SETTLE_S:.0f} s, should it never get there; the detail table "
        "says which). Committed offsets cannot "
        "serve: sluice commits its batches in read order, each only once every window it "
        "touched was emitted, so its commits stop before the first batch that holds a "
        "closing event (whose window stays open).",
        f"Every {settings.poll_interval_s} s the harness scrapes the engine's metrics and the "
        "state of its consumer group; for sluice, once its rows-written counter reaches the "
        "expected windows, also `count(*)` of its table. Each time is that of the first poll "
        f"that saw the event, so it is known to within {settings.poll_interval_s} s.",
        f"'busy from': the start of the first poll interval after the join in which the "
        f"engine used >= {common.BUSY_CORES} cores; 'input rows/s from busy' = events / "
        "(all input at - busy from).",
        "CPU-s per 1M input rows: user + system CPU of the engine's process tree from its "
        "start to the poll that saw every message consumed (startup and group join "
        "included), per 1M events. For sluice that CPU includes emitting and writing the "
        "windows closed so far. 'CPU-s per 1M rows to done' runs to the poll that saw it "
        "done; 'CPU-s whole run' is the reaped process's rusage (start to exit).",
        common.PEAK_RSS,
        f"Expected windows: the events (user_id, amount, message timestamp, decoded from the "
        f"very payloads sent) are loaded into `{RAW_TABLE}` and grouped by Postgres into "
        f"{exp.windows:,} windows, {exp.shape.means} (`{exp.shape.size_toml}`). Each sluice "
        "table must have "
        "exactly those windows (none missing, none unexpected; the closing events' windows, "
        "which sluice's bounded run emits only when it drains at the end of input, are left "
        "out), each with the same count, window end, min and max, the sum equal to the "
        "exact decimal sum once rounded to cents (every amount has two decimals), and avg "
        f"within {AVG_TOLERANCE:g} (relative) of the exact average.",
        "Both engines get the same pre-created table, primary key (user_id, window_start); "
        'sluice writes it with mode = "merge". The reference ignores `mode` (and '
        "`session_timeout_ms`); it never writes to the table.",
        "sluice stops by itself (`--stop-after-idle-ms 3000`); the reference runs forever and "
        "gets SIGTERM once done.",
        f"In the other benchmarks the reference keeps its Kafka offsets in "
        f"`{k2pg.REFERENCE_OFFSETS}` of the target database, keyed by pipeline_name; with a "
        "window it wrote no row there and committed every message to the broker instead, "
        "windows unemitted. Every run uses a new pipeline_name (and deletes its row, if any).",
        "Each sluice run gets its own `SLUICE_STATE_DIR` in the work directory: sluice "
        "stores a window pipeline's watermark there under the pipeline_name and starts the "
        "next run with the same name at it.",
    ]


def render_markdown(
    settings: Settings,
    ds: Dataset,
    exp: Expected,
    sql: str,
    results: Sequence[TumblingResult],
    facts: dict[str, Any],
    date: str,
) -> str:
    lines = [
        f"# Kafka -> {exp.shape.title} -> Postgres: sluice vs the reference engine ({date})",
        "",
        f"{ds.rows:,} JSON events (avg {ds.payload_bytes_avg:.0f} bytes) of 10k users with "
        f"explicit message timestamps in a {ds.partitions}-partition topic (`{ds.topic}`, "
        f"produced in {ds.produce_s:.1f} s), aggregated per user_id into {exp.shape.title}s "
        f" (count, sum, avg, min, max of amount; {exp.windows:,} windows) by each "
        "engine, one engine at a time, into its own pre-created Postgres table.",
        "",
        f"**Asymmetry.** {ASYMMETRY}",
        "",
        common.markdown_table(SUMMARY_HEADERS, summary_rows(results, ds.rows)),
        "",
        f"({DONE_MEANS}.)",
        "",
        common.markdown_table(DETAIL_HEADERS, detail_rows(results)),
        "",
        "What each engine did (its own metrics at the last poll, the broker's committed "
        "offsets of its group and its table after it stopped):",
        "",
        common.markdown_table(BEHAVIOUR_HEADERS, behaviour_rows(results, ds)),
        "",
        common.markdown_table(VERIFY_HEADERS, verify_rows(results, exp)),
        "",
        *common.problems_section(results),
        *common.report_tail(methodology(settings, exp, sql), facts, results),
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, Shape]:
    """``kafka_to_postgres``'s command line plus ``--window``."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--window", choices=tuple(SHAPES), default="tumbling")
    extra, rest = pre.parse_known_args(argv)
    settings = k2pg.parse_settings(
        rest,
        benchmark=BENCHMARK,
        description=(
            "Kafka -> event-time window -> Postgres input rate, CPU and memory: "
            "sluice vs ematix-flow 1.0.0. Also: --window {tumbling,hopping,session} "
            "(default tumbling): " + "; ".join(f"{k}: {v.title}" for k, v in SHAPES.items())
        ),
        engines=ENGINES,
        keep_help="keep the schema (tables, raw events), topic and offsets",
        stall_help="give up after this long without progress (input or windows)",
    )
    return settings, SHAPES[extra.window]


def main(argv: Sequence[str] | None = None) -> int:
    settings, shape = parse_args(argv)
    settings, run_id = common.start_run(settings, PREFIX)
    date = common.utc_date()
    sql, lateness_ms = pipeline_facts(settings, shape)
    if lateness_ms <= DISORDER_MS:
        raise SystemExit(f"DISORDER_MS = {DISORDER_MS} must be below lateness_ms = {lateness_ms}")

    k2pg.check_services(settings)
    kinds = sorted({engine_kind(e) for e in settings.engines})
    kind_versions = {kind: common.check_engine(kind) for kind in kinds}
    versions = {engine: kind_versions[engine_kind(engine)] for engine in settings.engines}
    facts = common.run_facts(date)
    facts["packages"] = common.engine_packages(PACKAGES, kinds)

    topic = f"{PREFIX}-{run_id}"
    exp = Expected(schema=schema_name(run_id), shape=shape, lateness_ms=lateness_ms)
    print(
        f"producing {settings.rows:,} timestamped events and {settings.partitions} closing "
        f"events to {topic} ({settings.partitions} partitions)",
        flush=True,
    )
    ds = k2pg.produce(settings, topic, timed_events(settings.rows, settings.seed))
    exp.closers_ts_ms = produce_closers(settings, topic, settings.rows)
    common.print_produced(ds)

    results: list[TumblingResult] = []
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    try:
        with common.poller(settings.postgres_url, facts) as conn:
            facts["postgres_timezone"] = conn.execute("SHOW TimeZone").fetchone()[0]  # type: ignore[index]
            prepare_postgres(conn, settings, exp)
            print(
                f"schema {exp.schema}: {exp.events:,} events loaded in {exp.load_s:.1f} s; "
                f"expected {exp.windows:,} windows, computed in {exp.query_s:.1f} s",
                flush=True,
            )
            for engine in settings.engines:
                results.append(
                    run_engine(settings, conn, admin, ds, exp, run_id, engine, versions[engine])
                )
    finally:
        if not settings.keep:
            k2pg.drop_schema(settings, exp.schema, pipeline_name(run_id))
            if shape.kind == "session":
                for engine in settings.engines:
                    state = state_schema(exp.schema, engine)
                    k2pg.drop_schema(settings, state, pipeline_name(run_id))
            k2pg.delete_topic(settings, topic)

    print()
    print(common.format_table(SUMMARY_HEADERS, summary_rows(results, ds.rows)))
    print(f"({DONE_MEANS}.)")
    print()
    print(common.format_table(DETAIL_HEADERS, detail_rows(results)))
    print()
    print(common.format_table(BEHAVIOUR_HEADERS, behaviour_rows(results, ds)))
    print()
    print(common.format_table(VERIFY_HEADERS, verify_rows(results, exp)))
    print()
    print("note: " + ASYMMETRY)

    data = {
        "benchmark": shape.benchmark,
        "run_id": run_id,
        "date": date,
        "settings": settings.as_json(),
        "dataset": asdict(ds),
        "events": {
            "t0_ms": T0_MS,
            "event_step_ms": EVENT_STEP_MS,
            "disorder_ms": DISORDER_MS,
            "closing_events_ts_ms": exp.closers_ts_ms,
            "closing_user_ids": [CLOSER_USER_ID + p for p in range(ds.partitions)],
        },
        "expected": asdict(exp),
        "sql": sql,
        "asymmetry": ASYMMETRY,
        "machine": facts,
        "methodology": methodology(settings, exp, sql),
        "results": [
            {
                **asdict(r),
                "input_window_s": r.input_window_s,
                "done_after_input_s": r.done_after_input_s,
                "cpu_s_per_million_rows_to_done": r.cpu_s_per_million_done(ds.rows),
                "cpu_s_per_million_input_rows": r.cpu_s_per_million_input(ds.rows),
                "peak_rss_mb": r.peak_rss_bytes / 2**20,
            }
            for r in results
        ],
    }
    markdown = render_markdown(settings, ds, exp, sql, results, facts, date)
    common.save_results(settings, shape.benchmark, date, markdown, data)
    ok = not any(common.failed(r) for r in results)
    # sluice must also have written and verified every window.
    ok = ok and all(r.verification.get("ok") for r in results if engine_kind(r.engine) == "sluice")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
