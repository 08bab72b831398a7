"""One process against two: the same pipeline as replicas in one consumer group.

    python -m benchmarks.replicas.run [--rows N] [--scenarios append,tumbling]

1. Produce ``--rows`` JSON events keyed by ``user_id`` to a new 6-partition
   topic (one topic for the whole run).
2. For each scenario and each process count (1, then 2): a fresh target table
   (and state schema), the pipeline started that many times in one consumer
   group with ``--stop-after-idle-ms``; the run ends when every process
   exited (a replica stops once its partitions are drained and idle).
   * ``append``: Kafka -> Postgres append, positions in the target
     (exactly-once), the S1 pipeline of ``kafka_to_postgres``;
   * ``tumbling``: a 60 s tumbling window per user (count, sum) ->
     Postgres merge, ``replicas = true`` with the Postgres state store.
3. Verify each table (append: every id once; tumbling: the windows a
   single-process run wrote), print rows/s (wall from the first start to the
   last exit, startup included), CPU-s per 1M rows (all processes) and the
   two-process / one-process ratio; write
   ``benchmarks/results/replicas-<date>.{md,json}``.

The machine has 2 cores that the broker, Postgres and the engines share: a
ratio near 1 means the machine, not the pipeline, is the limit.
"""

from __future__ import annotations

import argparse
import secrets
import string
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import confluent_kafka as ck
import psycopg
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from benchmarks import common

BENCHMARK = "replicas"
SCENARIOS = ("append", "tumbling")
PARTITIONS = 6
USERS = 5_000
TS0_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
PACKAGES = ("sluice", "confluent-kafka", "psycopg", "pyarrow")

PIPELINE = string.Template(
    """
pipeline_name = "${name}"
source_query = "${topic}"
idle_pause_ms = 100
${replicas}

[source]
kind = "kafka"
bootstrap_servers = "${bootstrap}"
group_id = "${name}"
auto_offset_reset = "earliest"
session_timeout_ms = 3000

[target]
kind = "postgres"
url = "${postgres}"
${mode}

[target.table]
schema = "public"
name = "${name}"
${key}
${window}
"""
)

WINDOW = """
[transform.window]
kind = "tumbling"
duration_ms = 60000
group_by = ["user_id"]
max_groups_per_window = 1000000

[[transform.window.aggregations]]
agg = "count"
as = "n"

[[transform.window.aggregations]]
agg = "sum"
column = "amount"
as = "amount_sum"

[watermark]
source_idleness_ms = 5000

[state_store]
kind = "postgres"
url = "${postgres}"
schema = "${name}_state"
checkpoint_interval_ms = 5000
"""


@dataclass
class Run:
    scenario: str
    processes: int
    rows: int
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    exit_codes: list[int | None]
    check: str

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.wall_s

    @property
    def cpu_per_m(self) -> float:
        return self.cpu_s / self.rows * 1_000_000


def produce(topic: str, rows: int, bootstrap: str) -> None:
    producer = ck.Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 20, "queue.buffering.max.messages": 2_000_000}
    )
    for i in range(rows):
        user = i % USERS
        body = (
            f'{{"id":{i},"user_id":{user},"amount":{i % 1000},"event_type":"e{i % 7}","ts":"{i}"}}'
        ).encode()
        while True:
            try:
                producer.produce(topic, body, key=str(user).encode(), timestamp=TS0_MS + i * 20)
                break
            except BufferError:
                producer.poll(0.1)
        if i % 10_000 == 0:
            producer.poll(0)
    producer.flush(120)


