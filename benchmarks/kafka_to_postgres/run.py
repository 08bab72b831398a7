"""Kafka -> Postgres: sluice against the reference engine (ematix-flow 1.0.0).

    python -m benchmarks.kafka_to_postgres.run [--rows N] [--engines sluice,reference]

1. Produce ``--rows`` deterministic JSON events (~150 bytes each) to a new
   3-partition topic (unique name per run).
2. For each engine, one after the other: create its own target table, render
   ``pipeline.toml.tmpl`` (same pipeline; only the group_id and table differ),
   start the engine as a subprocess and poll ``count(*)`` of its table until
   every row landed. sluice stops by itself (``--stop-after-idle-ms``); the
   reference runs forever and gets SIGTERM.
3. Verify each table (row count, distinct ids, checksums), print the table
   and write ``benchmarks/results/kafka_to_postgres-<date>.{md,json}``.

See benchmarks/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import string
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import confluent_kafka as ck
import psycopg
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from benchmarks import common
from benchmarks.common import Dataset, EngineResult

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "pipeline.toml.tmpl"
#: The reference keeps its Kafka offsets in this table of the target database,
#: keyed by (pipeline_name, topic), and resumes from them whatever the group_id.
REFERENCE_OFFSETS = "public._ematix_offsets"
BENCHMARK = "kafka_to_postgres"
ENGINES = ("sluice", "reference")
#: The packages of this environment that the results record.
PACKAGES = ("sluice", "confluent-kafka", "psycopg", "pyarrow", "adbc-driver-postgresql", "msgspec")

JOIN_NOTE = (
    "rows/s = rows / (last row landed - engine's consumer group became Stable), so startup "
    "and the consumer-group join (about 23 s for the reference on this broker, about "
    "2.5 s for sluice with session_timeout_ms = 3000) are not counted against either engine. "
    "The window starts at the join, not at the first row landing, because the reference "
    "commits large batches (50k rows landed in one commit), which makes first-to-last "
    "landing undefined for it."
)


@dataclass(frozen=True)
class Settings:
    rows: int
    engines: tuple[str, ...]
    bootstrap_servers: str
    postgres_url: str
    partitions: int
    seed: int
    poll_interval_s: float
    timeout_s: float
    stall_timeout_s: float
    stop_grace_s: float
    results_dir: Path
    work_dir: Path
    keep: bool

    def as_json(self) -> dict[str, Any]:
        """The settings as a results file records them (paths as strings)."""
        return common.settings_json(self)


# ---------------------------------------------------------------- data


#: What :func:`produce` sends: ``(user_id, JSON payload, message timestamp in ms
#: since the epoch or None for the producer's clock)``.
Message = tuple[int, bytes, int | None]


def produce(settings: Settings, topic: str, messages: Iterable[Message] | None = None) -> Dataset:
    """Create ``topic`` and fill it with ``settings.rows`` events (key = user_id).

    ``messages`` (``settings.rows`` of them) replaces :func:`common.events` for a
    benchmark that needs other payloads or explicit message timestamps;
    without it every message gets the producer's clock as its timestamp.
    """
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    for fut in admin.create_topics([NewTopic(topic, settings.partitions, 1)]).values():
        fut.result(timeout=30)

    producer = ck.Producer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "linger.ms": 20,
            "batch.num.messages": 10_000,
            "queue.buffering.max.messages": 500_000,
            "queue.buffering.max.kbytes": 512 * 1024,
        }
    )
    failed: list[str] = []

    def on_delivery(err: ck.KafkaError | None, _msg: ck.Message) -> None:
        if err is not None:
            failed.append(err.str())

    ds = Dataset(
        topic=topic, rows=settings.rows, partitions=settings.partitions, seed=settings.seed
    )
    total_bytes = 0
    started = time.monotonic()
    if messages is None:
        messages = (
            (uid, payload, None) for uid, payload in common.events(settings.rows, settings.seed)
        )
    for user_id, payload, timestamp_ms in messages:
        ds.expected_user_id_sum += user_id
        total_bytes += len(payload)
        # timestamp 0 is confluent-kafka's "now", what the producer does without one.
        ts = 0 if timestamp_ms is None else timestamp_ms
        while True:
            try:
                producer.produce(
                    topic, payload, key=str(user_id).encode(), timestamp=ts, on_delivery=on_delivery
                )
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    left = producer.flush(300)
    ds.produce_s = time.monotonic() - started
    ds.payload_bytes_avg = total_bytes / max(settings.rows, 1)
    if left or failed:
        raise SystemExit(
            f"producing to {topic}: {left} undelivered, {len(failed)} failed "
            f"(first error: {failed[0] if failed else '-'})"
        )
    return ds


def delete_topic(settings: Settings, topic: str) -> None:
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    try:
        for fut in admin.delete_topics([topic], operation_timeout=30).values():
            fut.result(timeout=30)
    except Exception as exc:
        print(f"note: could not delete topic {topic}: {exc}", file=sys.stderr)


# ---------------------------------------------------------------- engines


def pipeline_name(run_id: str) -> str:
    return f"bench-k2pg-{run_id}"


def forget_reference_offsets(conn: psycopg.Connection[Any], pipeline: str) -> None:
    """Delete the row of ``pipeline`` (the TOML's pipeline_name) from the
    reference's offsets table, if it has one."""
    row = conn.execute("SELECT to_regclass(%s)", (REFERENCE_OFFSETS,)).fetchone()
    if row and row[0]:
        conn.execute(f"DELETE FROM {REFERENCE_OFFSETS} WHERE pipeline_id = %s", (pipeline,))


def drop_schema(settings: Settings, schema: str, pipeline: str) -> None:
    """Drop this run's ``schema`` and the reference's offsets row of ``pipeline``,
    on a new connection (the run's may be the reason we got here); say what is
    left over if that fails."""
    try:
        with psycopg.connect(settings.postgres_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            forget_reference_offsets(conn, pipeline)
    except psycopg.Error as exc:
        print(
            f"note: could not drop schema {schema} or delete the offsets row of "
            f"{pipeline} in {REFERENCE_OFFSETS}: {exc}",
            file=sys.stderr,
        )


def postgres_state_store(settings: Settings, schema: str) -> str:
    """A pipeline's ``[state_store]`` table: Postgres, in ``schema`` (of its own per run)."""
    return f'[state_store]\nkind = "postgres"\nurl = "{settings.postgres_url}"\nschema = "{schema}"'


def render_template(
    template: Path, settings: Settings, pipeline: str, group_id: str, table: str, **values: str
) -> str:
    """``template`` (a ``string.Template``) with what every Kafka -> Postgres
    pipeline takes: ``pipeline`` (unique per run: the reference resumes from its
    own offsets table, see REFERENCE_OFFSETS, keyed by pipeline_name, whatever
    the group_id), the broker, ``group_id``, the database, ``table``, and
    ``values`` (the topic, the schema, ...)."""
    return string.Template(template.read_text()).substitute(
        pipeline_name=pipeline,
        bootstrap_servers=settings.bootstrap_servers,
        group_id=group_id,
        postgres_url=settings.postgres_url,
        table=table,
        **values,
    )


def render_pipeline(settings: Settings, run_id: str, topic: str, group_id: str, table: str) -> str:
    return render_template(TEMPLATE, settings, pipeline_name(run_id), group_id, table, topic=topic)


def group_stable(admin: AdminClient, group_id: str) -> bool:
    """Whether ``group_id`` finished joining (Stable: members have their partitions)."""
    try:
        desc = admin.describe_consumer_groups([group_id], request_timeout=5)[group_id].result()
    except ck.KafkaException:
        return False
    return getattr(desc.state, "name", str(desc.state)) == "STABLE"


def watch_engine(
    settings: Settings,
    admin: AdminClient,
    res: EngineResult,
    count: Callable[[], int],
    done_at: int,
    what: str = "rows",
    env: Mapping[str, str] | None = None,
) -> None:
    """:func:`common.watch_engine` with the engine ready once its consumer group
    ``res.group_id`` is Stable. Shared by every Kafka benchmark; ``what`` names
    what ``count()`` counts, ``env`` replaces the engine's environment."""
    common.watch_engine(
        settings,
        res,
        count,
        done_at,
        lambda: group_stable(admin, res.group_id),
        what=what,
        env=env,
    )


def run_engine(
    settings: Settings,
    conn: psycopg.Connection[Any],
    admin: AdminClient,
    ds: Dataset,
    run_id: str,
    engine: str,
    version: str,
) -> EngineResult:
    table = f"bench_k2pg_{run_id}_{engine}"
    toml_path = settings.work_dir / f"{engine}.toml"
    group_id = f"bench-k2pg-{run_id}-{engine}"
    toml_path.write_text(render_pipeline(settings, run_id, ds.topic, group_id, table))
    return run_append_engine(settings, conn, admin, ds, engine, version, table, toml_path, group_id)


def run_append_engine(
    settings: Settings,
    conn: psycopg.Connection[Any],
    admin: AdminClient,
    ds: Dataset,
    engine: str,
    version: str,
    table: str,
    toml_path: Path,
    group_id: str,
) -> EngineResult:
    """:func:`common.run_append_engine`, ready once the consumer group ``group_id`` is Stable."""
    return common.run_append_engine(
        settings,
        conn,
        ds,
        engine,
        version,
        table,
        toml_path,
        group_id,
        lambda: group_stable(admin, group_id),
    )


# ---------------------------------------------------------------- report


def methodology(settings: Settings) -> list[str]:
    return [
        JOIN_NOTE,
        f"Every {settings.poll_interval_s} s the harness polls `SELECT count(*)` of the "
        "engine's table and the state of its consumer group (AdminClient "
        "describe_consumer_groups); each time is that of the first poll that saw the event, "
        f"so it is known to within {settings.poll_interval_s} s.",
        f"'busy from': the start of the first poll interval after the join in which the "
        f"engine used >= {common.BUSY_CORES} cores; 'rows/s from busy' = rows / (all rows at - busy "
        "from). It shows how much of the ingest window the engine spent waiting after its "
        "join (the reference idles about 5 s after its group is Stable before it fetches).",
        "'rows/s first->last landing' = (rows - rows already there at the first poll that "
        "saw any) / (all rows at - first row at), the rate over the landing window alone; "
        "n/a when every row landed between two polls (one big commit).",
        "CPU-s per 1M rows: user + system CPU of the engine's process tree from its start to "
        "the poll that saw the last row (startup and group join included; sluice's 3 s idle "
        "tail and the reference's shutdown excluded), scaled to 1M rows. 'CPU-s whole run' "
        "is the reaped process's rusage (start to exit).",
        common.PEAK_RSS,
        "Both tables have the same columns, including `_event_ts timestamptz`: sluice fills it "
        "with the Kafka message timestamp, the reference does not produce it (NULL).",
        "sluice stops by itself (`--stop-after-idle-ms 3000`); the reference runs forever and "
        "gets SIGTERM once every row landed (it takes about 15 s to exit after it).",
        f"The reference stores its Kafka offsets in `{REFERENCE_OFFSETS}` of the target "
        "database, keyed by pipeline_name and topic, and resumes from them whatever the "
        "group_id; so every run uses a new pipeline_name (and deletes its row afterwards).",
    ]


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> Settings:
    return parse_settings(
        argv,
        benchmark=BENCHMARK,
        description="Kafka -> Postgres throughput, CPU and memory: sluice vs ematix-flow 1.0.0.",
    )


def parse_settings(
    argv: Sequence[str] | None,
    *,
    benchmark: str,
    description: str,
    engines: Sequence[str] = ENGINES,
    keep_help: str = "keep the tables and the topic",
    stall_help: str = "give up after this long without new rows",
) -> Settings:
    """The command line every Kafka -> Postgres benchmark takes."""
    p = argparse.ArgumentParser(
        prog=f"python -m benchmarks.{benchmark}.run", description=description
    )
    common.add_run_arguments(p, engines=engines, keep_help=keep_help, stall_help=stall_help)
    p.add_argument("--bootstrap-servers", default="127.0.0.1:19092")
    p.add_argument("--partitions", type=int, default=3)
    a = p.parse_args(argv)
    return Settings(
        **common.run_arguments(p, a, engines),
        bootstrap_servers=a.bootstrap_servers,
        partitions=a.partitions,
    )


def check_services(settings: Settings) -> None:
    hint = "is it running? `bash scripts/services.sh start`"
    try:
        AdminClient({"bootstrap.servers": settings.bootstrap_servers}).list_topics(timeout=10)
    except ck.KafkaException as exc:
        raise SystemExit(f"Kafka at {settings.bootstrap_servers}: {exc}; {hint}") from exc
    try:
        with psycopg.connect(settings.postgres_url, connect_timeout=10) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        raise SystemExit(f"Postgres at {settings.postgres_url}: {exc}; {hint}") from exc


def produce_events(settings: Settings, topic: str) -> Dataset:
    """:func:`produce` the benchmark's events to ``topic``, saying so on stdout."""
    print(
        f"producing {settings.rows:,} events to {topic} ({settings.partitions} partitions)",
        flush=True,
    )
    ds = produce(settings, topic)
    common.print_produced(ds)
    return ds


def main(argv: Sequence[str] | None = None) -> int:
    settings, run_id = common.start_run(parse_args(argv), "bench-k2pg")
    date = common.utc_date()

    check_services(settings)
    versions = {engine: common.check_engine(engine) for engine in settings.engines}
    facts = common.run_facts(date)
    facts["packages"] = common.engine_packages(PACKAGES, settings.engines)

    topic = f"bench-k2pg-{run_id}"
    ds = produce_events(settings, topic)

    results: list[EngineResult] = []
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    try:
        with common.poller(settings.postgres_url, facts) as conn:
            for engine in settings.engines:
                results.append(
                    run_engine(settings, conn, admin, ds, run_id, engine, versions[engine])
                )
            if not settings.keep:
                forget_reference_offsets(conn, pipeline_name(run_id))
    finally:
        if not settings.keep:
            delete_topic(settings, topic)

    return common.append_report(
        settings,
        benchmark=BENCHMARK,
        run_id=run_id,
        date=date,
        title="Kafka -> Postgres: sluice vs the reference engine",
        intro=f"{ds.rows:,} JSON events (avg {ds.payload_bytes_avg:.0f} bytes) in a "
        f"{ds.partitions}-partition topic (`{ds.topic}`, produced in {ds.produce_s:.1f} s), "
        "appended by each engine into its own pre-created Postgres table, one engine at a time.",
        ds=ds,
        results=results,
        facts=facts,
        methodology=methodology(settings),
        note=JOIN_NOTE,
    )


if __name__ == "__main__":
    sys.exit(main())
