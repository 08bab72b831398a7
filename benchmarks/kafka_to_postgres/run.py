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
import itertools
import json
import random
import secrets
import string
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import confluent_kafka as ck
import psycopg
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from benchmarks import common

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "pipeline.toml.tmpl"
#: The reference keeps its Kafka offsets in this table of the target database,
#: keyed by (pipeline_name, topic), and resumes from them whatever the group_id.
REFERENCE_OFFSETS = "public._ematix_offsets"
#: An engine counts as busy (working on the rows, not waiting) from the first
#: poll interval after its group join in which it used this much CPU.
BUSY_CORES = 0.2
BENCHMARK = "kafka_to_postgres"
ENGINES = ("sluice", "reference")
#: The packages of this environment that the results record.
PACKAGES = ("sluice", "confluent-kafka", "psycopg", "pyarrow", "adbc-driver-postgresql", "msgspec")

USERS = 10_000
EVENT_TYPES = (
    "page_view", "click", "search", "add_to_cart", "remove_from_cart",
    "checkout", "purchase", "login", "logout", "signup",
)  # fmt: skip
COUNTRIES = (
    "US", "DE", "GB", "FR", "IN", "BR", "JP", "CA", "AU", "ES",
    "IT", "NL", "SE", "PL", "MX", "KR", "ZA", "NG", "AR", "TR",
)  # fmt: skip
TS_BASE = datetime(2026, 1, 1, tzinfo=UTC)
TS_STEP = timedelta(milliseconds=25)

#: Both tables get the same columns. ``_event_ts`` is the Kafka message
#: timestamp: sluice writes it (it would otherwise ALTER TABLE to add it
#: mid-run); the reference does not produce it and leaves it NULL.
TABLE_COLUMNS = (
    ("id", "bigint"),
    ("user_id", "bigint"),
    ("event_type", "text"),
    ("amount", "double precision"),
    ("country", "text"),
    ("session", "text"),
    ("ts", "text"),
    ("_event_ts", "timestamptz"),
)

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
        return {
            **asdict(self),
            "results_dir": str(self.results_dir),
            "work_dir": str(self.work_dir),
        }


# ---------------------------------------------------------------- data


def events(rows: int, seed: int) -> Iterator[tuple[int, bytes]]:
    """``(user_id, JSON payload)`` for ids 1..rows; the same for the same seed."""
    rng = random.Random(seed)
    hexdigits = "0123456789abcdef"
    for i in range(1, rows + 1):
        user_id = rng.randint(1, USERS)
        event = {
            "id": i,
            "user_id": user_id,
            "event_type": rng.choice(EVENT_TYPES),
            "amount": round(rng.uniform(0.5, 500.0), 2),
            "country": rng.choice(COUNTRIES),
            "session": "sess-" + "".join(rng.choices(hexdigits, k=16)),
            "ts": (TS_BASE + i * TS_STEP).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        }
        yield user_id, json.dumps(event, separators=(",", ":")).encode()


@dataclass
class Dataset:
    topic: str
    rows: int
    partitions: int
    seed: int
    payload_bytes_avg: float = 0.0
    produce_s: float = 0.0
    expected_user_id_sum: int = 0


#: What :func:`produce` sends: ``(user_id, JSON payload, message timestamp in ms
#: since the epoch or None for the producer's clock)``.
Message = tuple[int, bytes, int | None]


