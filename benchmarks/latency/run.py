"""End-to-end latency at a fixed produce rate: Kafka JSON -> Postgres append,
sluice against the peers Bytewax and Quix Streams.

    python -m benchmarks.latency.run [--rates 1000,20000,100000] [--duration 60]
        [--engines sluice,bytewax,quix]

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

Writes ``benchmarks/results/latency-<date>.{md,json}``. See
benchmarks/README.md (latency) for what the figures mean and the
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
from collections.abc import Sequence
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
    rates: tuple[int, ...]
    duration_s: float
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
    """What the pacing thread sent."""

    target_rate: int
    messages: int = 0
    started_at: float = 0.0  # time.time()
    ended_at: float = 0.0  # after the final flush
    sent_last_at: float = 0.0  # time.time() of the last produce() call
    failed: int = 0
    max_behind: int = 0  # most messages the thread was behind its schedule

    @property
    def rate(self) -> float:
        """Messages per second from the first send to the last (flush left out)."""
        return self.messages / max(self.sent_last_at - self.started_at, 1e-9)


def payloads(seed: int) -> list[tuple[bytes, bytes]]:
    """``(key, payload without its opening brace)`` of :data:`POOL` events."""
    return [(str(uid).encode(), payload[1:]) for uid, payload in common.events(POOL, seed)]


def produce_paced(settings: Settings, topic: str, rate: int, out: Produced) -> None:
    """Send ``rate x duration`` messages to ``topic`` at ``rate`` per second:
    each tick of about 1 ms sends what the schedule says is due."""
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
    total = int(rate * settings.duration_s)
    seq = 0
    out.started_at = start = time.time()
    cycle = itertools.cycle(pool)
    while seq < total:
        due = min(total, int((time.time() - start) * rate) + 1)
        out.max_behind = max(out.max_behind, due - seq)
        while seq < due:
            key, rest = next(cycle)
            seq += 1
            now_us = time.time_ns() // 1000
            value = b'{"seq":%d,"produced_us":%d,%s' % (seq, now_us, rest)
            try:
                producer.produce(topic, value, key=key, on_delivery=on_delivery)
            except BufferError:
                producer.poll(0.01)
                producer.produce(topic, value, key=key, on_delivery=on_delivery)
        producer.poll(0)
        ahead = start + seq / rate - time.time()
        if ahead > 0:
            time.sleep(min(ahead, 0.001))
    out.messages = seq
    out.sent_last_at = time.time()
    producer.flush(60)
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
    for fut in admin.create_topics([NewTopic(name, settings.partitions, 1)]).values():
        fut.result(timeout=30)
    common.recreate_table(conn, f"public.{table}", COLUMNS)
    toml = settings.work_dir / f"{engine}-{rate}.toml"
    # kafka_to_postgres's pipeline: pipeline name = group = topic name.
    toml.write_text(
        k2pg.render_template(k2pg.TEMPLATE, settings, name, name, table, topic=name)  # type: ignore[arg-type]
    )
    proc = common.MonitoredProcess(
        engine_argv(engine, settings, toml, name, name, table),
        settings.work_dir / f"{engine}-{rate}.log",
    )
    print(f"[{engine} @ {rate:,}/s] {common.utc_now()} starting; log: {proc.log_path}", flush=True)
    proc.start()

    def ready() -> bool:
        if engine in LOG_READY:
            # It never joins its group: it says so in its log.
            text = proc.log_path.read_text(errors="replace") if proc.log_path.exists() else ""
            return "ready" in text.splitlines()
        return k2pg.group_stable(admin, name)

    try:
        while not ready():
            if proc.reap() or proc.elapsed() > settings.ready_timeout_s:
                res.outcome = "exited early" if proc.returncode is not None else "not ready"
                return res
            proc.sample()
            time.sleep(0.25)
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
        proc.stop(settings.stop_grace_s)
        res.cpu_s = proc.final_cpu_s
        res.peak_rss_mb = proc.peak_rss_bytes() / 2**20
        res.log = proc.log_tail()
        if not settings.keep:
            k2pg.delete_topic(settings, name)  # type: ignore[arg-type]
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


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> Settings:
    p = argparse.ArgumentParser(prog="python -m benchmarks.latency.run", description=__doc__)
    p.add_argument("--rates", default="1000,20000,100000", help="msgs/s, comma-separated")
    p.add_argument("--duration", type=float, default=60, help="seconds of producing per rate")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--bootstrap-servers", default="127.0.0.1:19092")
    p.add_argument("--postgres-url", default=common.POSTGRES_URL)
    p.add_argument("--partitions", type=int, default=3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--drain", type=float, default=30, help="give up after this long without rows")
    p.add_argument("--ready-timeout", type=float, default=120)
    p.add_argument("--stop-grace", type=float, default=30)
    p.add_argument("--results-dir", type=Path, default=common.RESULTS_DIR)
    p.add_argument("--work-dir", type=Path, default=Path("/tmp"))
    p.add_argument("--keep", action="store_true", help="keep the tables and topics")
    a = p.parse_args(argv)
    try:
        rates = tuple(int(r) for r in a.rates.split(","))
    except ValueError:
        p.error("--rates: comma-separated integers")
    if not rates or min(rates) < 1 or a.duration <= 0:
        p.error("--rates and --duration must be positive")
    return Settings(
        rates=rates,
        duration_s=a.duration,
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


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    run_id = datetime.now(UTC).strftime("%Y%m%d%H%M%S") + secrets.token_hex(2)
    settings = replace(settings, work_dir=settings.work_dir / f"{PREFIX}-{run_id}")
    settings.work_dir.mkdir(parents=True)
    date = common.utc_date()
    k2pg.check_services(settings)  # type: ignore[arg-type]
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

    results: list[RateResult] = []
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    with common.poller(settings.postgres_url, facts) as conn:
        for engine in versions:
            for rate in settings.rates:
                results.append(run_rate(settings, conn, admin, run_id, engine, rate))

    common.print_tables((HEADERS, table_rows(results)))
    data = {
        "benchmark": BENCHMARK,
        "run_id": run_id,
        "date": date,
        "settings": common.settings_json(settings),
        "skipped": skipped,
        "machine": facts,
        "methodology": methodology(settings),
        "results": [asdict(r) for r in results],
    }
    md = common.write_results(
        settings.results_dir,
        f"{BENCHMARK}-{date}",
        render_markdown(settings, results, skipped, facts, date),
        data,
    )
    print(f"results: {md} (and .json); engine logs: {settings.work_dir}")
    return 0 if results and all(r.outcome == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
