"""``flow consume``: run a pipeline as a daemon, with an optional supervisor.

SIGTERM / SIGINT finish the in-flight batch (write, flush, commit) and exit
0; open windows stay open (the next run resumes them). A bounded run
(``--stop-after-idle-ms``) ends its input instead: it drains every open
window and buffered join row before the last commit, unless ``--no-drain``. With ``--restart-on-error`` a failed run restarts in-process after an
exponential backoff with jitter; a run that lasted
``--reset-backoff-after-secs`` resets the backoff; ``--max-restarts`` bounds
the restarts. Logs: one line at start, one at stop, and errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sluice import logs
from sluice.config import PipelineSpec, load_file
from sluice.engine import metrics as m
from sluice.engine.runner import Runner, RunOptions
from sluice.errors import ConfigError, ConfigProblem, SluiceError
from sluice.functions import Function, collect

log = logging.getLogger("sluice")


@dataclass(frozen=True)
class SupervisorOptions:
    """Restart policy of ``flow consume`` (defaults per PIPELINE_TOML.md)."""

    restart_on_error: bool = False
    initial_backoff_ms: int = 1_000
    max_backoff_ms: int = 60_000
    max_restarts: int | None = None
    reset_backoff_after_secs: float = 60.0


def next_backoff_ms(previous_ms: int | None, opts: SupervisorOptions) -> int:
    """The un-jittered wait before the next restart."""
    if previous_ms is None:
        return opts.initial_backoff_ms
    return min(previous_ms * 2, opts.max_backoff_ms)


def jittered(backoff_ms: int) -> float:
    """Seconds to wait: the backoff with ±20% jitter, so replicas do not restart in step."""
    return backoff_ms * random.uniform(0.8, 1.2) / 1000


async def supervise(
    spec: PipelineSpec,
    opts: SupervisorOptions,
    run_opts: RunOptions,
    functions: Iterable[Function] = (),
    file: str = "<pipeline>",
) -> int:
    """Run ``spec`` until stopped; restart on failure when allowed. Returns the exit code
    (0 stopped, 1 failed, 2 invalid configuration found at start)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)  # only possible in the main thread
    functions = list(functions)
    restarts = 0
    backoff: int | None = None
    while True:
        started = time.monotonic()
        try:
            await Runner(spec, stop, run_opts, functions=functions, file=file).run()
            return 0
        except ConfigError as exc:
            print(str(exc), file=sys.stderr)
            return 2
        except (SluiceError, OSError) as exc:
            error: BaseException = exc
        except Exception as exc:
            error = exc
        m.ERRORS.labels(spec.pipeline_name, "fatal").inc()
        if not opts.restart_on_error or stop.is_set():
            log.error("pipeline %s failed: %s", spec.pipeline_name, _describe(error))
            return 1
        if opts.max_restarts is not None and restarts >= opts.max_restarts:
            log.error(
                "pipeline %s failed after %d restart(s), giving up: %s",
                spec.pipeline_name,
                restarts,
                _describe(error),
            )
            return 1
        if time.monotonic() - started >= opts.reset_backoff_after_secs:
            backoff = None
        backoff = next_backoff_ms(backoff, opts)
        restarts += 1
        m.RESTARTS.labels(spec.pipeline_name).inc()
        wait = jittered(backoff)
        log.error(
            "pipeline %s failed, restart %d in %.1fs: %s",
            spec.pipeline_name,
            restarts,
            wait,
            _describe(error),
        )
        try:
            await asyncio.wait_for(stop.wait(), timeout=wait)
            return 0
        except TimeoutError:
            pass


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, SluiceError) else f"{type(exc).__name__}: {exc}"


def _cmd_consume(args: argparse.Namespace) -> int:
    logs.configure(args.log_format, args.log_level)
    try:
        spec, functions, origin = _load(args)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    logs.bind(spec.pipeline_name)
    if args.metrics_port is not None:
        m.serve(args.metrics_port)
    opts = SupervisorOptions(
        restart_on_error=args.restart_on_error,
        initial_backoff_ms=args.initial_backoff_ms,
        max_backoff_ms=args.max_backoff_ms,
        max_restarts=args.max_restarts,
        reset_backoff_after_secs=args.reset_backoff_after_secs,
    )
    log.info(
        "pipeline %s starting: %d source(s), %d target(s)",
        spec.pipeline_name,
        len(spec.all_sources),
        len(spec.all_targets),
    )
    run_opts = RunOptions(stop_after_idle_ms=args.stop_after_idle_ms, drain=not args.no_drain)
    code = asyncio.run(supervise(spec, opts, run_opts, functions, origin))
    log.info("pipeline %s stopped (exit %d)", spec.pipeline_name, code)
    return code


