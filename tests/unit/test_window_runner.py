"""The window stage inside the run loop: emission, commit holdback, restarts,
late rows, idle sources and rebalances, with in-memory sources and targets.

The expected windows always come from DuckDB SQL over the same events.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import pyarrow as pa
import pytest

from sluice.config import load_text
from sluice.connectors.api import EVENT_TS, EVENT_TS_TYPE, Batch, Position, RawRecord
from sluice.engine import metrics as m
from sluice.engine.runner import Runner, RunOptions, _source_names
from sluice.engine.watermark import WatermarkFile, Watermarks

MIN_US = 60_000_000
T0 = 1_700_000_000 * 1_000_000 // MIN_US * MIN_US  # a minute boundary


@dataclass
class _Records:
    payloads: list[bytes]
    first: int

    def __len__(self) -> int:
        return len(self.payloads)

    def record(self, index: int) -> RawRecord:
        return RawRecord("log:0", self.first + index, None, None, self.payloads[index])

    def where(self, index: int) -> str:
        return f"offset {self.first + index}"

    def span(self) -> str:
        return f"offsets {self.first}-{self.first + len(self.payloads) - 1}"


class LogSource:
    """A replayable log: reads ``batch`` events at a time from the committed offset.

    ``stop_after`` sets ``stop`` once that many batches were read; ``epoch``
    may be bumped by a test to play a rebalance (the run loop then rewinds).
    """

    def __init__(
        self,
        events: list[dict[str, Any]],
        batch: int,
        committed: int = 0,
        source_id: str = "log",
        stop_after: int | None = None,
        stop: asyncio.Event | None = None,
    ) -> None:
        self.id = source_id
        self.payloads = [json.dumps(e).encode() for e in events]
        self.batch = batch
        self.committed = committed
        self.next = committed
        self.reads = 0
        self.stop_after = stop_after
        self.stop = stop
        self.epoch = 1
        self.rewinds = 0

    def open(self, resume: Position | None) -> None:
        self.next = self.committed

    def read(self, timeout_s: float) -> Batch | None:
        if self.next >= len(self.payloads):
            return None
        first = self.next
        payloads = self.payloads[first : first + self.batch]
        self.next += len(payloads)
        self.reads += 1
        if self.stop_after is not None and self.reads >= self.stop_after and self.stop:
            self.stop.set()
        rows = [json.loads(p) for p in payloads]
        table = pa.Table.from_pylist(rows)
        ts = pa.array([r["ts"] for r in rows], pa.int64()).cast(EVENT_TS_TYPE)
        table = table.append_column(pa.field(EVENT_TS, EVENT_TS_TYPE), ts)
        position: Position = {"log:0": self.next}
        return Batch(
            self.id,
            table,
            position,
            position=position,
            raw=_Records(payloads, first),
            epoch=self.epoch,
        )

    def commit(self, position: Position) -> None:
        offset = position["log:0"]
        assert isinstance(offset, int) and offset >= self.committed, "commits go forward"
        self.committed = offset

    def rewind(self, positions: Position | None = None) -> None:
        assert positions is None, "without a state store the committed offset is the start"
        self.rewinds += 1
        self.next = self.committed

    def assignment(self) -> tuple[str, ...]:
        """One partition, and its batches do not name it per row."""
        return ()

    def track(self, *, row_partitions: bool, wait_on_revoke: bool) -> None:
        """One partition, no revokes to wait on: nothing to configure."""

    def release_in_flight(self) -> None:
        """Nothing waits on the batches handed out."""

    def close(self) -> None:
        pass


@dataclass
class MergeTarget:
    """A merge target keyed by (window_start, user)."""

    id: str = "merge"
    rows: dict[tuple[Any, ...], dict[str, Any]] = field(default_factory=dict)
    writes: int = 0
    fail_on_write: int | None = None

    def open(self) -> None:
        pass

    def write(self, data: pa.Table) -> None:
        self.writes += 1
        if self.fail_on_write is not None and self.writes >= self.fail_on_write:
            raise KeyboardInterrupt("crash during the write")
        for row in data.to_pylist():
            self.rows[(row["window_start"], row["user"])] = row

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _spec(name: str, window: str = "", watermark: str = "", sources: int = 1) -> Any:
    if sources == 1:
        src = (
            'source_query = "log"\n[source]\nkind = "kafka"\nbootstrap_servers = "x:1"\n'
            "max_batch_wait_ms = 1\n"
        )
    else:
        src = "".join(
            f'[[sources]]\nquery = "log{i}"\nkind = "kafka"\nbootstrap_servers = "x:1"\n'
            "max_batch_wait_ms = 1\n"
            for i in range(sources)
        )
    return load_text(
        f'pipeline_name = "{name}"\nidle_pause_ms = 1\n{src}'
        '[target]\nkind = "sqlite"\npath = ":memory:"\n[target.table]\nname = "t"\n'
        f"{watermark}"
        '[transform.window]\nkind = "tumbling"\nduration_ms = 60000\ngroup_by = ["user"]\n'
        f"{window}"
        '[[transform.window.aggregations]]\nagg = "count"\nas = "n"\n'
        '[[transform.window.aggregations]]\nagg = "sum"\ncolumn = "amount"\nas = "total"\n'
        '[[transform.window.aggregations]]\nagg = "min"\ncolumn = "amount"\nas = "lo"\n'
        '[[transform.window.aggregations]]\nagg = "max"\ncolumn = "amount"\nas = "hi"\n'
    )


def _events(n: int, seed: int = 7, jitter_s: int = 4) -> list[dict[str, Any]]:
    """``n`` events over ~n/20 minutes, out of order by up to ``jitter_s``."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        base = T0 + i * 3_000_000  # 20 events a minute
        ts = base - rng.randint(0, jitter_s) * 1_000_000
        out.append({"user": f"u{rng.randint(0, 4)}", "amount": rng.randint(1, 100), "ts": ts})
    return out


