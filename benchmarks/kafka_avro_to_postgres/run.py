"""Kafka (Avro via a schema registry) -> Postgres: sluice against the reference engine.

    python -m benchmarks.kafka_avro_to_postgres.run [--rows N] [--engines sluice,reference]
        [--schema-registry-url http://127.0.0.1:8081]

``kafka_to_postgres`` with Avro payloads instead of JSON: the same events
(its generator, the same columns and checks), each serialized by
confluent-kafka's own ``AvroSerializer`` (Confluent wire format: magic byte,
schema id, Avro body) against the schema registry that
``scripts/services.sh`` starts (``tests/registry_server.py``). Both engines
decode through the registry. The polling, CPU and memory accounting and the
verification are ``kafka_to_postgres``'s; results go to
``benchmarks/results/kafka_avro_to_postgres-<date>.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import string
import sys
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from benchmarks import common
from benchmarks.kafka_to_postgres import run as k2pg
from benchmarks.kafka_to_postgres.run import Dataset, EngineResult, Settings

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "pipeline.toml.tmpl"
BENCHMARK = "kafka_avro_to_postgres"
PREFIX = "bench-avro"
PACKAGES = (*k2pg.PACKAGES, "fastavro", "httpx")
DEFAULT_REGISTRY = "http://127.0.0.1:8081"

#: The Avro schema of ``kafka_to_postgres``'s events (``ts`` stays the ISO string).
EVENT_SCHEMA = {
    "type": "record",
    "name": "Event",
    "namespace": "bench",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "user_id", "type": "long"},
        {"name": "event_type", "type": "string"},
        {"name": "amount", "type": "double"},
        {"name": "country", "type": "string"},
        {"name": "session", "type": "string"},
        {"name": "ts", "type": "string"},
    ],
}


def avro_events(settings: Settings, topic: str, registry_url: str) -> Iterator[k2pg.Message]:
    """``kafka_to_postgres``'s events, Avro-encoded by confluent-kafka's serializer."""
    serialize = AvroSerializer(
        SchemaRegistryClient({"url": registry_url}), json.dumps(EVENT_SCHEMA)
    )
    ctx = SerializationContext(topic, MessageField.VALUE)
    for user_id, payload in k2pg.events(settings.rows, settings.seed):
        yield user_id, serialize(json.loads(payload), ctx), None


def render_pipeline(
    settings: Settings, run_id: str, topic: str, group_id: str, table: str, registry_url: str
) -> str:
    return string.Template(TEMPLATE.read_text()).substitute(
        pipeline_name=f"{PREFIX}-{run_id}",
        topic=topic,
        bootstrap_servers=settings.bootstrap_servers,
        group_id=group_id,
        postgres_url=settings.postgres_url,
        table=table,
        schema_registry_url=registry_url,
    )


def run_engine(
    settings: Settings,
    conn: psycopg.Connection[Any],
    admin: AdminClient,
    ds: Dataset,
    run_id: str,
    engine: str,
    version: str,
    registry_url: str,
) -> EngineResult:
    table = f"bench_avro_{run_id}_{engine}"
    toml_path = settings.work_dir / f"{engine}.toml"
    group_id = f"{PREFIX}-{run_id}-{engine}"
    toml_path.write_text(render_pipeline(settings, run_id, ds.topic, group_id, table, registry_url))
    k2pg.recreate_table(conn, f"public.{table}", k2pg.TABLE_COLUMNS)
    argv = k2pg.engine_argv(engine, toml_path)
    res = EngineResult(engine=engine, version=version, table=table, command=argv, group_id=group_id)
    k2pg.watch_engine(
        settings, admin, res, lambda: k2pg.count_rows(conn, f"public.{table}"), ds.rows
    )
    if res.outcome == "ok" and res.ingest_window_s:
        res.rows_per_s = ds.rows / res.ingest_window_s
    if res.outcome == "ok" and res.busy_s is not None and res.last_row_s is not None:
        res.busy_rows_per_s = ds.rows / (res.last_row_s - res.busy_s)
    if res.outcome == "ok" and res.landing_window_s:
        res.landing_rows_per_s = (ds.rows - res.rows_at_first_poll) / res.landing_window_s
    res.verification = k2pg.verify(conn, table, ds)
    common.print_problem(res)
    if not settings.keep:
        conn.execute(f"DROP TABLE IF EXISTS public.{table}")
    return res


def render_markdown(
    settings: Settings,
    ds: Dataset,
    results: Sequence[EngineResult],
    facts: dict[str, Any],
    date: str,
) -> str:
    lines = [
        f"# Kafka (Avro, schema registry) -> Postgres: sluice vs the reference engine ({date})",
        "",
        f"{ds.rows:,} Avro events (avg {ds.payload_bytes_avg:.0f} bytes, Confluent wire format, "
        f"serialized by confluent-kafka's AvroSerializer) in a {ds.partitions}-partition topic "
        f"(`{ds.topic}`, produced in {ds.produce_s:.1f} s), appended by each engine into its own "
        "pre-created Postgres table, one engine at a time.",
        "",
        common.markdown_table(k2pg.SUMMARY_HEADERS, k2pg.summary_rows(results, ds.rows)),
        "",
        common.markdown_table(k2pg.DETAIL_HEADERS, k2pg.detail_rows(results)),
        "",
        *common.report_tail(k2pg.methodology(settings), facts, results),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--schema-registry-url", default=DEFAULT_REGISTRY)
    known, rest = extra.parse_known_args(argv)
    registry_url: str = known.schema_registry_url
    settings, run_id = k2pg.start_run(
        k2pg.parse_settings(
            rest,
            benchmark=BENCHMARK,
            description="Kafka (Avro) -> Postgres throughput, CPU and memory: sluice vs "
            "ematix-flow 1.0.0 (also takes --schema-registry-url).",
        ),
        PREFIX,
    )
    date = common.utc_date()
    k2pg.check_services(settings)
    try:
        urllib.request.urlopen(f"{registry_url}/subjects", timeout=10).close()
    except OSError as exc:
        raise SystemExit(
            f"schema registry at {registry_url}: {exc}; `bash scripts/services.sh start registry`"
        ) from exc
    versions = {engine: k2pg.check_engine(engine) for engine in settings.engines}
    facts = common.run_facts(date)
    facts["packages"] = common.engine_packages(PACKAGES, settings.engines)

    topic = f"{PREFIX}-{run_id}"
    print(f"producing {settings.rows:,} Avro events to {topic}", flush=True)
    ds = k2pg.produce(settings, topic, avro_events(settings, topic, registry_url))
    k2pg.print_produced(ds)

    results: list[EngineResult] = []
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    try:
        with psycopg.connect(settings.postgres_url, autocommit=True) as conn:
            facts["postgres"] = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
            conn.execute("SET max_parallel_workers_per_gather = 0")
            for engine in settings.engines:
                results.append(
                    run_engine(
                        settings, conn, admin, ds, run_id, engine, versions[engine], registry_url
                    )
                )
            if not settings.keep:
                k2pg.forget_reference_offsets(conn, f"{PREFIX}-{run_id}")
    finally:
        if not settings.keep:
            k2pg.delete_topic(settings, topic)

    print()
    print(common.format_table(k2pg.SUMMARY_HEADERS, k2pg.summary_rows(results, ds.rows)))
    print()
    print(common.format_table(k2pg.DETAIL_HEADERS, k2pg.detail_rows(results)))
    data = {
        "benchmark": BENCHMARK,
        "run_id": run_id,
        "date": date,
        "settings": {**settings.as_json(), "schema_registry_url": registry_url},
        "dataset": asdict(ds),
        "machine": facts,
        "methodology": k2pg.methodology(settings),
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
