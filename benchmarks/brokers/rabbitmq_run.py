"""RabbitMQ -> Postgres: sluice beside the reference engine (ematix-flow 1.0.0).

    python -m benchmarks.brokers.rabbitmq_run [--rows N] [--engines sluice,reference]

1. Declare one durable queue per engine, bound to a new fanout exchange, and
   publish ``--rows`` deterministic JSON events (the events of
   ``benchmarks/kafka_to_postgres``, ~150 bytes each) to the exchange once,
   with publisher confirms: every queue holds the same messages.
2. For each engine, one after the other: create its own target table, render
   ``rabbitmq_pipeline.toml.tmpl`` (same pipeline; only the queue and table
   differ), start the engine and poll ``count(*)`` of its table until every
   row landed. sluice stops by itself (``--stop-after-idle-ms``); the
   reference runs forever and gets SIGTERM.
3. Verify each table (row count, distinct ids, checksums), print the tables
   and write ``benchmarks/results/rabbitmq_to_postgres-<date>.{md,json}``.

rows/s = rows / (last row landed - the engine's consumer appeared on its
queue), so startup is not counted against either engine.
"""

from __future__ import annotations

import argparse
import secrets
import string
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pika
import psycopg

from benchmarks import common
from benchmarks.kafka_to_postgres import run as k2pg
from sluice.connectors.rabbitmq.target import Publisher

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "rabbitmq_pipeline.toml.tmpl"
BENCHMARK = "rabbitmq_to_postgres"
ENGINES = ("sluice", "reference")
PACKAGES = ("sluice", "pika", "psycopg", "pyarrow", "adbc-driver-postgresql", "msgspec")
#: Messages per confirmed publish call while filling the queues.
PUBLISH_CHUNK = 20_000

READY_NOTE = (
    "rows/s = rows / (last row landed - the engine's consumer appeared on its queue), so "
    "process startup is not counted against either engine."
)


@dataclass(frozen=True)
class Settings:
    rows: int
    engines: tuple[str, ...]
    amqp_url: str
    postgres_url: str
    seed: int
    poll_interval_s: float
    timeout_s: float
    stall_timeout_s: float
    stop_grace_s: float
    results_dir: Path
    work_dir: Path
    keep: bool

    def as_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "results_dir": str(self.results_dir),
            "work_dir": str(self.work_dir),
        }


def parse_args(argv: Sequence[str] | None) -> Settings:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.brokers.rabbitmq_run",
        description="RabbitMQ -> Postgres throughput, CPU and memory: sluice vs ematix-flow 1.0.0.",
    )
    p.add_argument("--rows", type=int, default=1_000_000, help="events to publish (default 1M)")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated, in this order")
    # %2f: the default virtual host "/" (a bare trailing slash is the empty vhost to some clients)
    p.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/%2f")
    p.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:55432/postgres")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--poll-interval", type=float, default=0.5, help="seconds between polls")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per engine")
    p.add_argument("--stall-timeout", type=float, default=120, help="no new rows this long: stop")
    p.add_argument("--stop-grace", type=float, default=60, help="SIGTERM -> SIGKILL delay")
    p.add_argument("--results-dir", type=Path, default=common.RESULTS_DIR)
    p.add_argument("--work-dir", type=Path, default=Path("/tmp"), help="TOMLs and engine logs")
    p.add_argument("--keep", action="store_true", help="keep the tables, queues and exchange")
    a = p.parse_args(argv)
    chosen = tuple(e.strip() for e in a.engines.split(",") if e.strip())
    if not chosen or set(chosen) - set(ENGINES) or len(set(chosen)) != len(chosen):
        p.error(f"--engines: choose from {','.join(ENGINES)}, each once")
    if a.rows < 1:
        p.error("--rows must be >= 1")
    return Settings(
        rows=a.rows,
        engines=chosen,
        amqp_url=a.amqp_url,
        postgres_url=a.postgres_url,
        seed=a.seed,
        poll_interval_s=a.poll_interval,
        timeout_s=a.timeout,
        stall_timeout_s=a.stall_timeout,
        stop_grace_s=a.stop_grace,
        results_dir=a.results_dir,
        work_dir=a.work_dir,
        keep=a.keep,
    )


# ---------------------------------------------------------------- data


