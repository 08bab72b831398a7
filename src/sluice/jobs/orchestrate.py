"""Deciding what fires: ticks, triggers, the DAG, retries, skips, claims.

A *unit* is a workflow, or a job in no workflow. ``run_due(now)`` walks the
units in ``triggered_by`` order. A unit is due when its schedule's latest
tick at or before ``now`` is newer than the tick it last fired (so ticks
missed while nothing ran are caught up once, not once each) — for a unit
that never fired, only when that tick fell in the last ``interval`` — and
every ``triggered_by`` name has succeeded since the unit last succeeded.

A due unit is fired under its lease (a compare-and-set on its state: one
process at a time walks a unit, and only one fires a tick), its jobs set
pending for the tick, and a *pass* runs them in ``depends_on`` order. In a pass a job runs when its upstreams succeeded (for this tick
inside the unit; today, in the job's zone, across units); otherwise it is
skipped and the skip recorded once; it runs later in the tick once they
succeed (a retry pass). A failed job is retried at
``backoff_seconds * backoff_factor ** (failures - 1)`` after its failure,
up to ``max_attempts``; the attempt count lives in the run log, so the
policy survives restarts. Each run claims ``job@tick#attempt`` first, so
two processes sharing a run log never run one attempt twice.

A workflow declared with ``on_message`` has no ticks: :meth:`Orchestrator.consume`
reads its source and fires it once per message (a fresh tick per firing,
retries waited out in place), committing the source's position after each
batch's messages finished; see :mod:`sluice.jobs.message` and the README.

Alerts: a failure on every failed attempt; a recovery when a job succeeds
after at least one failed attempt. Alerters and sinks never stop a run.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

from sluice.jobs import run as runner
from sluice.jobs.declare import Job, Registry, topo, validate
from sluice.jobs.notify import AlertEvent, MetricsSink, RunRecord
from sluice.jobs.runlog import RunLog, now_iso
from sluice.jobs.schedule import Schedule

log = logging.getLogger("sluice.jobs")

Clock = Callable[[], dt.datetime]


def system_clock() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class Unit:
    name: str
    jobs: list[str]
    schedule: Schedule | None
    triggered_by: list[str]
    workflow: str | None


@dataclass
class Fired:
    """One job run (or skip) of a ``run_due`` / ``run_now`` call."""

    job: str
    status: str
    attempt: int
    tick: str
    rows: int = 0
    error: str | None = None
    path: str | None = None


def _caught_up(src: Any) -> bool:
    """Whether a source that just read nothing has delivered all it holds
    (a source that cannot say: yes)."""
    from sluice.connectors.api import Observable, Partitioned

    if not isinstance(src, Observable):
        return True
    if not src.connected:
        return False
    lag = src.lag()
    parts = src.assignment() if isinstance(src, Partitioned) else tuple(lag)
    return bool(parts) and all(lag.get(p) == 0 for p in parts)


class _Quiet:
    """An alerter / sink that does nothing."""

    def notify(self, event: AlertEvent) -> None:
        pass

    def record(self, run: RunRecord) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class Orchestrator:
    """Fires a registry's jobs against one run log; see the module docstring."""

    registry: Registry
    runlog: RunLog
    alerters: Any = field(default_factory=_Quiet)  # .notify(event), never raises
    sink: MetricsSink = field(default_factory=_Quiet)
    clock: Clock = system_clock
    owner: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    runs: Callable[[Job, str | None], runner.Outcome] = runner.run
    #: Wall-clock seconds a unit's lease lasts (a process that died mid-run
    #: blocks its unit at most this long).
    lease_s: float = 3600.0
    #: An on_message workflow's lease: held by the one process consuming its
    #: source, renewed every third of it, so a killed consumer blocks the
    #: next one at most this long.
    message_lease_s: float = 30.0

    def __post_init__(self) -> None:
        validate(self.registry)

    # -- units -------------------------------------------------------------

    def units(self) -> list[Unit]:
        reg = self.registry
        out = {
            w.name: Unit(w.name, list(w.jobs), w.schedule, list(w.triggered_by), w.name)
            for w in reg.workflows.values()
        }
        for j in reg.jobs.values():
            if j.workflow is None:
                out[j.name] = Unit(j.name, [j.name], j.schedule, [], None)
        order = topo(sorted(out), {u.name: u.triggered_by for u in out.values()})
        return [out[n] for n in order]

    def zone(self, job: Job) -> ZoneInfo:
        if job.schedule is not None:
            return ZoneInfo(job.schedule.zone)
        wf = self.registry.workflows.get(job.workflow or "")
        if wf is not None and wf.schedule is not None:
            return ZoneInfo(wf.schedule.zone)
        return ZoneInfo("UTC")

    # -- state -------------------------------------------------------------

    def state(self, name: str) -> dict[str, Any]:
        got = self.runlog.get_state(name)
        return got[0] if got else {}

    def update(self, name: str, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Read-modify-write ``name``'s state with compare-and-set, retried on a race."""
        for _ in range(20):
            got = self.runlog.get_state(name)
            data, version = (got[0], got[1]) if got else ({}, None)
            change(data)
            if self.runlog.put_state(name, data, version):
                return data
        raise RuntimeError(f"run log state {name!r}: too many concurrent updates")

    # -- due ---------------------------------------------------------------

    def due_tick(self, unit: Unit, now: dt.datetime, interval_s: float) -> str | None:
        """The key of the firing ``unit`` is due for at ``now``, or None."""
        st = self.state(f"unit:{unit.name}")
        parts: list[str] = []
        if unit.schedule is not None:
            tick = unit.schedule.latest(now)
            last = st.get("last_tick")
            if last is None:
                if tick <= now - dt.timedelta(seconds=interval_s):
                    return None
            elif tick.isoformat() <= str(last).split("|")[0]:
                return None
            parts.append(tick.isoformat())
        if unit.triggered_by:
            since = st.get("last_success_at") or ""
            latest = ""
            for t in unit.triggered_by:
                other = self.state(f"unit:{t}") if t in self.registry.workflows else {}
                ok_at = other.get("last_success_at") or self.state(f"job:{t}").get(
                    "last_success_at"
                )
                if not ok_at or ok_at <= since:
                    return None
                latest = max(latest, ok_at)
            parts.append(f"after {latest}")
            if unit.schedule is None and st.get("last_tick") == "|".join(parts):
                return None
        return "|".join(parts) if parts else None

    def _cas(self, name: str, change: Callable[[dict[str, Any]], bool]) -> bool:
        """Compare-and-set ``name``'s state; ``change`` returns False to give up."""
        for _ in range(20):
            got = self.runlog.get_state(name)
            data, version = (got[0], got[1]) if got else ({}, None)
            if not change(data):
                return False
            if self.runlog.put_state(name, data, version):
                return True
        return False

    def _acquire(
        self, unit: Unit, key: str | None, now: dt.datetime, ttl: float | None = None
    ) -> str | None:
        """Take ``unit``'s lease (and, with ``key``, fire that tick); the holder
        token, or None when another process holds it or already fired ``key``.

        One process at a time walks a unit's DAG, so a new tick never resets
        the jobs of a firing still running elsewhere. The lease expires after
        :attr:`lease_s` of wall time (a process that died mid-run)."""
        token = f"{self.owner}#{uuid.uuid4().hex[:8]}"

        def take(d: dict[str, Any]) -> bool:
            if d.get("holder") and float(d.get("lease_until") or 0) > time.time():
                return False
            if key is not None:
                last = d.get("last_tick")
                if last is not None and (key == last or (key[:1].isdigit() and key <= last)):
                    return False
                d["last_tick"] = key
                d["fired_at"] = now_iso(now)
            d["holder"] = token
            d["lease_until"] = time.time() + (ttl or self.lease_s)
            return True

        return token if self._cas(f"unit:{unit.name}", take) else None

    def _release(self, unit: Unit, token: str) -> None:
        def free(d: dict[str, Any]) -> bool:
            if d.get("holder") != token:
                return False
            d["holder"] = None
            d["lease_until"] = None
            return True

        self._cas(f"unit:{unit.name}", free)

    def _needs_pass(self, unit: Unit, tick: str, now: dt.datetime) -> bool:
        for name in unit.jobs:
            st = self.state(f"job:{name}")
            if st.get("tick") != tick:
                continue
            status = st.get("status")
            if status in {"pending", "skipped"}:
                return True
            if status == "failed":
                at = st.get("next_retry_at")
                if not at or dt.datetime.fromisoformat(at) <= now:
                    return True
        return False

    def run_due(self, interval_s: float = 60.0, now: dt.datetime | None = None) -> list[Fired]:
        """Fire what is due at ``now`` (the clock's by default); see the module docstring."""
        now = now or self.clock()
        fired: list[Fired] = []
        for unit in self.units():
            wf = self.registry.workflows.get(unit.name)
            if wf is not None and wf.on_message is not None:
                continue  # fired per message by consume(), never by ticks
            key = self.due_tick(unit, now, interval_s)
            token = self._acquire(unit, key, now) if key is not None else None
            if token is not None and key is not None:
                try:
                    if not self.runlog.claim(f"unit:{unit.name}@{key}", self.owner):
                        continue
                    for name in unit.jobs:

                        def reset(d: dict[str, Any], key: str = key) -> None:
                            d.update(tick=key, status="pending", attempts=0, next_retry_at=None)

                        self.update(f"job:{name}", reset)
                    fired += self._pass(unit, key, now)
                finally:
                    self._release(unit, token)
                continue
            tick = self.state(f"unit:{unit.name}").get("last_tick")
            if tick is None or not self._needs_pass(unit, str(tick), now):
                continue
            token = self._acquire(unit, None, now)
            if token is None:
                continue
            try:
                fired += self._pass(unit, str(tick), now)
            finally:
                self._release(unit, token)
        return fired

    def _upstream(self, job: Job, tick: str, now: dt.datetime) -> tuple[str, bool] | None:
        """Why ``job`` cannot run yet, and whether that is settled for now
        (an upstream failed, or one in another unit has not succeeded today)
        rather than in progress (an upstream of this tick not run yet)."""
        today = now.astimezone(self.zone(job)).date()
        for d in job.depends_on:
            up = self.registry.jobs[d]
            st = self.state(f"job:{d}")
            failed = st.get("status") in {"failed", "gave_up"}
            if up.workflow is not None and up.workflow == job.workflow:
                if st.get("tick") == tick and st.get("status") == "success":
                    continue
                if failed:
                    return f"upstream {d} failed", True
                return f"waiting on upstream {d}", False
            ok = st.get("last_success_at")
            if ok and dt.datetime.fromisoformat(ok).astimezone(self.zone(job)).date() == today:
                continue
            return (f"upstream {d} failed" if failed else f"waiting on upstream {d}"), True
        return None

    def _pass(self, unit: Unit, tick: str, now: dt.datetime) -> list[Fired]:
        fired: list[Fired] = []
        jobs = self.registry.jobs
        order = topo(unit.jobs, {n: jobs[n].depends_on for n in unit.jobs})
        for name in order:
            job = jobs[name]
            st = self.state(f"job:{name}")
            if st.get("tick") != tick:
                continue
            status = st.get("status")
            if status in {"success", "gave_up", "running"}:
                continue
            if status == "failed":
                retry_at = st.get("next_retry_at")
                if retry_at and dt.datetime.fromisoformat(retry_at) > now:
                    continue
            blocked = self._upstream(job, tick, now)
            if blocked is not None:
                why, settled = blocked
                if (
                    settled
                    and status == "pending"
                    and self.runlog.claim(f"skip:{name}@{tick}", self.owner)
                ):
                    self._skip(job, tick, now, why)
                    fired.append(Fired(name, "skipped", 0, tick, error=why))
                continue
            attempt = int(st.get("attempts") or 0) + 1
            if not self.runlog.claim(f"job:{name}@{tick}#{attempt}", self.owner):
                continue
            fired.append(self._execute(job, tick, attempt, now))
        states = [self.state(f"job:{n}") for n in unit.jobs]
        if all(s.get("tick") == tick and s.get("status") == "success" for s in states):

            def done(d: dict[str, Any]) -> None:
                if d.get("last_success_tick") != tick:
                    d["last_success_tick"] = tick
                    d["last_success_at"] = now_iso(now)

            self.update(f"unit:{unit.name}", done)
        return fired

    def _skip(self, job: Job, tick: str, now: dt.datetime, why: str) -> None:
        def mark(d: dict[str, Any]) -> None:
            if d.get("status") == "pending":
                d["status"] = "skipped"
                d["last_error"] = why

        self.update(f"job:{job.name}", mark)
        run_id = uuid.uuid4().hex
        self.runlog.append_run(
            {
                "run_id": run_id,
                "job": job.name,
                "workflow": job.workflow,
                "tick": tick,
                "attempt": 0,
                "status": "skipped",
                "started_at": now_iso(now),
                "finished_at": now_iso(now),
                "rows": 0,
                "error": why,
                "metrics": None,
            }
        )
        self._record(RunRecord(job.name, run_id, "skipped", 0, now, 0.0, 0, job.workflow))

    def _record(self, rec: RunRecord) -> None:
        try:
            self.sink.record(rec)
        except Exception as exc:
            log.warning("metrics sink failed: %s: %s", type(exc).__name__, exc)

    def _alert(self, event: AlertEvent) -> None:
        try:
            self.alerters.notify(event)
        except Exception as exc:  # the alerters promise not to raise; belt and braces
            log.warning("alerter failed: %s: %s", type(exc).__name__, exc)

    def _execute(self, job: Job, tick: str, attempt: int, now: dt.datetime) -> Fired:
        run_id = uuid.uuid4().hex
        st = self.state(f"job:{job.name}")
        started = time.monotonic()
        error: str | None = None
        outcome: runner.Outcome | None = None
        try:
            outcome = self.runs(job, st.get("watermark"))
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else ""
            error = f"{type(exc).__name__}: {first}"
            log.warning("job %s attempt %d failed: %s", job.name, attempt, error)
            if os.environ.get("SLUICE_TRACEBACK") == "1":
                log.warning("%s", traceback.format_exc())
        duration = time.monotonic() - started
        finished = self.clock() if self.clock is not system_clock else dt.datetime.now(dt.UTC)
        finished = max(finished, now)
        gave_up = False

        def result(d: dict[str, Any]) -> None:
            nonlocal gave_up
            d["attempts"] = attempt
            d["last_run_id"] = run_id
            d["last_run_at"] = now_iso(now)
            if outcome is not None:
                d["status"] = "success"
                d["last_success_at"] = now_iso(finished)
                d["last_error"] = None
                d["next_retry_at"] = None
                if outcome.watermark is not None:
                    d["watermark"] = outcome.watermark
            else:
                d["last_error"] = error
                d["last_failure_at"] = now_iso(finished)
                if attempt < job.retry.max_attempts:
                    d["status"] = "failed"
                    delay = dt.timedelta(seconds=job.retry.delay_s(attempt))
                    d["next_retry_at"] = now_iso(finished + delay)
                else:
                    d["status"] = "gave_up"
                    d["next_retry_at"] = None
                    gave_up = True

        # The watermark moves here, after every target committed (runner.run returned).
        self.update(f"job:{job.name}", result)
        status = "success" if outcome is not None else "failed"
        rows = outcome.rows if outcome else 0
        self.runlog.append_run(
            {
                "run_id": run_id,
                "job": job.name,
                "workflow": job.workflow,
                "tick": tick,
                "attempt": attempt,
                "status": status,
                "started_at": now_iso(now),
                "finished_at": now_iso(finished),
                "rows": rows,
                "error": error,
                "metrics": {
                    "path": outcome.path if outcome else None,
                    "batches": outcome.batches if outcome else 0,
                    "duration_s": round(duration, 6),
                    "per_target": outcome.per_target if outcome else {},
                    "gave_up": gave_up,
                },
            }
        )
        self._record(
            RunRecord(
                job.name,
                run_id,
                "success" if outcome is not None else "failed",
                attempt,
                now,
                duration,
                rows,
                job.workflow,
            )
        )
        if outcome is None:
            self._alert(
                AlertEvent("failure", job.name, run_id, attempt, finished, error, job.workflow)
            )
        elif attempt > 1:
            self._alert(
                AlertEvent("recovery", job.name, run_id, attempt, finished, None, job.workflow)
            )
        return Fired(
            job.name,
            status,
            attempt,
            tick,
            rows,
            error,
            outcome.path if outcome else None,
        )

    # -- messages ------------------------------------------------------------

    def message_workflows(self) -> list[str]:
        """The workflows declared with ``on_message``."""
        return sorted(n for n, w in self.registry.workflows.items() if w.on_message is not None)

    def consume(
        self,
        name: str,
        *,
        wait_s: float = 1.0,
        follow: bool = False,
        idle_timeout_s: float = 30.0,
        max_messages: int | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> list[Fired]:
        """Fire message-triggered workflow ``name`` once per message of its source.

        Without ``follow``, reads until the source is caught up (an empty
        read with no lag left, or ``idle_timeout_s`` without a message) and
        returns; with it, until ``stop()``. The source commits a batch only
        after every message in it fired and its workflow succeeded or gave
        up (recorded failed); a replayable source's messages already fired
        in a batch read again after a crash are not fired twice. One
        :class:`Fired` per message (``job`` = the workflow).

        One process at a time consumes a workflow: it holds the unit's lease
        (``message_lease_s``, renewed by a thread). Another waits for it —
        without ``follow`` at most ``idle_timeout_s``, then skips the
        workflow (a warning) — so a killed consumer's successor starts
        within one lease."""
        wf = self.registry.workflows[name]
        unit = Unit(wf.name, list(wf.jobs), None, [], wf.name)
        # One process at a time consumes a workflow's source (its jobs' state
        # is the workflow's): the unit lease, renewed while consuming.
        ttl = self.message_lease_s
        token = self._acquire(unit, None, dt.datetime.now(dt.UTC), ttl)
        deadline = time.monotonic() + idle_timeout_s
        while token is None:
            if (stop is not None and stop()) or (not follow and time.monotonic() > deadline):
                log.warning("workflow %s: another process consumes its source; skipped", name)
                return []
            time.sleep(min(1.0, ttl / 3))
            token = self._acquire(unit, None, dt.datetime.now(dt.UTC), ttl)
        done = threading.Event()

        def renew() -> None:
            def bump(d: dict[str, Any]) -> bool:
                if d.get("holder") != token:
                    return False
                d["lease_until"] = time.time() + ttl
                return True

            while not done.wait(ttl / 3):
                try:
                    self._cas(f"unit:{name}", bump)
                except Exception as exc:  # the run log guards itself; belt and braces
                    log.warning("workflow %s: lease renewal failed: %s", name, exc)

        keeper = threading.Thread(target=renew, name=f"sluice-lease-{name}", daemon=True)
        keeper.start()
        try:
            return self._consume(unit, wait_s, follow, idle_timeout_s, max_messages, stop)
        finally:
            done.set()
            keeper.join()
            self._release(unit, token)

    def _consume(
        self,
        unit: Unit,
        wait_s: float,
        follow: bool,
        idle_timeout_s: float,
        max_messages: int | None,
        stop: Callable[[], bool] | None,
    ) -> list[Fired]:
        from sluice.connectors.api import Observable
        from sluice.errors import SluiceError
        from sluice.jobs import message as msgs

        name = unit.name
        src = msgs.build_source(name, self.registry.workflows[name].on_message)
        src.open(None)
        fired: list[Fired] = []
        last = time.monotonic()
        try:
            while stop is None or not stop():
                batch = src.read(wait_s)
                if batch is None:
                    if follow:
                        continue
                    if _caught_up(src):
                        break
                    if time.monotonic() - last > idle_timeout_s:
                        if isinstance(src, Observable) and not src.connected:
                            raise SluiceError(
                                f"workflow {name}: its on_message source did not connect "
                                f"within {idle_timeout_s:g}s"
                            )
                        break
                    continue
                last = time.monotonic()
                fired += self._messages(unit, src, batch)
                src.commit(batch.ack)  # every message of the batch fired: the position moves

                def forget(d: dict[str, Any]) -> None:
                    d.pop("done", None)

                self.update(f"unit:{name}", forget)
                last = time.monotonic()
                if max_messages is not None and len(fired) >= max_messages:
                    break
        finally:
            src.close()
        return fired

    def _messages(self, unit: Unit, src: Any, batch: Any) -> list[Fired]:
        from sluice.connectors.api import Seekable
        from sluice.jobs import message as msgs

        fired: list[Fired] = []
        seekable = isinstance(src, Seekable)
        done: dict[str, Any] = dict(self.state(f"unit:{unit.name}").get("done") or {})
        for i, value in enumerate(msgs.rows(batch.data)):
            idx = batch.rows[i] if batch.rows is not None else i
            raw = batch.raw.record(idx) if batch.raw is not None else None
            where = batch.raw.where(idx) if batch.raw is not None else f"{batch.span()} row {i}"
            part, off = (raw.partition, raw.offset) if raw is not None else (None, None)
            ordered = seekable and part is not None and isinstance(off, int)
            if ordered and int(done.get(str(part), -1)) >= int(off or 0):
                continue  # fired before a crash, in a batch not yet committed
            m = msgs.Message(value, where, raw.payload if raw else None, part, off)
            fired.append(self._fire_message(unit, m))
            if ordered:
                done[str(part)] = off

                def mark(d: dict[str, Any], p: str = str(part), o: Any = off) -> None:
                    d.setdefault("done", {})[p] = o

                self.update(f"unit:{unit.name}", mark)
        for idx, why in batch.bad:
            where = batch.raw.where(idx) if batch.raw is not None else batch.span()
            error = f"cannot decode the message at {where}: {why}"
            log.warning("workflow %s: %s", unit.name, error)
            fired.append(
                self._message_run(unit.name, f"message {where}", "failed", 0, 0, error, {})
            )
        return fired

    def _message_run(
        self,
        name: str,
        tick: str,
        status: str,
        attempt: int,
        rows: int,
        error: str | None,
        metrics: dict[str, Any],
        started: dt.datetime | None = None,
    ) -> Fired:
        now = dt.datetime.now(dt.UTC)
        self.runlog.append_run(
            {
                "run_id": uuid.uuid4().hex,
                "job": name,
                "workflow": name,
                "tick": tick,
                "attempt": attempt,
                "status": status,
                "started_at": now_iso(started or now),
                "finished_at": now_iso(now),
                "rows": rows,
                "error": error,
                "metrics": metrics,
            }
        )
        return Fired(name, status, attempt, tick, rows, error)

    def _fire_message(self, unit: Unit, m: Any) -> Fired:
        """Run ``unit``'s jobs for message ``m`` under the retry policies
        (waiting out backoffs here, in real time); one run-log row for the
        workflow: success, or failed with the message when a job gave up."""
        from sluice.jobs import message as msgs

        now = dt.datetime.now(dt.UTC)
        # A fresh tick per firing: a firing a dead process left half done is
        # fired again from its start (its claims are not this tick's).
        tick = f"message {m.where} #{uuid.uuid4().hex[:8]}"
        for n in unit.jobs:

            def reset(d: dict[str, Any]) -> None:
                d.update(tick=tick, status="pending", attempts=0, next_retry_at=None)

            self.update(f"job:{n}", reset)

        def fired_at(d: dict[str, Any]) -> None:
            d.update(last_message=m.where, fired_at=now_iso(now))

        self.update(f"unit:{unit.name}", fired_at)
        runs: list[Fired] = []
        with msgs.handing(m):
            while True:
                runs += self._pass(unit, tick, dt.datetime.now(dt.UTC))
                waits = [
                    dt.datetime.fromisoformat(st["next_retry_at"])
                    for st in (self.state(f"job:{n}") for n in unit.jobs)
                    if st.get("tick") == tick and st.get("status") == "failed"
                    if st.get("next_retry_at")
                ]
                if not waits:
                    break
                time.sleep(max(0.0, (min(waits) - dt.datetime.now(dt.UTC)).total_seconds()))
        states = [self.state(f"job:{n}") for n in unit.jobs]
        ok = all(s.get("tick") == tick and s.get("status") == "success" for s in states)
        errors = [f"{r.job}: {r.error}" for r in runs if r.status != "success" and r.error]
        return self._message_run(
            unit.name,
            tick,
            "success" if ok else "failed",
            max((r.attempt for r in runs), default=0),
            sum(r.rows for r in runs if r.status == "success"),
            None if ok else (errors[-1] if errors else "not every job succeeded"),
            {"message": m.json(), "where": m.where, "jobs": len(runs)},
            now,
        )

    # -- one-shot ------------------------------------------------------------

    def run_now(self, name: str) -> list[Fired]:
        """Run job ``name`` (or every job of workflow ``name``, in order) now,
        regardless of schedules and upstreams; recorded as a manual tick."""
        now = self.clock()
        jobs = self.registry.jobs
        if name in self.registry.workflows:
            names = self.registry.workflows[name].jobs
            names = topo(names, {n: jobs[n].depends_on for n in names})
        elif name in jobs:
            names = [name]
        else:
            from sluice.config.validate import nearest
            from sluice.errors import ConfigError, ConfigProblem

            hint = nearest(name, [*jobs, *self.registry.workflows])
            raise ConfigError(
                [
                    ConfigProblem(
                        "flow run",
                        name,
                        "no such job or workflow" + (f"; did you mean {hint!r}?" if hint else ""),
                    )
                ]
            )
        # The run is recorded under a manual tick; the job's scheduled state
        # (its tick) stays, so a manual success also lets a waiting downstream
        # of the current tick go on.
        tick = f"manual {now_iso(now)} {uuid.uuid4().hex[:8]}"
        out = []
        for n in names:
            out.append(self._execute(jobs[n], tick, 1, now))
            if out[-1].status != "success":
                break
        return out

    # -- status --------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        """Per job: last status, error, attempts, next due (job's zone), waiting-on."""
        now = self.clock()
        rows = []
        units = {n: u for u in self.units() for n in u.jobs}
        for name, job in sorted(self.registry.jobs.items()):
            st = self.state(f"job:{name}")
            unit = units[name]
            nxt = None
            if st.get("status") == "failed" and st.get("next_retry_at"):
                nxt = dt.datetime.fromisoformat(st["next_retry_at"])
            elif unit.schedule is not None:
                nxt = unit.schedule.next_after(now)
            waiting = None
            if st.get("status") in {"pending", "skipped"}:
                blocked = self._upstream(job, str(st.get("tick")), now)
                waiting = blocked[0] if blocked else None
            rows.append(
                {
                    "job": name,
                    "workflow": job.workflow,
                    "status": st.get("status") or "never run",
                    "attempts": st.get("attempts") or 0,
                    "error": st.get("last_error"),
                    "last_success_at": st.get("last_success_at"),
                    "next_due": nxt.astimezone(self.zone(job)).isoformat() if nxt else None,
                    "waiting_on": waiting,
                    "watermark": st.get("watermark"),
                }
            )
        return rows
