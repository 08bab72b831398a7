"""End-to-end latency at a fixed produce rate: Kafka JSON -> Postgres append,
sluice against the peers Bytewax and Quix Streams.

    python -m benchmarks.latency.run [--rates 1000,20000,100000] [--duration 60]
        [--engines sluice,bytewax,quix]
    python -m benchmarks.latency.run --backlog 1000000 [--engines sluice,bytewax,quix]

For each engine, for each rate (a new topic and a new table each time):

1. create the table: ``kafka_to_postgres``'s columns, plus ``seq`` and
   ``produced_us`` (from the payload) and ``seen_at timestamptz DEFAULT
   clock_timestamp()``, which Postgres fills as the engine's COPY / INSERT
   writes each row;
2. start the engine (sluice: ``kafka_to_postgres``'s template; the peers: a
   small program each, ``bytewax_append.py`` / ``quix_append.py``, in their
   own venvs from ``benchmarks/setup_peers.sh``) and wait until its consumer
   group is Stable;
3. produce ``rate x duration`` messages from a pacing thread (confluent-kafka,
   ``linger.ms`` 5): each payload is one of ``common.events``' events with
   ``seq`` and ``produced_us`` (the wall clock, in µs, just before
   ``produce()``) in front;
4. wait until every row is in the table (or the engine falls ``--drain`` s
   behind), stop the engine, and read, per row, ``seen_at - produced_us``:
   p50 / p99 / max, and the rows/s the engine sustained.

Writes ``benchmarks/results/latency-<date>.{md,json}``.

``--backlog N`` measures full-speed throughput instead, on the same table,
payloads and engine programs: for each engine, a new topic and table, all
``N`` messages produced first (unpaced), then the engine started and waited
for until every row landed (or no row landed for ``--drain`` s); rows/s =
``N`` / (last ``seen_at`` - the harness saw the engine ready), and over the
``seen_at`` span, CPU-s per 1M rows and peak RSS. Writes
``benchmarks/results/throughput-<date>.{md,json}``.

See benchmarks/README.md (latency) for what the figures mean and the
approximation ``seen_at`` makes.
"""

from __future__ import annotations

import argparse
import itertools
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import confluent_kafka as ck
import psycopg
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from benchmarks import common
from benchmarks.kafka_to_postgres import run as k2pg

HERE = Path(__file__).resolve().parent
BENCHMARK = "latency"
#: The results' name in backlog mode.
BACKLOG_BENCHMARK = "throughput"
PREFIX = "bench-lat"
ENGINES = ("sluice", "bytewax", "quix")
PEERS_DIR = Path(os.environ.get("PEERS_DIR", "/opt/peers"))
PEER_PYTHON = {
    "bytewax": PEERS_DIR / "bytewax" / "bin" / "python",
    "quix": PEERS_DIR / "quixstreams" / "bin" / "python",
}
PEER_PROGRAM = {"bytewax": HERE / "bytewax_append.py", "quix": HERE / "quix_append.py"}
PEER_PACKAGE = {"bytewax": "bytewax", "quix": "quixstreams"}
#: Engines that assign their partitions (no consumer group to watch): ready
#: once their log has a line ``ready``.
LOG_READY = ("bytewax",)
PACKAGES = ("sluice", "confluent-kafka", "psycopg", "pyarrow", "adbc-driver-postgresql")
#: The events a payload is drawn from, in turn (generating each anew would cap
#: the producer below 100k msgs/s).
POOL = 10_000
#: Seconds between the harness's polls of the engine's table.
POLL_S = 0.5
#: An engine kept up when its last row landed at most this long after it was sent.
KEPT_UP_LAG_S = 2.0
#: The table: seq and produced_us first, then kafka_to_postgres's columns, then seen_at.
COLUMNS = (
    ("seq", "bigint"),
    ("produced_us", "bigint"),
    *common.EVENT_COLUMNS,
    ("seen_at", "timestamptz DEFAULT clock_timestamp()"),
)
#: What the peers insert (no _event_ts: it is sluice's message timestamp).
PEER_COLUMNS = tuple(name for name, _ in COLUMNS[:-1] if name != "_event_ts")

LATENCY_SQL = """
SELECT count(*), count(DISTINCT seq),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY l),
       percentile_cont(0.99) WITHIN GROUP (ORDER BY l),
       max(l), min(l),
       (extract(epoch FROM max(seen_at)) * 1e6 - min(produced_us)) / 1e6,
       extract(epoch FROM max(seen_at))
FROM (SELECT seq, produced_us, seen_at,
             (extract(epoch FROM seen_at) * 1e6 - produced_us) / 1e3 AS l
      FROM {table}) t
"""


