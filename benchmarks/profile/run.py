"""Where sluice's CPU and memory go, per stage, per 1M rows: append, SQL, window, join.

    python -m benchmarks.profile.run [--rows N] [--scenarios append,sql,window,join]

Scenarios: ``append``, ``sql``, ``window`` (tumbling), ``hopping``, ``session``
(the window harness's ``--window``), ``join``; the first four unless told.

For each scenario it runs that scenario's own harness (its events, template,
checks) with ``--engines sluice``; when the harness starts ``flow consume``,
:data:`common.ENGINE_STARTED` attaches

* ``py-spy record --pid PID --format raw --threads --nonblocking --rate 200``
  (the collapsed stacks of the Python threads while they are on CPU), and
* a sampler of ``/proc/PID/task/*/stat`` (each thread's own CPU, its name)
  and ``/proc/PID/status`` (``VmRSS``) every 0.25 s.

Each Python thread's measured CPU is split over the stages in proportion to
its py-spy samples (:func:`stage_of` maps a stack to a stage); native threads
that py-spy never sees (librdkafka's ``rdk:*``, tokio workers, ...) are named
by their thread name. Writes ``profile-<date>.{md,json}`` and, beside them, the
raw collapsed stacks ``profile-<date>-<scenario>.collapsed.gz`` (flame graph:
``zcat F | flamegraph.pl > F.svg``). The scenario harnesses' own results go
into the run's work folder, never into ``benchmarks/results``.

See benchmarks/README.md (profile) for what each figure means.
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import EngineResult, MonitoredProcess

BENCHMARK = "profile"
#: Scenario -> the harness module whose ``main(argv)`` runs it, and the
#: arguments beside the common ones that pick the scenario's pipeline.
SCENARIOS: dict[str, tuple[str, tuple[str, ...]]] = {
    "append": ("benchmarks.kafka_to_postgres.run", ()),
    "sql": ("benchmarks.kafka_sql_lookup_to_postgres.run", ()),
    "window": ("benchmarks.kafka_tumbling_to_postgres.run", ()),
    "hopping": ("benchmarks.kafka_tumbling_to_postgres.run", ("--window", "hopping")),
    "session": ("benchmarks.kafka_tumbling_to_postgres.run", ("--window", "session")),
    "join": ("benchmarks.kafka_join_to_postgres.run", ()),
    # The append over a backlog, sluice beside the peers (latency/run.py --backlog).
    "peers": ("benchmarks.latency.run", ()),
}
#: The peers' harness takes ``--backlog N`` for ``--rows N`` and runs these engines.
PEERS = ("sluice", "bytewax", "quix")
#: What ``--scenarios`` runs unless told: hopping and session on request.
DEFAULT_SCENARIOS = ("append", "sql", "window", "join")
PACKAGES = ("sluice", "confluent-kafka", "pyarrow", "datafusion", "adbc-driver-postgresql")
TASK_POLL_S = 0.25

# ---------------------------------------------------------------- stages

STAGES = (
    "start / imports",
    "consume",
    "decode",
    "sql",
    "lookup",
    "window",
    "join",
    "other stages",
    "encode + write",
    "commit / state",
    "metrics",
    "idle / wait",
    "engine loop (other)",
    "native: no Python frame",
    "native: other threads",
    "not sampled",
)

#: Leaf frames that mean "waiting" (the wake-ups and spins that py-spy saw on CPU).
_WAIT = re.compile(
    r"^(wait|_wait_for_tstate_lock|join|sleep|get|select|poll|acquire) "
    r"\((threading|queue|selectors|asyncio/[a-z_]+|concurrent/futures/[a-z_]+)\.py"
)
#: An import's frames. A ``<module>`` frame below the root is a module's body
#: run by an import too (see :func:`stage_of`); the root one is a script's own
#: top-level code, such as a peer's main loop, and not an import.
_IMPORT = re.compile(r"importlib\._bootstrap")
#: Opening a connector (connections, metadata) counts as start-up.
_CONNECT = re.compile(r"\.open \(sluice/connectors/")
#: (pattern on one frame ``function (file:line)``, stage): sluice's own frames
#: first, from the leaf up (the innermost sluice frame that matches names the
#: stage, so a library called from a lookup counts as lookup), then the
#: libraries' frames, from the leaf up.
_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), stage)
    for pattern, stage in (
        (r"sluice/formats/encode\.py", "encode + write"),
        (r"sluice/formats/", "decode"),
        (r"sluice/engine/stages/sql\.py", "sql"),
        (r"sluice/engine/lookups\.py|sluice/connectors/[a-z_]+/lookup\.py", "lookup"),
        (r"sluice/engine/stages/window/", "window"),
        (r"sluice/engine/stages/join\.py", "join"),
        (r"sluice/engine/stages/", "other stages"),
        (r"sluice/connectors/postgres/target\.py", "encode + write"),
        (r"sluice/engine/commit\.py|sluice/state/|Source\._?commit \(sluice/", "commit / state"),
        (r"sluice/connectors/kafka/", "consume"),
        (r"sluice/engine/metrics\.py", "metrics"),
        (r"sluice/(config|cli|starter|doctor)[/.]|sluice/engine/plan\.py", "start / imports"),
    )
)
_LIB_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), stage)
    for pattern, stage in (
        (r"\(datafusion/", "sql"),
        (r"\(adbc_driver|\(psycopg2?/", "encode + write"),
        (r"\(confluent_kafka/", "consume"),
        # the peers: Quix Streams' consumer and sinks, Bytewax's Kafka connector
        # (py-spy names its frames from below the bytewax package)
        (r"\(quixstreams/(kafka|internal_consumer)/|\(connectors/kafka/", "consume"),
        (r"\(quixstreams/sinks/", "encode + write"),
        # the peers' payload decoding (Quix Streams' deserializers, json.loads)
        (r"\(quixstreams/models/serializers/|\(json/", "decode"),
        (r"\(prometheus_client/|\(socketserver\.py|\(http/server\.py", "metrics"),
    )
)
#: Native threads (never in py-spy's stacks) by their name (``comm``).
_NATIVE: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^rdk:"), "consume"),
    (re.compile(r"^tokio|^datafusion"), "sql"),
)


def stage_of(frames: Sequence[str]) -> str:
    """The stage of one stack (``frames`` root first, each ``function (file:line)``)."""
    if not frames:
        return "native: no Python frame"
    if any(_IMPORT.search(f) for f in frames) or any(
        f.startswith("<module> (") for f in frames[1:]
    ):
        return "start / imports"
    if _WAIT.search(frames[-1]):
        return "idle / wait"
    if any(_CONNECT.search(f) for f in frames):
        return "start / imports"
    for rules in (_RULES, _LIB_RULES):
        for frame in reversed(frames):
            for pattern, stage in rules:
                if pattern.search(frame):
                    return stage
    return "engine loop (other)"


def read_collapsed(path: Path) -> dict[int, Counter[str]]:
    """py-spy's raw output: thread id -> Counter of stage -> samples."""
    by_thread: dict[int, Counter[str]] = {}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        tid = -1
        if frames and frames[0].startswith("thread ("):
            m = re.match(r"thread \((?:0x)?([0-9a-fA-F]+)\)", frames[0])
            tid = int(m.group(1), 16 if "0x" in frames[0] else 10) if m else -1
            frames = frames[1:]
        if frames and frames[0].startswith("process "):
            frames = frames[1:]
        by_thread.setdefault(tid, Counter())[stage_of(frames)] += int(count)
    return by_thread