def publish(settings: Settings, exchange: str, queues: Sequence[str]) -> k2pg.Dataset:
    """Bind ``queues`` to a new fanout ``exchange`` and publish the events
    there, confirmed (sluice's own publisher: asynchronous confirms)."""
    with pika.BlockingConnection(pika.URLParameters(settings.amqp_url)) as conn:
        ch = conn.channel()
        ch.exchange_declare(exchange, "fanout", durable=True)
        for queue in queues:
            ch.queue_declare(queue, durable=True)
            ch.queue_bind(queue, exchange)
    ds = k2pg.Dataset(
        topic=exchange, rows=settings.rows, partitions=len(queues), seed=settings.seed
    )
    publisher = Publisher(settings.amqp_url, "benchmark publisher", f"exchange {exchange}")
    publisher.open()
    props = pika.BasicProperties(content_type="application/json", delivery_mode=2)
    total_bytes = 0
    started = time.monotonic()
    chunk: list[tuple[str, bytes, Any]] = []
    try:
        for user_id, payload in k2pg.events(settings.rows, settings.seed):
            ds.expected_user_id_sum += user_id
            total_bytes += len(payload)
            chunk.append(("", payload, props))
            if len(chunk) >= PUBLISH_CHUNK:
                publisher.publish(exchange, chunk)
                chunk = []
        publisher.publish(exchange, chunk)
    finally:
        publisher.close()
    ds.produce_s = time.monotonic() - started
    ds.payload_bytes_avg = total_bytes / settings.rows
    return ds


def consumers(ch: Any, queue: str) -> int:
    """Consumers on ``queue`` now (a passive declare answers in real time)."""
    return int(ch.queue_declare(queue, passive=True).method.consumer_count)


# ---------------------------------------------------------------- engines


def watch(settings: Settings, res: k2pg.EngineResult, conn: Any, ch: Any, queue: str) -> None:
    """Run the engine, poll its table until every row landed (or it exits,
    stalls or times out); record the timeline and process figures."""
    proc = common.MonitoredProcess(res.command, log_path=settings.work_dir / f"{res.engine}.log")
    print(f"[{res.engine}] {common.utc_now()} starting; log: {proc.log_path}", flush=True)
    proc.start()
    last_growth = proc.elapsed()
    table = f"public.{res.table}"
    try:
        while True:
            tick = time.monotonic()
            t = round(proc.elapsed(), 3)
            n = k2pg.count_rows(conn, table)
            sample = proc.sample()
            cpu = None if sample is None else round(sample.cpu_s, 3)
            res.timeline.append((t, n, cpu))
            if n > res.rows_seen:
                last_growth = t
            res.rows_seen = n
            if res.ready_s is None and (n or consumers(ch, queue)):
                res.ready_s, res.cpu_s_at_ready = t, cpu
                print(f"[{res.engine}] consuming after {t:.1f} s", flush=True)
            if n and res.first_row_s is None:
                res.first_row_s, res.rows_at_first_poll, res.cpu_s_at_first_row = t, n, cpu
            if n >= settings.rows:
                res.last_row_s, res.cpu_s_at_last_row = t, cpu
                print(f"[{res.engine}] all {n} rows after {t:.1f} s", flush=True)
                break
            if proc.reap():
                res.outcome = "exited early"
                break
            if t > settings.timeout_s:
                res.outcome = "timeout"
                break
            if n and t - last_growth > settings.stall_timeout_s:
                res.outcome = "stalled"
                break
            time.sleep(max(0.0, settings.poll_interval_s - (time.monotonic() - tick)))
        if res.outcome == "ok" and "--stop-after-idle-ms" in res.command:
            proc.wait(timeout_s=60)
        proc.stop(settings.stop_grace_s)
    finally:
        if not proc.reap():
            proc.stop(settings.stop_grace_s)
    res.wall_s = (proc.ended_at or time.monotonic()) - proc.started_at
    res.returncode = proc.returncode
    res.cpu_s_whole_run = proc.final_cpu_s
    res.peak_rss_bytes = proc.peak_rss_bytes()
    res.signals = proc.signals_sent
    res.log = proc.log_tail()
    if res.ready_s is not None:
        res.busy_s = k2pg.busy_from(res.timeline, res.ready_s)


def run_engine(
    settings: Settings,
    conn: Any,
    ch: Any,
    ds: k2pg.Dataset,
    run_id: str,
    engine: str,
    version: str,
) -> k2pg.EngineResult:
    table = f"bench_r2pg_{run_id}_{engine}"
    queue = queue_name(run_id, engine)
    toml_path = settings.work_dir / f"{engine}.toml"
    toml_path.write_text(
        string.Template(TEMPLATE.read_text()).substitute(
            pipeline_name=f"bench-r2pg-{run_id}",
            queue=queue,
            amqp_url=settings.amqp_url,
            postgres_url=settings.postgres_url,
            table=table,
        )
    )
    k2pg.recreate_table(conn, f"public.{table}", k2pg.TABLE_COLUMNS)
    argv = k2pg.engine_argv(engine, toml_path)
    res = k2pg.EngineResult(
        engine=engine, version=version, table=table, command=argv, group_id=queue
    )
    watch(settings, res, conn, ch, queue)
    if res.outcome == "ok" and res.ingest_window_s:
        res.rows_per_s = ds.rows / res.ingest_window_s
    if res.outcome == "ok" and res.busy_s is not None and res.last_row_s is not None:
        res.busy_rows_per_s = ds.rows / max(res.last_row_s - res.busy_s, 1e-9)
    if res.outcome == "ok" and res.landing_window_s:
        res.landing_rows_per_s = (ds.rows - res.rows_at_first_poll) / res.landing_window_s
    res.verification = k2pg.verify(conn, table, ds)
    common.print_problem(res)
    if not settings.keep:
        conn.execute(f"DROP TABLE IF EXISTS public.{table}")
    return res