@dataclass(frozen=True)
class Settings:
    rates: tuple[int, ...]  # () in backlog mode
    duration_s: float  # 0 in backlog mode
    backlog: int  # messages produced before the engine starts; 0: the latency mode
    engines: tuple[str, ...]
    bootstrap_servers: str
    postgres_url: str
    partitions: int
    seed: int
    drain_s: float
    ready_timeout_s: float
    stop_grace_s: float
    results_dir: Path
    work_dir: Path
    keep: bool


# ---------------------------------------------------------------- producing


@dataclass
class Produced:
    """What the producer sent (the pacing thread, or the backlog unpaced)."""

    target_rate: int | None  # None: unpaced (the backlog)
    messages: int = 0
    started_at: float = 0.0  # time.time()
    ended_at: float = 0.0  # after the final flush
    sent_last_at: float = 0.0  # time.time() of the last produce() call
    failed: int = 0
    max_behind: int = 0  # most messages the thread was behind its schedule
    unflushed: int = 0  # still undelivered when the final flush gave up

    @property
    def rate(self) -> float:
        """Messages per second from the first send to the last (flush left out)."""
        return self.messages / max(self.sent_last_at - self.started_at, 1e-9)


def payloads(seed: int) -> list[tuple[bytes, bytes]]:
    """``(key, payload without its opening brace)`` of :data:`POOL` events."""
    return [(str(uid).encode(), payload[1:]) for uid, payload in common.events(POOL, seed)]


def produce_paced(
    settings: Settings, topic: str, rate: int | None, out: Produced, total: int | None = None
) -> None:
    """Send ``total`` (default ``rate x duration``) messages to ``topic`` at
    ``rate`` per second: each tick of about 1 ms sends what the schedule says is
    due. ``rate`` None: as fast as the producer goes (the backlog), 10k per tick."""
    producer = ck.Producer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "linger.ms": 5,
            "batch.num.messages": 10_000,
            "queue.buffering.max.messages": 1_000_000,
        }
    )

    def on_delivery(err: ck.KafkaError | None, _msg: ck.Message) -> None:
        if err is not None:
            out.failed += 1

    # Connected, with the topic's metadata, before the clock starts: the
    # producer's own start-up is not the engine's latency.
    producer.list_topics(topic, timeout=30)
    pool = payloads(settings.seed)
    if total is None:
        assert rate is not None
        total = int(rate * settings.duration_s)
    seq = 0
    out.started_at = start = time.time()
    cycle = itertools.cycle(pool)
    while seq < total:
        if rate is None:
            due = min(total, seq + 10_000)
        else:
            due = min(total, int((time.time() - start) * rate) + 1)
            out.max_behind = max(out.max_behind, due - seq)
        while seq < due:
            key, rest = next(cycle)
            seq += 1
            now_us = time.time_ns() // 1000
            value = b'{"seq":%d,"produced_us":%d,%s' % (seq, now_us, rest)
            while True:
                try:
                    producer.produce(topic, value, key=key, on_delivery=on_delivery)
                    break
                except BufferError:
                    producer.poll(0.01)
        producer.poll(0)
        ahead = 0.0 if rate is None else start + seq / rate - time.time()
        if ahead > 0:
            time.sleep(min(ahead, 0.001))
    out.messages = seq
    out.sent_last_at = time.time()
    out.unflushed = producer.flush(60 if rate is not None else 300)
    out.ended_at = time.time()


# ---------------------------------------------------------------- engines


@dataclass
class RateResult:
    engine: str
    rate: int
    topic: str
    table: str
    outcome: str = "ok"  # ok | not ready | fell behind | exited early
    produced: dict[str, Any] = field(default_factory=dict)
    rows: int = 0
    distinct: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    min_ms: float | None = None
    rows_per_s: float | None = None  # rows / (last seen_at - first produced_us)
    lag_at_end_s: float | None = None  # last seen_at - the producer's last send
    kept_up: bool | None = None
    ready_s: float | None = None
    cpu_s: float | None = None
    peak_rss_mb: float | None = None
    log: str = ""


def engine_argv(
    engine: str, settings: Settings, toml: Path, topic: str, group: str, table: str
) -> list[str]:
    if engine == "sluice":
        # No --stop-after-idle-ms: it must wait for the producer; SIGTERM ends it.
        return [str(Path(sys.executable).with_name("flow")), "consume", str(toml)]
    return [
        str(PEER_PYTHON[engine]), str(PEER_PROGRAM[engine]),
        "--bootstrap-servers", settings.bootstrap_servers, "--topic", topic,
        "--group", group, "--postgres-url", settings.postgres_url, "--table", table,
        "--columns", ",".join(PEER_COLUMNS), "--state-dir", str(settings.work_dir / "state"),
    ]  # fmt: skip


def check_engine(engine: str) -> str | None:
    """The engine's version, None when a peer is not installed."""
    if engine == "sluice":
        return common.check_engine("sluice")
    if not PEER_PYTHON[engine].exists():
        return None
    return common.package_versions(PEER_PYTHON[engine], [PEER_PACKAGE[engine]])[
        PEER_PACKAGE[engine]
    ]