def _expected(events: list[dict[str, Any]], closed_before_us: int) -> dict[tuple[Any, ...], Any]:
    """Tumbling per-minute windows by DuckDB, those that end by ``closed_before_us``."""
    con = duckdb.connect()
    con.register("ev", pa.Table.from_pylist(events))
    rows = con.sql(
        f"""
        SELECT ts // {MIN_US} * {MIN_US} AS ws, "user", count(*) AS n, sum(amount) AS total,
               min(amount) AS lo, max(amount) AS hi
        FROM ev GROUP BY ws, "user" HAVING ws + {MIN_US} <= {closed_before_us}
        """
    ).fetchall()
    return {(ws, user): (n, total, lo, hi) for ws, user, n, total, lo, hi in rows}


def _got(target: MergeTarget) -> dict[tuple[Any, ...], Any]:
    out = {}
    for row in target.rows.values():
        ws = row["window_start"]
        assert row["window_end"] - ws == pa.scalar(MIN_US, pa.duration("us")).as_py()
        us = int(ws.timestamp()) * 1_000_000
        out[(us, row["user"])] = (row["n"], row["total"], row["lo"], row["hi"])
    return out


def _runner(
    spec: Any,
    sources: list[Any],
    target: Any,
    stop: asyncio.Event | None = None,
    drain: bool = False,
) -> Runner:
    """A run that stops once idle; without ``drain`` a stop that resumes:
    windows the watermark did not close stay open."""
    return Runner(
        spec,
        stop or asyncio.Event(),
        RunOptions(stop_after_idle_ms=0, drain=drain),
        sources=sources,
        targets=[target],
    )


def _run(spec: Any, sources: list[Any], target: Any, stop: asyncio.Event | None = None) -> None:
    asyncio.run(_runner(spec, sources, target, stop).run())


