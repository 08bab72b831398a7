"""Helpers shared by the benchmarks: the events, the command line, Postgres
tables, engine processes and their watch loop, process accounting, engine
metrics, machine facts, results.

Process accounting reads ``/proc`` (Linux only) so it needs no extra package:

* CPU: ``utime + stime`` of the process and every live descendant, plus the
  ``cutime + cstime`` of children they already reaped.
* Memory: ``VmHWM`` (peak resident set) of the process tree, polled. Not
  the ``ru_maxrss`` that :func:`os.wait4` reports: Linux counts in it the
  resident pages of the process that spawned the engine, at the exec (a
  ``sleep`` started by a Python holding 600 MB reports 613 MB), so a harness
  holding its expected rows made every engine look as big as itself.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import secrets
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

import psycopg

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"

#: Where ``benchmarks/setup_reference.sh`` installs the reference engine.
REFERENCE_VENV = Path(os.environ.get("EMATIX_VENV", "/opt/ematix"))
REFERENCE_PYTHON = REFERENCE_VENV / "bin" / "python"

_CLK_TCK = os.sysconf("SC_CLK_TCK")

POSTGRES_URL = "postgresql://postgres@127.0.0.1:55432/postgres"
#: An engine counts as busy (working on the rows, not waiting) from the first
#: poll interval after it became ready in which it used this much CPU.
BUSY_CORES = 0.2


# ---------------------------------------------------------------- events

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

#: The target table of :func:`events`, the same for every engine. ``_event_ts``
#: is the message timestamp: sluice writes it (it would otherwise ALTER TABLE
#: to add it mid-run); the reference does not produce it and leaves it NULL.
EVENT_COLUMNS = (
    ("id", "bigint"),
    ("user_id", "bigint"),
    ("event_type", "text"),
    ("amount", "double precision"),
    ("country", "text"),
    ("session", "text"),
    ("ts", "text"),
    ("_event_ts", "timestamptz"),
)


def events(rows: int, seed: int) -> Iterator[tuple[int, bytes]]:
    """``(user_id, JSON payload)`` for ids 1..rows (~150 bytes each); the same
    for the same seed."""
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
    """What was put into the broker before the engines start. ``topic`` is the
    topic, exchange or stream; ``partitions`` its partitions (or queues)."""

    topic: str
    rows: int
    partitions: int
    seed: int
    payload_bytes_avg: float = 0.0
    produce_s: float = 0.0
    expected_user_id_sum: int = 0


def print_produced(ds: Dataset) -> None:
    """Say on stdout how long producing ``ds`` took."""
    print(
        f"produced in {ds.produce_s:.1f} s ({ds.rows / ds.produce_s:,.0f} msgs/s, "
        f"avg {ds.payload_bytes_avg:.0f} bytes)",
        flush=True,
    )


# ---------------------------------------------------------------- settings


class RunSettings(Protocol):
    """What the shared run helpers read of a benchmark's ``Settings``."""

    @property
    def rows(self) -> int: ...
    @property
    def engines(self) -> tuple[str, ...]: ...
    @property
    def poll_interval_s(self) -> float: ...
    @property
    def timeout_s(self) -> float: ...
    @property
    def stall_timeout_s(self) -> float: ...
    @property
    def stop_grace_s(self) -> float: ...
    @property
    def results_dir(self) -> Path: ...
    @property
    def work_dir(self) -> Path: ...
    @property
    def keep(self) -> bool: ...


S = TypeVar("S", bound=RunSettings)


def add_run_arguments(
    p: argparse.ArgumentParser,
    *,
    engines: Sequence[str],
    rows_help: str = "events to produce (default 1M)",
    keep_help: str = "keep the tables and the topic",
    stall_help: str = "give up after this long without new rows",
) -> None:
    """The options every engine-against-engine benchmark takes (read them back
    with :func:`run_arguments`)."""
    p.add_argument("--rows", type=int, default=1_000_000, help=rows_help)
    p.add_argument(
        "--engines",
        default=",".join(engines),
        help=f"comma-separated, run in this order (default {','.join(engines)})",
    )
    p.add_argument("--postgres-url", default=POSTGRES_URL)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--poll-interval", type=float, default=0.5, help="seconds between polls")
    p.add_argument(
        "--timeout", type=float, default=1800, help="seconds per engine before giving up"
    )
    p.add_argument("--stall-timeout", type=float, default=120, help=stall_help)
    p.add_argument("--stop-grace", type=float, default=60, help="SIGTERM -> SIGKILL delay")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument(
        "--work-dir", type=Path, default=None, help="rendered TOMLs and engine logs (default /tmp)"
    )
    p.add_argument("--keep", action="store_true", help=keep_help)