# ---------------------------------------------------------------- attach


@dataclass
class Task:
    """One thread of the engine as ``/proc`` last saw it."""

    tid: int
    name: str
    cpu_s: float = 0.0


@dataclass
class Attached:
    """What :class:`Profiler` attached to one engine process."""

    res: Any  # an EngineResult, or latency/run.py's BacklogResult
    proc: MonitoredProcess
    spy: subprocess.Popen[bytes]
    raw_path: Path
    tasks: dict[int, Task] = field(default_factory=dict)
    rss: list[tuple[float, int]] = field(default_factory=list)  # (s since start, VmRSS bytes)
    sampler: threading.Thread | None = None


class Profiler:
    """The :data:`common.ENGINE_STARTED` hook: py-spy and the /proc sampler on
    each sluice process the scenario harness starts."""

    def __init__(self, work_dir: Path, rate_hz: int) -> None:
        self.work_dir = work_dir
        self.rate_hz = rate_hz
        self.attached: list[Attached] = []

    def __call__(self, res: Any, proc: MonitoredProcess) -> None:
        raw = self.work_dir / f"{res.engine}-{len(self.attached)}.collapsed"
        argv = [
            "py-spy", "record", "--pid", str(proc.pid), "--format", "raw", "--threads",
            "--nonblocking", "--rate", str(self.rate_hz), "--output", str(raw),
        ]  # fmt: skip
        log = (self.work_dir / f"py-spy-{len(self.attached)}.log").open("wb")
        spy = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        a = Attached(res=res, proc=proc, spy=spy, raw_path=raw)
        a.sampler = threading.Thread(target=self._sample, args=(a,), daemon=True)
        a.sampler.start()
        self.attached.append(a)

    @staticmethod
    def _sample(a: Attached) -> None:
        pid = a.proc.pid
        while a.proc.returncode is None:
            try:
                for entry in Path(f"/proc/{pid}/task").iterdir():
                    raw = (entry / "stat").read_text()
                    name = raw[raw.index("(") + 1 : raw.rindex(")")]
                    fields = raw[raw.rindex(")") + 2 :].split()
                    cpu = (int(fields[11]) + int(fields[12])) / common._CLK_TCK
                    a.tasks[int(entry.name)] = Task(int(entry.name), name, cpu)
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        a.rss.append((round(a.proc.elapsed(), 2), int(line.split()[1]) * 1024))
            except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
                pass  # a thread or the process went away mid-read
            time.sleep(TASK_POLL_S)

    def finish(self, a: Attached, timeout_s: float = 60) -> int | None:
        """Wait for py-spy (it stops when the engine exits); its exit status."""
        try:
            return a.spy.wait(timeout_s)
        except subprocess.TimeoutExpired:
            a.spy.terminate()
            return a.spy.wait(10)