def prepare(
    settings: Settings,
    conn: psycopg.Connection[Any],
    admin: AdminClient,
    engine: str,
    label: str,
    name: str,
    table: str,
) -> common.MonitoredProcess:
    """Create the topic ``name`` and the table ``public.<table>``, render the
    engine's TOML (sluice) and return its process, not yet started (``label``:
    the rate or ``backlog``, in the file names)."""
    for fut in admin.create_topics([NewTopic(name, settings.partitions, 1)]).values():
        fut.result(timeout=30)
    common.recreate_table(conn, f"public.{table}", COLUMNS)
    toml = settings.work_dir / f"{engine}-{label}.toml"
    # kafka_to_postgres's pipeline: pipeline name = group = topic name.
    toml.write_text(
        k2pg.render_template(k2pg.TEMPLATE, settings, name, name, table, topic=name)  # type: ignore[arg-type]
    )
    return common.MonitoredProcess(
        engine_argv(engine, settings, toml, name, name, table),
        settings.work_dir / f"{engine}-{label}.log",
    )


def wait_ready(
    settings: Settings,
    admin: AdminClient,
    engine: str,
    proc: common.MonitoredProcess,
    group: str,
    also: Callable[[], bool] = lambda: False,
) -> str | None:
    """Poll every 0.25 s until the engine is ready (its consumer group Stable;
    Bytewax: ``ready`` in its log) or ``also()``; the outcome when it exits
    or is not ready within ``--ready-timeout``, else None."""

    def ready() -> bool:
        if engine in LOG_READY:
            # It never joins its group: it says so in its log.
            text = proc.log_path.read_text(errors="replace") if proc.log_path.exists() else ""
            return "ready" in text.splitlines()
        return k2pg.group_stable(admin, group)

    while not (ready() or also()):
        if proc.reap() or proc.elapsed() > settings.ready_timeout_s:
            return "exited early" if proc.returncode is not None else "not ready"
        proc.sample()
        time.sleep(0.25)
    return None


def stop_engine(
    settings: Settings, proc: common.MonitoredProcess, topic: str
) -> tuple[float | None, float, str]:
    """Stop the engine and delete ``topic`` (unless ``--keep``): the engine's
    CPU-s (whole run), peak RSS MB and log tail."""
    proc.stop(settings.stop_grace_s)
    if not settings.keep:
        k2pg.delete_topic(settings, topic)  # type: ignore[arg-type]
    return proc.final_cpu_s, proc.peak_rss_bytes() / 2**20, proc.log_tail()


def run_rate(
    settings: Settings,
    conn: psycopg.Connection[Any],
    admin: AdminClient,
    run_id: str,
    engine: str,
    rate: int,
) -> RateResult:
    name = f"{PREFIX}-{run_id}-{engine}-{rate}"
    table = f"bench_lat_{run_id}_{engine}_{rate}"
    res = RateResult(engine=engine, rate=rate, topic=name, table=table)
    proc = prepare(settings, conn, admin, engine, str(rate), name, table)
    print(f"[{engine} @ {rate:,}/s] {common.utc_now()} starting; log: {proc.log_path}", flush=True)
    proc.start()
    try:
        outcome = wait_ready(settings, admin, engine, proc, name)
        if outcome is not None:
            res.outcome = outcome
            return res
        res.ready_s = proc.elapsed()
        print(f"[{engine} @ {rate:,}/s] ready after {res.ready_s:.1f} s", flush=True)

        produced = Produced(target_rate=rate)
        producer = threading.Thread(
            target=produce_paced, args=(settings, name, rate, produced), daemon=True
        )
        producer.start()
        total = int(rate * settings.duration_s)
        last_n, last_growth = -1, time.monotonic()
        while True:
            time.sleep(POLL_S)
            proc.sample()
            n = landed(conn, table, total)
            if n != last_n:
                last_n, last_growth = n, time.monotonic()
            if not producer.is_alive() and n >= total:
                break
            if proc.reap():
                res.outcome = "exited early"
                break
            if not producer.is_alive() and time.monotonic() - last_growth > settings.drain_s:
                res.outcome = "fell behind"
                break
            if time.monotonic() - last_growth > settings.drain_s + settings.duration_s:
                res.outcome = "fell behind"
                break
        producer.join(120)
        res.produced = {**asdict(produced), "rate": produced.rate}
        print(
            f"[{engine} @ {rate:,}/s] produced {produced.messages:,} at {produced.rate:,.0f}/s "
            f"(most behind schedule: {produced.max_behind:,}); {last_n:,} rows landed",
            flush=True,
        )
    finally:
        res.cpu_s, res.peak_rss_mb, res.log = stop_engine(settings, proc, name)
    measure(conn, res)
    if not settings.keep:
        conn.execute(f"DROP TABLE IF EXISTS public.{table}")
    return res


