"""The libraries' own cost: what no engine built on them goes below, per 1M events.

Issue 20 asks for 2.0 CPU-s per 1M rows (Kafka -> Postgres append) and
300k input rows/s for windows and joins, or, where a figure is not reached,
the library's own cost, measured. This harness measures each library call
sluice's hot path makes, alone, on the benchmarks' own data and settings:

* ``start``: a Python interpreter importing the libraries the append path
  loads (pyarrow, numpy, confluent-kafka, the ADBC driver, prometheus-client,
  msgspec), and the same with sluice's modules (``import sluice.cli`` and
  the connectors a Kafka -> Postgres pipeline opens);
* ``consume``: confluent-kafka handing out the 1M messages of
  ``kafka_to_postgres``'s topic with sluice's consumer settings, and the two
  per-message calls any engine needs (the value and the timestamp);
* ``decode``: pyarrow's JSON reader over the same payloads, in 50k-message
  batches, with sluice's options (explicit schema, threads, 4 MiB blocks);
* ``copy``: ADBC's binary COPY of the decoded rows into a Postgres table,
  one transaction per 50k rows;
* ``merge_copy``: the tumbling benchmark's output, 752,488 windows, copied
  straight into a table keyed on (user_id, window_start), per 50k windows:
  what a ``merge`` target runs for a batch of new keys (every window of a
  run that does not replay);
* ``upsert``: the same windows staged by COPY into a temporary table and
  merged with ``INSERT ... ON CONFLICT DO UPDATE``: what a ``merge`` target
  runs for a batch holding a key the table has (a replay, a re-emitted
  window), per 50k windows;
* ``join_copy``: the join benchmark's 439,791 pairs, appended by COPY;
* ``window_fold``, ``join_match``: the window's group-by and the join's hash
  join over all the events at once, in Arrow (Acero), as sluice's stages
  compute them (a lower bound: sluice works batch by batch).

Each step runs in its own child process, which measures its own CPU
(``getrusage``: all its threads) around the work alone, and the servers'
CPU (the broker, every Postgres process) from ``/proc`` around it. The
derived rows: the append's client floor (start + consume + decode + copy),
and for the window and the join the CPU every process on the machine spends
on 1M events (client, broker, Postgres) over the two cores: the shortest
wall time those libraries and servers allow, hence the highest rows/s.

    python -m benchmarks.floor.run               # 1M events
    python -m benchmarks.floor.run --rows 50000  # quick check
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import common

HERE = Path(__file__).resolve().parent
BATCH = 50_000  # sluice's max_batch_rows default
WINDOWS = 752_488  # the tumbling benchmark's windows for 1M events (its results of 2026-12-07)
PAIRS = 439_791  # the join benchmark's pairs for 1M events (its results of 2026-12-07)
HOPPING_WINDOWS = 1_505_271  # --window hopping's windows for 1M events (2026-12-08)
SESSIONS = 741_234  # --window session's sessions for 1M events (2026-12-08)
CORES = os.cpu_count() or 2
CLK_TCK = os.sysconf("SC_CLK_TCK")

LIBRARIES = (
    "import pyarrow, pyarrow.json, pyarrow.compute, numpy, confluent_kafka, "
    "adbc_driver_postgresql.dbapi, prometheus_client, msgspec"
)
SLUICE = (
    "import sluice.cli, sluice.engine.runner, sluice.connectors.kafka.source, "
    "sluice.connectors.postgres.target, sluice.formats.json"
)


# ---------------------------------------------------------------- measuring


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _proc_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def _pids(comm: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip().startswith(comm):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _servers_cpu() -> dict[str, float]:
    """CPU-s so far of the broker (tansu) and of every Postgres process.

    Postgres processes that end between two readings (a backend closing)
    take their CPU with them; the steps keep their connection open."""
    return {
        "broker": sum(_proc_cpu(p) for p in _pids("tansu")),
        "postgres": sum(_proc_cpu(p) for p in _pids("postgres")),
    }


class Meter:
    """Client CPU (this process, all threads), server CPU and wall around a block."""

    def __enter__(self) -> Meter:
        self._servers = _servers_cpu()
        self._cpu = _cpu_self()
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.perf_counter() - self._wall
        self.client_cpu_s = _cpu_self() - self._cpu
        after = _servers_cpu()
        self.broker_cpu_s = after["broker"] - self._servers["broker"]
        self.postgres_cpu_s = after["postgres"] - self._servers["postgres"]

    def result(self, **extra: Any) -> dict[str, Any]:
        return {
            "wall_s": self.wall_s,
            "client_cpu_s": self.client_cpu_s,
            "broker_cpu_s": self.broker_cpu_s,
            "postgres_cpu_s": self.postgres_cpu_s,
            **extra,
        }


# ---------------------------------------------------------------- the steps (child side)


def _payloads(rows: int, seed: int) -> list[bytes]:
    return [payload for _, payload in common.events(rows, seed)]


def _json_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.int64()),
            ("user_id", pa.int64()),
            ("event_type", pa.string()),
            ("amount", pa.float64()),
            ("country", pa.string()),
            ("session", pa.string()),
            ("ts", pa.string()),
        ]
    )


def _decode(chunks: Sequence[Sequence[bytes]]) -> list[Any]:
    import pyarrow.json as pajson

    from sluice.formats.json import _BLOCK_BYTES

    parse = pajson.ParseOptions(explicit_schema=_json_schema(), unexpected_field_behavior="infer")
    tables = []
    for chunk in chunks:
        buf = b"\n".join(chunk)
        block = _BLOCK_BYTES if len(buf) > _BLOCK_BYTES else max(len(buf) + 1, 1 << 16)
        read = pajson.ReadOptions(use_threads=True, block_size=block)
        tables.append(pajson.read_json(io.BytesIO(buf), read_options=read, parse_options=parse))
    return tables


def _chunks(items: Sequence[Any], size: int = BATCH) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def step_window_fold(args: argparse.Namespace) -> dict[str, Any]:
    """The tumbling benchmark's 1M events grouped by (user, minute) with its five
    aggregates in one Acero group-by (sluice folds per batch into the open
    windows: more work than this)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from benchmarks.kafka_tumbling_to_postgres import run as tumbling

    users, amounts, times = [], [], []
    for uid, payload, ts_ms in tumbling.timed_events(args.rows, args.seed):
        users.append(uid)
        amounts.append(float(payload.split(b'"amount":', 1)[1].split(b",", 1)[0]))
        times.append(ts_ms * 1000)
    data = pa.table(
        {
            "user_id": pa.array(users, pa.int64()),
            "amount": pa.array(amounts, pa.float64()),
            "ts": pa.array(times, pa.int64()),
        }
    )
    with Meter() as meter:
        start = pc.multiply(pc.divide(data["ts"], 60_000_000), 60_000_000)
        keyed = data.append_column("window_start", start)
        out = keyed.group_by(["user_id", "window_start"], use_threads=False).aggregate(
            [
                ("amount", "count"),
                ("amount", "sum"),
                ("amount", "mean"),
                ("amount", "min"),
                ("amount", "max"),
            ]
        )
    return meter.result(rows=data.num_rows, windows=out.num_rows)


