"""Pub/Sub (emulator) -> Postgres: sluice beside the reference engine on the same TOML.

    python -m benchmarks.brokers.pubsub_to_postgres [--rows N] [--engines sluice,reference]

1. Create a topic and one subscription per engine (each gets every message),
   then publish ``--rows`` deterministic JSON events (the Kafka benchmark's
   events, ~150 bytes each).
2. For each engine, one after the other: create its target table, render
   ``pubsub_pipeline.toml.tmpl``, start the engine as a subprocess and poll
   ``count(*)`` until every row landed (or no row lands for
   ``--stall-timeout-s``). sluice stops by itself after 3 s idle; the reference
   runs forever and gets SIGTERM.
3. Verify each table (row count, distinct ids, sum of user_id), delete the
   subscriptions and the topic, print the table and write
   ``benchmarks/results/pubsub_to_postgres-<date>.{md,json}``.

Loading takes about 1.9 s per 10k events on the 2-core test machine (100k in
19 s, linear), so about 3 min at the default 1M. The rows/s is its own
measure (rows over first -> last row landed), not ``kafka_to_postgres``'s.

:func:`run_broker` is shared with ``kinesis_to_postgres.py``.
"""

from __future__ import annotations

import argparse
import os
import string
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from benchmarks import common

HERE = Path(__file__).resolve().parent
PROJECT = "sluice-bench"
EMULATOR = os.environ.get("PUBSUB_EMULATOR_HOST", "127.0.0.1:8085")
PACKAGES = ("sluice", "google-cloud-pubsub", "boto3", "psycopg", "pyarrow", "msgspec")
ENGINES = ("sluice", "reference")


@dataclass(frozen=True)
class Settings:
    rows: int
    engines: tuple[str, ...]
    postgres_url: str
    seed: int
    poll_interval_s: float
    timeout_s: float
    stall_timeout_s: float
    results_dir: Path
    work_dir: Path


@dataclass
class EngineResult:
    engine: str
    version: str
    table: str
    outcome: str = "not run"  # ok | exited early | timeout | stalled
    rows_landed: int = 0
    first_row_s: float | None = None  # since the engine started
    last_row_s: float | None = None
    rows_per_s: float | None = None  # rows / (last row - first row landed)
    cpu_s: float | None = None
    cpu_s_per_1m: float | None = None
    peak_rss_mib: float | None = None
    verification: dict[str, Any] = field(default_factory=dict)
    log: str = ""


@dataclass(frozen=True)
class Broker:
    """What differs between the brokers: how data gets in, and the TOML keys."""

    name: str  # pubsub | kinesis
    template: Path
    #: Put the rows in; returns (source_query per engine, produce seconds).
    load: Callable[[Settings, list[bytes], Sequence[str]], tuple[dict[str, str], float]]
    #: Template values of the source connection.
    values: dict[str, str]
    #: Environment for the engines (e.g. PUBSUB_EMULATOR_HOST).
    env: dict[str, str]
    #: Remove what ``load`` made (given its source_query per engine), so that a
    #: large run leaves nothing behind in the emulator's memory.
    cleanup: Callable[[dict[str, str]], None]
    #: ``--rows`` when not given.
    default_rows: int = 1_000_000
    #: sluice's ``--stop-after-idle-ms``: how long a silence ends its run.
    idle_ms: int = 3000


def parse_args(argv: Sequence[str] | None, b: Broker) -> Settings:
    name = b.name
    p = argparse.ArgumentParser(description=f"{name} -> Postgres: sluice vs ematix-flow 1.0.0.")
    p.add_argument("--rows", type=int, default=b.default_rows)
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--postgres-url", default=common.POSTGRES_URL)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--poll-interval-s", type=float, default=0.5)
    p.add_argument("--timeout-s", type=float, default=1800)
    p.add_argument("--stall-timeout-s", type=float, default=60)
    p.add_argument("--results-dir", type=Path, default=common.RESULTS_DIR)
    p.add_argument("--work-dir", type=Path, default=Path("/tmp") / f"bench-{name}")
    a = p.parse_args(argv)
    engines = common.chosen_engines(p, a.engines, ENGINES)
    return Settings(
        a.rows, engines, a.postgres_url, a.seed, a.poll_interval_s, a.timeout_s,
        a.stall_timeout_s, a.results_dir, a.work_dir,
    )  # fmt: skip