# ---------------------------------------------------------------- figures


@dataclass
class ScenarioProfile:
    scenario: str
    harness: str
    rows: int
    harness_exit: int
    outcome: str
    verified: bool | None
    wall_s: float | None
    cpu_s_total: float | None  # rusage of the reaped process, start to exit
    peak_rss_mb: float
    rss_at_ready_mb: float | None
    rss_at_last_row_mb: float | None
    ready_s: float | None
    last_row_s: float | None
    samples: int
    py_spy_exit: int | None
    stage_cpu_s: dict[str, float]
    threads: list[dict[str, Any]]
    collapsed: str | None

    def per_million(self, cpu_s: float) -> float:
        return cpu_s * 1_000_000 / self.rows


def attribute(a: Attached) -> tuple[dict[str, float], list[dict[str, Any]], int]:
    """CPU-s per stage, per-thread facts, total py-spy samples."""
    samples = read_collapsed(a.raw_path) if a.raw_path.exists() else {}
    stage_cpu = dict.fromkeys(STAGES, 0.0)
    threads = []
    for task in sorted(a.tasks.values(), key=lambda t: -t.cpu_s):
        counts = samples.get(task.tid)
        if counts:
            n = sum(counts.values())
            for stage, c in counts.items():
                stage_cpu[stage] += task.cpu_s * c / n
            kind = "python"
        else:
            stage = next((s for p, s in _NATIVE if p.search(task.name)), "native: other threads")
            stage_cpu[stage] += task.cpu_s
            kind = f"native -> {stage}"
        threads.append(
            {"tid": task.tid, "name": task.name, "cpu_s": round(task.cpu_s, 3), "kind": kind}
        )
    total = a.proc.final_cpu_s
    if total is not None:
        # Threads that ended before the last /proc poll, and CPU after it.
        stage_cpu["not sampled"] = max(0.0, total - sum(t.cpu_s for t in a.tasks.values()))
    return stage_cpu, threads, sum(sum(c.values()) for c in samples.values())


def rss_at(rss: Sequence[tuple[float, int]], t: float | None) -> float | None:
    """VmRSS (MB) at the last sample at or before ``t``."""
    if t is None:
        return None
    before = [b for s, b in rss if s <= t]
    return before[-1] / 2**20 if before else None