def step_join_match(args: argparse.Namespace) -> dict[str, Any]:
    """The join benchmark's orders and payments matched on order_id within
    ±5 min in one Arrow hash join and filter (sluice joins per batch against
    its buffers: more work than this)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from benchmarks.kafka_join_to_postgres import run as joins

    ev = joins.generate(args.rows, args.seed)
    order_cols = ["order_id", "user_id", "amount", "currency", "ts"]
    payment_cols = ["payment_id", "order_id", "paid", "method", "pts"]
    orders = pa.table(dict(zip(order_cols, map(list, zip(*ev.orders, strict=True)), strict=True)))
    payments = pa.table(
        dict(zip(payment_cols, map(list, zip(*ev.payments, strict=True)), strict=True))
    )
    with Meter() as meter:
        joined = orders.join(payments, "order_id", join_type="inner", use_threads=False)
        near = pc.less_equal(pc.abs(pc.subtract(joined["pts"], joined["ts"])), 300_000)
        pairs = joined.filter(near)
    return meter.result(rows=orders.num_rows + payments.num_rows, pairs=pairs.num_rows)


def step_consume(args: argparse.Namespace) -> dict[str, Any]:
    import confluent_kafka as ck
    import numpy as np

    from sluice.connectors.kafka.source import FETCHING

    # sluice's consumer settings (connectors/kafka/source.py, KafkaSource.open).
    consumer = ck.Consumer(
        {
            "bootstrap.servers": args.bootstrap_servers,
            "group.id": f"floor-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            **FETCHING,
            "enable.partition.eof": True,
        }
    )
    consumer.assign(
        [ck.TopicPartition(args.topic, p, ck.OFFSET_BEGINNING) for p in range(args.partitions)]
    )
    got = 0
    with Meter() as meter:
        while got < args.rows:
            msgs = consumer.consume(num_messages=BATCH, timeout=1.0)
            np.fromiter((m.timestamp()[1] for m in msgs), dtype=np.int64, count=len(msgs))
            values = [m.value() for m in msgs]
            got += len(values) - values.count(None)  # end-of-partition events have none
    consumer.close()
    return meter.result(messages=got)


def step_decode(args: argparse.Namespace) -> dict[str, Any]:
    chunks = _chunks(_payloads(args.rows, args.seed))
    _decode([chunks[0][:100]])  # imports and Arrow's thread pool, as in a running engine
    with Meter() as meter:
        tables = _decode(chunks)
    return meter.result(rows=sum(t.num_rows for t in tables))


def _connect(url: str) -> Any:
    import adbc_driver_postgresql.dbapi as pg

    return pg.connect(url)


def _ingest(conn: Any, table: str, chunks: Sequence[Any], *, merge_sql: str | None = None) -> int:
    written = 0
    for chunk in chunks:
        with conn.cursor() as cur:
            if merge_sql is None:
                cur.adbc_ingest(table, chunk, mode="append")
            else:
                cur.adbc_ingest("floor_stage", chunk, mode="replace", temporary=True)
                cur.execute(merge_sql)
        conn.commit()
        written += chunk.num_rows
    return written


def _create(conn: Any, prefix: str, columns: str) -> str:
    """A new table ``public.<prefix>_<random>`` with ``columns`` (SQL); its name."""
    table = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with conn.cursor() as cur:
        cur.execute(f"CREATE TABLE public.{table} ({columns})")
    conn.commit()
    return table


def step_copy(args: argparse.Namespace) -> dict[str, Any]:
    tables = _decode(_chunks(_payloads(args.rows, args.seed)))
    conn = _connect(args.postgres_url)
    table = _create(
        conn,
        "floor_copy",
        "id bigint, user_id bigint, event_type text, amount double precision, "
        "country text, session text, ts text",
    )
    with Meter() as meter:
        rows = _ingest(conn, table, tables)
    _drop(conn, table)
    return meter.result(rows=rows)


def _windows(n: int) -> Any:
    """``n`` rows shaped as the tumbling benchmark's output, distinct keys."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(7)
    start_us = np.arange(n, dtype=np.int64) // 1000 * 60_000_000 + 1_767_225_600_000_000
    amount = rng.uniform(0.5, 500.0, n)
    return pa.table(
        {
            "user_id": pa.array(np.arange(n, dtype=np.int64) % 1000 + 1),
            "window_start": pa.array(start_us, pa.timestamp("us", "UTC")),
            "window_end": pa.array(start_us + 60_000_000, pa.timestamp("us", "UTC")),
            "n": pa.array(rng.integers(1, 4, n)),
            "amount_sum": pa.array(amount * 2),
            "amount_avg": pa.array(amount),
            "amount_min": pa.array(amount / 2),
            "amount_max": pa.array(amount * 1.5),
            "_sluice_seq": pa.array(np.arange(n, dtype=np.int64)),
        }
    )