def produce(settings: Settings, topic: str, messages: Iterable[Message] | None = None) -> Dataset:
    """Create ``topic`` and fill it with ``settings.rows`` events (key = user_id).

    ``messages`` (``settings.rows`` of them) replaces :func:`events` for a
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
        messages = ((uid, payload, None) for uid, payload in events(settings.rows, settings.seed))
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


def engine_argv(engine: str, toml_path: Path, metrics_port: int | None = None) -> list[str]:
    """The command that runs ``toml_path`` with ``engine`` until stopped; with
    ``metrics_port``, the engine serves its Prometheus ``/metrics`` there."""
    if engine == "sluice":
        # The console script next to this interpreter: never /opt/ematix/bin/flow.
        flow = Path(sys.executable).with_name("flow")
        argv = [str(flow), "consume", str(toml_path), "--stop-after-idle-ms", "3000"]
        return argv if metrics_port is None else [*argv, "--metrics-port", str(metrics_port)]
    if metrics_port is None:
        code = (
            "import sys, ematix_flow\n"
            "print(ematix_flow.run_pipeline(config=sys.argv[1]), flush=True)\n"
        )
        return [str(common.REFERENCE_PYTHON), "-c", code, str(toml_path)]
    code = (
        "import sys, ematix_flow\n"
        "print(ematix_flow.run_pipeline(config=sys.argv[1], metrics_port=int(sys.argv[2])), "
        "flush=True)\n"
    )
    return [str(common.REFERENCE_PYTHON), "-c", code, str(toml_path), str(metrics_port)]


def check_engine(engine: str) -> str:
    """The engine's version; exits with a hint when it is not installed."""
    if engine == "sluice":
        flow = Path(sys.executable).with_name("flow")
        if not flow.exists():
            raise SystemExit(f"{flow} not found: install sluice (pip install -e '.[all]')")
        version = common.package_versions(sys.executable, ["sluice"])["sluice"]
        return version or "unknown"
    probe = "import ematix_flow._core as c; print(c.core_version())"
    out = common.run_capture([str(common.REFERENCE_PYTHON), "-c", probe])
    if not out:
        raise SystemExit(
            f"the reference engine is not importable from {common.REFERENCE_PYTHON}: "
            "run `bash benchmarks/setup_reference.sh` first"
        )
    return out.splitlines()[-1]


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


def render_pipeline(settings: Settings, run_id: str, topic: str, group_id: str, table: str) -> str:
    return string.Template(TEMPLATE.read_text()).substitute(
        # Unique per run: the reference resumes from its own offsets table
        # (see REFERENCE_OFFSETS), keyed by pipeline_name, whatever the group_id.
        pipeline_name=pipeline_name(run_id),
        topic=topic,
        bootstrap_servers=settings.bootstrap_servers,
        group_id=group_id,
        postgres_url=settings.postgres_url,
        table=table,
    )


@dataclass
class EngineResult:
    engine: str
    version: str
    table: str
    command: list[str]
    group_id: str
    outcome: str = "ok"  # ok | exited early | timeout | stalled
    # Seconds since the process started, each at the first poll that saw it:
    ready_s: float | None = None  # the engine's consumer group is Stable (joined, assigned)
    busy_s: float | None = None  # from here on (after ready) it used >= BUSY_CORES of CPU
    first_row_s: float | None = None  # a row in the table
    last_row_s: float | None = None  # every row in the table
    rows_at_first_poll: int = 0  # rows already there at first_row_s
    rows_seen: int = 0
    rows_per_s: float | None = None  # rows / (last_row_s - ready_s)
    landing_rows_per_s: float | None = None  # (rows - rows_at_first_poll) / landing window
    busy_rows_per_s: float | None = None  # rows / (last_row_s - busy_s)
    cpu_s_at_ready: float | None = None
    cpu_s_at_first_row: float | None = None
    cpu_s_at_last_row: float | None = None
    cpu_s_whole_run: float | None = None
    peak_rss_bytes: int = 0
    wall_s: float | None = None
    returncode: int | None = None
    signals: list[str] = field(default_factory=list)
    verification: dict[str, Any] = field(default_factory=dict)
    log: str = ""
    timeline: list[tuple[float, int, float | None]] = field(default_factory=list)  # t, rows, CPU-s

    @property
    def ingest_window_s(self) -> float | None:
        """Group ready -> every row landed."""
        if self.ready_s is None or self.last_row_s is None:
            return None
        return self.last_row_s - self.ready_s

    @property
    def landing_window_s(self) -> float | None:
        """First row landed -> every row landed (0 when one commit wrote them all)."""
        if self.first_row_s is None or self.last_row_s is None:
            return None
        return self.last_row_s - self.first_row_s

    def cpu_s_per_million(self, rows: int) -> float | None:
        if self.cpu_s_at_last_row is None:
            return None
        return self.cpu_s_at_last_row * 1_000_000 / rows