@pytest.fixture(autouse=True)
def _state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_STATE_DIR", str(tmp_path / "state"))


def _value(metric: Any, *labels: str) -> float:
    return float(metric.labels(*labels)._value.get())


def test_windows_emit_when_the_watermark_passes_and_hold_back_the_commit() -> None:
    events = _events(400)
    source = LogSource(events, batch=37)
    target = MergeTarget()
    spec = _spec("w-emit", watermark="[watermark]\nlateness_ms = 5000\n")
    emitted_before = _value(m.WINDOWS_EMITTED, "w-emit")
    _run(spec, [source], target)
    top = max(e["ts"] for e in events)
    wm = top - 5_000_000
    assert _got(target) == _expected(events, wm)
    assert _value(m.WINDOWS_EMITTED, "w-emit") - emitted_before == len(target.rows)
    # Offsets stop before the first row of the windows still open.
    open_start = wm // MIN_US * MIN_US
    first_open = min(i for i, e in enumerate(events) if e["ts"] >= open_start)
    assert source.committed <= first_open
    assert all(e["ts"] < open_start for e in events[: source.committed])
    assert _value(m.WINDOWS_ACTIVE, "w-emit") >= 1
    assert _value(m.STATE_GROUPS, "w-emit") >= 1


@pytest.mark.parametrize(("crash_write", "batch"), [(2, 23), (5, 50), (9, 31), (2, 400)])
def test_a_crash_and_restart_replays_the_open_windows_exactly(crash_write: int, batch: int) -> None:
    events = _events(600, seed=crash_write)
    spec = _spec("w-crash", watermark="[watermark]\nlateness_ms = 5000\n")
    target = MergeTarget(fail_on_write=crash_write)
    source = LogSource(events, batch=batch)
    with pytest.raises(KeyboardInterrupt):
        _run(spec, [source], target)
    assert len(target.rows) > 0 or batch == 400
    # Restart from what was committed, twice more with a crash, then to the end.
    target.fail_on_write = target.writes + 2
    source = LogSource(events, batch=batch + 7, committed=source.committed)
    with pytest.raises(KeyboardInterrupt):
        _run(spec, [source], target)
    target.fail_on_write = None
    source = LogSource(events, batch=batch, committed=source.committed)
    _run(spec, [source], target)
    wm = max(e["ts"] for e in events) - 5_000_000
    assert _got(target) == _expected(events, wm)


def test_without_the_stored_watermark_a_replay_would_rewrite_windows_partially() -> None:
    """The watermark file is what keeps a replay from overwriting emitted windows."""
    events = _events(300, seed=3, jitter_s=0)
    spec = _spec("w-file")
    target = MergeTarget()
    source = LogSource(events, batch=20)
    _run(spec, [source], target)
    good = dict(target.rows)
    stored = WatermarkFile("w-file", _source_names(spec))
    assert stored.load() == max(e["ts"] for e in events)
    assert WatermarkFile("w-file", "kafka:another-topic:g").load() is None  # not these sources
    # A replay of everything after the commit: rows of emitted windows are late.
    _run(spec, [LogSource(events, batch=20, committed=0)], target)
    assert target.rows == good
    stored.path.unlink()
    _run(spec, [LogSource(events, batch=20, committed=source.committed - 5)], target)
    assert target.rows != good  # a window rebuilt from its last 5 rows only


def test_late_rows_are_dropped_and_counted() -> None:
    events = [
        {"user": "a", "amount": 1, "ts": T0 + 10_000_000},
        {"user": "a", "amount": 2, "ts": T0 + 70_000_000},  # closes minute 0
        {"user": "a", "amount": 50, "ts": T0 + 20_000_000},  # late for minute 0
        {"user": "a", "amount": 3, "ts": T0 + 130_000_000},  # closes minute 1
    ]
    before = _value(m.LATE_ROWS_DROPPED, "w-late", "drop")
    target = MergeTarget()
    _run(_spec("w-late"), [LogSource(events, batch=1)], target)
    assert _value(m.LATE_ROWS_DROPPED, "w-late", "drop") - before == 1
    assert _got(target) == {(T0, "a"): (1, 1, 1, 1), (T0 + MIN_US, "a"): (1, 2, 2, 2)}