def landed(conn: psycopg.Connection[Any], table: str, total: int) -> int:
    """Rows in ``public.<table>``, cheaply: the table's insert counter (Postgres
    publishes it within about a second of each commit) until it reaches
    ``total``, then ``count(*)`` to confirm. A ``count(*)`` of millions of rows
    every poll would load Postgres while the engines write to it."""
    row = conn.execute(
        "SELECT n_tup_ins FROM pg_stat_user_tables WHERE relid = %s::regclass",
        (f"public.{table}",),
    ).fetchone()
    inserted = int(row[0]) if row and row[0] is not None else total
    return inserted if inserted < total else common.count_rows(conn, f"public.{table}")


def measure(conn: psycopg.Connection[Any], res: RateResult) -> None:
    row = conn.execute(LATENCY_SQL.format(table=f"public.{res.table}")).fetchone()
    assert row is not None
    res.rows, res.distinct = int(row[0]), int(row[1])
    if res.rows:
        res.p50_ms, res.p99_ms, res.max_ms, res.min_ms = (float(v) for v in row[2:6])
        res.rows_per_s = res.rows / max(float(row[6]), 1e-9)
        if res.produced.get("sent_last_at"):
            res.lag_at_end_s = float(row[7]) - res.produced["sent_last_at"]
    sent = res.produced.get("messages", 0)
    # Kept up: every row landed, the last one at most KEPT_UP_LAG_S after it was sent.
    res.kept_up = (
        bool(sent)
        and res.distinct == sent
        and res.lag_at_end_s is not None
        and res.lag_at_end_s <= KEPT_UP_LAG_S
    )
    print(
        f"[{res.engine} @ {res.rate:,}/s] {res.outcome}: {res.rows:,} rows; latency ms "
        f"p50 {common.num(res.p50_ms, '.1f')}, p99 {common.num(res.p99_ms, '.1f')}, "
        f"max {common.num(res.max_ms, '.1f')}; {common.num(res.rows_per_s, ',.0f')} rows/s; "
        f"kept up: {res.kept_up}",
        flush=True,
    )


# ---------------------------------------------------------------- report

HEADERS = (
    "engine",
    "target msgs/s",
    "produced msgs/s",
    "rows landed",
    "p50 ms",
    "p99 ms",
    "max ms",
    "engine rows/s",
    "lag at end s",
    "kept up",
    "CPU-s",
    "peak RSS MB",
    "outcome",
)


def table_rows(results: Sequence[RateResult]) -> list[list[str]]:
    return [
        [
            r.engine,
            f"{r.rate:,}",
            common.num(r.produced.get("rate"), ",.0f"),
            f"{r.rows:,} / {r.produced.get('messages', 0):,}",
            common.num(r.p50_ms, ".1f"),
            common.num(r.p99_ms, ".1f"),
            common.num(r.max_ms, ".1f"),
            common.num(r.rows_per_s, ",.0f"),
            common.num(r.lag_at_end_s, ".2f"),
            {True: "yes", False: "NO", None: "n/a"}[r.kept_up],
            common.num(r.cpu_s, ".1f"),
            common.num(r.peak_rss_mb, ".0f"),
            r.outcome,
        ]
        for r in results
    ]


def methodology(settings: Settings) -> list[str]:
    return [
        "Latency of a row = `seen_at - produced_us`: `produced_us` is the producer's wall "
        "clock (µs) just before `produce()`, written into the payload; `seen_at` is the "
        "table's `DEFAULT clock_timestamp()`, which Postgres evaluates as the engine's COPY "
        "or INSERT writes that row. The row becomes visible only when that transaction "
        "commits, a little later: the figures leave out the time from a row's write to its "
        "commit (for sluice one COPY then COMMIT per batch; Quix and Bytewax an INSERT / "
        "COPY per batch then COMMIT). Producer, engine and Postgres share one clock (one "
        "machine).",
        f"The producer is a thread of the harness: every ~1 ms it sends the messages its "
        f"schedule says are due (rate x elapsed), `linger.ms` 5, keys = user_id, "
        f"{settings.partitions} partitions; the producer's batching is part of every "
        "engine's latency alike. 'produced msgs/s' is what it achieved; 'most behind "
        "schedule' in the JSON says whether it could keep the pace on this machine.",
        "Each engine runs with its defaults (sluice: `kafka_to_postgres`'s pipeline.toml."
        "tmpl; Quix Streams: `Application` defaults, whose commit interval is 5 s and "
        "whose PostgreSQLSink writes at each commit; Bytewax: a stateless sink writing each "
        "batch the Kafka input hands it, with COPY). It starts, its consumer group becomes "
        "Stable, and only then does the producer start: the join is not in the figures.",
        "engine rows/s = rows / (last `seen_at` - first `produced_us`): below the rate "
        "by one latency's worth over a short run. 'lag at end' = last `seen_at` - the "
        "producer's last send. Kept up: every message landed (distinct seq) and lag at end "
        f"<= {KEPT_UP_LAG_S:g} s (an engine that falls behind ends the run with a backlog, "
        "and its lag grows with the run's length).",
        f"The engine is stopped (SIGTERM, SIGKILL after {settings.stop_grace_s:.0f} s) once "
        f"every row landed, or when no new row landed for {settings.drain_s:.0f} s after the "
        "producer finished ('fell behind'). CPU-s and peak RSS are the engine process's, "
        "start (imports, join) to exit.",
    ]


