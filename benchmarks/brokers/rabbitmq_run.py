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

Publishing takes about 5 s per 10k events into two queues on the 2-core test
machine (100k in 47 s, linear), so about 8 min at the default 1M.
"""

from __future__ import annotations

import argparse
import string
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
import psycopg

from benchmarks import common
from benchmarks.common import Dataset, EngineResult
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


def parse_args(argv: Sequence[str] | None) -> Settings:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.brokers.rabbitmq_run",
        description="RabbitMQ -> Postgres throughput, CPU and memory: sluice vs ematix-flow 1.0.0.",
    )
    common.add_run_arguments(
        p,
        engines=ENGINES,
        rows_help="events to publish (default 1M)",
        keep_help="keep the tables, queues and exchange",
    )
    # %2f: the default virtual host "/" (a bare trailing slash is the empty vhost to some clients)
    p.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/%2f")
    a = p.parse_args(argv)
    return Settings(**common.run_arguments(p, a, ENGINES), amqp_url=a.amqp_url)


# ---------------------------------------------------------------- data


def publish(settings: Settings, exchange: str, queues: Sequence[str]) -> Dataset:
    """Bind ``queues`` to a new fanout ``exchange`` and publish the events
    there, confirmed (sluice's own publisher: asynchronous confirms)."""
    with pika.BlockingConnection(pika.URLParameters(settings.amqp_url)) as conn:
        ch = conn.channel()
        ch.exchange_declare(exchange, "fanout", durable=True)
        for queue in queues:
            ch.queue_declare(queue, durable=True)
            ch.queue_bind(queue, exchange)
    ds = Dataset(topic=exchange, rows=settings.rows, partitions=len(queues), seed=settings.seed)
    publisher = Publisher(settings.amqp_url, "benchmark publisher", f"exchange {exchange}")
    publisher.open()
    props = pika.BasicProperties(content_type="application/json", delivery_mode=2)
    total_bytes = 0
    started = time.monotonic()
    chunk: list[tuple[str, bytes, Any]] = []
    try:
        for user_id, payload in common.events(settings.rows, settings.seed):
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


def run_engine(
    settings: Settings,
    conn: psycopg.Connection[Any],
    ch: Any,
    ds: Dataset,
    run_id: str,
    engine: str,
    version: str,
) -> EngineResult:
    """Run ``engine`` on its own queue until every row landed in its own table
    (it is ready once its consumer is on the queue); verify the table."""
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
    return common.run_append_engine(
        settings,
        conn,
        ds,
        engine,
        version,
        table,
        toml_path,
        queue,
        lambda: consumers(ch, queue) > 0,
        ready_what="consuming",
    )


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
        "the poll that saw the last row, scaled to 1M rows.",
        common.PEAK_RSS,
        "sluice stops by itself (`--stop-after-idle-ms 3000`); the reference runs until SIGTERM.",
    ]


DETAIL_HEADERS = ("engine", "consuming at (s)", *common.DETAIL_HEADERS[2:])


def main(argv: Sequence[str] | None = None) -> int:
    settings, run_id = common.start_run(parse_args(argv), "bench-r2pg")
    date = common.utc_date()
    versions = {engine: common.check_engine(engine) for engine in settings.engines}
    facts = common.run_facts(date)
    facts["packages"] = common.engine_packages(PACKAGES, settings.engines)

    exchange = f"bench-r2pg-{run_id}"
    queues = [queue_name(run_id, e) for e in settings.engines]
    print(f"publishing {settings.rows:,} events to {exchange} ({len(queues)} queues)", flush=True)
    ds = publish(settings, exchange, queues)
    common.print_produced(ds)

    results: list[EngineResult] = []
    # Idle while the engines run (minutes): without heartbeats, or the broker
    # drops it before the queues are deleted.
    params = pika.URLParameters(settings.amqp_url)
    params.heartbeat = 0
    with pika.BlockingConnection(params) as amqp:
        ch = amqp.channel()
        try:
            with common.poller(settings.postgres_url, facts) as conn:
                for engine in settings.engines:
                    results.append(
                        run_engine(settings, conn, ch, ds, run_id, engine, versions[engine])
                    )
        finally:
            if not settings.keep:
                for queue in queues:
                    ch.queue_delete(queue)
                ch.exchange_delete(exchange)

    return common.append_report(
        settings,
        benchmark=BENCHMARK,
        run_id=run_id,
        date=date,
        title="RabbitMQ -> Postgres: sluice vs the reference engine",
        intro=f"{ds.rows:,} JSON events (avg {ds.payload_bytes_avg:.0f} bytes) in one durable "
        f"queue per engine (exchange `{ds.topic}`, published in {ds.produce_s:.1f} s), appended "
        "by each engine into its own pre-created Postgres table, one engine at a time.",
        ds=ds,
        results=results,
        facts=facts,
        methodology=methodology(settings),
        detail_headers=DETAIL_HEADERS,
        note=READY_NOTE,
    )


if __name__ == "__main__":
    sys.exit(main())