def test_reopen_re_emits_a_corrected_window_and_drops_beyond_the_lateness() -> None:
    events = [
        {"user": "a", "amount": 1, "ts": T0 + 10_000_000},
        {"user": "a", "amount": 2, "ts": T0 + 70_000_000},  # emits minute 0
        {"user": "a", "amount": 50, "ts": T0 + 20_000_000},  # within 30 s: re-emit minute 0
        {"user": "a", "amount": 3, "ts": T0 + 100_000_000},  # wm past minute 0 + 30 s
        {"user": "a", "amount": 70, "ts": T0 + 30_000_000},  # too late: dropped
        {"user": "a", "amount": 4, "ts": T0 + 190_000_000},
    ]
    spec = _spec("w-reopen", window='late_data = "reopen"\nallowed_lateness_ms = 30000\n')
    before = _value(m.LATE_ROWS_DROPPED, "w-reopen", "reopen")
    target = MergeTarget()
    _run(spec, [LogSource(events, batch=1)], target)
    assert _value(m.LATE_ROWS_DROPPED, "w-reopen", "reopen") - before == 1
    got = _got(target)
    assert got[(T0, "a")] == (2, 51, 1, 50)
    assert got[(T0 + MIN_US, "a")] == (2, 5, 2, 3)


def test_late_rows_go_to_the_dead_letters_with_their_raw_payload(tmp_path: Path) -> None:
    events = [
        {"user": "a", "amount": 1, "ts": T0 + 10_000_000},
        {"user": "a", "amount": 2, "ts": T0 + 70_000_000},
        {"user": "a", "amount": 9, "ts": T0 + 5_000_000},
    ]
    dlq = tmp_path / "late.jsonl"
    spec = load_text(f'dlq_store = "{dlq}"\n' + _raw_toml("w-dlq", 'late_data = "dlq"\n'))
    source = LogSource(events, batch=1)
    _run(spec, [source], MergeTarget())
    letters = [json.loads(line) for line in dlq.read_text().splitlines()]
    assert len(letters) == 1
    assert json.loads(letters[0]["payload"]) == events[2]
    assert letters[0]["stage"] == "window" and letters[0]["offset"] == 2
    assert source.committed == 1  # minute 1 is still open


def _raw_toml(name: str, window: str) -> str:
    return (
        f'pipeline_name = "{name}"\nidle_pause_ms = 1\nsource_query = "log"\n'
        '[source]\nkind = "kafka"\nbootstrap_servers = "x:1"\nmax_batch_wait_ms = 1\n'
        '[target]\nkind = "sqlite"\npath = ":memory:"\n[target.table]\nname = "t"\n'
        '[transform.window]\nkind = "tumbling"\nduration_ms = 60000\ngroup_by = ["user"]\n'
        f"{window}"
        '[[transform.window.aggregations]]\nagg = "count"\nas = "n"\n'
    )


def test_an_idle_source_stops_holding_the_watermark_back() -> None:
    clock = [0.0]
    marks = Watermarks(["a", "b"], lateness_ms=0, idle_after_ms=1000, clock=lambda: clock[0])
    ts = pa.array([T0 + 5_000_000], pa.int64()).cast(EVENT_TS_TYPE)
    marks.observe("a", ts)
    assert marks.global_us() is None  # b has said nothing yet, and is not idle
    clock[0] = 1.5
    marks.observe("a", pa.array([T0 + 9_000_000], pa.int64()).cast(EVENT_TS_TYPE))
    assert marks.global_us() == T0 + 9_000_000  # b idle: a alone
    marks.observe("b", pa.array([T0 + 1_000_000], pa.int64()).cast(EVENT_TS_TYPE))
    assert marks.global_us() == T0 + 9_000_000  # never goes back
    assert marks.source("b") == T0 + 1_000_000
    clock[0] = 10.0
    assert marks.global_us() == T0 + 9_000_000  # every source idle: it holds


