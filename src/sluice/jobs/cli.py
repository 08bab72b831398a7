"""The batch-job commands of ``flow``: run-due, listen, run, status, runs, preview,
and ``validate --module`` (EXPLAIN).

Each loads ``--module`` (an importable module, or a ``.py`` file), opens the
run log (``--run-log``, env ``SLUICE_RUN_LOG_URL``, default
``sqlite://~/.sluice/run_log.db``) and acts. Exit 0 when every job that ran
succeeded (skips included), 1 when one failed. ``run-due`` also drains the
sources of the ``on_message`` workflows; ``listen NAME`` follows one until
SIGTERM (:meth:`Orchestrator.consume`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

from sluice.errors import ConfigError, ConfigProblem, SluiceError
from sluice.jobs.declare import clear, registry, validate
from sluice.jobs.orchestrate import Fired, Orchestrator, system_clock
from sluice.jobs.runlog import DEFAULT_URL, MemoryRunLog, open_run_log

EXIT_OK = 0
EXIT_FAILED = 1


def load(module: str) -> None:
    """Import ``module`` (or run a ``.py`` file) afresh so its declarations register."""
    clear()
    if module.endswith(".py") or os.sep in module:
        path = Path(module).resolve()
        if not path.exists():
            raise ConfigError([ConfigProblem("--module", "", f"no such file {module}")])
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise ConfigError([ConfigProblem("--module", "", f"cannot load {module}")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = mod
        spec.loader.exec_module(mod)
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        sys.modules.pop(module, None)
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(
                [ConfigProblem("--module", module, f"cannot import module: {exc}")]
            ) from None
    validate(registry())


def _now(args: argparse.Namespace) -> dt.datetime:
    if args.now:
        t = dt.datetime.fromisoformat(args.now)
        return t if t.tzinfo else t.replace(tzinfo=dt.UTC)
    return system_clock()


def _orchestrator(args: argparse.Namespace, *, writes: bool = True) -> Orchestrator:
    load(args.module)
    env_url = os.environ.get("SLUICE_RUN_LOG_URL")
    if getattr(args, "no_run_log", False) or (not args.run_log and env_url == ""):
        # --no-run-log, or SLUICE_RUN_LOG_URL set empty: no history, on purpose.
        rl: Any = MemoryRunLog()
    else:
        rl = open_run_log(args.run_log or os.environ.get("SLUICE_RUN_LOG_URL") or DEFAULT_URL)
    kw: dict[str, Any] = {}
    alerters = getattr(args, "alerter", None) or [
        u for u in os.environ.get("SLUICE_ALERTERS", "").split(",") if u.strip()
    ]
    metrics = getattr(args, "metrics", None) or os.environ.get("SLUICE_METRICS") or None
    if writes and alerters:
        from sluice.jobs.alerters import build_alerters

        kw["alerters"] = build_alerters(alerters)
    if writes and metrics:
        from sluice.jobs.sinks import build_sink

        kw["sink"] = build_sink(metrics)
    if os.environ.get("SLUICE_MESSAGE_LEASE_S"):
        kw["message_lease_s"] = float(os.environ["SLUICE_MESSAGE_LEASE_S"])
    fixed = _now(args) if args.now else None
    return Orchestrator(registry(), rl, clock=(lambda: fixed) if fixed else system_clock, **kw)


def _print_fired(fired: list[Fired]) -> int:
    for f in fired:
        extra = f" rows={f.rows}" if f.status == "success" else ""
        path = f" path={f.path}" if f.path else ""
        err = f" error={f.error}" if f.error else ""
        print(f"{f.job}: {f.status} attempt={f.attempt}{extra}{path}{err}")
    return EXIT_FAILED if any(f.status == "failed" for f in fired) else EXIT_OK


def cmd_run_due(args: argparse.Namespace) -> int:
    orch = _orchestrator(args)
    try:
        fired = orch.run_due(args.interval, _now(args))
        # Message-triggered workflows: what their sources hold now, then exit.
        broken = False
        for name in orch.message_workflows():
            try:
                fired += orch.consume(name, idle_timeout_s=args.message_wait)
            except SluiceError as exc:  # one unreachable source does not hide the others
                print(f"flow: {exc}", file=sys.stderr)
                broken = True
        code = _print_fired(fired)
        return EXIT_FAILED if broken else code
    finally:
        orch.sink.close()
        orch.runlog.close()


def cmd_listen(args: argparse.Namespace) -> int:
    """Fire a message-triggered workflow per message until SIGTERM / SIGINT."""
    import signal
    import threading

    orch = _orchestrator(args)
    names = orch.message_workflows()
    if args.name not in names:
        raise ConfigError(
            [
                ConfigProblem(
                    "flow listen",
                    args.name,
                    "no workflow with on_message= of that name"
                    + (f" (there are: {', '.join(names)})" if names else ""),
                )
            ]
        )
    stopping = threading.Event()

    def stop(signum: int, frame: Any) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        fired = orch.consume(args.name, follow=True, stop=stopping.is_set)
        return _print_fired(fired)
    finally:
        orch.sink.close()
        orch.runlog.close()


def cmd_run(args: argparse.Namespace) -> int:
    orch = _orchestrator(args)
    try:
        return _print_fired(orch.run_now(args.name))
    finally:
        orch.sink.close()
        orch.runlog.close()


def cmd_status(args: argparse.Namespace) -> int:
    orch = _orchestrator(args, writes=False)
    rows = orch.status()
    orch.runlog.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    for r in rows:
        parts = [f"{r['job']}", f"status={r['status']}", f"attempts={r['attempts']}"]
        if r["workflow"]:
            parts.append(f"workflow={r['workflow']}")
        if r["next_due"]:
            parts.append(f"next={r['next_due']}")
        if r["waiting_on"]:
            parts.append(f"waiting: {r['waiting_on']}")
        if r["error"]:
            parts.append(f"error: {r['error']}")
        print("  ".join(parts))
    return EXIT_OK


def cmd_runs_list(args: argparse.Namespace) -> int:
    rl = open_run_log(args.run_log or os.environ.get("SLUICE_RUN_LOG_URL") or DEFAULT_URL)
    rows = rl.runs(args.job, args.limit)
    rl.close()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return EXIT_OK
    for r in rows:
        err = f"  error: {r['error']}" if r.get("error") else ""
        print(
            f"{r['finished_at']}  {r['job']}  {r['status']}  attempt={r['attempt']}  "
            f"rows={r['rows']}{err}"
        )
    return EXIT_OK


def cmd_preview(args: argparse.Namespace) -> int:
    """What would run now and with what SQL; writes nothing."""
    from sluice.jobs import run as runner
    from sluice.jobs.load import target_database

    orch = _orchestrator(args, writes=False)
    now = _now(args)
    jobs = registry().jobs
    names = [args.name] if args.name else sorted(jobs)
    due = {n for u in orch.units() if orch.due_tick(u, now, args.interval) for n in u.jobs}
    for n in names:
        if n not in jobs:
            raise ConfigError([ConfigProblem("flow preview", n, "no such job")])
        job = jobs[n]
        st = orch.state(f"job:{n}")
        src = runner.source_db(job)
        targets = ", ".join(f"{t.table.name} ({t.mode}) on {t.connection}" for t in job.targets)
        tdb = target_database(job.targets[0])
        fast = len(job.targets) == 1 and tdb is not None and tdb.identity == src.identity
        print(f"{n}: {'due now' if n in due else 'not due'}; -> {targets}")
        if _is_sql(job):
            conn = src.connect()
            try:
                sql = runner.render(
                    job, str(runner.body(job, conn)), st.get("watermark"), src.dialect
                )
            finally:
                conn.close()
            print(f"  path: {'insert_select' if fast else 'arrow'}")
            print(f"  sql: {sql}")
        else:
            print("  body yields Arrow batches")
    orch.runlog.close()
    return EXIT_OK


def _is_sql(job: Any) -> bool:
    import inspect

    return not inspect.isgeneratorfunction(job.func)


def cmd_validate(args: argparse.Namespace) -> int:
    """EXPLAIN each named job's SQL against its source database."""
    from sluice.jobs import run as runner

    load(args.module)
    jobs = registry().jobs
    names = args.files or sorted(jobs)
    status = EXIT_OK
    for n in names:
        if n not in jobs:
            raise ConfigError([ConfigProblem("flow validate", n, "no such job")])
        job = jobs[n]
        if not _is_sql(job):
            print(f"{n}: ok (yields Arrow batches; nothing to EXPLAIN)")
            continue
        src = runner.source_db(job)
        conn = src.connect()
        try:
            sql = runner.render(job, str(runner.body(job, conn)), None, src.dialect)
        finally:
            conn.close()
        try:
            plan = src.explain(sql)
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            print(f"{n}: invalid: {first}", file=sys.stderr)
            status = 2
            continue
        print(f"{n}: ok")
        if not args.quiet:
            for line in plan.splitlines():
                print(f"  {line}")
    return status


