"""``@sluice.job`` and ``sluice.workflow``: declarations and their checks.

Declaring registers into one process-wide registry (:func:`registry`);
``flow`` commands import a module (``--module``) and read it. Every rule
that can be checked without a database is checked here, at import: unknown
modes, bad schedules and zones, ``depends_on`` naming no job, cycles (the
ring named, ``a -> b -> a``), ``on_message`` beside a schedule, a workflow
with no trigger, a job in two workflows.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sluice.api.connections import Connection
from sluice.errors import ConfigError, ConfigProblem
from sluice.jobs.schedule import Schedule
from sluice.jobs.tables import ManagedTable

MODES = ("append", "truncate", "merge", "scd1", "scd2")


class CycleError(ConfigError):
    """A cycle among jobs (``depends_on``) or workflows (``triggered_by``)."""


@dataclass(frozen=True)
class Retry:
    """Retry policy: attempt ``max_attempts`` times, waiting
    ``backoff_seconds * backoff_factor ** (n - 1)`` after failure ``n``."""

    max_attempts: int = 1
    backoff_seconds: float = 0.0
    backoff_factor: float = 2.0

    def delay_s(self, failures: int) -> float:
        return float(self.backoff_seconds * self.backoff_factor ** max(failures - 1, 0))


@dataclass(frozen=True)
class TargetBinding:
    """One target of a job: a managed table, its connection name and mode."""

    table: ManagedTable
    connection: str | Connection | None
    mode: str


def target(table: ManagedTable, mode: str = "append", connection: str | None = None) -> Any:
    """``sluice.target(Table, mode=...)`` in ``targets=[...]``."""
    return TargetBinding(table, connection, mode)


@dataclass
class Job:
    """A declared job; see :func:`job`."""

    name: str
    func: Callable[..., Any]
    targets: list[TargetBinding]
    source_connection: str | Connection | None
    schedule: Schedule | None
    retry: Retry
    depends_on: list[str]
    compare_columns: list[str] | None = None
    event_timestamp_column: str | None = None
    ttl_seconds: int | None = None
    watermark_column: str | None = None
    watermark_initial: str = "1970-01-01 00:00:00+00"
    workflow: str | None = None

    @property
    def mode(self) -> str:
        return self.targets[0].mode

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.func(*args, **kwargs)


@dataclass
class Workflow:
    """A declared workflow; see :func:`workflow`."""

    name: str
    jobs: list[str]
    triggered_by: list[str] = field(default_factory=list)
    schedule: Schedule | None = None
    on_message: Any = None


@dataclass
class Registry:
    jobs: dict[str, Job] = field(default_factory=dict)
    workflows: dict[str, Workflow] = field(default_factory=dict)


_REGISTRY = Registry()


def registry() -> Registry:
    """The jobs and workflows declared in this process."""
    return _REGISTRY


def clear() -> None:
    """Forget every declaration (tests, and ``flow`` before importing a module)."""
    _REGISTRY.jobs.clear()
    _REGISTRY.workflows.clear()


def _err(where: str, key: str, msg: str) -> ConfigError:
    return ConfigError([ConfigProblem(where, key, msg)])


def _retry(value: Retry | Mapping[str, Any] | None, where: str) -> Retry:
    if value is None:
        return Retry()
    if isinstance(value, Retry):
        return value
    unknown = set(value) - {"max_attempts", "backoff_seconds", "backoff_factor"}
    if unknown:
        raise _err(where, "retry", f"unknown keys {sorted(unknown)}")
    r = Retry(**value)
    if r.max_attempts < 1 or r.backoff_seconds < 0 or r.backoff_factor < 1:
        raise _err(where, "retry", "needs max_attempts >= 1, backoff_seconds >= 0, factor >= 1")
    return r


def job(
    name: str | None = None,
    *,
    target: ManagedTable | None = None,
    targets: Sequence[ManagedTable | TargetBinding] | None = None,
    source_connection: str | Connection | None = None,
    target_connection: str | Connection | Mapping[str, str | Connection] | None = None,
    schedule: str | None = None,
    timezone: str | None = None,
    mode: str = "append",
    retry: Retry | Mapping[str, Any] | None = None,
    depends_on: Iterable[str | Job] = (),
    compare_columns: Sequence[str] | None = None,
    event_timestamp_column: str | None = None,
    ttl_seconds: int | None = None,
    watermark_column: str | None = None,
    watermark_initial: str | None = None,
) -> Callable[[Callable[..., Any]], Job]:
    """Declare a batch job; the decorated function is its body.

    The body takes the source connection's DB-API connection and returns one
    SQL string (run on ``source_connection``, rows streamed as Arrow batches)
    or yields ``pyarrow.RecordBatch`` values. ``target`` / ``targets`` are
    :class:`ManagedTable` values (or :func:`target` bindings with their own
    mode); ``target_connection`` is a connection name (default: the table's
    ``connection``, else ``"default"``, i.e. ``SLUICE_DSN``), or a mapping
    from table name to connection name for fan-out. With no ``source_connection``
    the job reads from its (first) target's connection. ``$watermark`` in
    the SQL is replaced by the job's watermark (the greatest
    ``watermark_column`` — default ``event_timestamp_column`` — committed so
    far). Raises :class:`ConfigError` at import for a bad declaration.
    """

    def wrap(func: Callable[..., Any]) -> Job:
        jname = name or func.__name__
        where = f"job {jname}"
        if mode not in MODES:
            raise _err(where, "mode", f"expected one of {', '.join(MODES)}, got {mode!r}")
        if (target is None) == (targets is None):
            raise _err(where, "target", "give exactly one of target= and targets=")
        items = [target] if target is not None else list(targets or [])
        if not items:
            raise _err(where, "targets", "is empty")
        bound: list[TargetBinding] = []
        for t in items:
            if isinstance(t, TargetBinding):
                b = t
            elif isinstance(t, ManagedTable):
                b = TargetBinding(t, None, mode)
            else:
                raise _err(where, "targets", f"expected @sluice.table classes, got {t!r}")
            conn = b.connection
            if conn is None:
                if isinstance(target_connection, Mapping):
                    conn = target_connection.get(b.table.name)
                    if conn is None:
                        raise _err(
                            where, "target_connection", f"names no connection for {b.table.name!r}"
                        )
                else:
                    # The guide's shortest jobs name no connection: the one
                    # called "default" (SLUICE_DSN) is resolved when it runs.
                    conn = target_connection or b.table.connection or "default"
            if b.mode not in MODES:
                raise _err(where, "mode", f"expected one of {', '.join(MODES)}, got {b.mode!r}")
            if b.mode in {"merge", "scd1", "scd2"} and not b.table.primary_key:
                raise _err(where, "mode", f"{b.mode} needs a primary key on {b.table.name}")
            bound.append(TargetBinding(b.table, conn, b.mode))
        sched = Schedule.parse(schedule, timezone, where) if schedule else None
        if timezone and not schedule:
            Schedule.parse("@daily", timezone, where)  # the zone is still checked
        wm_col = watermark_column or event_timestamp_column
        j = Job(
            name=jname,
            func=func,
            targets=bound,
            source_connection=source_connection,
            schedule=sched,
            retry=_retry(retry, where),
            depends_on=[d.name if isinstance(d, Job) else str(d) for d in depends_on],
            compare_columns=list(compare_columns) if compare_columns else None,
            event_timestamp_column=event_timestamp_column,
            ttl_seconds=ttl_seconds,
            watermark_column=wm_col,
            watermark_initial=watermark_initial or "1970-01-01 00:00:00+00",
        )
        if jname in _REGISTRY.jobs:
            raise _err(where, "name", "a job of this name is already declared")
        _REGISTRY.jobs[jname] = j
        _check_cycles()
        return j

    return wrap


#: The historical name, as in the user guide.
pipeline = job


def workflow(
    name: str,
    jobs: Sequence[str | Job],
    triggered_by: Sequence[str] = (),
    schedule: str | None = None,
    timezone: str | None = None,
    on_message: Any = None,
    depends_on: Any = None,
) -> Workflow:
    """Group jobs; fire them on the workflow's triggers, in ``depends_on`` order.

    Triggers (AND-ed, each since this workflow last succeeded):
    ``triggered_by`` names workflows or jobs that must have succeeded;
    ``schedule`` (+ ``timezone``) a tick that must have been reached.
    ``on_message=sluice.Source(connection, query="topic")`` fires the
    workflow once per message instead (exclusive with both; see
    :mod:`sluice.jobs.message`). Raises :class:`ConfigError` (or
    :class:`CycleError`, naming the ring) at declaration.
    """
    where = f"workflow {name}"
    if depends_on is not None:
        raise _err(
            where,
            "depends_on",
            "workflows take no depends_on: declare depends_on=[...] on each job, "
            "and triggered_by=[...] between workflows",
        )
    if on_message is not None and (schedule or triggered_by):
        raise _err(where, "on_message", "is exclusive with schedule and triggered_by")
    if on_message is not None:
        from sluice.jobs.message import check

        check(on_message, where)
    if on_message is None and not schedule and not triggered_by:
        raise _err(where, "schedule", "missing: a workflow needs schedule= or triggered_by=")
    names = [j.name if isinstance(j, Job) else str(j) for j in jobs]
    if not names:
        raise _err(where, "jobs", "is empty")
    if name in _REGISTRY.workflows or name in _REGISTRY.jobs:
        raise _err(where, "name", "a workflow or job of this name is already declared")
    for n in names:
        jb = _REGISTRY.jobs.get(n)
        if jb is None:
            raise _err(where, "jobs", f"no job named {n!r} is declared (declare it first)")
        if jb.workflow is not None and jb.workflow != name:
            raise _err(where, "jobs", f"job {n!r} is already in workflow {jb.workflow!r}")
    wf = Workflow(
        name,
        names,
        list(triggered_by),
        Schedule.parse(schedule, timezone, where) if schedule else None,
        on_message,
    )
    for n in names:
        _REGISTRY.jobs[n].workflow = name
    _REGISTRY.workflows[name] = wf
    try:
        _check_cycles()
    except ConfigError:
        del _REGISTRY.workflows[name]
        for n in names:
            _REGISTRY.jobs[n].workflow = None
        raise
    return wf


def _ring(graph: Mapping[str, Sequence[str]]) -> list[str] | None:
    """A cycle in ``graph`` (node -> what it waits on), as a path, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in graph.get(n, ()):
            if state.get(m) == 1:
                return [*stack[stack.index(m) :], m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def _check_cycles() -> None:
    jobs = {n: j.depends_on for n, j in _REGISTRY.jobs.items()}
    if ring := _ring(jobs):
        raise CycleError([ConfigProblem("depends_on", "", f"cycle: {' -> '.join(ring)}")])
    flows = {n: w.triggered_by for n, w in _REGISTRY.workflows.items()}
    if ring := _ring(flows):
        raise CycleError([ConfigProblem("triggered_by", "", f"cycle: {' -> '.join(ring)}")])


def validate(reg: Registry) -> None:
    """The checks that need every declaration: names that exist."""
    problems = []
    for j in reg.jobs.values():
        for d in j.depends_on:
            if d not in reg.jobs:
                problems.append(ConfigProblem(f"job {j.name}", "depends_on", f"no job {d!r}"))
    for w in reg.workflows.values():
        for t in w.triggered_by:
            if t not in reg.workflows and t not in reg.jobs:
                problems.append(
                    ConfigProblem(f"workflow {w.name}", "triggered_by", f"no workflow or job {t!r}")
                )
    if problems:
        raise ConfigError(problems)


def topo(names: Iterable[str], deps: Mapping[str, Sequence[str]]) -> list[str]:
    """``names`` ordered so each comes after what it depends on (stable)."""
    wanted = list(names)
    inside = set(wanted)
    out: list[str] = []
    seen: set[str] = set()

    def visit(n: str) -> None:
        if n in seen:
            return
        seen.add(n)
        for d in deps.get(n, ()):
            if d in inside:
                visit(d)
        out.append(n)

    for n in wanted:
        visit(n)
    return out


def takes_connection(func: Callable[..., Any]) -> bool:
    """Whether the job body takes the connection argument."""
    try:
        return len(inspect.signature(func).parameters) >= 1
    except (TypeError, ValueError):
        return True
