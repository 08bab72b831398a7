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
import sys
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka.admin import AdminClient
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from benchmarks import common
from benchmarks.common import Dataset, EngineResult
from benchmarks.kafka_to_postgres import run as k2pg
from benchmarks.kafka_to_postgres.run import Settings

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
    for user_id, payload in common.events(settings.rows, settings.seed):
        yield user_id, serialize(json.loads(payload), ctx), None


def render_pipeline(
    settings: Settings, run_id: str, topic: str, group_id: str, table: str, registry_url: str
) -> str:
    return k2pg.render_template(
        TEMPLATE,
        settings,
        f"{PREFIX}-{run_id}",
        group_id,
        table,
        topic=topic,
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
    return k2pg.run_append_engine(
        settings, conn, admin, ds, engine, version, table, toml_path, group_id
    )


def main(argv: Sequence[str] | None = None) -> int:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--schema-registry-url", default=DEFAULT_REGISTRY)
    known, rest = extra.parse_known_args(argv)
    registry_url: str = known.schema_registry_url
    settings, run_id = common.start_run(
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
    versions = {engine: common.check_engine(engine) for engine in settings.engines}
    facts = common.run_facts(date)
    facts["packages"] = common.engine_packages(PACKAGES, settings.engines)

    topic = f"{PREFIX}-{run_id}"
    print(f"producing {settings.rows:,} Avro events to {topic}", flush=True)
    ds = k2pg.produce(settings, topic, avro_events(settings, topic, registry_url))
    common.print_produced(ds)

    results: list[EngineResult] = []
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    try:
        with common.poller(settings.postgres_url, facts) as conn:
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

    return common.append_report(
        settings,
        benchmark=BENCHMARK,
        run_id=run_id,
        date=date,
        title="Kafka (Avro, schema registry) -> Postgres: sluice vs the reference engine",
        intro=f"{ds.rows:,} Avro events (avg {ds.payload_bytes_avg:.0f} bytes, Confluent wire "
        f"format, serialized by confluent-kafka's AvroSerializer) in a {ds.partitions}-partition "
        f"topic (`{ds.topic}`, produced in {ds.produce_s:.1f} s), appended by each engine into "
        "its own pre-created Postgres table, one engine at a time.",
        ds=ds,
        results=results,
        facts=facts,
        methodology=k2pg.methodology(settings),
        extra_settings={"schema_registry_url": registry_url},
    )


if __name__ == "__main__":
    sys.exit(main())