def profile_scenario(
    scenario: str, settings: Settings, work: Path, date: str
) -> list[ScenarioProfile]:
    """Run ``scenario``'s harness under the profiler: a profile per engine it
    started (sluice; for ``peers`` sluice, Bytewax and Quix Streams)."""
    harness, extra = SCENARIOS[scenario]
    main: Callable[[Sequence[str]], int] = importlib.import_module(harness).main
    scen_work = work / scenario
    scen_work.mkdir(parents=True)
    profiler = Profiler(scen_work, settings.rate_hz)
    if scenario == "peers":
        size = ["--backlog", str(settings.rows), "--engines", ",".join(PEERS)]
    else:
        size = ["--rows", str(settings.rows), "--engines", "sluice"]
    argv = [
        *size,
        "--results-dir", str(scen_work / "results"), "--work-dir", str(scen_work),
        "--bootstrap-servers", settings.bootstrap_servers, "--postgres-url", settings.postgres_url,
        *extra,
    ]  # fmt: skip
    print(f"== {scenario}: {harness} {' '.join(argv)}", flush=True)
    common.ENGINE_STARTED.append(profiler)
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        common.ENGINE_STARTED.remove(profiler)
    if not profiler.attached:
        print(f"[{scenario}] no engine was started", flush=True)
        return []
    if scenario != "peers":
        return [
            engine_profile(scenario, harness, profiler, profiler.attached[-1], settings, date, code)
        ]
    return [
        engine_profile(f"{scenario}: {a.res.engine}", harness, profiler, a, settings, date, code)
        for a in profiler.attached
    ]


def engine_profile(
    scenario: str,
    harness: str,
    profiler: Profiler,
    a: Attached,
    settings: Settings,
    date: str,
    code: int,
) -> ScenarioProfile:
    """The profile of the one engine process ``a`` that ``harness`` started
    (``scenario``: its name in the report)."""
    scen_work = a.raw_path.parent
    spy_exit = profiler.finish(a)
    stage_cpu, threads, n_samples = attribute(a)
    if not n_samples:
        print(
            f"[{scenario}] WARNING: py-spy took no samples (exit {spy_exit}); see "
            f"{scen_work}/py-spy-*.log: every thread counts as native",
            flush=True,
        )
    collapsed = None
    if a.raw_path.exists():
        slug = scenario.replace(": ", "-")
        gz = settings.results_dir / f"{BENCHMARK}-{date}-{slug}.collapsed.gz"
        gz.parent.mkdir(parents=True, exist_ok=True)
        with a.raw_path.open("rb") as src, gzip.open(gz, "wb") as dst:
            shutil.copyfileobj(src, dst)
        collapsed = gz.name
    res = a.res
    if isinstance(res, EngineResult):
        verified, last_row_s = res.verification.get("ok"), res.last_row_s
    else:  # latency/run.py's BacklogResult: wall-clock times of the ready poll and last row
        verified, last_row_s = res.verified, None
        if res.ready_s is not None and res.ready_at and res.last_row_at:
            last_row_s = res.ready_s + res.last_row_at - res.ready_at
    return ScenarioProfile(
        scenario=scenario,
        harness=harness,
        rows=settings.rows,
        harness_exit=int(code),
        outcome=res.outcome,
        verified=verified,
        wall_s=res.wall_s,
        cpu_s_total=a.proc.final_cpu_s,
        peak_rss_mb=a.proc.peak_rss_bytes() / 2**20,
        rss_at_ready_mb=rss_at(a.rss, res.ready_s),
        rss_at_last_row_mb=rss_at(a.rss, last_row_s),
        ready_s=res.ready_s,
        last_row_s=last_row_s,
        samples=n_samples,
        py_spy_exit=spy_exit,
        stage_cpu_s=stage_cpu,
        threads=threads,
        collapsed=collapsed,
    )


# ---------------------------------------------------------------- report


def stage_table(profiles: Sequence[ScenarioProfile]) -> tuple[list[str], list[list[str]]]:
    """CPU-s per 1M rows: a row per stage, a column per scenario."""
    headers = ["stage", *(p.scenario for p in profiles)]
    rows = [
        [stage, *(common.num(p.per_million(p.stage_cpu_s[stage]), ".2f") for p in profiles)]
        for stage in STAGES
        if any(p.stage_cpu_s[stage] for p in profiles)
    ]
    totals: list[str] = []
    steady: list[str] = []
    for p in profiles:
        total = p.cpu_s_total
        totals.append(common.num(None if total is None else p.per_million(total), ".2f"))
        start = p.stage_cpu_s["start / imports"]
        steady.append(common.num(None if total is None else p.per_million(total - start), ".2f"))
    rows.append(["total (rusage)", *totals])
    rows.append(["total without start / imports", *steady])
    return headers, rows


SUMMARY_HEADERS = (
    "scenario",
    "rows",
    "outcome",
    "verified",
    "CPU-s total",
    "CPU-s per 1M rows",
    "RSS at ready MB",
    "RSS at last row MB",
    "peak RSS MB",
    "wall s",
    "py-spy samples",
)


