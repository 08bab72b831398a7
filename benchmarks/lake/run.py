"""Lake scenarios: sluice beside the reference engine (ematix-flow 1.0.0).

    python -m benchmarks.lake.run [--rows N] [--scenarios kafka_delta,kafka_parquet,files_postgres]
                                  [--engines sluice,reference]

* ``kafka_delta``: a 3-partition topic of ``--rows`` JSON events (the events
  of ``benchmarks.kafka_to_postgres``) -> a local Delta table, append. Both
  engines run the same pipeline file (only the group and the path differ).
* ``kafka_parquet``: the same topic -> Parquet files (``object_store_local``).
* ``files_postgres``: the same events as JSON-lines files (100k rows each)
  in a folder -> a Postgres table. sluice only: the reference cannot stream
  from files.

Each engine runs alone; sluice exits by itself (``--stop-after-idle-ms``),
the reference gets SIGTERM once every row landed. The figures: rows/s over
the wall time from the start of the process to the last row landed (so the
group join and startup count), CPU seconds and peak RSS of the process
tree. Every target is verified (row count, distinct ids, sum of user ids).
Results go to ``benchmarks/results/lake-<date>.{md,json}`` at >= 1M rows, or to
``--results-dir`` whenever it is given.
"""

from __future__ import annotations

import argparse
import collections
import json
import secrets
import string
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.dataset as ds

from benchmarks import common
from benchmarks.kafka_to_postgres import run as k2pg

HERE = Path(__file__).resolve().parent
SCENARIOS = ("kafka_delta", "kafka_parquet", "files_postgres")
ENGINES = ("sluice", "reference")
FILE_ROWS = 100_000  # events per JSON-lines file of files_postgres

KAFKA_SOURCE = """
pipeline_name = "{pipeline}"
source_query = "{topic}"

[source]
kind = "kafka"
bootstrap_servers = "{bootstrap}"
group_id = "{group}"
auto_offset_reset = "earliest"
session_timeout_ms = 3000
"""
TARGETS = {
    # The reference requires [target.table] on Delta and prefix on files.
    "kafka_delta": '\n[target]\nkind = "delta_local"\npath = "{out}"\n\n[target.table]\nname = "events"\n',
    "kafka_parquet": (
        '\n[target]\nkind = "object_store_local"\npath = "{out}"\nformat = "parquet"\n'
        'prefix = "events"\n'
    ),
}
FILES_PIPELINE = """
pipeline_name = "{pipeline}"
source_query = "events"

[source]
kind = "object_store_local"
path = "{folder}"
format = "json_lines"

[target]
kind = "postgres"
url = "{postgres_url}"

[target.table]
schema = "public"
name = "{table}"
"""


@dataclass
class Result:
    scenario: str
    engine: str
    version: str
    rows: int
    wall_s: float | None = None
    cpu_s: float | None = None
    peak_rss_mb: float | None = None
    verified: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None

    @property
    def rows_per_s(self) -> float | None:
        return self.rows / self.wall_s if self.wall_s else None


def count_delta(path: Path) -> pa.Table | None:
    from deltalake import DeltaTable

    if not (path / "_delta_log").exists() and (path / "events" / "_delta_log").exists():
        path = path / "events"  # the reference puts the table in path/<table name>
    try:
        return pa.table(DeltaTable(str(path)).scan(columns=["id", "user_id"]))
    except Exception:  # not created yet
        return None


def count_parquet(path: Path) -> pa.Table | None:
    files = list(path.rglob("*.parquet"))
    if not files:
        return None
    return ds.dataset(files, format="parquet").to_table(columns=["id", "user_id"])


def count_postgres(url: str, table: str) -> pa.Table | None:
    with psycopg.connect(url) as conn:
        try:
            rows = conn.execute(f"SELECT id, user_id FROM public.{table}").fetchall()
        except psycopg.errors.UndefinedTable:
            return None
    return pa.table({"id": [r[0] for r in rows], "user_id": [r[1] for r in rows]})


def check(data: pa.Table | None, rows: int, user_sum: int) -> dict[str, Any]:
    if data is None:
        return {"rows": 0, "ok": False}
    ids = data["id"].to_pylist()
    dupes = sum(1 for c in collections.Counter(ids).values() if c > 1)
    got_sum = sum(data["user_id"].to_pylist())
    ok = len(ids) == rows and dupes == 0 and got_sum == user_sum
    return {"rows": len(ids), "duplicates": dupes, "user_id_sum": got_sum, "ok": ok}