def chosen_engines(
    p: argparse.ArgumentParser, value: str, engines: Sequence[str]
) -> tuple[str, ...]:
    """The engines of a comma-separated ``--engines`` value, in its order;
    ``p.error`` for an unknown or repeated one."""
    chosen = tuple(e.strip() for e in value.split(",") if e.strip())
    unknown = sorted(set(chosen) - set(engines))
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        p.error(f"--engines: unknown or repeated {unknown}; choose from {','.join(engines)}")
    return chosen


def run_arguments(
    p: argparse.ArgumentParser, a: argparse.Namespace, engines: Sequence[str]
) -> dict[str, Any]:
    """The ``Settings`` fields of the options of :func:`add_run_arguments`."""
    if a.rows < 1:
        p.error("--rows must be >= 1")
    return {
        "rows": a.rows,
        "engines": chosen_engines(p, a.engines, engines),
        "postgres_url": a.postgres_url,
        "seed": a.seed,
        "poll_interval_s": a.poll_interval,
        "timeout_s": a.timeout,
        "stall_timeout_s": a.stall_timeout,
        "stop_grace_s": a.stop_grace,
        "results_dir": a.results_dir,
        "work_dir": a.work_dir or Path("/tmp"),
        "keep": a.keep,
    }


def settings_json(settings: Any) -> dict[str, Any]:
    """A ``Settings`` dataclass as a results file records it (paths as strings)."""
    return {
        **asdict(settings),
        "results_dir": str(settings.results_dir),
        "work_dir": str(settings.work_dir),
    }


def start_run(settings: S, prefix: str) -> tuple[S, str]:
    """A new run id (UTC time and 4 random hex digits), and ``settings`` with
    ``work_dir`` set to the run's own new ``<work_dir>/<prefix>-<run id>``."""
    run_id = datetime.now(UTC).strftime("%Y%m%d%H%M%S") + secrets.token_hex(2)
    new: S = replace(settings, work_dir=settings.work_dir / f"{prefix}-{run_id}")  # type: ignore[type-var]
    new.work_dir.mkdir(parents=True)
    return new, run_id


# ---------------------------------------------------------------- postgres


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


def poller(url: str, facts: dict[str, Any]) -> psycopg.Connection[Any]:
    """The harness's own autocommit connection (to use in a ``with``), kept
    light (no parallel workers for ``count(*)``); records the server version
    in ``facts["postgres"]``."""
    conn = psycopg.connect(url, autocommit=True)
    facts["postgres"] = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
    conn.execute("SET max_parallel_workers_per_gather = 0")
    return conn


def verify_events(conn: psycopg.Connection[Any], table: str, ds: Dataset) -> dict[str, Any]:
    """Check the table ``public.<table>`` of :func:`events` against ``ds``: row
    count, distinct ids, id range, sum of user ids, non-null amount and ts."""
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


# ---------------------------------------------------------------- engines


def engine_argv(
    engine: str, toml_path: Path, metrics_port: int | None = None, idle_ms: int = 3000
) -> list[str]:
    """The command that runs ``toml_path`` with ``engine`` (sluice or reference)
    until stopped (sluice: by itself after ``idle_ms`` without a row); with
    ``metrics_port``, the engine serves its Prometheus ``/metrics`` there.

    ``BENCH_WRAP`` in the environment (e.g. ``memray run --native -o run.bin``)
    is put before sluice's command: the allocation profile of the issue-20
    notes was taken that way."""
    if engine == "sluice":
        # The console script next to this interpreter: never /opt/ematix/bin/flow.
        flow = Path(sys.executable).with_name("flow")
        argv = [str(flow), "consume", str(toml_path), "--stop-after-idle-ms", str(idle_ms)]
        argv = os.environ.get("BENCH_WRAP", "").split() + argv
        return argv if metrics_port is None else [*argv, "--metrics-port", str(metrics_port)]
    if metrics_port is None:
        code = (
            "import sys, ematix_flow\n"
            "print(ematix_flow.run_pipeline(config=sys.argv[1]), flush=True)\n"
        )
        return [str(REFERENCE_PYTHON), "-c", code, str(toml_path)]
    code = (
        "import sys, ematix_flow\n"
        "print(ematix_flow.run_pipeline(config=sys.argv[1], metrics_port=int(sys.argv[2])), "
        "flush=True)\n"
    )
    return [str(REFERENCE_PYTHON), "-c", code, str(toml_path), str(metrics_port)]