def busy_from(timeline: Sequence[tuple[float, int, float | None]], after: float) -> float | None:
    """Start of the first poll interval, at or after ``after``, in which the
    process used at least ``BUSY_CORES`` of CPU."""
    for (t0, _, c0), (t1, _, c1) in itertools.pairwise(timeline):
        if t0 < after or c0 is None or c1 is None or t1 <= t0:
            continue
        if (c1 - c0) / (t1 - t0) >= BUSY_CORES:
            return t0
    return None


def create_table(
    conn: psycopg.Connection[Any],
    name: str,
    columns: Sequence[tuple[str, str]],
    primary_key: Sequence[str] = (),
) -> None:
    """Create the table ``name`` (schema-qualified) with ``columns``, each
    ``(name, SQL type)``, and ``primary_key`` if any."""
    cols = ", ".join(f"{col} {sqltype}" for col, sqltype in columns)
    key = f", PRIMARY KEY ({', '.join(primary_key)})" if primary_key else ""
    conn.execute(f"CREATE TABLE {name} ({cols}{key})")


def recreate_table(
    conn: psycopg.Connection[Any],
    name: str,
    columns: Sequence[tuple[str, str]],
    primary_key: Sequence[str] = (),
) -> None:
    """An engine's empty target table: drop ``name`` if it exists, then
    :func:`create_table`, then CHECKPOINT."""
    conn.execute(f"DROP TABLE IF EXISTS {name}")
    create_table(conn, name, columns, primary_key)
    # Start each engine with the previous one's dirty pages written out.
    conn.execute("CHECKPOINT")


