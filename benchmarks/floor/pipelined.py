"""The fastest hand-written pipeline on sluice's libraries: a ceiling measured, not summed.

``benchmarks/floor/run.py`` adds up each library call's CPU and divides by
the two cores: a ceiling that assumes every CPU-second runs in parallel with
nothing waiting. This harness measures what a program gets when it really
runs those calls, in threads, on this machine: the tumbling-window pipeline
of ``kafka_tumbling_to_postgres`` with none of an engine's duties, written
as directly as these libraries allow.

* **read** (a thread): confluent-kafka with sluice's consumer settings,
  ``consume`` of up to 50k messages, each message's value and timestamp (the
  two calls any engine makes), handed on through a queue of two batches;
* **fold** (the main thread): pyarrow's JSON reader (explicit schema,
  threads, 4 MiB blocks), the minute of each event (its Kafka timestamp, as
  sluice's ``_event_ts``), one Acero group-by of the batch per (user,
  minute), merged with the open windows by a second group-by; windows that
  end at or before the watermark (the largest event time less 5 s) are
  emitted. ``hopping``: the same with each event in its two 60 s windows
  (one starts every 30 s). ``session``: the open sessions (one partial row
  each) and the batch's events sorted by (user, start) in numpy, a session
  opened where an item starts more than 30 s after the largest event time
  before it, one group-by per session; a session whose last event + 30 s
  is at or before the watermark is emitted, with a 64-bit id;
* **write** (a thread): each emitted table by ADBC's binary COPY into a
  Postgres table keyed on (user_id, window_start), one transaction each.

Not done, and all done by sluice: checkpoints of the open windows, source
commits, per-partition watermarks, metrics, error policies, the SQL
transform, casting the output to the table. So its rows/s is an upper bound
of any engine built on these libraries in Python on this machine (the broker
and Postgres share the two cores, as in every benchmark here). The windows
it writes are checked: their count and their summed event count.

    python -m benchmarks.floor.pipelined               # 1M events, three runs
    python -m benchmarks.floor.pipelined --rows 50000  # quick check
"""

from __future__ import annotations

import argparse
import io
import queue
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

from benchmarks import common
from benchmarks.floor.run import (
    BATCH,
    CORES,
    HOPPING_WINDOWS,
    PAIRS,
    SESSIONS,
    WINDOWS,
    Meter,
    _json_schema,
    add_common_args,
    producer_settings,
    save_full_run,
)

WINDOW_US = 60_000_000
HOP_US = 30_000_000  # the hopping window's hop
GAP_US = 30_000_000  # the session window's gap
LATENESS_US = 5_000_000
JOIN_WINDOW_US = 300_000_000  # the join benchmark's time_window_ms
_DONE = object()


def _reader(
    args: argparse.Namespace,
    topic: str,
    count: int,
    out: queue.Queue[Any],
    busy: dict[str, float],
) -> None:
    """Read ``count`` messages of ``topic``: ``(topic, values, ts_ms, partitions)``
    batches into ``out``, then ``(topic, None, None, None)``."""
    import confluent_kafka as ck
    import numpy as np

    from sluice.connectors.kafka.source import FETCHING

    consumer = ck.Consumer(
        {
            "bootstrap.servers": args.bootstrap_servers,
            "group.id": f"pipelined-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            **FETCHING,
        }
    )
    consumer.assign(
        [ck.TopicPartition(topic, p, ck.OFFSET_BEGINNING) for p in range(args.partitions)]
    )
    got = 0
    try:
        while got < count:
            began = time.perf_counter()
            msgs = consumer.consume(num_messages=BATCH, timeout=1.0)
            if not msgs:
                continue
            ts_ms = np.array([m.timestamp()[1] for m in msgs], dtype=np.int64)
            parts = np.array([m.partition() for m in msgs], dtype=np.int32)
            values = [m.value() for m in msgs]
            got += len(values)
            busy["read"] += time.perf_counter() - began
            out.put((topic, values, ts_ms, parts))
    finally:
        consumer.close()
        out.put((topic, None, None, None))