def compile_sources() -> None:
    """Byte-compile sluice's sources, as ``pip install`` does for the peers and
    the reference: an editable install has none, and with
    ``PYTHONDONTWRITEBYTECODE`` set every start would compile them again
    (~0.2 CPU-s per start, measured 2026-12-07)."""
    import compileall

    import sluice

    compileall.compile_dir(str(Path(sluice.__file__).parent), quiet=1)


def check_engine(engine: str) -> str:
    """The engine's version; exits with a hint when it is not installed."""
    if engine == "sluice":
        flow = Path(sys.executable).with_name("flow")
        if not flow.exists():
            raise SystemExit(f"{flow} not found: install sluice (pip install -e '.[all]')")
        version = package_versions(sys.executable, ["sluice"])["sluice"]
        compile_sources()
        return version or "unknown"
    probe = "import ematix_flow._core as c; print(c.core_version())"
    out = run_capture([str(REFERENCE_PYTHON), "-c", probe])
    if not out:
        raise SystemExit(
            f"the reference engine is not importable from {REFERENCE_PYTHON}: "
            "run `bash benchmarks/setup_reference.sh` first"
        )
    return out.splitlines()[-1]


# ---------------------------------------------------------------- /proc


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the ``(comm)`` field, or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live descendants so far."""
    ticks = 0
    for p in [pid, *descendants(pid)]:
        fields = _stat_fields(p)
        if fields is not None:
            # utime, stime, cutime, cstime are stat fields 14-17 (1-based).
            ticks += sum(int(v) for v in fields[11:15])
    return ticks / _CLK_TCK


def tree_peak_rss_bytes(pid: int) -> int:
    """Sum of ``VmHWM`` over ``pid`` and its live descendants (0 once it exited)."""
    total = 0
    for p in [pid, *descendants(pid)]:
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) * 1024
                break
    return total


#: What the results say of their peak RSS column (see the module docstring).
PEAK_RSS = (
    "Peak RSS: the polled VmHWM of the process tree (its last poll before exit), not the "
    "reaped ru_maxrss, in which Linux counts what the harness had resident when it started "
    "the engine."
)


# ---------------------------------------------------------------- processes


@dataclass
class Sample:
    """One poll of a monitored process."""

    t: float  # seconds since the process started
    cpu_s: float
    peak_rss_bytes: int


@dataclass
class MonitoredProcess:
    """A subprocess whose CPU and memory are sampled until it is reaped.

    It is reaped with :func:`os.wait4`, which returns that process's own
    resource usage (including descendants it waited for), so the final
    figures do not depend on how often it was sampled.
    """

    argv: Sequence[str]
    log_path: Path
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] = field(init=False)
    started_at: float = field(init=False)
    returncode: int | None = field(init=False, default=None)
    ended_at: float | None = field(init=False, default=None)
    final_cpu_s: float | None = field(init=False, default=None)
    final_maxrss_bytes: int | None = field(init=False, default=None)
    last: Sample | None = field(init=False, default=None)
    signals_sent: list[str] = field(init=False, default_factory=list)
    _log: IO[bytes] = field(init=False)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            list(self.argv),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dict(self.env) if self.env is not None else None,
            cwd=self.cwd,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def elapsed(self) -> float:
        return time.monotonic() - self.started_at

    def sample(self) -> Sample | None:
        """CPU and peak RSS so far; None once the process has been reaped."""
        if self.returncode is not None:
            return None
        s = Sample(self.elapsed(), tree_cpu_seconds(self.pid), tree_peak_rss_bytes(self.pid))
        # VmHWM disappears when the process exits but is not yet reaped: keep the last.
        if self.last is not None and s.peak_rss_bytes < self.last.peak_rss_bytes:
            s.peak_rss_bytes = self.last.peak_rss_bytes
        self.last = s
        return s

    def reap(self, block: bool = False) -> bool:
        """Reap the process if it exited (waiting for it with ``block``); True once reaped."""
        if self.returncode is not None:
            return True
        pid, status, usage = os.wait4(self.pid, 0 if block else os.WNOHANG)
        if pid == 0:
            return False
        self.ended_at = time.monotonic()
        self.returncode = os.waitstatus_to_exitcode(status)
        self.proc.returncode = self.returncode  # so Popen never waits for it again
        self.final_cpu_s = usage.ru_utime + usage.ru_stime
        self.final_maxrss_bytes = usage.ru_maxrss * 1024  # KiB on Linux
        self._log.close()
        return True

    def wait(self, timeout_s: float, poll_s: float = 0.1) -> bool:
        """Wait up to ``timeout_s`` for the process to exit on its own."""
        deadline = time.monotonic() + timeout_s
        while not self.reap():
            if time.monotonic() >= deadline:
                return False
            self.sample()
            time.sleep(poll_s)
        return True

    def stop(self, grace_s: float) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``; returns once reaped."""
        if self.reap():
            return
        self.sample()
        self._signal(signal.SIGTERM)
        if not self.wait(grace_s):
            self._signal(signal.SIGKILL)
            self.reap(block=True)

    def _signal(self, sig: signal.Signals) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            return
        self.signals_sent.append(f"{sig.name} at {self.elapsed():.1f} s")

    def peak_rss_bytes(self) -> int:
        """Peak RSS: the polled ``VmHWM`` (see the module docstring for why not
        the reaped ``ru_maxrss``, kept in :attr:`final_maxrss_bytes`)."""
        return self.last.peak_rss_bytes if self.last else 0

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------- watch