def summary_rows(profiles: Sequence[ScenarioProfile]) -> list[list[str]]:
    return [
        [
            p.scenario,
            f"{p.rows:,}",
            p.outcome,
            {True: "yes", False: "NO", None: "n/a"}[p.verified],
            common.num(p.cpu_s_total, ".2f"),
            common.num(p.cpu_s_total and p.per_million(p.cpu_s_total), ".2f"),
            common.num(p.rss_at_ready_mb, ".0f"),
            common.num(p.rss_at_last_row_mb, ".0f"),
            f"{p.peak_rss_mb:.0f}",
            common.num(p.wall_s, ".1f"),
            f"{p.samples:,}",
        ]
        for p in profiles
    ]


def methodology(settings: Settings) -> list[str]:
    return [
        "Each scenario is its own harness (`benchmarks/<scenario>/run.py`, same events, "
        "template and checks) run with `--engines sluice`; its results files are in the "
        "run's work folder, not here. `peers` is `benchmarks/latency/run.py --backlog N "
        "--engines sluice,bytewax,quix` (the throughput benchmark: each engine appends the "
        "same N-message backlog into its own table, one after the other), each engine's "
        "process profiled the same way; its stages come from the same rules (the peers' "
        "own framework code is 'engine loop (other)').",
        f"py-spy {settings.py_spy_version} attaches to the `flow consume` process right "
        f"after it starts: `record --format raw --threads --nonblocking --rate "
        f"{settings.rate_hz}`. Without `--idle` it keeps only the samples where a thread is "
        "running, so its samples show where each Python thread spends CPU; `--nonblocking` "
        "does not stop the engine to sample it (a few stacks may be torn).",
        f"Each thread's own CPU (utime + stime from /proc/PID/task/TID/stat, polled every "
        f"{TASK_POLL_S} s, last value before exit) is split over the stages in proportion "
        "to that thread's py-spy samples, so a stage's CPU-s does not depend on how many "
        "samples py-spy managed to take. Threads py-spy never sampled are native threads: "
        "librdkafka's `rdk:*` count as consume, tokio / datafusion workers as sql, any other "
        "as 'native: other threads'. 'not sampled' = the reaped process's rusage minus the "
        "threads' last polled CPU (threads that ended between polls, the last 0.25 s).",
        "A stack's stage is that of its innermost frame matching a rule (`stage_of` in "
        "`benchmarks/profile/run.py`): formats/ -> decode (formats/encode.py -> encode + "
        "write); engine/stages/sql.py, datafusion -> sql; lookups -> lookup; "
        "engine/stages/window/ -> window; engine/stages/join.py -> join; "
        "connectors/postgres/target.py, adbc, psycopg -> encode + write; engine/commit.py, "
        "state/ -> commit / state; connectors/kafka/, confluent_kafka -> consume; "
        "the peers' json, Quix Streams' serializers -> decode, Quix Streams' consumer and "
        "Bytewax's Kafka connector -> consume, Quix Streams' sinks -> encode + write; any "
        "import frame -> start / imports; a leaf in threading/queue/selectors wait / get / "
        "sleep -> idle / wait (CPU spent waking up and polling, not time spent blocked). "
        "Arrow or Python work called from the engine loop itself (engine/consume.py, "
        "runner.py) is 'engine loop (other)'.",
        "CPU-s per 1M rows = CPU-s x 1,000,000 / input events; the whole process from "
        "start to exit, including start-up, the consumer-group join and sluice's 3 s idle "
        "tail (`--stop-after-idle-ms 3000`), so at small N the fixed costs dominate.",
        "Peak RSS: the polled VmHWM (not the reaped ru_maxrss, in which Linux counts what "
        "the harness had resident when it started the engine); 'RSS at ready': "
        "VmRSS at the last 0.25 s poll before the consumer group was Stable (imports, "
        "connections, before any data); 'RSS at last row': VmRSS at the last poll before "
        "the harness saw every row (done).",
        "The raw collapsed stacks are kept beside this file (`profile-<date>-<scenario>."
        "collapsed.gz`, one line per distinct stack: `thread (tid);frame;...;frame count`); "
        "draw a flame graph with `zcat FILE | flamegraph.pl > FILE.svg` or load it in "
        "speedscope.",
    ]