def _load(args: argparse.Namespace) -> tuple[PipelineSpec, list[Function], str]:
    """The pipeline ``flow consume`` runs: a file, or with ``--module`` a
    pipeline a Python module declares (``@sluice.streaming_pipeline``)."""
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

    try:
        declared = load_module(args.module)
        specs = {name: d.spec() for name, d in sorted(declared.items())}
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    for name, spec in specs.items():
        sources = ", ".join(spec.query_of(s) for s in spec.all_sources)
        targets = ", ".join(str(t.kind) for t in spec.all_targets)
        print(f"{name}\t{sources} -> {targets}")
    return 0


def run_pipeline(
    config: str | Path,
    *,
    udfs: Iterable[Function] = (),
    aggregate_udfs: Iterable[Function] = (),
    metrics_port: int | None = None,
    stop_after_idle_ms: int | None = None,
    restart_on_error: bool = False,
    drain: bool = True,
) -> int:
    """Run the pipeline file ``config`` in this process until it stops; the exit code.

    ``udfs`` / ``aggregate_udfs`` (``@sluice.udf`` / ``@sluice.udaf``) are
    registered besides the file's ``udf_modules``. With ``stop_after_idle_ms``
    the run ends once its input is idle and, with ``drain``, first emits every
    open window and join row (``False``: keep them for a run that resumes).
    An invalid file raises
    :class:`ConfigError`.
    """
    return run_spec(
        load_file(config),
        str(config),
        udfs=udfs,
        aggregate_udfs=aggregate_udfs,
        metrics_port=metrics_port,
        stop_after_idle_ms=stop_after_idle_ms,
        restart_on_error=restart_on_error,
        drain=drain,
    )


def run_spec(
    spec: PipelineSpec,
    origin: str,
    *,
    udfs: Iterable[Function] = (),
    aggregate_udfs: Iterable[Function] = (),
    metrics_port: int | None = None,
    stop_after_idle_ms: int | None = None,
    restart_on_error: bool = False,
    drain: bool = True,
) -> int:
    """Run a validated pipeline spec (``origin`` names it in messages: its
    file, or ``<python:NAME>``); see :func:`run_pipeline`."""
    config = origin
    functions = [*udfs, *aggregate_udfs]
    collect(functions, spec.transform.udf_modules if spec.transform else (), str(config))
    if metrics_port is not None:
        m.serve(metrics_port)
    opts = SupervisorOptions(restart_on_error=restart_on_error)
    return asyncio.run(
        supervise(
            spec,
            opts,
            RunOptions(stop_after_idle_ms=stop_after_idle_ms, drain=drain),
            functions,
            str(config),
        )
    )


def add_consume_parser(sub: Any) -> None:
    """Register ``flow consume`` on the CLI's subparsers."""
    p = sub.add_parser("consume", help="run a pipeline until stopped")
    p.add_argument(
        "config",
        nargs="?",
        default="pipeline.toml",
        metavar="CONFIG",
        help="the pipeline file; with --module, the name of a pipeline the module declares",
    )
    p.add_argument(
        "--module",
        default=None,
        metavar="MODULE",
        help="import MODULE and run its @sluice.streaming_pipeline named CONFIG",
    )
    p.add_argument(
        "--metrics-port", type=int, default=None, help="serve /metrics, /healthz, /readyz"
    )
    p.add_argument(
        "--restart-on-error", action="store_true", help="restart in-process after a failure"
    )
    p.add_argument("--initial-backoff-ms", "--min-backoff-ms", type=int, default=1_000)
    p.add_argument("--max-backoff-ms", type=int, default=60_000)
    p.add_argument("--max-restarts", type=int, default=None, help="unbounded when omitted")
    p.add_argument("--reset-backoff-after-secs", type=float, default=60.0)
    p.add_argument(
        "--stop-after-idle-ms",
        type=int,
        default=None,
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