@dataclass
class EngineResult:
    """One engine's run over a table that fills up to a known count."""

    engine: str
    version: str
    table: str
    command: list[str]
    group_id: str  # its consumer group (Kafka) or queue (RabbitMQ)
    outcome: str = "ok"  # ok | exited early | timeout | stalled
    # Seconds since the process started, each at the first poll that saw it:
    ready_s: float | None = None  # consuming: its consumer group is Stable (joined, assigned)
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
        """Ready -> every row landed."""
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

    def derive_rates(self, rows: int, out_rows: int | None = None) -> None:
        """Once watched to ``ok``: ``rows`` (the input events) per second over the
        ingest window, from busy, and over the landing window. ``out_rows``: the
        table's final count when it is not ``rows`` (a filter keeps a share)."""
        if self.outcome != "ok":
            return
        if self.ingest_window_s:
            self.rows_per_s = rows / self.ingest_window_s
        if self.busy_s is not None and self.last_row_s is not None:
            self.busy_rows_per_s = rows / max(self.last_row_s - self.busy_s, 1e-9)
        if self.landing_window_s:
            # The first commit's rows, already there at the first poll, landed at
            # an unknown earlier moment: they are left out, not credited.
            if out_rows is None:
                self.landing_rows_per_s = (rows - self.rows_at_first_poll) / self.landing_window_s
            else:
                # Input events behind the output rows that landed after the first
                # poll that saw any (the filter keeps the same share all along).
                left = 1 - self.rows_at_first_poll / out_rows
                self.landing_rows_per_s = rows * left / self.landing_window_s


#: Called as ``hook(res, proc)`` right after :func:`watch_engine` (or
#: ``latency/run.py``'s backlog run, with its own result type) started an
#: engine's process, before the first poll: ``benchmarks/profile`` attaches its
#: sampling profiler and its per-thread CPU sampler here. Empty by default.
ENGINE_STARTED: list[Callable[[Any, MonitoredProcess], None]] = []


def busy_from(timeline: Sequence[tuple[float, int, float | None]], after: float) -> float | None:
    """Start of the first poll interval, at or after ``after``, in which the
    process used at least ``BUSY_CORES`` of CPU."""
    for (t0, _, c0), (t1, _, c1) in itertools.pairwise(timeline):
        if t0 < after or c0 is None or c1 is None or t1 <= t0:
            continue
        if (c1 - c0) / (t1 - t0) >= BUSY_CORES:
            return t0
    return None