def test_a_pipeline_with_an_idle_source_still_closes_its_windows() -> None:
    busy = _events(200, seed=11)
    quiet = [{"user": "q", "amount": 1, "ts": T0 + 1_000_000}]
    spec = _spec("w-idle", watermark="[watermark]\nsource_idleness_ms = 200\n", sources=2)
    a = LogSource(quiet, batch=10, source_id="log0")

    class Slow(LogSource):
        def read(self, timeout_s: float) -> Batch | None:
            import time

            time.sleep(0.005)  # ~1 s for the whole log: log0 goes idle meanwhile
            return super().read(timeout_s)

    b = Slow(busy, batch=1, source_id="log1")
    target = MergeTarget()
    _run(spec, [a, b], target)
    top = max(e["ts"] for e in busy)
    assert _got(target) == _expected(busy + quiet, top)
    assert b.committed > 0


def test_a_rebalance_drops_the_windows_and_reads_again_from_the_commit() -> None:
    events = _events(300, seed=5)
    stop = asyncio.Event()
    source = LogSource(events, batch=25)
    original_read = source.read

    def read(timeout_s: float) -> Batch | None:
        if source.reads == 6 and source.rewinds == 0:
            source.epoch += 1  # partitions were reassigned before this read
        return original_read(timeout_s)

    source.read = read  # type: ignore[method-assign]
    target = MergeTarget()
    spec = _spec("w-rebalance", watermark="[watermark]\nlateness_ms = 5000\n")
    _run(spec, [source], target, stop)
    assert source.rewinds == 1
    wm = max(e["ts"] for e in events) - 5_000_000
    assert _got(target) == _expected(events, wm)


def test_a_partition_behind_holds_its_source_back() -> None:
    clock = [0.0]
    marks = Watermarks(["k"], lateness_ms=1000, idle_after_ms=5000, clock=lambda: clock[0])
    ts = pa.array([T0 + 50_000_000, T0 + 2_000_000], pa.int64()).cast(EVENT_TS_TYPE)
    parts = pa.array(["t:0", "t:1"]).dictionary_encode()
    marks.observe("k", ts.slice(0, 1), parts.slice(0, 1), ["t:0", "t:1", "t:2"])
    assert marks.global_us() is None  # t:1 and t:2 have not delivered yet
    marks.observe("k", ts, parts, ["t:0", "t:1", "t:2"])
    assert marks.global_us() is None  # t:2 still holds
    marks.observe("k", ts.slice(1), parts.slice(1), ["t:0", "t:1"])  # t:2 revoked
    assert marks.global_us() == T0 + 1_000_000  # the partition behind decides
    assert marks.source("k") == T0 + 1_000_000
    clock[0] = 6.0
    marks.observe("k", ts.slice(0, 1), parts.slice(0, 1), ["t:0", "t:1"])
    # Silent past the idle timeout, but its lag was never reported: it may
    # hold a backlog the broker has not served yet, so it still holds.
    assert marks.global_us() == T0 + 1_000_000
    marks.report_lag("k", {"t:0": 0, "t:1": 0})
    assert marks.global_us() == T0 + 49_000_000  # t:1 idle: silent and caught up


def _bounded(spec: Any, source: LogSource, target: Any, drain: bool) -> None:
    asyncio.run(_runner(spec, [source], target, drain=drain).run())


