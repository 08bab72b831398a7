"""Batch jobs: ``@sluice.job``, workflows, schedules, the run log, alerters.

Declare with :func:`job`, :func:`table` and :func:`workflow` (re-exported as
``sluice.job`` / ``sluice.table`` / ``sluice.workflow``); run with ``flow
run-due`` / ``flow run`` (:mod:`sluice.jobs.orchestrate`). See the README's
"Batch jobs" section.
"""

from sluice.jobs.declare import (
    CycleError,
    Job,
    Retry,
    Workflow,
    clear,
    job,
    pipeline,
    registry,
    target,
    workflow,
)
from sluice.jobs.message import Message, current_message
from sluice.jobs.tables import ManagedTable, lower, parse_timestamp, pk, table, trim

__all__ = [
    "CycleError",
    "Job",
    "ManagedTable",
    "Message",
    "Retry",
    "Workflow",
    "clear",
    "current_message",
    "job",
    "lower",
    "parse_timestamp",
    "pipeline",
    "pk",
    "registry",
    "table",
    "target",
    "trim",
    "workflow",
]