def run_engine(
    s: Settings, b: Broker, engine: str, query: str, expected: int, user_id_sum: int
) -> EngineResult:
    """Run one engine over its own table until every row landed, stalled or timed out."""
    table = f"bench_{b.name}_{engine}_{int(time.time())}"
    res = EngineResult(engine, common.check_engine(engine), table)
    with psycopg.connect(s.postgres_url, autocommit=True) as conn:
        common.create_table(conn, f"public.{table}", common.EVENT_COLUMNS)
        toml = s.work_dir / f"{b.name}-{engine}.toml"
        toml.parent.mkdir(parents=True, exist_ok=True)
        toml.write_text(
            string.Template(b.template.read_text()).substitute(
                pipeline_name=table, query=query, table=table, postgres_url=s.postgres_url,
                **b.values,
            )
        )  # fmt: skip
        env = {**os.environ, **b.env, "SLUICE_STATE_DIR": str(s.work_dir / "state")}
        if engine == "reference":
            env.pop("PYTHONPATH", None)
        argv = common.engine_argv(engine, toml, idle_ms=b.idle_ms)
        proc = common.MonitoredProcess(argv, s.work_dir / f"{engine}.log", env)
        proc.start()
        started = time.monotonic()
        last_change, landed = started, 0
        while True:
            time.sleep(s.poll_interval_s)
            proc.sample()
            now = time.monotonic()
            count = common.count_rows(conn, f"public.{table}")
            if count and res.first_row_s is None:
                res.first_row_s = now - started
            if count != landed:
                landed, last_change = count, now
                res.last_row_s = now - started
            if landed >= expected:
                res.outcome = "ok"
                break
            if proc.reap():
                res.outcome = "exited early"
                break
            if now - started > s.timeout_s:
                res.outcome = "timeout"
                break
            if now - last_change > s.stall_timeout_s:
                res.outcome = "stalled"
                break
        if not proc.wait(30 if engine == "sluice" else 0.0):
            proc.stop(10)
        res.rows_landed = landed
        res.cpu_s = proc.final_cpu_s
        if res.cpu_s is not None and landed:
            res.cpu_s_per_1m = res.cpu_s / landed * 1_000_000
        res.peak_rss_mib = proc.peak_rss_bytes() / (1 << 20)
        if res.first_row_s is not None and res.last_row_s is not None:
            # Rows landing within one poll count as landing over one poll interval.
            span = max(res.last_row_s - res.first_row_s, s.poll_interval_s)
            res.rows_per_s = landed / span
        res.log = proc.log_tail()
        res.verification = verify(conn, table, expected, user_id_sum)
    return res


def verify(
    conn: psycopg.Connection[Any], table: str, expected: int, user_id_sum: int
) -> dict[str, Any]:
    """Row count, duplicate ids and the sum of user ids of ``public.<table>``."""
    row = conn.execute(
        f"SELECT count(*), count(DISTINCT id), coalesce(sum(user_id), 0) FROM public.{table}"
    ).fetchone()
    count, distinct, user_sum = row if row else (0, 0, 0)
    problems = []
    if count != expected:
        problems.append(f"{count} rows, expected {expected}")
    if distinct != count:
        problems.append(f"{count - distinct} duplicate ids")
    if user_sum != user_id_sum:
        problems.append(f"sum(user_id) {user_sum}, expected {user_id_sum}")
    return {"ok": not problems, "problems": problems}