def render_markdown(
    settings: Settings,
    results: Sequence[RateResult],
    skipped: dict[str, str],
    facts: dict[str, Any],
    date: str,
) -> str:
    lines = [
        f"# End-to-end latency, Kafka JSON -> Postgres, at fixed rates ({date})",
        "",
        f"Rates {', '.join(f'{r:,}' for r in settings.rates)} msgs/s for "
        f"{settings.duration_s:g} s each; latency = row written in Postgres - produced.",
        "",
        common.markdown_table(HEADERS, table_rows(results)),
        "",
    ]
    if skipped:
        lines += ["Not run:", "", *(f"* {e}: {why}" for e, why in skipped.items()), ""]
    for r in results:
        if r.outcome != "ok":
            lines += [f"### {r.engine} @ {r.rate:,}/s: {r.outcome}", "", "```", r.log, "```", ""]
    lines += common.report_tail(methodology(settings), facts, [])
    return "\n".join(lines)


# ---------------------------------------------------------------- backlog

BACKLOG_SQL = """
SELECT count(*), count(DISTINCT seq), min(seq), max(seq),
       extract(epoch FROM min(seen_at)), extract(epoch FROM max(seen_at))
FROM {table}
"""


@dataclass
class BacklogResult:
    """One engine's run over a backlog of ``messages`` produced before it started."""

    engine: str
    messages: int
    topic: str
    table: str
    outcome: str = "ok"  # ok | produce failed | not ready | exited early | stalled
    produced: dict[str, Any] = field(default_factory=dict)
    rows: int = 0
    distinct: int = 0
    min_seq: int | None = None
    max_seq: int | None = None
    verified: bool = False  # count = count(DISTINCT seq) = messages, seq 1..messages
    ready_s: float | None = None  # since the process started
    ready_at: float | None = None  # time.time() of the poll that saw it ready
    first_row_at: float | None = None  # min(seen_at), epoch s
    last_row_at: float | None = None  # max(seen_at), epoch s
    window_s: float | None = None  # last_row_at - ready_at
    rows_per_s: float | None = None  # messages / window_s, when every row landed
    span_rows_per_s: float | None = None  # rows / (last_row_at - first_row_at)
    cpu_s: float | None = None  # the engine process, start to exit
    cpu_s_per_million: float | None = None
    peak_rss_mb: float | None = None
    wall_s: float | None = None  # the engine process, start to exit
    stopped_by: str = ""  # the signals sent, else its exit status
    log: str = ""


def run_backlog(
    settings: Settings,
    conn: psycopg.Connection[Any],
    admin: AdminClient,
    run_id: str,
    engine: str,
) -> BacklogResult:
    total = settings.backlog
    name = f"{PREFIX}-{run_id}-{engine}-backlog"
    table = f"bench_lat_{run_id}_{engine}_backlog"
    res = BacklogResult(engine=engine, messages=total, topic=name, table=table)
    proc = prepare(settings, conn, admin, engine, "backlog", name, table)
    produced = Produced(target_rate=None)
    print(f"[{engine} backlog] producing {total:,} messages to {name}", flush=True)
    produce_paced(settings, name, None, produced, total)
    res.produced = {**asdict(produced), "rate": produced.rate}
    print(
        f"[{engine} backlog] produced {produced.messages:,} in "
        f"{produced.ended_at - produced.started_at:.1f} s ({produced.rate:,.0f}/s; "
        f"failed {produced.failed}, unflushed {produced.unflushed})",
        flush=True,
    )
    if produced.failed or produced.unflushed:
        res.outcome = "produce failed"  # the engine is not started
        if not settings.keep:
            k2pg.delete_topic(settings, name)  # type: ignore[arg-type]
            conn.execute(f"DROP TABLE IF EXISTS public.{table}")
        return res
    print(f"[{engine} backlog] {common.utc_now()} starting; log: {proc.log_path}", flush=True)
    proc.start()
    for hook in common.ENGINE_STARTED:  # benchmarks/profile attaches here
        hook(res, proc)
    try:
        # With a backlog the engine may write before the harness sees it ready: a row counts.
        outcome = wait_ready(
            settings, admin, engine, proc, name, lambda: landed(conn, table, total) > 0
        )
        if outcome is not None:
            res.outcome = outcome
        else:
            res.ready_at, res.ready_s = time.time(), proc.elapsed()
            print(f"[{engine} backlog] ready after {res.ready_s:.1f} s", flush=True)
            best, counter, last_growth = 0, -1, time.monotonic()
            prev = proc.sample()
            while True:
                time.sleep(POLL_S)
                now = proc.sample()
                n = raw = landed(conn, table, total)
                # An idle backend publishes its insert counter up to 10 s late (Postgres
                # 15+): once the counter and the engine both stand still, count(*).
                if raw < total and raw == counter and idle(prev, now):
                    n = common.count_rows(conn, f"public.{table}")
                counter, prev = raw, now
                if n > best:
                    best, last_growth = n, time.monotonic()
                if best >= total:
                    break
                if proc.reap():
                    res.outcome = "exited early"
                    break
                if time.monotonic() - last_growth > settings.drain_s:
                    res.outcome = "stalled"
                    break
    finally:
        res.cpu_s, res.peak_rss_mb, res.log = stop_engine(settings, proc, name)
        res.wall_s = (proc.ended_at or time.monotonic()) - proc.started_at
        res.stopped_by = ", ".join(proc.signals_sent) or f"itself (exit {proc.returncode})"
    measure_backlog(conn, res)
    if not settings.keep:
        conn.execute(f"DROP TABLE IF EXISTS public.{table}")
    return res