def copy_rows(
    conn: psycopg.Connection[Any],
    name: str,
    columns: Sequence[tuple[str, str]],
    rows: Iterable[Sequence[Any]],
) -> None:
    """COPY ``rows`` (values in the order of ``columns``) into the table ``name``."""
    cols = ", ".join(col for col, _ in columns)
    with conn.cursor() as cur, cur.copy(f"COPY {name} ({cols}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def count_rows(conn: psycopg.Connection[Any], name: str) -> int:
    """``count(*)`` of the table ``name`` (schema-qualified)."""
    row = conn.execute(f"SELECT count(*) FROM {name}").fetchone()
    return int(row[0]) if row else 0


def verify(conn: psycopg.Connection[Any], table: str, ds: Dataset) -> dict[str, Any]:
    row = conn.execute(
        "SELECT count(*), count(DISTINCT id), min(id), max(id), sum(user_id), "
        f"count(amount), count(ts) FROM public.{table}"
    ).fetchone()
    assert row is not None
    got = dict(
        zip(
            (
                "rows",
                "distinct_ids",
                "min_id",
                "max_id",
                "user_id_sum",
                "amount_non_null",
                "ts_non_null",
            ),
            (None if v is None else int(v) for v in row),
            strict=True,
        )
    )
    want = {
        "rows": ds.rows,
        "distinct_ids": ds.rows,
        "min_id": 1,
        "max_id": ds.rows,
        "user_id_sum": ds.expected_user_id_sum,
        "amount_non_null": ds.rows,
        "ts_non_null": ds.rows,
    }
    problems = [f"{k} = {got[k]}, expected {v}" for k, v in want.items() if got[k] != v]
    return {"ok": not problems, "problems": problems, **got}


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
    """Run ``res.command`` and poll ``count()`` until it reaches ``done_at`` (or the
    engine exits, stalls or times out); record the timeline and process figures
    in ``res``. Shared by every Kafka benchmark; ``what`` names what ``count()``
    counts in the progress lines it prints, ``env`` replaces the engine's
    environment (default: this process's).
    """
    proc = common.MonitoredProcess(
        res.command, log_path=settings.work_dir / f"{res.engine}.log", env=env
    )
    print(f"[{res.engine}] {common.utc_now()} starting; log: {proc.log_path}", flush=True)
    proc.start()
    last_growth = proc.elapsed()
    try:
        while True:
            tick = time.monotonic()
            t = round(proc.elapsed(), 3)  # the count's snapshot is taken at (about) this time
            n = count()
            sample = proc.sample()
            cpu = None if sample is None else round(sample.cpu_s, 3)
            res.timeline.append((t, n, cpu))
            if n > res.rows_seen:
                last_growth = t
            res.rows_seen = n
            if res.ready_s is None and (n or group_stable(admin, res.group_id)):
                res.ready_s, res.cpu_s_at_ready = t, cpu
                print(f"[{res.engine}] consumer group ready after {t:.1f} s", flush=True)
            if n and res.first_row_s is None:
                res.first_row_s, res.rows_at_first_poll, res.cpu_s_at_first_row = t, n, cpu
                print(f"[{res.engine}] first {what} after {t:.1f} s", flush=True)
            if n >= done_at:
                res.last_row_s, res.cpu_s_at_last_row = t, cpu
                print(f"[{res.engine}] all {n} {what} after {t:.1f} s", flush=True)
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
            proc.wait(timeout_s=60)  # sluice: it exits once idle for 3 s
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
        res.busy_s = busy_from(res.timeline, res.ready_s)


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
    recreate_table(conn, f"public.{table}", TABLE_COLUMNS)

    argv = engine_argv(engine, toml_path)
    res = EngineResult(engine=engine, version=version, table=table, command=argv, group_id=group_id)
    watch_engine(settings, admin, res, lambda: count_rows(conn, f"public.{table}"), ds.rows)
    if res.outcome == "ok" and res.ingest_window_s:
        res.rows_per_s = ds.rows / res.ingest_window_s
    if res.outcome == "ok" and res.busy_s is not None and res.last_row_s is not None:
        res.busy_rows_per_s = ds.rows / (res.last_row_s - res.busy_s)
    if res.outcome == "ok" and res.landing_window_s:
        # The first commit's rows, already there at the first poll, landed at
        # an unknown earlier moment: they are left out, not credited.
        res.landing_rows_per_s = (ds.rows - res.rows_at_first_poll) / res.landing_window_s
    res.verification = verify(conn, table, ds)
    common.print_problem(res)
    if not settings.keep:
        conn.execute(f"DROP TABLE IF EXISTS public.{table}")
    return res


# ---------------------------------------------------------------- report


def summary_rows(results: Sequence[EngineResult], rows: int) -> list[list[str]]:
    out = [
        [
            r.engine,
            common.num(r.rows_per_s, ",.0f"),
            common.num(r.cpu_s_per_million(rows), ".1f"),
            common.num(r.peak_rss_bytes / 2**20 if r.peak_rss_bytes else None, ".0f"),
        ]
        for r in results
    ]
    by = {r.engine: r for r in results}
    if "sluice" in by and "reference" in by:
        s, ref = by["sluice"], by["reference"]
        out.append(
            [
                "sluice/reference",
                common.ratio(s.rows_per_s, ref.rows_per_s),
                common.ratio(s.cpu_s_per_million(rows), ref.cpu_s_per_million(rows)),
                common.ratio(s.peak_rss_bytes or None, ref.peak_rss_bytes or None),
            ]
        )
    return out


SUMMARY_HEADERS = ("engine", "rows/s", "CPU-s per 1M rows", "peak RSS MB")
DETAIL_HEADERS = (
    "engine",
    "group ready at (s)",
    "first row at (s)",
    "all rows at (s)",
    "ingest window (s)",
    "busy from (s)",
    "rows/s from busy",
    "rows/s first->last landing",
    "CPU-s to ready",
    "CPU-s to last row",
    "CPU-s whole run",
    "wall (s)",
    "stopped by",
    "outcome",
    "verified",
)


def detail_rows(results: Sequence[EngineResult]) -> list[list[str]]:
    return [
        [
            r.engine,
            common.num(r.ready_s, ".1f"),
            common.num(r.first_row_s, ".1f"),
            common.num(r.last_row_s, ".1f"),
            common.num(r.ingest_window_s, ".2f"),
            common.num(r.busy_s, ".1f"),
            common.num(r.busy_rows_per_s, ",.0f"),
            common.num(r.landing_rows_per_s, ",.0f")
            + ("" if r.landing_rows_per_s else f" (1st poll: {r.rows_at_first_poll:,} rows)"),
            common.num(r.cpu_s_at_ready, ".2f"),
            common.num(r.cpu_s_at_last_row, ".2f"),
            common.num(r.cpu_s_whole_run, ".2f"),
            common.num(r.wall_s, ".1f"),
            ", ".join(r.signals) or f"itself (exit {r.returncode})",
            r.outcome,
            "yes" if r.verification.get("ok") else "NO: " + "; ".join(r.verification["problems"]),
        ]
        for r in results
    ]


def methodology(settings: Settings) -> list[str]:
    return [
        JOIN_NOTE,
        f"Every {settings.poll_interval_s} s the harness polls `SELECT count(*)` of the "
        "engine's table and the state of its consumer group (AdminClient "
        "describe_consumer_groups); each time is that of the first poll that saw the event, "
        f"so it is known to within {settings.poll_interval_s} s.",
        f"'busy from': the start of the first poll interval after the join in which the "
        f"engine used >= {BUSY_CORES} cores; 'rows/s from busy' = rows / (all rows at - busy "
        "from). It shows how much of the ingest window the engine spent waiting after its "
        "join (the reference idles about 5 s after its group is Stable before it fetches).",
        "'rows/s first->last landing' = (rows - rows already there at the first poll that "
        "saw any) / (all rows at - first row at), the rate over the landing window alone; "
        "n/a when every row landed between two polls (one big commit).",
        "CPU-s per 1M rows: user + system CPU of the engine's process tree from its start to "
        "the poll that saw the last row (startup and group join included; sluice's 3 s idle "
        "tail and the reference's shutdown excluded), scaled to 1M rows. 'CPU-s whole run' "
        "is the reaped process's rusage (start to exit).",
        "Peak RSS: the larger of the polled VmHWM of the process tree and the reaped ru_maxrss.",
        "Both tables have the same columns, including `_event_ts timestamptz`: sluice fills it "
        "with the Kafka message timestamp, the reference does not produce it (NULL).",
        "sluice stops by itself (`--stop-after-idle-ms 3000`); the reference runs forever and "
        "gets SIGTERM once every row landed (it takes about 15 s to exit after it).",
        f"The reference stores its Kafka offsets in `{REFERENCE_OFFSETS}` of the target "
        "database, keyed by pipeline_name and topic, and resumes from them whatever the "
        "group_id; so every run uses a new pipeline_name (and deletes its row afterwards).",
    ]


def render_markdown(
    settings: Settings,
    ds: Dataset,
    results: Sequence[EngineResult],
    facts: dict[str, Any],
    date: str,
) -> str:
    lines = [
        f"# Kafka -> Postgres: sluice vs the reference engine ({date})",
        "",
        f"{ds.rows:,} JSON events (avg {ds.payload_bytes_avg:.0f} bytes) in a "
        f"{ds.partitions}-partition topic (`{ds.topic}`, produced in {ds.produce_s:.1f} s), "
        "appended by each engine into its own pre-created Postgres table, one engine at a time.",
        "",
        common.markdown_table(SUMMARY_HEADERS, summary_rows(results, ds.rows)),
        "",
        common.markdown_table(DETAIL_HEADERS, detail_rows(results)),
        "",
        *common.report_tail(methodology(settings), facts, results),
    ]
    return "\n".join(lines)


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
    p.add_argument("--rows", type=int, default=1_000_000, help="events to produce (default 1M)")
    p.add_argument(
        "--engines",
        default=",".join(engines),
        help=f"comma-separated, run in this order (default {','.join(engines)})",
    )
    p.add_argument("--bootstrap-servers", default="127.0.0.1:19092")
    p.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:55432/postgres")
    p.add_argument("--partitions", type=int, default=3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--poll-interval", type=float, default=0.5, help="seconds between polls")
    p.add_argument(
        "--timeout", type=float, default=1800, help="seconds per engine before giving up"
    )
    p.add_argument("--stall-timeout", type=float, default=120, help=stall_help)
    p.add_argument("--stop-grace", type=float, default=60, help="SIGTERM -> SIGKILL delay")
    p.add_argument("--results-dir", type=Path, default=common.RESULTS_DIR)
    p.add_argument(
        "--work-dir", type=Path, default=None, help="rendered TOMLs and engine logs (default /tmp)"
    )
    p.add_argument("--keep", action="store_true", help=keep_help)
    a = p.parse_args(argv)
    chosen = tuple(e.strip() for e in a.engines.split(",") if e.strip())
    unknown = sorted(set(chosen) - set(engines))
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        p.error(f"--engines: unknown or repeated {unknown}; choose from {','.join(engines)}")
    if a.rows < 1:
        p.error("--rows must be >= 1")
    return Settings(
        rows=a.rows,
        engines=chosen,
        bootstrap_servers=a.bootstrap_servers,
        postgres_url=a.postgres_url,
        partitions=a.partitions,
        seed=a.seed,
        poll_interval_s=a.poll_interval,
        timeout_s=a.timeout,
        stall_timeout_s=a.stall_timeout,
        stop_grace_s=a.stop_grace,
        results_dir=a.results_dir,
        work_dir=a.work_dir or Path("/tmp"),
        keep=a.keep,
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


def start_run(settings: Settings, prefix: str) -> tuple[Settings, str]:
    """A new run id (UTC time and 4 random hex digits), and ``settings`` with
    ``work_dir`` set to the run's own new ``<work_dir>/<prefix>-<run id>``."""
    run_id = datetime.now(UTC).strftime("%Y%m%d%H%M%S") + secrets.token_hex(2)
    settings = replace(settings, work_dir=settings.work_dir / f"{prefix}-{run_id}")
    settings.work_dir.mkdir(parents=True)
    return settings, run_id


def print_produced(ds: Dataset) -> None:
    """Say on stdout how long producing ``ds`` took."""
    print(
        f"produced in {ds.produce_s:.1f} s ({ds.rows / ds.produce_s:,.0f} msgs/s, "
        f"avg {ds.payload_bytes_avg:.0f} bytes)",
        flush=True,
    )


def produce_events(settings: Settings, topic: str) -> Dataset:
    """:func:`produce` the benchmark's events to ``topic``, saying so on stdout."""
    print(
        f"producing {settings.rows:,} events to {topic} ({settings.partitions} partitions)",
        flush=True,
    )
    ds = produce(settings, topic)
    print_produced(ds)
    return ds


def results_json(results: Sequence[EngineResult], rows: int) -> list[dict[str, Any]]:
    """``results`` as a results file records them, with the derived figures."""
    return [
        {
            **asdict(r),
            "ingest_window_s": r.ingest_window_s,
            "landing_window_s": r.landing_window_s,
            "cpu_s_per_million_rows": r.cpu_s_per_million(rows),
            "peak_rss_mb": r.peak_rss_bytes / 2**20,
        }
        for r in results
    ]


def main(argv: Sequence[str] | None = None) -> int:
    settings, run_id = start_run(parse_args(argv), "bench-k2pg")
    date = common.utc_date()

    check_services(settings)
    versions = {engine: check_engine(engine) for engine in settings.engines}
    facts = common.run_facts(date)
    facts["packages"] = common.engine_packages(PACKAGES, settings.engines)

    topic = f"bench-k2pg-{run_id}"
    ds = produce_events(settings, topic)

    results: list[EngineResult] = []
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    try:
        with psycopg.connect(settings.postgres_url, autocommit=True) as conn:
            facts["postgres"] = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
            # Keep the poller light: no parallel workers for count(*).
            conn.execute("SET max_parallel_workers_per_gather = 0")
            for engine in settings.engines:
                results.append(
                    run_engine(settings, conn, admin, ds, run_id, engine, versions[engine])
                )
            if not settings.keep:
                forget_reference_offsets(conn, pipeline_name(run_id))
    finally:
        if not settings.keep:
            delete_topic(settings, topic)

    print()
    print(common.format_table(SUMMARY_HEADERS, summary_rows(results, ds.rows)))
    print()
    print(common.format_table(DETAIL_HEADERS, detail_rows(results)))
    print()
    print("note: " + JOIN_NOTE)

    data = {
        "benchmark": BENCHMARK,
        "run_id": run_id,
        "date": date,
        "settings": settings.as_json(),
        "dataset": asdict(ds),
        "machine": facts,
        "methodology": methodology(settings),
        "results": results_json(results, ds.rows),
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