_WINDOW_TYPES = {
    "user_id": "bigint",
    "window_start": "timestamptz",
    "window_end": "timestamptz",
    "n": "bigint",
}


def _windows_table(conn: Any, cols: Sequence[str]) -> str:
    """A new table for :func:`_windows` rows, keyed as the tumbling benchmark's."""
    return _create(
        conn,
        "floor_windows",
        ", ".join(f"{c} {_WINDOW_TYPES.get(c, 'double precision')}" for c in cols)
        + ", PRIMARY KEY (user_id, window_start)",
    )


def step_merge_copy(args: argparse.Namespace) -> dict[str, Any]:
    data = _windows(args.windows)
    data = data.drop_columns(["_sluice_seq"])
    conn = _connect(args.postgres_url)
    table = _windows_table(conn, data.column_names)
    with Meter() as meter:
        rows = _ingest(conn, table, _tables(data))
    _drop(conn, table)
    return meter.result(rows=rows)


def step_upsert(args: argparse.Namespace) -> dict[str, Any]:
    n = args.windows
    data = _windows(n)
    conn = _connect(args.postgres_url)
    cols = [c for c in data.column_names if c != "_sluice_seq"]
    types = _WINDOW_TYPES
    table = _windows_table(conn, cols)
    select = ", ".join(f"{c}::{types.get(c, 'double precision')}" for c in cols)
    # What sluice's merge target runs (connectors/postgres/target.py, _apply).
    merge = (
        f"INSERT INTO public.{table} ({', '.join(cols)}) "
        f"SELECT DISTINCT ON (user_id, window_start) {select} FROM floor_stage "
        "ORDER BY user_id, window_start, _sluice_seq DESC "
        "ON CONFLICT (user_id, window_start) DO UPDATE SET "
        + ", ".join(f"{c} = EXCLUDED.{c}" for c in cols if c not in ("user_id", "window_start"))
    )
    with Meter() as meter:
        rows = _ingest(conn, table, _tables(data), merge_sql=merge)
    _drop(conn, table)
    return meter.result(rows=rows)


