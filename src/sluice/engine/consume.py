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

from sluice.config import PipelineSpec, load_file
from sluice.engine import metrics as m
from sluice.engine.runner import Runner, RunOptions
from sluice.errors import ConfigError, Fenced, SluiceError
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
        # Fenced: another process took over; restarting would fence it in turn.
        if not opts.restart_on_error or stop.is_set() or isinstance(error, Fenced):
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