def run_broker(b: Broker, argv: Sequence[str] | None) -> int:
    s = parse_args(argv, b)
    data = list(common.events(s.rows, s.seed))
    payloads = [p for _, p in data]
    user_id_sum = sum(u for u, _ in data)
    del data
    queries, produce_s = b.load(s, payloads, s.engines)
    del payloads
    print(f"{b.name}: {s.rows} events in {produce_s:.1f} s", flush=True)
    results = []
    try:
        for engine in s.engines:
            print(f"[{engine}] running", flush=True)
            r = run_engine(s, b, engine, queries[engine], s.rows, user_id_sum)
            common.print_problem(r)
            results.append(r)
    finally:
        b.cleanup(queries)
    headers = ["engine", "outcome", "rows", "rows/s", "CPU-s / 1M rows", "peak RSS MiB"]
    rows = [
        [r.engine, r.outcome, str(r.rows_landed), common.num(r.rows_per_s, ",.0f"),
         common.num(r.cpu_s_per_1m, ".1f"), common.num(r.peak_rss_mib, ".0f")]
        for r in results
    ]  # fmt: skip
    by = {r.engine: r for r in results}
    if "sluice" in by and "reference" in by:
        rows.append(
            ["sluice / reference", "", "", common.ratio(by["sluice"].rows_per_s,
             by["reference"].rows_per_s), common.ratio(by["sluice"].cpu_s_per_1m,
             by["reference"].cpu_s_per_1m), common.ratio(by["sluice"].peak_rss_mib,
             by["reference"].peak_rss_mib)]
        )  # fmt: skip
    print(common.format_table(headers, rows), flush=True)
    date = common.utc_date()
    facts = {**common.run_facts(date), "packages": common.engine_packages(PACKAGES, s.engines)}
    md = [
        f"# {b.name} -> Postgres, {s.rows} events ({date})",
        "",
        common.markdown_table(headers, rows),
        "",
        *common.problems_section(results),
        *common.report_tail(
            [
                f"{s.rows} JSON events put into {b.name} before the engines start; each "
                "engine reads all of them into its own table.",
                "rows/s = rows / (last row landed - first row landed, at least one poll "
                f"interval), polled every {s.poll_interval_s} s; CPU-s (startup included) "
                "and peak RSS of the engine's process tree.",
            ],
            facts,
            results,
        ),
    ]
    path = common.write_results(
        s.results_dir,
        f"{b.name}_to_postgres-{date}",
        "\n".join(md),
        {"settings": common.settings_json(s), "produce_s": produce_s, "machine": facts,
         "results": [asdict(r) for r in results]},
    )  # fmt: skip
    print(f"results: {path}", flush=True)
    return 1 if any(common.failed(r) for r in results) else 0


# ---------------------------------------------------------------- Pub/Sub


def load_pubsub(
    s: Settings, payloads: list[bytes], engines: Sequence[str]
) -> tuple[dict[str, str], float]:
    """One topic, one subscription per engine, then every payload published."""
    os.environ.setdefault("PUBSUB_EMULATOR_HOST", EMULATOR)
    from google.cloud import pubsub_v1

    pub = pubsub_v1.PublisherClient(pubsub_v1.types.BatchSettings(max_messages=1000))
    sub = pubsub_v1.SubscriberClient()
    run = f"bench{int(time.time())}"
    topic = pub.topic_path(PROJECT, run)
    pub.create_topic(name=topic)
    queries = {}
    for engine in engines:
        name = f"{run}-{engine}"
        sub.create_subscription(
            request={"name": sub.subscription_path(PROJECT, name), "topic": topic,
                     "ack_deadline_seconds": 60}
        )  # fmt: skip
        queries[engine] = name
    started = time.monotonic()
    for i in range(0, len(payloads), 10_000):
        futures = [pub.publish(topic, p) for p in payloads[i : i + 10_000]]
        for f in futures:
            f.result(timeout=120)
    return queries, time.monotonic() - started


def cleanup_pubsub(queries: dict[str, str]) -> None:
    """Delete the subscriptions (``<topic>-<engine>``) and their topic."""
    os.environ.setdefault("PUBSUB_EMULATOR_HOST", EMULATOR)
    from google.cloud import pubsub_v1

    sub = pubsub_v1.SubscriberClient()
    topics = {name.removesuffix(f"-{engine}") for engine, name in queries.items()}
    for name in queries.values():
        sub.delete_subscription(request={"subscription": sub.subscription_path(PROJECT, name)})
    for topic in topics:
        pubsub_v1.PublisherClient().delete_topic(request={"topic": sub.topic_path(PROJECT, topic)})


PUBSUB = Broker(
    name="pubsub",
    template=HERE / "pubsub_pipeline.toml.tmpl",
    load=load_pubsub,
    values={"project_id": PROJECT, "endpoint": EMULATOR},
    env={"PUBSUB_EMULATOR_HOST": EMULATOR},
    cleanup=cleanup_pubsub,
    # A pull the client gave up on (its deadline) may still have leased
    # messages at the emulator: they come back only once the ack deadline
    # (10 s) lapsed, so a shorter silence would end the run without them.
    idle_ms=30_000,
    # With 2 x 1M messages held the emulator (6 GB heap) served ~200 msgs/s
    # to each pull while sluice sat at 2 % CPU: 1M measures the emulator.
    default_rows=100_000,
)


def main(argv: Sequence[str] | None = None) -> int:
    return run_broker(PUBSUB, argv)


if __name__ == "__main__":
    sys.exit(main())