def _pairs(n: int) -> Any:
    """``n`` rows shaped as the join benchmark's output (an order and its payment)."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(11)
    ts = pa.array(np.arange(n, dtype=np.int64) * 1_000 + 1_767_225_600_000_000, pa.timestamp("us"))
    methods = pa.array(rng.choice(["card", "paypal", "bank", "wallet"], n))
    return pa.table(
        {
            "left_order_id": pa.array(np.arange(1, n + 1, dtype=np.int64)),
            "left_user_id": pa.array(rng.integers(1, 10_000, n)),
            "left_amount": pa.array(rng.uniform(5.0, 500.0, n)),
            "left_currency": pa.array(rng.choice(["EUR", "USD", "GBP"], n)),
            "left_ts": ts,
            "right_payment_id": pa.array(np.arange(1, n + 1, dtype=np.int64)),
            "right_order_id": pa.array(np.arange(1, n + 1, dtype=np.int64)),
            "right_amount": pa.array(rng.uniform(5.0, 500.0, n)),
            "right_method": methods,
            "right_ts": ts,
        }
    )


def step_join_copy(args: argparse.Namespace) -> dict[str, Any]:
    data = _pairs(args.pairs)
    conn = _connect(args.postgres_url)
    table = _create(
        conn,
        "floor_pairs",
        "left_order_id bigint, left_user_id bigint, left_amount double precision, "
        "left_currency text, left_ts timestamp, right_payment_id bigint, right_order_id bigint, "
        "right_amount double precision, right_method text, right_ts timestamp",
    )
    with Meter() as meter:
        rows = _ingest(conn, table, _tables(data))
    _drop(conn, table)
    return meter.result(rows=rows)


def _tables(data: Any) -> list[Any]:
    """``data`` as tables of ``BATCH`` rows (one transaction each, as sluice's rounds)."""
    return [data.slice(i, BATCH) for i in range(0, data.num_rows, BATCH)]


def _drop(conn: Any, table: str) -> None:
    with conn.cursor() as cur:
        cur.execute(f"DROP TABLE public.{table}")
    conn.commit()
    conn.close()


STEPS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "consume": step_consume,
    "decode": step_decode,
    "copy": step_copy,
    "merge_copy": step_merge_copy,
    "upsert": step_upsert,
    "join_copy": step_join_copy,
    "window_fold": step_window_fold,
    "join_match": step_join_match,
}