def idle(before: common.Sample | None, after: common.Sample | None) -> bool:
    """Whether the engine used less than ``common.BUSY_CORES`` between two samples."""
    if before is None or after is None or after.t <= before.t:
        return False
    return (after.cpu_s - before.cpu_s) / (after.t - before.t) < common.BUSY_CORES


def measure_backlog(conn: psycopg.Connection[Any], res: BacklogResult) -> None:
    row = conn.execute(BACKLOG_SQL.format(table=f"public.{res.table}")).fetchone()
    assert row is not None
    res.rows, res.distinct = int(row[0]), int(row[1])
    n = res.messages
    if res.rows:
        res.min_seq, res.max_seq = int(row[2]), int(row[3])
        res.first_row_at, res.last_row_at = float(row[4]), float(row[5])
        if res.rows > 1 and res.last_row_at > res.first_row_at:
            res.span_rows_per_s = res.rows / (res.last_row_at - res.first_row_at)
    res.verified = res.rows == res.distinct == n and (res.min_seq, res.max_seq) == (1, n)
    if res.ready_at is not None and res.last_row_at is not None:
        res.window_s = res.last_row_at - res.ready_at
        if res.verified and res.window_s > 0:
            res.rows_per_s = n / res.window_s
    if res.cpu_s is not None:
        res.cpu_s_per_million = res.cpu_s * 1_000_000 / n
    print(
        f"[{res.engine} backlog] {res.outcome}: {res.rows:,} rows ({res.distinct:,} distinct); "
        f"{common.num(res.rows_per_s, ',.0f')} rows/s ready->last row, "
        f"{common.num(res.span_rows_per_s, ',.0f')} rows/s first->last row; "
        f"CPU-s {common.num(res.cpu_s, '.1f')}, peak RSS {common.num(res.peak_rss_mb, '.0f')} MB; "
        f"exited after {common.num(res.wall_s, '.1f')} s, stopped by {res.stopped_by}",
        flush=True,
    )


BACKLOG_HEADERS = (
    "engine",
    "rows landed",
    "rows/s ready->last row",
    "rows/s first->last row",
    "CPU-s per 1M rows",
    "peak RSS MB",
    "ready after s",
    "1st row after ready s",
    "window s",
    "outcome",
    "verified",
)


def backlog_rows(results: Sequence[BacklogResult]) -> list[list[str]]:
    """Rows of :data:`BACKLOG_HEADERS`, then sluice/bytewax and sluice/quix
    (rows/s, CPU-s per 1M, RSS) for the peers that ran."""
    out = [
        [
            r.engine,
            f"{r.rows:,} / {r.messages:,}",
            common.num(r.rows_per_s, ",.0f"),
            common.num(r.span_rows_per_s, ",.0f"),
            common.num(r.cpu_s_per_million, ".1f"),
            common.num(r.peak_rss_mb, ".0f"),
            common.num(r.ready_s, ".1f"),
            common.num(
                None
                if r.first_row_at is None or r.ready_at is None
                else r.first_row_at - r.ready_at,
                ".2f",
            ),
            common.num(r.window_s, ".2f"),
            r.outcome,
            "yes"
            if r.verified
            else f"NO: {r.rows:,} rows, {r.distinct:,} distinct seq, seq {r.min_seq}..{r.max_seq}",
        ]
        for r in results
    ]
    by = {r.engine: r for r in results}
    for peer in ("bytewax", "quix"):
        if "sluice" in by and peer in by:
            s, o = by["sluice"], by[peer]
            out.append(
                [
                    f"sluice/{peer}",
                    "",
                    common.ratio(s.rows_per_s, o.rows_per_s),
                    common.ratio(s.span_rows_per_s, o.span_rows_per_s),
                    common.ratio(s.cpu_s_per_million, o.cpu_s_per_million),
                    common.ratio(s.peak_rss_mb, o.peak_rss_mb),
                    *([""] * 5),
                ]
            )
    return out