def render_markdown(
    settings: Settings, profiles: Sequence[ScenarioProfile], facts: dict[str, Any], date: str
) -> str:
    lines = [
        f"# Profile: where sluice's CPU and memory go, per stage ({date})",
        "",
        f"{settings.rows:,} input events per scenario, under py-spy ({settings.rate_hz} Hz): "
        "sluice alone, except `peers`, where sluice, Bytewax and Quix Streams each append "
        "the same backlog in one run.",
        "",
        common.markdown_table(SUMMARY_HEADERS, summary_rows(profiles)),
        "",
        "## CPU-s per 1M input rows, by stage",
        "",
        common.markdown_table(*stage_table(profiles)),
        "",
        "## Threads",
        "",
    ]
    for p in profiles:
        lines += [
            f"* {p.scenario}: "
            + ", ".join(f"{t['name']} [{t['kind']}] {t['cpu_s']:.2f} s" for t in p.threads[:8]),
        ]
    lines += ["", *common.report_tail(methodology(settings), facts, [])]
    return "\n".join(lines)


# ---------------------------------------------------------------- main


@dataclass(frozen=True)
class Settings:
    rows: int
    scenarios: tuple[str, ...]
    rate_hz: int
    bootstrap_servers: str
    postgres_url: str
    results_dir: Path
    work_dir: Path
    py_spy_version: str


def parse_args(argv: Sequence[str] | None) -> Settings:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile.run", description=__doc__)
    p.add_argument("--rows", type=int, default=1_000_000, help="input events per scenario")
    p.add_argument(
        "--scenarios",
        default=",".join(DEFAULT_SCENARIOS),
        help=f"comma-separated, of: {', '.join(SCENARIOS)}",
    )
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--bootstrap-servers", default="127.0.0.1:19092")
    p.add_argument("--postgres-url", default=common.POSTGRES_URL)
    p.add_argument("--results-dir", type=Path, default=common.RESULTS_DIR)
    p.add_argument("--work-dir", type=Path, default=Path("/tmp"))
    a = p.parse_args(argv)
    scenarios = common.chosen_engines(p, a.scenarios, tuple(SCENARIOS))
    if shutil.which("py-spy") is None:
        p.error("py-spy not found on PATH (pip install py-spy)")
    version = common.run_capture(["py-spy", "--version"]) or "unknown"
    return Settings(
        rows=a.rows,
        scenarios=scenarios,
        rate_hz=a.rate,
        bootstrap_servers=a.bootstrap_servers,
        postgres_url=a.postgres_url,
        results_dir=a.results_dir,
        work_dir=a.work_dir,
        py_spy_version=version.removeprefix("py-spy "),
    )


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    date = common.utc_date()
    run_id = common.utc_now().replace(":", "").replace("-", "")
    work = settings.work_dir / f"bench-profile-{run_id}"
    work.mkdir(parents=True)
    facts = common.run_facts(date)
    facts["packages"] = common.engine_packages(PACKAGES, ["sluice"])
    # With it set, every start compiles sluice's (and its libraries') sources anew.
    facts["PYTHONDONTWRITEBYTECODE"] = os.environ.get("PYTHONDONTWRITEBYTECODE")

    profiles = []
    for scenario in settings.scenarios:
        profiles += profile_scenario(scenario, settings, work, date)
    if not profiles:
        return 1

    common.print_tables((SUMMARY_HEADERS, summary_rows(profiles)), stage_table(profiles))
    data = {
        "benchmark": BENCHMARK,
        "run_id": run_id,
        "date": date,
        "settings": {**asdict(settings), "results_dir": str(settings.results_dir),
                     "work_dir": str(work)},
        "machine": facts,
        "methodology": methodology(settings),
        "stages": list(STAGES),
        "results": [
            {
                **asdict(p),
                "cpu_s_per_million_rows": p.cpu_s_total and p.per_million(p.cpu_s_total),
                "stage_cpu_s_per_million_rows": {
                    s: p.per_million(v) for s, v in p.stage_cpu_s.items()
                },
            }
            for p in profiles
        ],
    }  # fmt: skip
    md = common.write_results(
        settings.results_dir,
        f"{BENCHMARK}-{date}",
        render_markdown(settings, profiles, facts, date),
        data,
    )
    print(f"results: {md} (and .json, .collapsed.gz); work folder: {work}")
    bad = any(p.harness_exit or p.outcome != "ok" or p.verified is False for p in profiles)
    return 1 if bad or len(profiles) < len(settings.scenarios) else 0


if __name__ == "__main__":
    sys.exit(main())
