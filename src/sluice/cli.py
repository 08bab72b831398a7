"""The ``flow`` command: validate, plan, schema, consume, init, doctor, and the
batch-job commands run-due, listen, run, status, runs, preview (:mod:`sluice.jobs.cli`).

Exit codes: 0 success; 1 a runtime failure; 2 an invalid configuration or
usage (a bad flag, a port that cannot be served). Problems go to stderr, one
line each, never with a traceback and never with a password; results go to
stdout. ``SLUICE_TRACEBACK=1`` shows the traceback of an unexpected error
(for a bug report).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import msgspec

from sluice import envflags, logs
from sluice.config import load_file
from sluice.config.base import MAX_MS
from sluice.config.redact import redact_text
from sluice.config.spec import PipelineSpec, pipeline_type
from sluice.engine.plan import build_plan
from sluice.errors import ConfigError, ConfigProblem, SluiceError
from sluice.functions import Function, collect

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2

log = logging.getLogger("sluice")


class UsageError(SluiceError):
    """A flag or argument is wrong in a way argparse cannot see (exit 2)."""


def _say(message: str) -> None:
    """One line (or one per problem) on stderr, passwords masked."""
    print(redact_text(message), file=sys.stderr)


# ---------------------------------------------------------------------------
# Flag types: each says what it expected, in one line.


def _int_in(low: int, high: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got '{text}'") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text}")
    return value


_port = _int_in(1, 65535, "a port number from 1 to 65535")
_ms = _int_in(0, MAX_MS, f"milliseconds from 0 to {MAX_MS}")
_positive_ms = _int_in(1, MAX_MS, f"milliseconds from 1 to {MAX_MS}")
_count = _int_in(0, 2**31 - 1, "an integer >= 0")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``flow consume: --max-restarts: expected ...``."""

    def error(self, message: str) -> NoReturn:
        message = message.replace("argument ", "", 1)
        if "/" in message.split(":", 1)[0]:  # "--initial-backoff-ms/--min-backoff-ms: ..."
            head, _, rest = message.partition(":")
            message = f"{head.split('/')[0]}:{rest}"
        self.exit(EXIT_CONFIG, f"{self.prog}: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------
# validate / plan / schema


def _cmd_validate(args: argparse.Namespace) -> int:
    if args.module:
        from sluice.jobs.cli import cmd_validate

        return cmd_validate(args)
    if not args.files:
        raise UsageError("give pipeline files, or --module M [JOB ...] for batch jobs")
    status = EXIT_OK
    for path in args.files:
        try:
            spec = load_file(path)
            if spec.transform is not None and spec.transform.udf_modules:
                collect((), spec.transform.udf_modules, path)
        except ConfigError as exc:
            _say(str(exc))
            status = EXIT_CONFIG
        else:
            if not args.quiet:
                print(f"{path}: ok")
    return status


def _cmd_plan(args: argparse.Namespace) -> int:
    spec = load_file(args.file)
    plan = build_plan(spec)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(plan.to_text(), end="")
    return EXIT_OK


def _cmd_schema(_: argparse.Namespace) -> int:
    schema = msgspec.json.schema(pipeline_type())
    print(json.dumps(schema, indent=2))
    return EXIT_OK


# ---------------------------------------------------------------------------
# consume


class _Redacting(logging.Filter):
    """Masks passwords in every log line (a driver's error may quote a URL)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact_text(record.getMessage())
        record.args = None
        return True


def _serve_metrics(port: int) -> None:
    from sluice.engine import metrics as m

    try:
        m.serve(port)
    except OSError as exc:
        reason = {
            errno.EADDRINUSE: "the port is already in use",
            errno.EACCES: "permission denied",
        }.get(exc.errno or 0, exc.strerror or str(exc))
        raise UsageError(f"--metrics-port {port}: cannot serve /metrics: {reason}") from None


def _totals(pipeline: str) -> tuple[float, dict[str, float], float]:
    """Rows read, rows written per target, dead letters: this process's counters."""
    from sluice.engine import metrics as m

    read = m.REGISTRY.get_sample_value("sluice_rows_consumed_total", {"pipeline": pipeline}) or 0.0
    dead = m.REGISTRY.get_sample_value("sluice_dlq_writes_total", {"pipeline": pipeline}) or 0.0
    written: dict[str, float] = {}
    for metric in m.TARGET_ROWS_WRITTEN.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels.get("pipeline") == pipeline:
                written[sample.labels["target"]] = sample.value
    return read, written, dead


def _rows(n: float) -> str:
    return f"{int(n)} row{'' if int(n) == 1 else 's'}"


def summary_line(pipeline: str, code: int, elapsed_s: float) -> str:
    """The line ``flow consume`` logs at stop: what was read, what went where, how long."""
    read, written, dead = _totals(pipeline)
    where = ", ".join(f"{_rows(n)} to {t}" for t, n in sorted(written.items()))
    parts = [f"read {_rows(read)}", f"wrote {where}" if where else "wrote 0 rows"]
    if dead:
        parts.append(f"{_rows(dead)} dead-lettered")
    return f"pipeline {pipeline} stopped (exit {code}) after {elapsed_s:.1f}s: " + "; ".join(parts)


async def _progress(pipeline: str, every_s: float) -> None:
    """Log a progress line every ``every_s`` seconds until cancelled."""
    started = last_at = time.monotonic()
    last_read = 0.0
    while True:
        await asyncio.sleep(every_s)
        now = time.monotonic()
        read, written, _ = _totals(pipeline)
        rate = (read - last_read) / max(now - last_at, 1e-9)
        where = ", ".join(f"{int(n)} to {t}" for t, n in sorted(written.items())) or "0"
        log.info(
            "pipeline %s: %s read (%.0f/s), written %s, %.0fs elapsed",
            pipeline,
            _rows(read),
            rate,
            where,
            now - started,
        )
        last_read, last_at = read, now


async def _run(
    spec: PipelineSpec,
    args: argparse.Namespace,
    progress_s: float | None,
    functions: Sequence[Function] = (),
    origin: str = "<pipeline>",
) -> int:
    from sluice.engine.consume import SupervisorOptions, supervise
    from sluice.engine.runner import RunOptions

    opts = SupervisorOptions(
        restart_on_error=args.restart_on_error,
        initial_backoff_ms=args.initial_backoff_ms,
        max_backoff_ms=args.max_backoff_ms,
        max_restarts=args.max_restarts,
        reset_backoff_after_secs=args.reset_backoff_after_secs,
    )
    run_opts = RunOptions(stop_after_idle_ms=args.stop_after_idle_ms, drain=not args.no_drain)
    ticker = (
        asyncio.ensure_future(_progress(spec.pipeline_name, progress_s)) if progress_s else None
    )
    try:
        return await supervise(spec, opts, run_opts, functions, origin)
    finally:
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker


def _cmd_consume(args: argparse.Namespace) -> int:
    if args.max_backoff_ms < args.initial_backoff_ms:
        raise UsageError(
            f"--max-backoff-ms ({args.max_backoff_ms}) is below --initial-backoff-ms "
            f"({args.initial_backoff_ms})"
        )
    if args.no_drain and args.stop_after_idle_ms is None:
        raise UsageError("--no-drain needs --stop-after-idle-ms (it shapes that stop)")
    spec, functions, origin = _load(args)
    from sluice.engine import memory

    memory.tune()  # before any thread starts (the metrics server's is the first)
    if spec.transform is not None and spec.transform.udf_modules:
        collect(functions, spec.transform.udf_modules, origin)
    if args.metrics_port is not None:
        _serve_metrics(args.metrics_port)
    # Logging is set up once the run is certain to start: an invalid file
    # or flag has said so in its one line already.
    logs.configure(args.log_format, args.log_level)
    logs.bind(spec.pipeline_name)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_Redacting())
    progress_s = args.progress_secs
    if progress_s is None:
        progress_s = 10.0 if sys.stderr.isatty() else 0.0
    log.info(
        "pipeline %s starting: %d source(s), %d target(s)",
        spec.pipeline_name,
        len(spec.all_sources),
        len(spec.all_targets),
    )
    started = time.monotonic()
    code = asyncio.run(_run(spec, args, progress_s, functions, origin))
    log.info("%s", summary_line(spec.pipeline_name, code, time.monotonic() - started))
    return code