def watch_engine(
    settings: RunSettings,
    res: EngineResult,
    count: Callable[[], int],
    done_at: int,
    ready: Callable[[], bool],
    *,
    ready_what: str = "consumer group ready",
    what: str = "rows",
    env: Mapping[str, str] | None = None,
) -> None:
    """Run ``res.command`` and poll ``count()`` until it reaches ``done_at`` (or the
    engine exits, stalls or times out); record the timeline and process figures
    in ``res``. The engine is ready at the first poll where ``ready()`` (or a
    row is there); ``ready_what`` and ``what`` (what ``count()`` counts) name
    them in the progress lines it prints; ``env`` replaces the engine's
    environment (default: this process's).
    """
    proc = MonitoredProcess(res.command, log_path=settings.work_dir / f"{res.engine}.log", env=env)
    print(f"[{res.engine}] {utc_now()} starting; log: {proc.log_path}", flush=True)
    proc.start()
    for hook in ENGINE_STARTED:
        hook(res, proc)
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
            if res.ready_s is None and (n or ready()):
                res.ready_s, res.cpu_s_at_ready = t, cpu
                print(f"[{res.engine}] {ready_what} after {t:.1f} s", flush=True)
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


def run_append_engine(
    settings: RunSettings,
    conn: psycopg.Connection[Any],
    ds: Dataset,
    engine: str,
    version: str,
    table: str,
    toml_path: Path,
    group_id: str,
    ready: Callable[[], bool],
    ready_what: str = "consumer group ready",
) -> EngineResult:
    """Run the rendered ``toml_path`` with ``engine``, appending ``ds``'s events
    into a new ``public.<table>`` of :data:`EVENT_COLUMNS`; :func:`watch_engine`
    it (``ready``, ``ready_what``), rate and verify it, then drop the table
    (unless ``keep``)."""
    recreate_table(conn, f"public.{table}", EVENT_COLUMNS)
    argv = engine_argv(engine, toml_path)
    res = EngineResult(engine=engine, version=version, table=table, command=argv, group_id=group_id)
    watch_engine(
        settings,
        res,
        lambda: count_rows(conn, f"public.{table}"),
        ds.rows,
        ready,
        ready_what=ready_what,
    )
    res.derive_rates(ds.rows)
    res.verification = verify_events(conn, table, ds)
    print_problem(res)
    if not settings.keep:
        conn.execute(f"DROP TABLE IF EXISTS public.{table}")
    return res


# ---------------------------------------------------------------- metrics


def scrape_metrics(port: int, prefix: str, names: Collection[str]) -> dict[str, float] | None:
    """The Prometheus metrics ``<prefix><name>`` for each of ``names`` that an
    engine serves on ``port``, each summed over its label sets; None when it
    does not answer. A labelled counter has no sample until it first moves."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except (OSError, urllib.error.URLError):
        return None
    found: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0].removeprefix(prefix)
        if name in names:
            found[name] = found.get(name, 0.0) + float(value)
    return found


# ---------------------------------------------------------------- facts


def utc_date() -> str:
    """Today in UTC, as ``date -u +%F`` prints it."""
    return datetime.now(UTC).strftime("%F")


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_capture(argv: Sequence[str], timeout_s: float = 30) -> str | None:
    try:
        out = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout_s, check=True, cwd=REPO
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def package_versions(python: str | Path, names: Iterable[str]) -> dict[str, str | None]:
    """Installed versions of ``names`` in the environment of ``python``."""
    code = (
        "import json, sys\n"
        "from importlib import metadata\n"
        "out = {}\n"
        "for n in sys.argv[1:]:\n"
        "    try:\n"
        "        out[n] = metadata.version(n)\n"
        "    except metadata.PackageNotFoundError:\n"
        "        out[n] = None\n"
        "print(json.dumps(out))\n"
    )
    names = list(names)
    raw = run_capture([str(python), "-c", code, *names])
    if raw is None:
        return dict.fromkeys(names)
    result: dict[str, str | None] = json.loads(raw)
    return result


def git_revision() -> dict[str, Any]:
    """HEAD of the repository and whether the engine's sources differ from it."""
    head = run_capture(["git", "rev-parse", "HEAD"])
    dirty = run_capture(["git", "status", "--porcelain", "--", "src", "pyproject.toml"])
    return {"commit": head, "src_dirty": bool(dirty)}


def machine_facts() -> dict[str, Any]:
    """Facts that make a benchmark result comparable to another."""
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_total_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
                break
    except OSError:
        pass
    os_name = None
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "mem_total_gib": mem_total_gib,
        "os": os_name,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def run_facts(date: str) -> dict[str, Any]:
    """What a results file's ``machine`` starts with: ``date``, :func:`machine_facts`,
    the :func:`command_line` and the :func:`git_revision`."""
    return {"date": date, **machine_facts(), "command": command_line(), "git": git_revision()}