def run_once(
    scenario: str, processes: int, topic: str, rows: int, args: argparse.Namespace, work: Path
) -> Run:
    name = f"bench_rep_{scenario}_{processes}_{secrets.token_hex(3)}"
    stateful = scenario == "tumbling"
    toml = PIPELINE.substitute(
        name=name,
        topic=topic,
        bootstrap=args.bootstrap,
        postgres=args.postgres,
        replicas="replicas = true" if stateful else "",
        mode='mode = "merge"' if stateful else "",
        key='primary_key = ["window_start", "user_id"]' if stateful else "",
        window=string.Template(WINDOW).substitute(name=name, postgres=args.postgres)
        if stateful
        else "",
    )
    path = work / f"{name}.toml"
    path.write_text(toml)
    flow = str(Path(sys.executable).with_name("flow"))
    procs = [
        common.MonitoredProcess(
            [flow, "consume", str(path), "--stop-after-idle-ms", str(args.idle_ms)],
            work / f"{name}-{i}.log",
        )
        for i in range(processes)
    ]
    started = time.monotonic()
    for p in procs:
        p.start()
    deadline = started + args.timeout
    while not all(p.reap() for p in procs):
        for p in procs:
            p.sample()
        if time.monotonic() > deadline:
            for p in procs:
                p.stop(10)
            break
        time.sleep(0.2)
    # The last row landed before the processes noticed they were idle: count that wait out.
    wall = time.monotonic() - started - args.idle_ms / 1000
    with psycopg.connect(args.postgres) as conn:
        if stateful:
            got = conn.execute(f"SELECT count(*), sum(n) FROM public.{name}").fetchone()
            assert got is not None
            check = f"{got[0]} windows, {got[1]} rows counted"
            ok = got[1] == rows
        else:
            got = conn.execute(f"SELECT count(*), count(DISTINCT id) FROM public.{name}").fetchone()
            assert got is not None
            check = f"{got[0]} rows, {got[1]} distinct ids"
            ok = got[0] == got[1] == rows
    if not ok:
        check = "WRONG: " + check
    return Run(
        scenario,
        processes,
        rows,
        wall,
        sum(p.final_cpu_s or 0.0 for p in procs),
        max(p.peak_rss_bytes() for p in procs) / 1e6,
        [p.returncode for p in procs],
        check,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--bootstrap", default="127.0.0.1:19092")
    parser.add_argument("--postgres", default=common.POSTGRES_URL)
    parser.add_argument("--idle-ms", type=int, default=3000)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--results-dir", type=Path, default=common.RESULTS_DIR)
    args = parser.parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]
    topic = f"bench_replicas_{secrets.token_hex(4)}"
    admin = AdminClient({"bootstrap.servers": args.bootstrap})
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])[topic].result(timeout=30)
    print(f"producing {args.rows} events to {topic} ...", flush=True)
    produce(topic, args.rows, args.bootstrap)
    work = Path("/tmp") / f"sluice-bench-replicas-{secrets.token_hex(3)}"
    work.mkdir(parents=True)
    runs: list[Run] = []
    for scenario in scenarios:
        for processes in (1, 2):
            r = run_once(scenario, processes, topic, args.rows, args, work)
            runs.append(r)
            print(
                f"{scenario:9} {processes} process(es): {r.rows_per_s:9.0f} rows/s "
                f"{r.cpu_per_m:5.2f} CPU-s/1M  peak {r.peak_rss_mb:5.0f} MB  "
                f"exit {r.exit_codes}  {r.check}",
                flush=True,
            )
    rows_md = []
    for scenario in scenarios:
        one = next(r for r in runs if r.scenario == scenario and r.processes == 1)
        two = next(r for r in runs if r.scenario == scenario and r.processes == 2)
        for r in (one, two):
            rows_md.append(
                [
                    scenario,
                    str(r.processes),
                    common.num(r.rows_per_s, ",.0f"),
                    common.num(r.cpu_per_m, ".2f"),
                    common.num(r.peak_rss_mb, ".0f"),
                    common.ratio(r.rows_per_s, one.rows_per_s),
                    r.check,
                ]
            )
    headers = ["scenario", "processes", "rows/s", "CPU-s / 1M rows", "peak RSS MB (one process)",
               "rows/s vs 1 process", "check"]  # fmt: skip
    table = common.markdown_table(headers, rows_md)
    print(table)
    if args.no_write:
        return 0 if all(not r.check.startswith("WRONG") for r in runs) else 1
    date = common.utc_date()
    facts = common.run_facts(date)
    facts["packages"] = common.engine_packages(PACKAGES, ())
    md = "\n".join(
        [
            f"# Replicas: one process against two ({date})",
            "",
            f"{args.rows:,} JSON events keyed by user_id in a {PARTITIONS}-partition topic; "
            "the same pipeline run as 1 and as 2 processes in one consumer group.",
            "",
            table,
            "",
            *common.report_tail(
                [
                    "wall: from the first process start to the last exit, minus the "
                    "--stop-after-idle-ms wait (startup and group joins included)",
                    "CPU-s: user + system of every process (wait4), per 1M rows",
                    "append: Kafka -> Postgres append with positions in the target",
                    "tumbling: replicas = true, 60 s window per user, Postgres state store",
                    "the broker, Postgres and the engines share the machine's 2 cores",
                ],
                facts,
                [],
            ),
        ]
    )
    out = common.write_results(
        args.results_dir,
        f"{BENCHMARK}-{date}",
        md,
        {"machine": facts, "runs": [asdict(r) | {"rows_per_s": r.rows_per_s} for r in runs]},
    )
    print(f"wrote {out}")
    return 0 if all(not r.check.startswith("WRONG") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