# ---------------------------------------------------------------- the parent


def _child(step: str, settings: argparse.Namespace, extra: Sequence[str] = ()) -> dict[str, Any]:
    argv = [
        sys.executable,
        "-m",
        "benchmarks.floor.run",
        "--step",
        step,
        "--rows",
        str(settings.rows),
        "--seed",
        str(settings.seed),
        "--windows",
        str(settings.windows),
        "--pairs",
        str(settings.pairs),
        "--partitions",
        str(settings.partitions),
        "--bootstrap-servers",
        settings.bootstrap_servers,
        "--postgres-url",
        settings.postgres_url,
        *extra,
    ]
    out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=1800)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _start(code: str, runs: int = 5) -> dict[str, Any]:
    """The CPU of an interpreter running ``code``, from wait4 (median of ``runs``)."""
    cpus, walls = [], []
    for _ in range(runs):
        began = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", code])
        _, status, usage = os.wait4(proc.pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, code
        walls.append(time.perf_counter() - began)
        cpus.append(usage.ru_utime + usage.ru_stime)
    return {
        "wall_s": sorted(walls)[runs // 2],
        "client_cpu_s": sorted(cpus)[runs // 2],
        "broker_cpu_s": 0.0,
        "postgres_cpu_s": 0.0,
    }


def producer_settings(args: argparse.Namespace, rows: int) -> Any:
    """``kafka_to_postgres``'s settings for producing ``rows`` events with ``args``."""
    from benchmarks.kafka_to_postgres import run as k2pg

    return k2pg.Settings(
        rows=rows,
        engines=(),
        bootstrap_servers=args.bootstrap_servers,
        postgres_url=args.postgres_url,
        partitions=args.partitions,
        seed=args.seed,
        poll_interval_s=0.5,
        timeout_s=600,
        stall_timeout_s=60,
        stop_grace_s=10,
        results_dir=args.results_dir,
        work_dir=Path("/tmp"),
        keep=False,
    )


def _topic(settings: argparse.Namespace) -> str:
    from benchmarks.kafka_to_postgres import run as k2pg

    topic = f"bench_floor_{datetime.now(UTC):%Y%m%d%H%M%S}{uuid.uuid4().hex[:4]}"
    k2pg.produce(producer_settings(settings, settings.rows), topic)
    return topic


def measure(settings: argparse.Namespace) -> dict[str, dict[str, Any]]:
    steps: dict[str, dict[str, Any]] = {}
    print("start ...", flush=True)
    steps["start (libraries)"] = _start(LIBRARIES)
    steps["start (sluice)"] = _start(f"{LIBRARIES}; {SLUICE}")
    print("producing ...", flush=True)
    topic = _topic(settings)
    try:
        for name in (*STEPS,):
            print(f"{name} ...", flush=True)
            extra = ["--topic", topic] if name == "consume" else []
            steps[name] = _child(name, settings, extra)
            print(f"  {steps[name]}", flush=True)
    finally:
        from confluent_kafka.admin import AdminClient

        AdminClient({"bootstrap.servers": settings.bootstrap_servers}).delete_topics([topic])
    return steps


def derive(steps: dict[str, dict[str, Any]], settings: argparse.Namespace) -> dict[str, Any]:
    """The floors (see the module docstring), per 1M input events."""
    m = 1_000_000 / settings.rows

    def cpu(name: str, *kinds: str) -> float:
        return float(sum(steps[name][f"{k}_cpu_s"] for k in kinds))

    start = cpu("start (libraries)", "client")
    scaled = {
        # Inputs scale with the events; the outputs are the benchmarks' counts for 1M events.
        "consume": cpu("consume", "client") * m,
        "broker": cpu("consume", "broker") * m,
        "decode": cpu("decode", "client") * m,
        "copy": cpu("copy", "client") * m,
        "copy_pg": cpu("copy", "postgres") * m,
        "merge_copy": cpu("merge_copy", "client") * WINDOWS / settings.windows,
        "merge_copy_pg": cpu("merge_copy", "postgres") * WINDOWS / settings.windows,
        "upsert": cpu("upsert", "client") * WINDOWS / settings.windows,
        "upsert_pg": cpu("upsert", "postgres") * WINDOWS / settings.windows,
        "join_copy": cpu("join_copy", "client") * PAIRS / settings.pairs,
        "join_copy_pg": cpu("join_copy", "postgres") * PAIRS / settings.pairs,
        "window_fold": cpu("window_fold", "client") * m,
        "join_match": cpu("join_match", "client") * m,
    }
    append_client = start + scaled["consume"] + scaled["decode"] + scaled["copy"]
    # The benchmarks count input rows/s from the consumer group's start on:
    # the start-up is not in the wall time the ceilings bound.
    reading = scaled["consume"] + scaled["broker"] + scaled["decode"]
    window_machine = (
        reading + scaled["window_fold"] + scaled["merge_copy"] + scaled["merge_copy_pg"]
    )
    join_machine = reading + scaled["join_match"] + scaled["join_copy"] + scaled["join_copy_pg"]
    return {
        "per_1m": scaled,
        "start": start,
        "append_client_cpu_s": append_client,
        "window_machine_cpu_s": window_machine,
        "window_max_rows_per_s": 1_000_000 / (window_machine / CORES),
        "join_machine_cpu_s": join_machine,
        "join_max_rows_per_s": 1_000_000 / (join_machine / CORES),
        "cores": CORES,
    }


def render(steps: dict[str, dict[str, Any]], floors: dict[str, Any], settings: Any) -> str:
    date = common.utc_date()
    rows = []
    sizes = {
        "consume": f"{settings.rows:,} messages",
        "decode": f"{settings.rows:,} payloads",
        "copy": f"{settings.rows:,} rows",
        "merge_copy": f"{settings.windows:,} windows",
        "upsert": f"{settings.windows:,} windows",
        "join_copy": f"{settings.pairs:,} pairs",
        "window_fold": f"{settings.rows:,} events, one group-by",
        "join_match": f"{settings.rows:,} events, one hash join",
    }
    for name, r in steps.items():
        rows.append(
            [
                name,
                sizes.get(name, "one interpreter (median of 5)"),
                f"{r['wall_s']:.2f}",
                f"{r['client_cpu_s']:.2f}",
                f"{r['broker_cpu_s']:.2f}",
                f"{r['postgres_cpu_s']:.2f}",
            ]
        )
    p = floors["per_1m"]
    lines = [
        f"# The libraries' own cost per 1M events ({date})",
        "",
        "Each library call of sluice's hot path alone, on the benchmarks' data and",
        "settings, in its own process (`benchmarks/floor/run.py`; how in the module",
        "docstring). CPU-s: the client process (every thread), the broker (tansu),",
        "every Postgres process.",
        "",
        common.markdown_table(
            ["step", "work", "wall s", "client CPU-s", "broker CPU-s", "Postgres CPU-s"], rows
        ),
        "",
        "## Floors per 1M input events",
        "",
        common.markdown_table(
            ["figure", "issue 20 asks", "the libraries alone allow", "made of"],
            [
                [
                    "append, CPU-s of the engine process",
                    "<= 2.0",
                    f"{floors['append_client_cpu_s']:.2f}",
                    f"start {floors['start']:.2f} + consume {p['consume']:.2f} + "
                    f"decode {p['decode']:.2f} + COPY {p['copy']:.2f}",
                ],
                [
                    "tumbling window, input rows/s",
                    ">= 300,000",
                    f"{floors['window_max_rows_per_s']:,.0f}",
                    f"{floors['window_machine_cpu_s']:.2f} CPU-s on {floors['cores']} cores: "
                    f"consume {p['consume']:.2f}, broker {p['broker']:.2f}, "
                    f"decode {p['decode']:.2f}, fold {p['window_fold']:.2f}, "
                    f"COPY of {WINDOWS:,} new windows {p['merge_copy']:.2f} client + "
                    f"{p['merge_copy_pg']:.2f} Postgres (their upsert, on a replay: "
                    f"{p['upsert']:.2f} + {p['upsert_pg']:.2f})",
                ],
                [
                    "interval join, input rows/s",
                    ">= 300,000",
                    f"{floors['join_max_rows_per_s']:,.0f}",
                    f"{floors['join_machine_cpu_s']:.2f} CPU-s on {floors['cores']} cores: "
                    f"the same reading (no start), match {p['join_match']:.2f}, "
                    f"COPY of {PAIRS:,} pairs {p['join_copy']:.2f} client + "
                    f"{p['join_copy_pg']:.2f} Postgres",
                ],
            ],
        ),
        "",
        "The rows/s ceilings assume every CPU-s above runs in parallel on both cores",
        "with nothing else, from the consumer group's start on (as the benchmarks",
        "count input rows/s: the start-up is left out). The fold and the match are lower bounds of the stages'",
        "library work (one group-by, one hash join over all the events; an engine",
        "folds and matches batch by batch against its open state); the engine's own",
        "work (state checkpoints, watermarks, the loop) comes on top. The window and",
        "join figures count the broker and Postgres because they run on the same two",
        "cores as the engine here, as in every benchmark of this repository.",
        "",
        "## Command",
        "",
        "```",
        common.command_line(),
        "```",
        "",
        "## Machine",
        "",
        *[f"* {k}: {v}" for k, v in common.machine_facts().items()],
        "",
    ]
    return "\n".join(lines)


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """The services and the results folder, as every floor harness takes them."""
    ap.add_argument(
        "--bootstrap-servers", default=os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:19092")
    )
    ap.add_argument(
        "--postgres-url",
        default=os.environ.get("POSTGRES_URL", "postgresql://postgres@127.0.0.1:55432/postgres"),
    )
    ap.add_argument("--results-dir", type=Path, default=HERE.parent / "results")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--step", choices=sorted(STEPS))
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--windows", type=int, default=None)
    ap.add_argument("--pairs", type=int, default=None)
    ap.add_argument("--partitions", type=int, default=3)
    ap.add_argument("--topic")
    add_common_args(ap)
    args = ap.parse_args(argv)
    scale = args.rows / 1_000_000
    args.windows = args.windows or max(1, round(WINDOWS * scale))
    args.pairs = args.pairs or max(1, round(PAIRS * scale))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    if settings.step:  # a child: one step, its JSON on the last line of stdout
        print(json.dumps(STEPS[settings.step](settings)))
        return 0
    steps = measure(settings)
    floors = derive(steps, settings)
    markdown = render(steps, floors, settings)
    print(markdown)
    save_full_run(settings, "floor", markdown, {"steps": steps, "floors": floors})
    return 0


def save_full_run(args: argparse.Namespace, name: str, markdown: str, data: dict[str, Any]) -> None:
    """Write ``<name>-<date>.{md,json}`` (``data`` and the settings) into the
    results folder: only for a full run (1M rows); a smaller one is a check."""
    if args.rows != 1_000_000:
        return
    settings = {k: str(v) for k, v in vars(args).items()}
    path = common.write_results(
        args.results_dir, f"{name}-{common.utc_date()}", markdown, {**data, "settings": settings}
    )
    print(f"results: {path}")


if __name__ == "__main__":
    raise SystemExit(main())