def engine_packages(
    project: Iterable[str], engines: Collection[str]
) -> dict[str, dict[str, str | None]]:
    """Versions of the ``project`` packages in this environment and, when
    ``engines`` include the reference, of the reference's own venv."""
    packages = {"project env": package_versions(sys.executable, project)}
    if "reference" in engines:
        packages["/opt/ematix"] = package_versions(REFERENCE_PYTHON, ["ematix-flow", "pyarrow"])
    return packages


def command_line() -> str:
    """The command that started this process, as it could be re-typed."""
    return shlex.join([Path(sys.executable).name, "-m", _module_name(), *sys.argv[1:]])


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return str(spec.name)
    return Path(sys.argv[0]).stem


# ---------------------------------------------------------------- output


class EngineRun(Protocol):
    """What the report needs of an engine's result (every scenario's ``EngineResult``).

    ``verification`` holds ``ok`` (True, False, or None when the table was
    not verified), ``problems`` and, optionally, ``examples``.
    """

    engine: str
    outcome: str  # ok | exited early | timeout | stalled
    verification: dict[str, Any]
    log: str  # the last lines of the engine's log


def failed(r: EngineRun) -> bool:
    """Whether the engine did not end ``ok`` or its table failed verification
    (a table that was not verified, ``ok`` None, is no failure)."""
    return r.outcome != "ok" or r.verification.get("ok") is False


def print_problem(r: EngineRun) -> None:
    """If the engine :func:`failed`, say so on stdout with its log tail."""
    if failed(r):
        print(f"[{r.engine}] PROBLEM: {r.outcome}; {r.verification['problems']}", flush=True)
        print(f"[{r.engine}] log tail:\n{r.log}", flush=True)


def problems_section(results: Iterable[EngineRun]) -> list[str]:
    """The ``## Problems`` section of a results file: each failed engine's
    outcome, verification problems and examples, and log tail; no lines when
    none failed."""
    lines: list[str] = []
    for r in results:
        if not failed(r):
            continue
        lines += [
            f"### {r.engine}: {r.outcome}",
            "",
            *(f"* {p}" for p in r.verification.get("problems", [])),
            *(f"* e.g. {e}" for e in r.verification.get("examples", [])),
            "",
            "Last lines of its log:",
            "",
            "```",
            r.log,
            "```",
            "",
        ]
    return ["## Problems", "", *lines] if lines else []


def num(value: float | None, fmt: str) -> str:
    """A figure for a table: ``value`` in ``fmt``, ``n/a`` when unknown."""
    return "n/a" if value is None else format(value, fmt)


def ratio(a: float | None, b: float | None) -> str:
    """``a / b`` for a table, as ``1.23x``; ``n/a`` when either is unknown or ``b`` is 0."""
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table with right-aligned columns (first column left)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    align = ["---", *("---:" for _ in headers[1:])]
    out = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def report_tail(
    methodology: Iterable[str], facts: Mapping[str, Any], results: Iterable[Any]
) -> list[str]:
    """The closing sections of a results file: how it was measured, the command,
    the machine and the versions (``results``: objects with ``engine`` and ``version``)."""
    return [
        "## How it was measured",
        "",
        *(f"* {m}" for m in methodology),
        "",
        "## Command",
        "",
        "```",
        facts["command"],
        "```",
        "",
        "## Machine",
        "",
        *(f"* {k}: {v}" for k, v in facts.items() if k not in {"command", "packages"}),
        "",
        "## Versions",
        "",
        *(
            f"* {env}: " + ", ".join(f"{k} {v}" for k, v in pkgs.items())
            for env, pkgs in facts["packages"].items()
        ),
        *(f"* {r.engine} engine: {r.version}" for r in results),
        "",
    ]


def write_results(directory: Path, stem: str, markdown: str, data: Mapping[str, Any]) -> Path:
    """Write ``STEM.md`` and ``STEM.json`` into ``directory``; returns the .md path."""
    directory.mkdir(parents=True, exist_ok=True)
    md = directory / f"{stem}.md"
    md.write_text(markdown)
    (directory / f"{stem}.json").write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return md


# ---------------------------------------------------------------- report of EngineResult


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