def _load(args: argparse.Namespace) -> tuple[PipelineSpec, list[Function], str]:
    """The pipeline ``flow consume`` runs: a file, or with ``--module`` a
    pipeline a Python module declares (``@sluice.streaming_pipeline``); its
    functions and the name messages give it."""
    if args.module is None:
        return load_file(args.config), [], args.config
    from sluice.api import load_module

    declared = load_module(args.module)
    chosen = declared.get(args.config)
    if chosen is None:
        names = ", ".join(sorted(declared)) or "none"
        raise ConfigError(
            [
                ConfigProblem(
                    args.module,
                    "",
                    f"declares no streaming pipeline {args.config!r} (it declares: {names})",
                )
            ]
        )
    functions = [*chosen.udfs, *chosen.aggregate_udfs]
    return chosen.spec(), functions, f"<python:{args.module}.{chosen.name}>"


def _cmd_consume_list(args: argparse.Namespace) -> int:
    from sluice.api import load_module

    declared = load_module(args.module)
    specs = {name: d.spec() for name, d in sorted(declared.items())}
    for name, spec in specs.items():
        sources = ", ".join(spec.query_of(s) for s in spec.all_sources)
        targets = ", ".join(str(t.kind) for t in spec.all_targets)
        print(f"{name}\t{sources} -> {targets}")
    return EXIT_OK