def backlog_methodology(settings: Settings) -> list[str]:
    n = settings.backlog
    return [
        f"For each engine, one after the other: a new {settings.partitions}-partition topic "
        f"and a new table (the latency mode's: `kafka_to_postgres`'s columns, `seq`, "
        f"`produced_us`, `seen_at timestamptz DEFAULT clock_timestamp()`). The harness "
        f"produces all {n:,} messages first, unpaced (confluent-kafka, `linger.ms` 5, keys = "
        f"user_id; the latency mode's payloads, `seq` 1..{n:,} and `produced_us` in front), "
        "waits for the final flush, and only then starts the engine: the backlog is on the "
        "broker before the engine exists.",
        "Each engine runs with its defaults, as in the latency mode (sluice: "
        "`kafka_to_postgres`'s pipeline.toml.tmpl, no idle stop; Quix Streams: `Application` "
        "defaults, commit and sink write every 5 s; Bytewax: `bytewax_append.py`, a COPY per "
        "batch), reading from the earliest offset.",
        "Ready = the first of the harness's polls (every 0.25 s) that finds the engine's "
        "consumer group Stable (Bytewax, which assigns its partitions and joins no group: "
        "`ready` in its log, printed once its sink is built) or a row in its table. "
        "'ready after s' counts from the process start; its start-up and group join are "
        "outside the window.",
        f"rows/s ready->last row = {n:,} / (max(`seen_at`) - the wall-clock time of the poll "
        "that found the engine ready); 'window s' is that denominator. `seen_at` is "
        "Postgres's `clock_timestamp()` as the engine's COPY / INSERT writes the row, so the "
        "window ends when the last row was written, before its commit (one batch's "
        "commit, left out); it starts up to one poll (0.25 s) after the engine really was "
        "ready. Reported only when every row landed. '1st row after ready s' = min(`seen_at`) "
        "- ready: negative when the engine wrote before the harness's poll saw it ready.",
        "rows/s first->last row = rows / (max(`seen_at`) - min(`seen_at`)), from the table "
        "alone: the engine's write rate once writing, without the time to its first write "
        "(its first fetch, decode and batch).",
        "CPU-s per 1M rows = the engine process's user + system CPU over the whole run "
        "(process start to exit after SIGTERM: imports, group join, the backlog, shutdown), "
        f"from its `wait4` rusage, x 1M / {n:,}; at small N start-up dominates it.",
        common.PEAK_RSS,
        f"The engine gets SIGTERM (SIGKILL after {settings.stop_grace_s:.0f} s) once all "
        f"{n:,} rows are in the table (the insert counter of `pg_stat_user_tables` polled "
        f"every {POLL_S:g} s, confirmed by `count(*)`; `count(*)` too when that counter "
        "and the engine's CPU both stood still over a poll, since an idle backend publishes "
        "its counter up to 10 s late), or when no row landed for "
        f"{settings.drain_s:.0f} s ('stalled'). Verified = `count(*)` = `count(DISTINCT seq)` "
        f"= {n:,} and seq runs 1..{n:,}.",
        "sluice/<peer> rows: rows/s above 1 means sluice is faster; CPU-s and RSS below 1 "
        "mean sluice uses less.",
    ]