def summary_rows(results: Sequence[EngineResult], rows: int) -> list[list[str]]:
    """Rows of :data:`SUMMARY_HEADERS`, and sluice/reference when both ran."""
    out = [
        [
            r.engine,
            num(r.rows_per_s, ",.0f"),
            num(r.cpu_s_per_million(rows), ".1f"),
            num(r.peak_rss_bytes / 2**20 if r.peak_rss_bytes else None, ".0f"),
        ]
        for r in results
    ]
    by = {r.engine: r for r in results}
    if "sluice" in by and "reference" in by:
        s, ref = by["sluice"], by["reference"]
        out.append(
            [
                "sluice/reference",
                ratio(s.rows_per_s, ref.rows_per_s),
                ratio(s.cpu_s_per_million(rows), ref.cpu_s_per_million(rows)),
                ratio(s.peak_rss_bytes or None, ref.peak_rss_bytes or None),
            ]
        )
    return out


def stopped_by(r: Any) -> str:
    """How an engine's process ended: the signals sent, else its exit status."""
    return ", ".join(r.signals) or f"itself (exit {r.returncode})"


def detail_rows(results: Sequence[EngineResult]) -> list[list[str]]:
    """Rows of :data:`DETAIL_HEADERS`."""
    return [
        [
            r.engine,
            num(r.ready_s, ".1f"),
            num(r.first_row_s, ".1f"),
            num(r.last_row_s, ".1f"),
            num(r.ingest_window_s, ".2f"),
            num(r.busy_s, ".1f"),
            num(r.busy_rows_per_s, ",.0f"),
            num(r.landing_rows_per_s, ",.0f")
            + ("" if r.landing_rows_per_s else f" (1st poll: {r.rows_at_first_poll:,} rows)"),
            num(r.cpu_s_at_ready, ".2f"),
            num(r.cpu_s_at_last_row, ".2f"),
            num(r.cpu_s_whole_run, ".2f"),
            num(r.wall_s, ".1f"),
            stopped_by(r),
            r.outcome,
            "yes" if r.verification.get("ok") else "NO: " + "; ".join(r.verification["problems"]),
        ]
        for r in results
    ]


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


def print_tables(*tables: tuple[Sequence[str], Sequence[Sequence[str]]]) -> None:
    """Each ``(headers, rows)`` as a :func:`format_table` on stdout, after a blank line."""
    for headers, rows in tables:
        print()
        print(format_table(headers, rows))


def save_results(
    settings: RunSettings, benchmark: str, date: str, markdown: str, data: Mapping[str, Any]
) -> None:
    """Write the results files (``<benchmark>-<date>.{md,json}`` in the
    settings' results folder) and say where they and the engine logs are."""
    md = write_results(settings.results_dir, f"{benchmark}-{date}", markdown, data)
    print(f"results: {md} (and .json); engine logs: {settings.work_dir}")


def finish_run(
    settings: RunSettings,
    benchmark: str,
    date: str,
    markdown: str,
    data: Mapping[str, Any],
    results: Iterable[EngineRun],
) -> int:
    """:func:`save_results`; the exit status: 1 if any engine :func:`failed`."""
    save_results(settings, benchmark, date, markdown, data)
    return 1 if any(failed(r) for r in results) else 0


def append_report(
    settings: RunSettings,
    *,
    benchmark: str,
    run_id: str,
    date: str,
    title: str,
    intro: str,
    ds: Dataset,
    results: Sequence[EngineResult],
    facts: dict[str, Any],
    methodology: list[str],
    detail_headers: Sequence[str] = DETAIL_HEADERS,
    note: str | None = None,
    extra_settings: Mapping[str, Any] | None = None,
) -> int:
    """Print, write and judge a run where each engine appends ``ds`` into its
    own table (:class:`EngineResult` figures): the summary and detail tables,
    then the closing sections. ``title`` gets `` (<date>)``; ``note`` is printed
    after the tables."""
    summary = (SUMMARY_HEADERS, summary_rows(results, ds.rows))
    detail = (detail_headers, detail_rows(results))
    print_tables(summary, detail)
    if note is not None:
        print()
        print("note: " + note)
    markdown = [
        f"# {title} ({date})",
        "",
        intro,
        "",
        markdown_table(*summary),
        "",
        markdown_table(*detail),
        "",
        *report_tail(methodology, facts, results),
    ]
    data = {
        "benchmark": benchmark,
        "run_id": run_id,
        "date": date,
        "settings": {**settings_json(settings), **(extra_settings or {})},
        "dataset": asdict(ds),
        "machine": facts,
        "methodology": methodology,
        "results": results_json(results, ds.rows),
    }
    return finish_run(settings, benchmark, date, "\n".join(markdown), data, results)