def _writer(conn: Any, table: str, inbox: queue.Queue[Any], busy: dict[str, float]) -> None:
    while (item := inbox.get()) is not _DONE:
        began = time.perf_counter()
        with conn.cursor() as cur:
            cur.adbc_ingest(table, item, mode="append")
        conn.commit()
        busy["write"] += time.perf_counter() - began


def _decode(values: list[bytes], schema: Any) -> Any:
    """sluice's JSON fast path: one pyarrow read of the batch, explicit schema."""
    import pyarrow.json as pajson

    from sluice.formats.json import _BLOCK_BYTES

    buf = b"\n".join(values)
    block = _BLOCK_BYTES if len(buf) > _BLOCK_BYTES else max(len(buf) + 1, 1 << 16)
    return pajson.read_json(
        io.BytesIO(buf),
        read_options=pajson.ReadOptions(use_threads=True, block_size=block),
        parse_options=pajson.ParseOptions(
            explicit_schema=schema, unexpected_field_behavior="infer"
        ),
    )


class _Watermark:
    """The least of the partitions' largest event times (ms), less the lateness,
    in µs: a partition read ahead of another closes nothing early."""

    def __init__(self, partitions: int) -> None:
        self.highest: dict[Any, int] = {}
        self.partitions = partitions

    def advance(self, topic: str, ts_ms: Any, parts: Any) -> int:
        import numpy as np

        for p in np.unique(parts):
            key = (topic, int(p))
            self.highest[key] = max(self.highest.get(key, -1), int(ts_ms[parts == p].max()))
        if len(self.highest) < self.partitions:
            return -(2**62)
        return min(self.highest.values()) * 1000 - LATENESS_US


_PARTIAL = [("n", "sum"), ("s", "sum"), ("lo", "min"), ("hi", "max")]


def _fold(open_: Any, values: list[bytes], ts_ms: Any, watermark: int, hop: int) -> tuple[Any, Any]:
    """Fold one batch into the open windows of ``hop`` (µs; the window's
    length: tumbling): (the windows still open, the emitted: those ending at
    or before ``watermark``, in µs)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    decoded = _decode(values, _json_schema())
    ts_us = ts_ms * 1000
    newest = ts_us // hop * hop
    reps = WINDOW_US // hop  # every window holding the event (its length is a multiple of hop)
    picks = pa.array(np.tile(np.arange(len(ts_us)), reps))
    starts = (newest[None, :] - (np.arange(reps) * hop)[:, None]).ravel()
    batch = pa.table(
        {
            "user_id": decoded["user_id"].take(picks) if reps > 1 else decoded["user_id"],
            "window_start": pa.array(starts),
            "amount": decoded["amount"].take(picks) if reps > 1 else decoded["amount"],
        }
    )
    part = batch.group_by(["user_id", "window_start"], use_threads=False).aggregate(
        [("amount", "count"), ("amount", "sum"), ("amount", "min"), ("amount", "max")]
    )
    part = part.rename_columns(["user_id", "window_start", "n", "s", "lo", "hi"])
    if open_ is not None:
        merged = pa.concat_tables([open_, part]).group_by(
            ["user_id", "window_start"], use_threads=False
        )
        part = merged.aggregate(_PARTIAL).rename_columns(
            ["user_id", "window_start", "n", "s", "lo", "hi"]
        )
    closed = pc.less_equal(pc.add(part["window_start"], WINDOW_US), watermark)
    return part.filter(pc.invert(closed)), _emit(part.filter(closed))


class _Keyed:
    """A window stage's open state and watermark; its table counts the events
    its windows hold."""

    check = "SELECT count(*), sum(n) FROM public.{table}"

    def __init__(self, args: argparse.Namespace, topics: dict[str, int]) -> None:
        self.watermark = _Watermark(args.partitions * len(topics))
        self.open: Any = None


class _Window(_Keyed):
    """The tumbling window's stage: fold each batch, emit the closed windows."""

    name = "window"
    hop = WINDOW_US
    table = (
        "user_id bigint, window_start timestamptz, window_end timestamptz, n bigint, "
        "amount_sum double precision, amount_avg double precision, "
        "amount_min double precision, amount_max double precision, "
        "PRIMARY KEY (user_id, window_start)"
    )

    def take(self, topic: str, values: list[bytes], ts_ms: Any, parts: Any) -> Any:
        watermark = self.watermark.advance(topic, ts_ms, parts)
        self.open, emitted = _fold(self.open, values, ts_ms, watermark, self.hop)
        return emitted

    def finish(self) -> Any:
        """The end of the input closes every window."""
        done, self.open = self.open, None
        return _emit(done)