def queue_name(run_id: str, engine: str) -> str:
    return f"bench-r2pg-{run_id}-{engine}"


# ---------------------------------------------------------------- report


def methodology(settings: Settings) -> list[str]:
    return [
        READY_NOTE,
        f"Every {settings.poll_interval_s} s the harness polls `SELECT count(*)` of the "
        "engine's table and the consumer count of its queue (a passive queue.declare); each "
        f"time is that of the first poll that saw the event (to within {settings.poll_interval_s} s).",
        "Each engine consumes its own durable queue; all queues are bound to one fanout "
        "exchange, so they hold the same messages, published once with publisher confirms "
        "before the first engine starts. Messages carry no AMQP timestamp: sluice's "
        "`_event_ts` is the receive time, the reference leaves it NULL.",
        "CPU-s per 1M rows: user + system CPU of the engine's process tree from its start to "
        "the poll that saw the last row, scaled to 1M rows. Peak RSS: the larger of the "
        "polled VmHWM and the reaped ru_maxrss.",
        "sluice stops by itself (`--stop-after-idle-ms 3000`); the reference runs until SIGTERM.",
    ]


def render_markdown(
    settings: Settings,
    ds: k2pg.Dataset,
    results: Sequence[k2pg.EngineResult],
    facts: dict[str, Any],
    date: str,
) -> str:
    lines = [
        f"# RabbitMQ -> Postgres: sluice vs the reference engine ({date})",
        "",
        f"{ds.rows:,} JSON events (avg {ds.payload_bytes_avg:.0f} bytes) in one durable queue "
        f"per engine (exchange `{ds.topic}`, published in {ds.produce_s:.1f} s), appended by "
        "each engine into its own pre-created Postgres table, one engine at a time.",
        "",
        common.markdown_table(k2pg.SUMMARY_HEADERS, k2pg.summary_rows(results, ds.rows)),
        "",
        common.markdown_table(DETAIL_HEADERS, k2pg.detail_rows(results)),
        "",
        *common.report_tail(methodology(settings), facts, results),
    ]
    return "\n".join(lines)


DETAIL_HEADERS = ("engine", "consuming at (s)", *k2pg.DETAIL_HEADERS[2:])


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    run_id = datetime.now(UTC).strftime("%Y%m%d%H%M%S") + secrets.token_hex(2)
    work_dir = settings.work_dir / f"bench-r2pg-{run_id}"
    work_dir.mkdir(parents=True)
    settings = Settings(**{**asdict(settings), "work_dir": work_dir})
    date = common.utc_date()
    versions = {engine: k2pg.check_engine(engine) for engine in settings.engines}
    facts = common.run_facts(date)
    facts["packages"] = common.engine_packages(PACKAGES, settings.engines)

    exchange = f"bench-r2pg-{run_id}"
    queues = [queue_name(run_id, e) for e in settings.engines]
    print(f"publishing {settings.rows:,} events to {exchange} ({len(queues)} queues)", flush=True)
    ds = publish(settings, exchange, queues)
    k2pg.print_produced(ds)

    results: list[k2pg.EngineResult] = []
    with pika.BlockingConnection(pika.URLParameters(settings.amqp_url)) as amqp:
        ch = amqp.channel()
        try:
            with psycopg.connect(settings.postgres_url, autocommit=True) as conn:
                facts["postgres"] = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
                conn.execute("SET max_parallel_workers_per_gather = 0")
                for engine in settings.engines:
                    results.append(
                        run_engine(settings, conn, ch, ds, run_id, engine, versions[engine])
                    )
        finally:
            if not settings.keep:
                for queue in queues:
                    ch.queue_delete(queue)
                ch.exchange_delete(exchange)

    print()
    print(common.format_table(k2pg.SUMMARY_HEADERS, k2pg.summary_rows(results, ds.rows)))
    print()
    print(common.format_table(DETAIL_HEADERS, k2pg.detail_rows(results)))
    print()
    print("note: " + READY_NOTE)
    data = {
        "benchmark": BENCHMARK,
        "run_id": run_id,
        "date": date,
        "settings": settings.as_json(),
        "dataset": asdict(ds),
        "machine": facts,
        "methodology": methodology(settings),
        "results": k2pg.results_json(results, ds.rows),
    }
    md = common.write_results(
        settings.results_dir,
        f"{BENCHMARK}-{date}",
        render_markdown(settings, ds, results, facts, date),
        data,
    )
    print(f"results: {md} (and .json); engine logs: {settings.work_dir}")
    return 1 if any(common.failed(r) for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