def backlog_markdown(
    settings: Settings,
    results: Sequence[BacklogResult],
    skipped: dict[str, str],
    facts: dict[str, Any],
    date: str,
) -> str:
    lines = [
        f"# Throughput over a backlog, Kafka JSON -> Postgres append ({date})",
        "",
        f"{settings.backlog:,} messages on a {settings.partitions}-partition topic, produced "
        "before each engine starts; each engine appends them to its own table.",
        "",
        common.markdown_table(BACKLOG_HEADERS, backlog_rows(results)),
        "",
    ]
    if skipped:
        lines += ["Not run:", "", *(f"* {e}: {why}" for e, why in skipped.items()), ""]
    for r in results:
        if r.outcome != "ok" or not r.verified:
            lines += [f"### {r.engine}: {r.outcome}", "", "```", r.log, "```", ""]
    lines += common.report_tail(backlog_methodology(settings), facts, [])
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> Settings:
    p = argparse.ArgumentParser(prog="python -m benchmarks.latency.run", description=__doc__)
    p.add_argument("--rates", help="msgs/s, comma-separated (default 1000,20000,100000)")
    p.add_argument("--duration", type=float, help="seconds of producing per rate (default 60)")
    p.add_argument(
        "--backlog",
        type=int,
        default=0,
        help="throughput mode: produce this many messages first, then run each engine over "
        "them (no --rates, --duration)",
    )
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--bootstrap-servers", default="127.0.0.1:19092")
    p.add_argument("--postgres-url", default=common.POSTGRES_URL)
    p.add_argument("--partitions", type=int, default=3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--drain", type=float, default=30, help="give up after this long without new rows"
    )
    p.add_argument("--ready-timeout", type=float, default=120)
    p.add_argument("--stop-grace", type=float, default=30)
    p.add_argument("--results-dir", type=Path, default=common.RESULTS_DIR)
    p.add_argument("--work-dir", type=Path, default=Path("/tmp"))
    p.add_argument("--keep", action="store_true", help="keep the tables and topics")
    a = p.parse_args(argv)
    if a.backlog:
        if a.backlog < 1:
            p.error("--backlog must be positive")
        if a.rates is not None or a.duration is not None:
            p.error("--backlog takes no --rates or --duration")
        rates: tuple[int, ...] = ()
        duration = 0.0
    else:
        try:
            rates = tuple(int(r) for r in (a.rates or "1000,20000,100000").split(","))
        except ValueError:
            p.error("--rates: comma-separated integers")
        duration = 60.0 if a.duration is None else a.duration
        if not rates or min(rates) < 1 or duration <= 0:
            p.error("--rates and --duration must be positive")
    return Settings(
        rates=rates,
        duration_s=duration,
        backlog=a.backlog,
        engines=common.chosen_engines(p, a.engines, ENGINES),
        bootstrap_servers=a.bootstrap_servers,
        postgres_url=a.postgres_url,
        partitions=a.partitions,
        seed=a.seed,
        drain_s=a.drain,
        ready_timeout_s=a.ready_timeout,
        stop_grace_s=a.stop_grace,
        results_dir=a.results_dir,
        work_dir=a.work_dir,
        keep=a.keep,
    )


def engines_and_facts(
    settings: Settings, date: str
) -> tuple[dict[str, str], dict[str, str], dict[str, Any]]:
    """The versions of the engines to run, the skipped ones (why), and the
    machine facts with the packages of each environment."""
    versions: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for engine in settings.engines:
        version = check_engine(engine)
        if version is None:
            skipped[engine] = (
                f"not installed ({PEER_PYTHON.get(engine)}): run `bash benchmarks/setup_peers.sh`"
            )
            print(f"[{engine}] skipped: {skipped[engine]}", flush=True)
        else:
            versions[engine] = version
    facts = common.run_facts(date)
    facts["packages"] = common.engine_packages(PACKAGES, ())
    for engine in versions:
        if engine != "sluice":
            facts["packages"][str(PEER_PYTHON[engine].parents[1])] = common.package_versions(
                PEER_PYTHON[engine], [PEER_PACKAGE[engine], "confluent-kafka"]
            )
    facts["engines"] = versions
    return versions, skipped, facts


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    run_id = datetime.now(UTC).strftime("%Y%m%d%H%M%S") + secrets.token_hex(2)
    settings = replace(settings, work_dir=settings.work_dir / f"{PREFIX}-{run_id}")
    settings.work_dir.mkdir(parents=True)
    date = common.utc_date()
    k2pg.check_services(settings)  # type: ignore[arg-type]
    versions, skipped, facts = engines_and_facts(settings, date)
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    data: dict[str, Any] = {
        "benchmark": BACKLOG_BENCHMARK if settings.backlog else BENCHMARK,
        "run_id": run_id,
        "date": date,
        "settings": common.settings_json(settings),
        "skipped": skipped,
        "machine": facts,
    }

    if settings.backlog:
        backlog: list[BacklogResult] = []
        with common.poller(settings.postgres_url, facts) as conn:
            for engine in versions:
                backlog.append(run_backlog(settings, conn, admin, run_id, engine))
        common.print_tables((BACKLOG_HEADERS, backlog_rows(backlog)))
        data["methodology"] = backlog_methodology(settings)
        data["results"] = [asdict(r) for r in backlog]
        markdown = backlog_markdown(settings, backlog, skipped, facts, date)
        ok = bool(backlog) and all(r.outcome == "ok" and r.verified for r in backlog)
    else:
        results: list[RateResult] = []
        with common.poller(settings.postgres_url, facts) as conn:
            for engine in versions:
                for rate in settings.rates:
                    results.append(run_rate(settings, conn, admin, run_id, engine, rate))
        common.print_tables((HEADERS, table_rows(results)))
        data["methodology"] = methodology(settings)
        data["results"] = [asdict(r) for r in results]
        markdown = render_markdown(settings, results, skipped, facts, date)
        ok = bool(results) and all(r.outcome == "ok" for r in results)

    md = common.write_results(settings.results_dir, f"{data['benchmark']}-{date}", markdown, data)
    print(f"results: {md} (and .json); engine logs: {settings.work_dir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