def run_one(
    scenario: str,
    engine: str,
    toml: str,
    work: Path,
    rows: int,
    landed: Callable[[], pa.Table | None],
    user_sum: int,
    timeout_s: float,
) -> Result:
    version = common.check_engine(engine)
    path = work / f"{scenario}-{engine}.toml"
    path.write_text(toml)
    proc = common.MonitoredProcess(
        common.engine_argv(engine, path), work / f"{scenario}-{engine}.log"
    )
    result = Result(scenario, engine, version, rows)
    proc.start()
    deadline = time.monotonic() + timeout_s
    done_at: float | None = None
    while time.monotonic() < deadline:
        exited = proc.reap()
        proc.sample()
        data = landed()
        if data is not None and data.num_rows >= rows:
            done_at = proc.elapsed()
            break
        if exited:
            break
        time.sleep(0.2)
    proc.stop(10)
    result.wall_s = done_at
    result.cpu_s = proc.final_cpu_s
    result.peak_rss_mb = proc.peak_rss_bytes() / 2**20
    result.verified = check(landed(), rows, user_sum)
    if done_at is None or not result.verified["ok"]:
        result.problem = f"not every row landed exactly once: {result.verified}\n{proc.log_tail()}"
    return result


def write_files(folder: Path, rows: int, seed: int) -> int:
    """The events as JSON-lines files of FILE_ROWS each; the sum of user ids."""
    folder.mkdir(parents=True)
    total = 0
    lines: list[bytes] = []
    n = 0
    for user_id, payload in common.events(rows, seed):
        total += user_id
        lines.append(payload)
        if len(lines) == FILE_ROWS:
            (folder / f"part-{n:05d}.jsonl").write_bytes(b"\n".join(lines) + b"\n")
            lines, n = [], n + 1
    if lines:
        (folder / f"part-{n:05d}.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return total


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/sluice-bench-lake"))
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="write the results here (default: benchmarks/results, and only at >= 1M rows)",
    )
    args = parser.parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]
    engines = [e for e in args.engines.split(",") if e]
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    work = args.work_dir / run_id
    work.mkdir(parents=True)
    bootstrap = "127.0.0.1:19092"
    postgres_url = common.POSTGRES_URL
    results: list[Result] = []
    kafka = [s for s in scenarios if s.startswith("kafka_")]
    if kafka:
        settings = k2pg.Settings(
            rows=args.rows,
            engines=tuple(engines),
            bootstrap_servers=bootstrap,
            postgres_url=postgres_url,
            partitions=3,
            seed=args.seed,
            poll_interval_s=0.2,
            timeout_s=args.timeout,
            stall_timeout_s=args.timeout,
            stop_grace_s=10,
            results_dir=args.results_dir or common.RESULTS_DIR,
            work_dir=work,
            keep=False,
        )
        topic = f"bench-lake-{run_id}"
        data = k2pg.produce(settings, topic)
        print(f"produced {data.rows} events to {topic} in {data.produce_s:.1f} s")
        for scenario in kafka:
            for engine in engines:
                out = work / f"{scenario}-{engine}-out"
                pipeline = f"bench_lake_{run_id}_{scenario}_{engine}"
                toml = KAFKA_SOURCE.format(
                    pipeline=pipeline, topic=topic, bootstrap=bootstrap, group=pipeline
                ) + TARGETS[scenario].format(out=out)
                counter = count_delta if scenario == "kafka_delta" else count_parquet
                results.append(
                    run_one(
                        scenario,
                        engine,
                        toml,
                        work,
                        args.rows,
                        lambda c=counter, o=out: c(o),
                        data.expected_user_id_sum,
                        args.timeout,
                    )
                )
                print(results[-1])
        k2pg.delete_topic(settings, topic)
    if "files_postgres" in scenarios:
        folder = work / "files"
        user_sum = write_files(folder / "events", args.rows, args.seed)
        table = f"bench_lake_{run_id}_files"
        toml = FILES_PIPELINE.format(
            pipeline=table, folder=folder, postgres_url=postgres_url, table=table
        )
        results.append(
            run_one(
                "files_postgres",
                "sluice",
                toml,
                work,
                args.rows,
                lambda: count_postgres(postgres_url, table),
                user_sum,
                args.timeout,
            )
        )
        print(results[-1])
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS public.{table}")
            conn.execute("DELETE FROM public._sluice_positions WHERE pipeline = %s", (table,))
    headers = ["scenario", "engine", "rows/s", "wall s", "CPU s", "peak RSS MB", "verified"]
    table_rows = [
        [
            r.scenario, r.engine, common.num(r.rows_per_s, ",.0f"), common.num(r.wall_s, ".1f"),
            common.num(r.cpu_s, ".1f"), common.num(r.peak_rss_mb, ".0f"),
            "yes" if r.verified.get("ok") else "NO",
        ]
        for r in results
    ]  # fmt: skip
    print(common.format_table(headers, table_rows))
    date = common.utc_date()
    markdown = "\n".join(
        [
            f"# lake ({date}, {args.rows:,} events)",
            "",
            common.markdown_table(headers, table_rows),
            "",
            "rows/s = rows / (last row landed - process start): startup and group join count.",
            "",
        ]
    )
    payload = {
        "date": date,
        "rows": args.rows,
        "results": [{**r.__dict__, "rows_per_s": r.rows_per_s} for r in results],
    }
    if args.results_dir is not None or args.rows >= 1_000_000:
        common.write_results(
            args.results_dir or common.RESULTS_DIR, f"lake-{date}", markdown, payload
        )
    else:
        print(json.dumps(payload["results"], indent=1, default=str)[:2000])
    return 1 if any(not r.verified.get("ok") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
