"""What the job orchestrator tells the outside world: alerts and run metrics.

The orchestrator (``sluice.jobs``) builds :class:`AlertEvent` and
:class:`RunRecord` values; alerters (``--alerter URL``, see
:mod:`sluice.jobs.alerters`) and metrics sinks (``--metrics URL``, see
:mod:`sluice.jobs.sinks`) deliver them. The orchestrator decides *when* to
alert (a recovery only after at least one failed attempt); these only deliver,
and an alerter that raises is logged by :class:`~sluice.jobs.alerters.Alerters`
and never stops a run.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal, Protocol


@dataclass(frozen=True, slots=True)
class AlertEvent:
    """A job failed (``failure``) or succeeded after failing (``recovery``)."""

    kind: Literal["failure", "recovery"]
    job: str
    run_id: str
    attempt: int
    at: dt.datetime
    error: str | None = None
    workflow: str | None = None


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One finished job run, for metrics sinks."""

    job: str
    run_id: str
    status: Literal["success", "failed", "skipped"]
    attempt: int
    started_at: dt.datetime
    duration_s: float
    rows: int
    workflow: str | None = None


class Alerter(Protocol):
    """Delivers one alert; may raise (the caller logs and goes on)."""

    def notify(self, event: AlertEvent) -> None: ...


class MetricsSink(Protocol):
    """Records one finished run; ``close`` flushes whatever is buffered."""

    def record(self, run: RunRecord) -> None: ...

    def close(self) -> None: ...