def add_commands(sub: Any, seconds: Any) -> None:
    """Register run-due, listen, run, status, runs, preview on ``flow``'s subparsers."""

    def common(p: argparse.ArgumentParser, *, module: bool = True, writes: bool = False) -> None:
        if module:
            p.add_argument(
                "--module", required=True, metavar="M", help="module (or .py file) declaring jobs"
            )
        p.add_argument(
            "--run-log",
            "--run-log-url",
            dest="run_log",
            metavar="URL",
            help="run log: sqlite:// (default ~/.sluice/run_log.db), memory://, postgres://, "
            "mysql://, duckdb://, s3://bucket/prefix (env SLUICE_RUN_LOG_URL)",
        )
        p.add_argument(
            "--now", metavar="ISO", help="evaluate schedules as of this time (tests, backfills)"
        )
        if writes:
            p.add_argument(
                "--no-run-log", action="store_true", help="keep no run history (in memory only)"
            )
            p.add_argument(
                "--alerter",
                action="append",
                metavar="URL",
                help="alert on failure / recovery (repeatable): stdout://, slack://, https://, "
                "email://, pagerduty:// (env SLUICE_ALERTERS, comma-separated)",
            )
            p.add_argument(
                "--metrics",
                metavar="URL",
                help="run metrics: null://, stdout://, memory://, prometheus://:PORT, otlp:// "
                "(env SLUICE_METRICS)",
            )

    p = sub.add_parser("run-due", help="fire the batch jobs that became due (cron-tick model)")
    common(p, writes=True)
    p.add_argument(
        "--interval",
        type=seconds,
        default=60.0,
        metavar="SECS",
        help="the tick window: a job that never ran fires if due in the last SECS (default 60)",
    )
    p.add_argument(
        "--message-wait",
        type=seconds,
        default=30.0,
        metavar="SECS",
        help="an on_message workflow's source: give up waiting for it to connect / catch up "
        "after SECS without a message (default 30)",
    )
    p.set_defaults(func=cmd_run_due)

    p = sub.add_parser("listen", help="fire an on_message workflow once per message, until stopped")
    common(p, writes=True)
    p.add_argument("name", metavar="NAME", help="workflow declared with on_message=")
    p.set_defaults(func=cmd_listen)

    p = sub.add_parser("run", help="run one batch job (or workflow) now")
    common(p, writes=True)
    p.add_argument("name", metavar="NAME", help="job or workflow name")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="per job: last status, error, attempts, next due")
    common(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("runs", help="the run history")
    runs = p.add_subparsers(dest="runs_command", required=True, metavar="SUBCOMMAND", help="list")
    p = runs.add_parser("list", help="the latest runs, newest first")
    common(p, module=False)
    p.add_argument("--job", metavar="NAME", help="only this job")
    p.add_argument("--limit", type=int, default=50, metavar="N", help="at most N (default 50)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_runs_list)

    p = sub.add_parser("preview", help="what would run now, with its SQL; writes nothing")
    common(p)
    p.add_argument("name", nargs="?", metavar="NAME", help="one job (default all)")
    p.add_argument("--interval", type=seconds, default=60.0, metavar="SECS", help="as run-due's")
    p.set_defaults(func=cmd_preview)