def _add_consume(sub: Any) -> None:
    p = sub.add_parser(
        "consume",
        help="run a pipeline until stopped",
        description="Run a pipeline until stopped (SIGTERM / SIGINT finish the batch in "
        "flight, commit and exit 0). At stop it logs what was read and written where.",
    )
    p.add_argument(
        "config",
        nargs="?",
        default="pipeline.toml",
        metavar="CONFIG",
        help="the pipeline file (default: pipeline.toml); with --module, the name of a "
        "pipeline the module declares",
    )
    p.add_argument(
        "--module",
        default=None,
        metavar="MODULE",
        help="import MODULE and run its @sluice.streaming_pipeline named CONFIG",
    )
    p.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        metavar="PORT",
        help="serve /metrics, /healthz and /readyz on this port (1-65535)",
    )
    p.add_argument(
        "--restart-on-error",
        action="store_true",
        help="restart in-process after a failure, with exponential backoff and jitter",
    )
    p.add_argument(
        "--initial-backoff-ms",
        "--min-backoff-ms",
        type=_positive_ms,
        default=1_000,
        metavar="MS",
        help="first wait before a restart (default 1000); doubles per restart",
    )
    p.add_argument(
        "--max-backoff-ms",
        type=_positive_ms,
        default=60_000,
        metavar="MS",
        help="longest wait before a restart (default 60000; at least --initial-backoff-ms)",
    )
    p.add_argument(
        "--max-restarts",
        type=_count,
        default=None,
        metavar="N",
        help="give up (exit 1) after N restarts (default: unbounded)",
    )
    p.add_argument(
        "--reset-backoff-after-secs",
        type=_seconds,
        default=60.0,
        metavar="SECS",
        help="a run that lasted this long starts the backoff over (default 60)",
    )
    p.add_argument(
        "--stop-after-idle-ms",
        type=_ms,
        default=None,
        metavar="MS",
        help="(ours) exit 0 once every source has been idle this long (batch-style runs); "
        "the end of input drains: every open window and buffered join row is emitted first",
    )
    p.add_argument(
        "--no-drain",
        action="store_true",
        help="(ours) with --stop-after-idle-ms: keep open windows and join rows for the next "
        "run instead of emitting them (a stop that will be resumed)",
    )
    p.add_argument(
        "--progress-secs",
        type=_seconds,
        default=None,
        metavar="SECS",
        help="log a progress line (rows read and written) this often; default 10 when "
        "stderr is a terminal, off otherwise; 0 turns it off",
    )
    p.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        default="text",
        help="text for people, json for log collectors (one object per line)",
    )
    p.add_argument(
        "--log-level", choices=logs.LEVELS, default="info", help="least severe level logged"
    )
    p.set_defaults(func=_cmd_consume)
    listing = sub.add_parser(
        "consume-list", help="list the streaming pipelines a Python module declares"
    )
    listing.add_argument("--module", required=True, metavar="MODULE", help="module to import")
    listing.set_defaults(func=_cmd_consume_list)