class _Hopping(_Window):
    """The hopping window's stage: 60 s windows, one every 30 s."""

    name = "hopping"
    hop = HOP_US


_SESSION_AGGS = [
    ("ws", "min"),
    ("last", "max"),
    ("n", "sum"),
    ("s", "sum"),
    ("lo", "min"),
    ("hi", "max"),
    ("user_id", "min"),
]


class _Session(_Keyed):
    """The session window's stage (30 s gap): each batch's events and the open
    sessions re-split by the gaps, the closed sessions emitted."""

    name = "session"
    table = (
        "user_id bigint, window_start timestamptz, window_end timestamptz, "
        "session_id numeric(20,0), n bigint, amount_sum double precision, "
        "amount_avg double precision, amount_min double precision, "
        "amount_max double precision, PRIMARY KEY (user_id, window_start)"
    )

    def take(self, topic: str, values: list[bytes], ts_ms: Any, parts: Any) -> Any:
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        watermark = self.watermark.advance(topic, ts_ms, parts)
        decoded = _decode(values, _json_schema())
        ts = pa.array(ts_ms * 1000)
        amount = decoded["amount"]
        items = pa.table(
            {
                "user_id": decoded["user_id"],
                "ws": ts,
                "last": ts,
                "n": pa.array(np.ones(len(ts_ms), np.int64)),
                "s": amount,
                "lo": amount,
                "hi": amount,
            }
        )
        if self.open is not None:
            items = pa.concat_tables([self.open, items])
        user = np.asarray(items["user_id"].to_numpy())
        ws = np.asarray(items["ws"].to_numpy())
        last = np.asarray(items["last"].to_numpy())
        order = np.lexsort((ws, user))
        u, w, la = user[order], ws[order], last[order]
        new_user = np.empty(len(u), bool)
        new_user[0] = True
        new_user[1:] = u[1:] != u[:-1]
        seg = np.cumsum(new_user) - 1
        low, span = int(la.min()), int(la.max() - la.min()) + 1
        run_max = np.maximum.accumulate(la - low + seg * span) - seg * span + low
        opens = new_user.copy()
        opens[1:] |= w[1:] > run_max[:-1] + GAP_US
        sess = np.empty(len(u), np.int64)
        sess[order] = np.cumsum(opens) - 1
        grouped = (
            items.append_column("sess", pa.array(sess))
            .group_by("sess", use_threads=False)
            .aggregate(_SESSION_AGGS)
        )
        grouped = pa.table({c: grouped[f"{c}_{f}"] for c, f in _SESSION_AGGS})
        closed = pc.less_equal(pc.add(grouped["last"], GAP_US), watermark)
        self.open = grouped.filter(pc.invert(closed)).select(items.column_names)
        return self._emit(grouped.filter(closed))

    def finish(self) -> Any:
        """The end of the input closes every session."""
        done, self.open = self.open, None
        return None if done is None else self._emit(done)

    @staticmethod
    def _emit(part: Any) -> Any:
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        ws = np.asarray(part["ws"].to_numpy())
        user = np.asarray(part["user_id"].to_numpy())
        ids = (user.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ ws.astype(np.uint64)
        return pa.table(
            {
                "user_id": part["user_id"],
                "window_start": part["ws"].cast(pa.timestamp("us", "UTC")),
                "window_end": pc.add(part["last"], GAP_US).cast(pa.timestamp("us", "UTC")),
                "session_id": pa.array(ids).cast(pa.decimal128(20, 0)),
                "n": part["n"],
                "amount_sum": part["s"],
                "amount_avg": pc.divide(part["s"], part["n"].cast(pa.float64())),
                "amount_min": part["lo"],
                "amount_max": part["hi"],
            }
        )


def _emit(part: Any) -> Any:
    """Windows as the benchmark's table holds them."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return pa.table(
        {
            "user_id": part["user_id"],
            "window_start": part["window_start"].cast(pa.timestamp("us", "UTC")),
            "window_end": pc.add(part["window_start"], WINDOW_US).cast(pa.timestamp("us", "UTC")),
            "n": part["n"],
            "amount_sum": part["s"],
            "amount_avg": pc.divide(part["s"], part["n"].cast(pa.float64())),
            "amount_min": part["lo"],
            "amount_max": part["hi"],
        }
    )


class _Join:
    """The interval join's stage: each batch against the other side's buffer
    (one Acero hash join and a filter), then into its own buffer; a buffer
    keeps what a later row of the other side can still match."""

    name = "join"
    check = "SELECT count(*), count(DISTINCT right_payment_id) FROM public.{table}"

    def __init__(self, args: argparse.Namespace, topics: dict[str, int]) -> None:
        import pyarrow as pa

        from benchmarks.kafka_join_to_postgres import run as joins

        self.table = ", ".join(f"{c} {t}" for c, t in joins.OUTPUT_COLUMNS)
        self.columns = [c for c, _ in joins.OUTPUT_COLUMNS]
        orders, payments = topics
        self.side = {orders: "left", payments: "right"}
        fields = {orders: joins.ORDER_FIELDS, payments: joins.PAYMENT_FIELDS}
        self.schema = {
            t: pa.schema([*zip(fields[t], joins.FIELD_TYPES, strict=True), ("ts", pa.string())])
            for t in topics
        }
        self.buffer: dict[str, Any] = {}
        self.watermark = _Watermark(args.partitions * len(topics))

    def take(self, topic: str, values: list[bytes], ts_ms: Any, parts: Any) -> Any:
        import pyarrow as pa
        import pyarrow.compute as pc

        side = self.side[topic]
        other = "right" if side == "left" else "left"
        decoded = _decode(values, self.schema[topic])
        new = decoded.append_column(
            "_event_ts", pa.array(ts_ms * 1000).cast(pa.timestamp("us", "UTC"))
        )
        new = new.rename_columns([f"{side}_{c}" for c in new.column_names])
        emitted = None
        against = self.buffer.get(other)
        if against is not None and against.num_rows:
            joined = new.join(
                against,
                keys=f"{side}_order_id",
                right_keys=f"{other}_order_id",
                join_type="inner",
                coalesce_keys=False,
                use_threads=False,
            )
            gap = pc.abs(
                pc.subtract(
                    joined["left__event_ts"].cast(pa.int64()),
                    joined["right__event_ts"].cast(pa.int64()),
                )
            )
            emitted = joined.filter(pc.less_equal(gap, JOIN_WINDOW_US)).select(self.columns)
        mine = self.buffer.get(side)
        self.buffer[side] = new if mine is None else pa.concat_tables([mine, new])
        horizon = self.watermark.advance(topic, ts_ms, parts) - JOIN_WINDOW_US
        for s, buf in self.buffer.items():  # what no later row can match any more
            keep = pc.greater_equal(buf[f"{s}__event_ts"].cast(pa.int64()), horizon)
            self.buffer[s] = buf.filter(keep).combine_chunks()
        return emitted

    def finish(self) -> Any:
        return None


def run_once(args: argparse.Namespace, topics: dict[str, int], scenario: type) -> dict[str, Any]:
    """One pass over ``topics`` (name -> messages): reader threads, the stage
    in the main thread, the writer thread."""
    import adbc_driver_postgresql.dbapi as pg

    stage = scenario(args, topics)
    table = f"pipelined_{uuid.uuid4().hex[:8]}"
    # One connection, open across the measurement: a backend that exits takes
    # its CPU out of /proc before the meter reads it.
    conn = pg.connect(args.postgres_url)
    with conn.cursor() as cur:
        cur.execute(f"CREATE TABLE public.{table} ({stage.table})")
    conn.commit()
    batches: queue.Queue[Any] = queue.Queue(maxsize=2 * len(topics))
    outbox: queue.Queue[Any] = queue.Queue(maxsize=2)
    busy = {"read": 0.0, "stage": 0.0, "write": 0.0}
    readers = [
        threading.Thread(target=_reader, args=(args, t, n, batches, busy))
        for t, n in topics.items()
    ]
    writer = threading.Thread(target=_writer, args=(conn, table, outbox, busy))
    with Meter() as meter:
        for r in readers:
            r.start()
        writer.start()
        reading = len(readers)
        while reading:
            topic, values, ts_ms, parts = batches.get()
            if values is None:
                reading -= 1
                continue
            began = time.perf_counter()
            emitted = stage.take(topic, values, ts_ms, parts)
            busy["stage"] += time.perf_counter() - began
            if emitted is not None and emitted.num_rows:
                outbox.put(emitted)
        last = stage.finish()
        if last is not None and last.num_rows:
            outbox.put(last)
        outbox.put(_DONE)
        for r in readers:
            r.join()
        writer.join()
    with conn.cursor() as cur:
        cur.execute(stage.check.format(table=table))
        rows, second = cur.fetchone()
        cur.execute(f"DROP TABLE public.{table}")
    conn.commit()
    conn.close()
    result = meter.result(
        out_rows=int(rows), check=int(second), **{f"{k}_busy_s": v for k, v in busy.items()}
    )
    result["rows_per_s"] = sum(topics.values()) / result["wall_s"]
    return result


def _produce(args: argparse.Namespace, scenario: str) -> dict[str, int]:
    """The scenario's topics, filled as its benchmark fills them: name -> messages."""
    from benchmarks.kafka_join_to_postgres import run as joins
    from benchmarks.kafka_to_postgres import run as k2pg
    from benchmarks.kafka_tumbling_to_postgres import run as tumbling

    run = uuid.uuid4().hex[:8]
    if scenario in ("window", "hopping", "session"):
        topic = f"bench_pipelined_{run}"
        k2pg.produce(
            producer_settings(args, args.rows), topic, tumbling.timed_events(args.rows, args.seed)
        )
        return {topic: args.rows}
    ev = joins.generate(args.rows, args.seed)
    orders, payments = f"bench_pipelined_{run}_orders", f"bench_pipelined_{run}_payments"
    k2pg.produce(producer_settings(args, len(ev.orders)), orders, joins.order_messages(ev))
    k2pg.produce(producer_settings(args, len(ev.payments)), payments, joins.payment_messages(ev))
    return {orders: len(ev.orders), payments: len(ev.payments)}


SCENARIOS: dict[str, type] = {
    "window": _Window,
    "hopping": _Hopping,
    "session": _Session,
    "join": _Join,
}
EXPECTED = {
    "window": ("windows", WINDOWS),
    "hopping": ("windows", HOPPING_WINDOWS),
    "session": ("sessions", SESSIONS),
    "join": ("pairs", PAIRS),
}


def render(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> str:
    date = common.utc_date()
    rows = []
    for name, runs in results.items():
        for i, r in enumerate(runs):
            cpu = r["client_cpu_s"] + r["broker_cpu_s"] + r["postgres_cpu_s"]
            rows.append(
                [
                    name,
                    str(i + 1),
                    f"{r['rows_per_s']:,.0f}",
                    f"{r['wall_s']:.2f}",
                    f"{r['client_cpu_s']:.2f}",
                    f"{r['broker_cpu_s']:.2f}",
                    f"{r['postgres_cpu_s']:.2f}",
                    f"{cpu / r['wall_s']:.2f}",
                    f"{r['read_busy_s']:.2f}",
                    f"{r['stage_busy_s']:.2f}",
                    f"{r['write_busy_s']:.2f}",
                    f"{r['out_rows']:,} {EXPECTED[name][0]}",
                ]
            )
    best = {name: max(r["rows_per_s"] for r in runs) for name, runs in results.items()}
    lines = [
        f"# The fastest hand-written pipelines on sluice's libraries ({date})",
        "",
        f"{args.rows:,} input events per scenario, {args.partitions} partitions a topic, "
        f"{args.runs} runs each, on {CORES} cores with the broker and Postgres "
        "(`benchmarks/floor/pipelined.py`; what the pipelines do and leave out is in "
        "its docstring). window, hopping, session: `kafka_tumbling_to_postgres`'s "
        "events, per user 60 s tumbling windows, 60 s windows every 30 s, sessions "
        "of a 30 s gap; join: `kafka_join_to_postgres`'s orders and payments, "
        "±5 min on order_id.",
        "",
        common.format_table(
            [
                "scenario",
                "run",
                "input rows/s",
                "wall s",
                "client CPU-s",
                "broker CPU-s",
                "Postgres CPU-s",
                "cores busy",
                "read busy s",
                "stage busy s",
                "write busy s",
                "written",
            ],
            rows,
        ),
        "",
        "Best: " + "; ".join(f"{n} {b:,.0f} input rows/s" for n, b in best.items()) + ".",
        "",
        "* wall: from the readers' start (the consumers' assignment) to the last "
        "commit, no interpreter start-up (the benchmarks count input rows/s so).",
        "* cores busy: every process's CPU-s (client, broker, Postgres) over the wall.",
        "* busy s: the wall time each thread spent working, not waiting on its queues "
        "(read: both readers' together for the join). A thread busy most of the wall "
        "is the one the others wait for; its time stretches beyond its CPU-s when it "
        "waits for the GIL or a core.",
        "",
        "## Command",
        "",
        "```",
        "python -m benchmarks.floor.pipelined",
        "```",
        "",
        "## Machine",
        "",
        *(f"* {k}: {v}" for k, v in common.run_facts(date).items() if k != "packages"),
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--partitions", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--scenarios", nargs="+", choices=sorted(SCENARIOS), default=list(SCENARIOS))
    add_common_args(ap)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from confluent_kafka.admin import AdminClient

    args = parse_args(argv)
    results: dict[str, list[dict[str, Any]]] = {}
    for name in args.scenarios:
        topics = _produce(args, name)
        try:
            results[name] = []
            for i in range(args.runs):
                result = run_once(args, topics, SCENARIOS[name])
                print(f"{name} run {i + 1}: {result}", flush=True)
                what, expected = EXPECTED[name]
                if args.rows == 1_000_000 and result["out_rows"] != expected:
                    raise SystemExit(f"{name}: {result['out_rows']} {what}, expected {expected}")
                events = 2 * args.rows if name == "hopping" else args.rows
                if name != "join" and result["check"] != events:
                    raise SystemExit(f"the windows hold {result['check']} events, not {events}")
                results[name].append(result)
        finally:
            AdminClient({"bootstrap.servers": args.bootstrap_servers}).delete_topics([*topics])
    markdown = render(results, args)
    print(markdown)
    save_full_run(args, "pipelined", markdown, {"runs": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