def test_a_bounded_run_drains_every_window_and_stores_the_real_watermark() -> None:
    events = _events(400, seed=21)
    spec = _spec("w-drain", watermark="[watermark]\nlateness_ms = 5000\n")
    source, target = LogSource(events, batch=37), MergeTarget()
    _bounded(spec, source, target, drain=True)
    assert _got(target) == _expected(events, 10**18)  # the last minutes too
    assert source.committed == len(events)  # nothing held back: nothing to read again
    real = max(e["ts"] for e in events) - 5_000_000
    assert WatermarkFile("w-drain", _source_names(spec)).load() == real  # not +inf
    # A later run over new data: its rows are not late, its windows emit once.
    later = [
        {"user": "n", "amount": i, "ts": max(e["ts"] for e in events) + 120_000_000 + i}
        for i in range(5)
    ]
    before = dict(target.rows)
    late_before = _value(m.LATE_ROWS_DROPPED, "w-drain", "drop")
    _bounded(spec, LogSource(events + later, batch=37, committed=len(events)), target, True)
    assert _value(m.LATE_ROWS_DROPPED, "w-drain", "drop") == late_before
    assert _got(target) == _expected(events + later, 10**18)
    assert {k: v for k, v in target.rows.items() if k in before} == before


def test_no_drain_keeps_the_last_window_open_for_the_next_run_which_emits_it_once() -> None:
    events = _events(400, seed=22)
    spec = _spec("w-nodrain")
    source, target = LogSource(events, batch=37), MergeTarget()
    _bounded(spec, source, target, drain=False)
    top = max(e["ts"] for e in events)
    assert _got(target) == _expected(events, top)  # the last minute is still open
    assert source.committed < len(events)
    later = [{"user": "n", "amount": 1, "ts": top + 120_000_000}]
    writes: list[pa.Table] = []
    original = target.write

    def write(data: pa.Table) -> None:
        writes.append(data)
        original(data)

    target.write = write  # type: ignore[method-assign]
    _bounded(spec, LogSource(events + later, batch=37, committed=source.committed), target, True)
    assert _got(target) == _expected(events + later, 10**18)
    keys = [(r["window_start"], r["user"]) for t in writes for r in t.to_pylist()]
    assert len(keys) == len(set(keys))  # every window emitted once by the second run


@dataclass
class OverlapTarget(MergeTarget):
    """A merge target whose first writes wait (up to 2 s each) for the window
    stage to fold another round: only a round written behind lets it."""

    folded: threading.Event = field(default_factory=threading.Event)
    overlapped: int = 0
    waits: int = 3

    def write(self, data: pa.Table) -> None:
        if self.waits:
            self.waits -= 1
            self.folded.clear()
            self.overlapped += self.folded.wait(2)
        super().write(data)


@pytest.mark.parametrize("behind", [True, False])
def test_the_next_round_runs_the_stage_while_a_round_is_written(behind: bool) -> None:
    """Write behind (the default): round n's write, flush and commit overlap
    round n+1's stages; the output and the held-back commits are what they
    are with ``write_behind = false``, where nothing overlaps."""
    events = _events(400)
    source = LogSource(events, batch=37)
    target = OverlapTarget(waits=3 if behind else 1)
    spec = _spec("w-behind", watermark="[watermark]\nlateness_ms = 5000\n")
    if not behind:
        spec = msgspec.structs.replace(spec, write_behind=False)
    runner = _runner(spec, [source], target)
    stage = runner._window
    assert stage is not None
    process = stage.process

    def folding(data: pa.Table, watermark_us: int | None) -> Any:
        out = process(data, watermark_us)
        target.folded.set()
        return out

    stage.process = folding  # type: ignore[method-assign]
    asyncio.run(runner.run())
    assert target.overlapped >= 2 if behind else target.overlapped == 0
    wm = max(e["ts"] for e in events) - 5_000_000
    assert _got(target) == _expected(events, wm)
    open_start = wm // MIN_US * MIN_US
    assert all(e["ts"] < open_start for e in events[: source.committed])
    assert source.committed > 0