# ---------------------------------------------------------------------------
# init / doctor


def _cmd_init(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sluice.starter import write_starter

    if Path(args.output).exists() and not args.force:
        raise UsageError(f"{args.output} exists; pass --force to overwrite it")
    path = write_starter(args.source, args.target, args.output, force=args.force)
    print(f"wrote {path}; next: flow validate {path}")
    return EXIT_OK


def _cmd_doctor(args: argparse.Namespace) -> int:
    from sluice.doctor import check_pipeline

    spec = load_file(args.file)
    results = check_pipeline(spec, timeout_s=args.timeout_secs)
    for result in results:
        print(redact_text(str(result)))
    failed = sum(1 for r in results if not r.ok)
    if failed:
        _say(f"flow doctor: {failed} of {len(results)} check(s) failed")
        return EXIT_FAILED
    return EXIT_OK


def _version() -> str:
    from sluice.engine.metrics import _version as installed

    return installed()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``flow`` (exposed for tests and docs)."""
    from sluice.starter import SOURCES, TARGETS

    parser = _Parser(prog="flow", description="sluice: run TOML-configured streaming pipelines.")
    parser.add_argument(
        "--version",
        action="version",
        version=f"flow (sluice) {_version()}",
        help="print the version",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "validate",
        help="check pipeline files (or, with --module, EXPLAIN batch jobs); exit 2 on a problem",
    )
    p.add_argument(
        "files", nargs="*", metavar="FILE", help="pipeline files (job names with --module)"
    )
    p.add_argument("--module", metavar="M", help="validate these batch jobs with EXPLAIN")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing for valid files")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("plan", help="print the plan graph of a pipeline")
    p.add_argument("file", metavar="FILE", help="the pipeline file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("schema", help="print the JSON schema of pipeline.toml (for editors)")
    p.set_defaults(func=_cmd_schema)

    _add_consume(sub)

    from sluice.jobs.cli import add_commands

    add_commands(sub, _seconds)

    p = sub.add_parser("init", help="write a starter pipeline for a source and a target")
    p.add_argument("--source", choices=SOURCES, default="files", help="source kind (default files)")
    p.add_argument(
        "--target", choices=TARGETS, default="duckdb", help="target kind (default duckdb)"
    )
    p.add_argument(
        "-o",
        "--output",
        default="pipeline.toml",
        metavar="FILE",
        help="where (default pipeline.toml)",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=_cmd_init)

    p = sub.add_parser(
        "doctor",
        help="connect to every source, target, lookup and state store; say what works",
    )
    p.add_argument("file", metavar="FILE", help="the pipeline file")
    p.add_argument(
        "--timeout-secs",
        type=_seconds,
        default=10.0,
        metavar="SECS",
        help="longest wait for each check (default 10)",
    )
    p.set_defaults(func=_cmd_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flow`` console script; returns the exit code."""
    parser = build_parser()
    envflags.apply_to(parser, os.environ, ("consume",))
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        _say(str(exc))
        return EXIT_CONFIG
    except UsageError as exc:
        _say(f"flow {args.command}: {exc}")
        return EXIT_CONFIG
    except SluiceError as exc:
        _say(f"flow: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`flow plan | head`): not an error of ours.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silences the flush at exit
        return EXIT_OK
    except Exception as exc:
        if os.environ.get("SLUICE_TRACEBACK") == "1":
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        _say(f"flow: unexpected {type(exc).__name__}: {first} (SLUICE_TRACEBACK=1 shows where)")
        return EXIT_FAILED
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
