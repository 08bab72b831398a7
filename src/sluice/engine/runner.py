"""The run loop: read → stages → write every target → flush → commit.

One iteration handles one batch per source, start to finish; the next batch
is read (and decoded) meanwhile, so at most two batches per source are in
memory and a slow target slows the reads. Commits happen in exactly one
place, :meth:`Runner._commit`, after every target flushed, in read order.

Connectors block; the loop runs them in worker threads (they release the GIL
in librdkafka, libpq and Arrow), so signals and timers stay responsive.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import msgspec
import numpy as np
import numpy.typing as npt
import pyarrow as pa

from sluice.config.spec import InMemoryStateStore, PipelineSpec
from sluice.connectors import registry
from sluice.connectors.api import EVENT_TS, Batch, Position, RawRecord, Source, Target
from sluice.engine import dlq
from sluice.engine import metrics as m
from sluice.engine.lookups import LookupTables
from sluice.engine.stages.join import PARTITION, JoinOutput, JoinStage
from sluice.engine.stages.sql import SqlStage
from sluice.engine.stages.window import WindowOutput, WindowStage
from sluice.engine.watermark import WatermarkFile, Watermarks, max_event_us
from sluice.errors import DecodeError, SluiceError, StageError, TransientError
from sluice.functions import Function, collect
from sluice.state import Checkpoint, StateStore, build_store

log = logging.getLogger("sluice")

_RETRY_FIRST_S = 0.5  # first wait after a transient target failure
_RETRY_MAX_S = 30.0  # waits double up to this; the batch is held, not re-read
_NOT_READY_AFTER_S = 60.0  # /readyz turns 503 when a write has been failing this long


class Stage(Protocol):
    """A transform between the sources and the targets (SQL, window, join, cdc)."""

    def open(self) -> None:
        """Prepare (load lookups, connect to state)."""

    def process(self, data: pa.Table) -> pa.Table:
        """Transform one batch; a failure is a :class:`StageError`."""

    def close(self) -> None:
        """Release what open() took."""


class _Endpoint(Protocol):
    """What the retry loop needs of a target or a dead-letter sink."""

    id: str

    def open(self) -> None:
        """Connect."""

    def close(self) -> None:
        """Disconnect."""


@dataclass
class RunOptions:
    """Run-time switches that are not part of the pipeline file."""

    stop_after_idle_ms: int | None = None  # stop cleanly once every source was idle this long


class Runner:
    """Runs one pipeline until stopped or failed."""

    def __init__(
        self,
        spec: PipelineSpec,
        stop: asyncio.Event,
        options: RunOptions | None = None,
        sources: list[Source] | None = None,
        targets: list[Target] | None = None,
        functions: Iterable[Function] = (),
        file: str = "<pipeline>",
        store: StateStore | None = None,
    ) -> None:
        """``sources`` / ``targets`` / ``store`` replace the ones the spec names
        (unit tests; a ``store`` given is used as a durable one);
        ``functions`` are UDFs / UDAFs registered besides ``udf_modules``."""
        self.spec = spec
        self.stop = stop
        self.options = options or RunOptions()
        self.name = spec.pipeline_name
        self.sources: list[Source] = sources or [
            registry.build_source(s, registry.Context(spec)) for s in spec.all_sources
        ]
        if targets is None and spec.transform is not None and spec.transform.cdc is not None:
            from sluice.engine import cdc  # CDC targets apply change events (engine/cdc.py)

            targets = cdc.build_targets(spec)
        self.targets: list[Target] = targets or [
            registry.build_target(t, registry.Context(spec), i)
            for i, t in enumerate(spec.all_targets)
        ]
        wm = spec.watermark
        self._wm = Watermarks(
            [s.id for s in self.sources],
            lateness_ms=wm.lateness_ms if wm else 0,
            idle_after_ms=wm.source_idleness_ms if wm else 60_000,
        )
        self._idle_since: float | None = None
        self._lag_labels: dict[str, set[str]] = {}
        self._ahead: asyncio.Future[list[Batch | None]] | None = None
        transform = spec.transform
        # A durable store (postgres) holds the stage state and the source
        # positions (see "State store" below). An in_memory store keeps state
        # in the process, which the window and join stages do anyway: restarts
        # are then safe through the commit holdback and the watermark file.
        store_spec = spec.state_store
        durable = store_spec is not None and not isinstance(store_spec, InMemoryStateStore)
        self._store: StateStore | None = store or (build_store(store_spec) if durable else None)
        self._checkpoint_s = (store_spec.checkpoint_interval_ms if store_spec else 60_000) / 1000
        self._version = 0  # the store's checkpoint version this process continues
        self._checkpoint_at = time.monotonic()
        self._dirty = False  # batches processed since the last checkpoint
        self._state_keys: set[str] = set()  # state keys the store holds for this pipeline
        self._positions: dict[str, Position] = {src.id: {} for src in self.sources}
        # False once a batch was processed but not written: its effect on the
        # stage state must then not be checkpointed.
        self._consistent = True
        self.on_error = transform.on_error if transform else "fail"
        self.stages: list[Stage] = []
        if transform is not None and transform.sql:
            functions_by_name = collect(functions, transform.udf_modules, file)
            lookups = LookupTables(transform.lookups, self.name) if transform.lookups else None
            self.stages.append(SqlStage(transform.sql, self.name, functions_by_name, lookups))
        window = transform.window if transform else None
        join = transform.join if transform else None
        timed = window or join
        self._event_column = timed.event_time_column if timed else EVENT_TS
        # Windows and joins hold offsets back until their state no longer
        # needs the rows (see "Windows and joins" below).
        self._window = WindowStage(window, self.name) if window else None
        self._join = JoinStage(join, self.name, join.max_buffer_rows) if join else None
        self._timed: WindowStage | JoinStage | None = self._window or self._join
        self._window_file = (
            WatermarkFile(self.name, _source_names(spec)) if timed and self._store is None else None
        )
        self._pending: dict[str, collections.deque[tuple[Position, int | None]]] = {
            src.id: collections.deque() for src in self.sources
        }
        self._epochs: dict[str, int] = {}
        self._dlq_own: dict[str, dlq.DeadLetterSink] = {}
        self._dlq_default: dlq.DeadLetterSink | None = None
        if self.on_error == "dlq" or (window is not None and window.late_data == "dlq"):
            ids = {i: src.id for i, src in enumerate(self.sources)}
            self._dlq_own, self._dlq_default = dlq.build_sinks(spec, ids)

    # -- lifecycle ------------------------------------------------------------

    async def run(self) -> None:
        """Open everything, loop until ``stop`` is set, close everything.

        Raises the first non-transient error (decode, fatal connector, stage).
        """
        m.HEALTH.set_ready(False, "connecting")
        try:
            for target in self.targets:
                if not await self._retry(target, target.open, "open"):
                    return
            for sink in self._dlq_sinks():
                if not await self._retry(sink, sink.open, "open"):
                    return
            for stage in self.stages:
                await asyncio.to_thread(stage.open)
            resume: dict[str, Position] = {}
            if self._store is not None:
                checkpoint = await self._load()
                if checkpoint is None:
                    return
                resume = checkpoint.positions
            elif self._timed is not None:
                await asyncio.to_thread(self._restore_window)
            if self._timed is not None or self._store is not None:
                for source in self.sources:
                    if hasattr(source, "wait_on_revoke"):
                        source.wait_on_revoke = False  # held offsets are never waited for
                    if hasattr(source, "track_partitions") and self._timed is not None:
                        source.track_partitions = True  # per-partition watermarks and state
            for source in self.sources:
                await asyncio.to_thread(source.open, resume.get(source.id))
            m.UP.labels(self.name).set(1)
            while not self.stop.is_set():
                if not await self._iteration():
                    break
            if self._consistent:
                await self._commit(final=True)  # a clean stop leaves nothing to replay
        finally:
            m.UP.labels(self.name).set(0)
            m.HEALTH.set_ready(False, "stopped")
            await self._drop_read_ahead()
            for source in self.sources:
                await asyncio.to_thread(_quietly, source.close)
            for target in self.targets:
                await asyncio.to_thread(_quietly, target.close)
            for sink in self._dlq_sinks():
                await asyncio.to_thread(_quietly, sink.close)
            for stage in self.stages:
                await asyncio.to_thread(_quietly, stage.close)
            if self._timed is not None:
                await asyncio.to_thread(_quietly, self._timed.close)
            if self._store is not None:
                await asyncio.to_thread(self._store.close)

    async def _read(self) -> list[Batch | None]:
        wait_s = min(s.max_batch_wait_ms for s in self.spec.all_sources) / 1000
        return list(
            await asyncio.gather(*(asyncio.to_thread(s.read, wait_s) for s in self.sources))
        )

    async def _drop_read_ahead(self) -> None:
        """Wait for a read-ahead still running (its thread uses the source), then
        forget it: it was never written, so it is never committed."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            for source in self.sources:
                release = getattr(source, "release_in_flight", None)
                if release is not None:
                    release()  # a revoke inside that read must not wait for us
            with contextlib.suppress(Exception):
                await ahead

    def _dlq_sinks(self) -> list[dlq.DeadLetterSink]:
        sinks = list(self._dlq_own.values())
        return sinks if self._dlq_default is None else [*sinks, self._dlq_default]

    async def _iteration(self) -> bool:
        """One read → transform → write → commit round; False when the loop should end."""
        m.ITERATIONS.labels(self.name).inc()
        if self._ahead is not None:
            ahead, self._ahead = self._ahead, None
            reads = await ahead
        else:
            reads = await self._read()
        batches = [b for b in reads if b is not None]
        self._update_ready()
        if not batches:
            return await self._idle()
        if (self._timed is not None or self._store is not None) and self._rebalanced(batches):
            return await self._reset_window()
        self._idle_since = None
        if not self.stop.is_set():
            # Read ahead: the next batch is read and decoded while this one is
            # transformed and written. It is committed only after this one.
            self._ahead = asyncio.ensure_future(self._read())
        started = time.perf_counter()
        m.ROWS_CONSUMED.labels(self.name).inc(sum(b.num_rows for b in batches))
        letters: list[dlq.DeadLetter] = []
        for b in batches:
            if b.bad:
                letters.extend(self._undecodable(b))
            column = (
                b.data[self._event_column] if self._event_column in b.data.column_names else None
            )
            self._wm.observe(b.source_id, column, b.row_partitions, b.partitions)
        decoded = [b for b in batches if b.num_rows]
        tops: dict[int, int | None] = {}
        out: pa.Table | None = None
        if decoded:
            out = await self._transform(decoded, letters, tops)
        if letters and not await self._dead_letter(letters):
            log.warning("stopping with unwritten dead letters; the batch will be read again")
            self._consistent = False
            return False
        if out is not None and out.num_rows and not await self._deliver(out):
            log.warning("stopping with an unwritten batch; it will be read again on restart")
            self._consistent = False
            return False
        for b in batches:
            if self._store is not None:
                self._positions[b.source_id].update(b.position)
            else:
                self._pending[b.source_id].append((b.position, tops.get(id(b))))
        self._dirty = True
        if not await self._commit(emitted=out is not None and out.num_rows > 0):
            return False
        m.BATCHES.labels(self.name).inc()
        if out is not None:
            m.ROWS_WRITTEN.labels(self.name).inc(out.num_rows)
        m.BATCH_SECONDS.labels(self.name).observe(time.perf_counter() - started)
        self._export_watermarks()
        return True

    # -- on_error ---------------------------------------------------------------

    def _undecodable(self, batch: Batch) -> list[dlq.DeadLetter]:
        """Apply on_error to the records of ``batch`` that did not decode."""
        m.ERRORS.labels(self.name, "decode").inc()
        first, reason = batch.bad[0]
        where = batch.raw.where(first) if batch.raw is not None else batch.span()
        if self.on_error == "fail":
            raise DecodeError(
                f"source {batch.source_id}: cannot decode message at {where}: {reason} "
                f"({len(batch.bad)} bad message(s) in this batch)"
            )
        if self.on_error == "drop" or batch.raw is None:
            m.ROWS_DROPPED.labels(self.name, "decode").inc(len(batch.bad))
            log.warning(
                "source %s: dropped %d undecodable message(s), first at %s: %s",
                batch.source_id,
                len(batch.bad),
                where,
                reason,
            )
            return []
        raw = batch.raw
        return [
            dlq.DeadLetter(self.name, batch.source_id, "decode", why, raw.record(i))
            for i, why in batch.bad
        ]

    async def _transform(
        self, batches: list[Batch], letters: list[dlq.DeadLetter], tops: dict[int, int | None]
    ) -> pa.Table | None:
        """Run the stages; on failure apply on_error. None when the batch was set aside.

        A window pipeline fills ``tops`` (``id(batch)`` → the largest event
        time of its rows that reached the window) and adds its late rows to
        ``letters`` under ``late_data = "dlq"``.
        """
        if not self.stages and self._timed is None:
            return self._union(batches)
        attempts = self.spec.dlq_max_attempts or 1
        error: StageError | None = None
        for attempt in range(1, attempts + 1):
            try:
                if self._window is not None:
                    return await self._windowed(batches, letters, tops)
                if self._join is not None:
                    return await self._joined(batches, letters, tops)
                out = self._union(batches)
                for stage in self.stages:
                    out = await asyncio.to_thread(stage.process, out)
                return out
            except StageError as exc:
                m.ERRORS.labels(self.name, "stage").inc()
                error = exc
                if attempt < attempts:
                    log.warning("batch failed (attempt %d of %d): %s", attempt, attempts, exc)
                    await self._sleep(min(_RETRY_FIRST_S * 2 ** (attempt - 1), _RETRY_MAX_S))
        spans = "; ".join(f"source {b.source_id} {b.span()}" for b in batches)
        if self.on_error == "fail":
            raise StageError(f"{error} (batch from {spans})") from error
        if self.on_error == "drop":
            rows = sum(b.num_rows for b in batches)
            m.ROWS_DROPPED.labels(self.name, "transform").inc(rows)
            log.warning("dropped a batch of %d row(s) (%s): %s", rows, spans, error)
            return None
        for b in batches:
            letters.extend(self._batch_letters(b, str(error)))
        return None

    # -- windows ------------------------------------------------------------------
    #
    # Restart safety without a state store. A batch's offsets are committed
    # only once every window its rows joined was emitted for the last time:
    # batches wait in self._pending (position, largest event time) and a
    # prefix of them is committed when its event times fall below the
    # stage's open floor. The stage's watermark is stored after every write
    # (WatermarkFile) and restored before the first batch, so rows replayed
    # after a crash that belong to windows already emitted are late, and the
    # windows still open are rebuilt from their replayed rows alone.

    async def _windowed(
        self, batches: list[Batch], letters: list[dlq.DeadLetter], tops: dict[int, int | None]
    ) -> pa.Table:
        """SQL per source batch (each source's event times count for its own
        watermark), then the window over all of them."""
        window = self._window
        assert window is not None
        parts: list[pa.Table] = []
        for b in batches:
            out = b.data
            for stage in self.stages:
                out = await asyncio.to_thread(stage.process, out)
            column = out[self._event_column] if self._event_column in out.column_names else None
            if self._event_column not in b.data.column_names:  # computed by the SQL
                self._wm.observe(b.source_id, column)
            tops[id(b)] = None if column is None else max_event_us(column)
            parts.append(out)
        data = (
            parts[0] if len(parts) == 1 else pa.concat_tables(parts, promote_options="permissive")
        )
        result = await asyncio.to_thread(window.process, data, self._wm.global_us())
        if len(result.late):
            self._late_rows(result.late, batches, parts, letters)
        m.WINDOWS_EMITTED.labels(self.name).inc(result.emitted.num_rows)
        return result.emitted

    async def _joined(
        self, batches: list[Batch], letters: list[dlq.DeadLetter], tops: dict[int, int | None]
    ) -> pa.Table:
        """The join over this round's batches, each source on its side."""
        join = self._join
        assert join is not None
        sides: tuple[list[Batch], list[Batch]] = ([], [])
        for b in batches:
            if b.source_id not in (join.spec.left_source, join.spec.right_source):
                raise StageError(f"join: source '{b.source_id}' is on neither side of the join")
            sides[b.source_id != join.spec.left_source].append(b)
            column = (
                b.data[self._event_column] if self._event_column in b.data.column_names else None
            )
            tops[id(b)] = None if column is None else max_event_us(column)

        def side(group: list[Batch]) -> pa.Table | None:
            if not group:
                return None
            # With a store, buffered rows carry their source partition: the
            # state is stored per partition.
            tables = [_tagged(b) if self._store is not None else b.data for b in group]
            return (
                tables[0]
                if len(tables) == 1
                else pa.concat_tables(tables, promote_options="permissive")
            )

        result = await asyncio.to_thread(
            join.process, side(sides[0]), side(sides[1]), self._wm.global_us()
        )
        for group, late in zip(sides, (result.late_left, result.late_right), strict=True):
            if len(late):
                self._late_rows(late, group, [b.data for b in group], letters)
        return result.emitted

    def _late_rows(
        self,
        late: npt.NDArray[np.int64],
        batches: list[Batch],
        parts: list[pa.Table],
        letters: list[dlq.DeadLetter],
    ) -> None:
        """Count late rows, or turn them into dead letters (``late_data = "dlq"``)."""
        assert self._timed is not None
        policy = self._timed.spec.late_data
        if policy != "dlq":
            m.LATE_ROWS_DROPPED.labels(self.name, policy).inc(len(late))
            return
        ends = np.cumsum([p.num_rows for p in parts])
        owner = np.searchsorted(ends, late, side="right")
        reason = f"late: event time before the watermark (late_data = dlq, {self._event_column})"
        for k, (b, part) in enumerate(zip(batches, parts, strict=True)):
            local = late[owner == k] - (ends[k] - part.num_rows)
            if not len(local):
                continue
            if not self.stages and b.raw is not None:  # window input rows are the decoded rows
                index = b.rows
                letters.extend(
                    dlq.DeadLetter(
                        self.name,
                        b.source_id,
                        "window",
                        reason,
                        b.raw.record(index[i] if index is not None else int(i)),
                    )
                    for i in local
                )
                continue
            # After SQL a row has no single raw record: the row itself, as JSON.
            letters.extend(self._row_letters(b, "window", reason, part.take(pa.array(local))))

    def _rebalanced(self, batches: list[Batch]) -> bool:
        """Whether a batch comes from a newer partition assignment than the last one."""
        changed = False
        for b in batches:
            if self._epochs.setdefault(b.source_id, b.epoch) != b.epoch:
                changed = True
        return changed

    async def _reset_window(self) -> bool:
        """After a rebalance: forget the stage state and what was read since
        the last commit, and read again from the committed offsets (with a
        state store: from its last checkpoint, state and positions). False
        when stopped while the store was down."""
        log.warning(
            "partitions were reassigned: dropping the state read since the last commit and "
            "reading again from there"
        )
        await self._drop_read_ahead()
        positions: dict[str, Position] = {}
        if self._store is not None:
            checkpoint = await self._load()
            if checkpoint is None:
                return False
            positions = checkpoint.positions
        for source in self.sources:
            rewind = getattr(source, "rewind", None)
            if rewind is not None:  # to the checkpoint's positions, else the committed ones
                await asyncio.to_thread(rewind, positions.get(source.id))
            self._epochs[source.id] = getattr(source, "epoch", 0)
            self._pending[source.id].clear()
        if self._store is None:
            await asyncio.to_thread(self._restore_window)
        return True

    def _restore_window(self) -> None:
        """Start the window stage empty, at the watermark stored by the last run."""
        assert self._timed is not None and self._window_file is not None
        self._timed.close()
        self._timed.open()
        stored = self._window_file.load()
        if stored is not None:
            self._timed.advance(stored)
            self._wm.restore(stored)

    async def _window_tick(self) -> bool:
        """Idle tick: emit what the watermark closed; False when stopped mid-write."""
        window = self._timed
        assert window is not None
        mark = self._wm.global_us()
        if mark is None or (window.watermark_us is not None and mark <= window.watermark_us):
            return True
        advance: Callable[[int], WindowOutput | JoinOutput] = window.advance
        emitted = (await asyncio.to_thread(advance, mark)).emitted
        self._dirty = True  # the watermark moved; a join evicted
        if emitted.num_rows:
            if self._window is not None:
                m.WINDOWS_EMITTED.labels(self.name).inc(emitted.num_rows)
            if not await self._deliver(emitted):
                self._consistent = False
                return False
            m.ROWS_WRITTEN.labels(self.name).inc(emitted.num_rows)
        return await self._commit(emitted=emitted.num_rows > 0)

    def _batch_letters(self, batch: Batch, error: str) -> list[dlq.DeadLetter]:
        """Dead letters for every decoded row of ``batch`` (raw when the source kept it)."""
        raw = batch.raw
        if raw is not None:
            index = batch.rows if batch.rows is not None else range(len(raw))
            bad = {i for i, _ in batch.bad}
            return [
                dlq.DeadLetter(self.name, batch.source_id, "transform", error, raw.record(i))
                for i in index
                if i not in bad
            ]
        # No raw payloads (e.g. files): the decoded row, as JSON, is the payload.
        return self._row_letters(batch, "transform", error, batch.data)

    def _row_letters(
        self, batch: Batch, stage: str, error: str, rows: pa.Table
    ) -> list[dlq.DeadLetter]:
        """Dead letters whose payloads are ``rows`` (of ``batch``) as JSON."""
        encoder = msgspec.json.Encoder()
        partition = ",".join(batch.partitions or tuple(batch.position))
        return [
            dlq.DeadLetter(
                self.name,
                batch.source_id,
                stage,
                error,
                RawRecord(partition, None, None, None, encoder.encode(row)),
            )
            for row in rows.to_pylist()
        ]

    async def _dead_letter(self, letters: list[dlq.DeadLetter]) -> bool:
        """Write ``letters`` durably to their sinks; False when stopped while retrying."""
        groups: dict[int, tuple[dlq.DeadLetterSink, list[dlq.DeadLetter]]] = {}
        for letter in letters:
            sink = self._dlq_own.get(letter.source, self._dlq_default)
            if sink is None:  # on_error = dlq always builds a default sink
                raise SluiceError("no dead-letter destination configured")
            groups.setdefault(id(sink), (sink, []))[1].append(letter)
        for sink, group in groups.values():

            def write(s: dlq.DeadLetterSink = sink, g: list[dlq.DeadLetter] = group) -> None:
                s.write(g)

            if not await self._retry(sink, write, "write"):
                return False
            m.DLQ_WRITES.labels(self.name).inc(len(group))
        return True

    async def _idle(self) -> bool:
        m.IDLE_ITERATIONS.labels(self.name).inc()
        if self._timed is not None and not await self._window_tick():
            return False
        if self._store is not None and not await self._commit():  # interval checkpoint
            return False
        now = time.monotonic()
        # Idleness counts only once every source is connected: a consumer
        # still joining its group has not seen the data yet.
        connected = all(getattr(s, "connected", True) for s in self.sources)
        if self._idle_since is None and connected:
            self._idle_since = now
        if self._idle_since is None:
            await self._sleep(self.spec.idle_pause_ms / 1000)
            return True
        limit = self.options.stop_after_idle_ms
        if limit is not None and (now - self._idle_since) * 1000 >= limit:
            return False
        self._export_watermarks()
        await self._sleep(self.spec.idle_pause_ms / 1000)
        return True

    def _union(self, batches: list[Batch]) -> pa.Table:
        if len(batches) == 1:
            return batches[0].data
        return pa.concat_tables([b.data for b in batches], promote_options="permissive")

    # -- delivery -------------------------------------------------------------

    async def _deliver(self, data: pa.Table) -> bool:
        """Write and flush ``data`` to every target, retrying transient failures.

        False when a stop was requested before every target had it. A target
        that flushed is not written again for this batch, so a retry after a
        partial fan-out duplicates nothing.
        """
        for target in self.targets:

            def write_and_flush(t: Target = target) -> None:
                t.write(data)
                t.flush()

            if not await self._retry(target, write_and_flush, "write"):
                return False
        return True

    async def _retry(self, target: _Endpoint, action: Callable[[], None], what: str) -> bool:
        """Run ``action`` until it succeeds, reconnecting on transient errors.

        Returns False when a stop is requested while waiting; any
        non-transient error propagates. Waits double from 0.5 s up to 30 s.
        """
        backoff = _RETRY_FIRST_S
        failing_since: float | None = None
        reopen = False
        while True:
            try:
                if reopen:  # reconnect first: the action needs an open endpoint
                    await asyncio.to_thread(target.open)
                    reopen = False
                await asyncio.to_thread(action)
            except TransientError as exc:
                now = time.monotonic()
                failing_since = failing_since or now
                m.ERRORS.labels(self.name, "transient").inc()
                m.RETRIES.labels(self.name, target.id).inc()
                if now - failing_since >= _NOT_READY_AFTER_S:
                    m.HEALTH.set_ready(False, f"{target.id} failing: {exc}")
                log.warning("%s %s failed, retrying in %.1fs: %s", target.id, what, backoff, exc)
                await asyncio.to_thread(_quietly, target.close)
                await self._sleep(backoff * random.uniform(0.8, 1.2))
                if self.stop.is_set():
                    return False
                backoff = min(backoff * 2, _RETRY_MAX_S)
                reopen = what != "open"
                continue
            return True

    async def _commit(self, emitted: bool = False, final: bool = False) -> bool:
        """Acknowledge to each source the batches it may forget, in read order.
        The only commit; False when stopped while the state store was down.

        With a durable state store: a checkpoint (see :meth:`_checkpoint`)
        when this round ``emitted`` rows, on the ``final`` call, or once
        ``checkpoint_interval_ms`` passed. Without a store and without a
        window or join: every batch written. With a window or join: the
        stage's watermark is stored first, then each source's longest prefix
        of batches whose rows lie before every open window or buffered row (a
        batch without such rows never holds back).
        """
        if self._store is not None:
            due = time.monotonic() - self._checkpoint_at >= self._checkpoint_s
            if self._dirty and (emitted or final or due):
                return await self._checkpoint()
            return True
        floor: int | None = None
        if self._timed is not None and self._window_file is not None:
            await asyncio.to_thread(self._window_file.save, self._timed.watermark_us)
            floor = self._timed.open_floor_us()
        by_id = {s.id: s for s in self.sources}
        for source_id, queue in self._pending.items():
            last: Position | None = None
            while queue and (floor is None or queue[0][1] is None or queue[0][1] < floor):
                last = queue.popleft()[0]
            if last is not None:
                await self._acknowledge(by_id[source_id], last)
        return True

    async def _acknowledge(self, source: Source, position: Position) -> None:
        """Commit ``position`` to the source (the broker), after the durable writes."""
        await asyncio.to_thread(source.commit, position)
        m.COMMITS.labels(self.name, source.id).inc()

    # -- state store ----------------------------------------------------------------
    #
    # With a durable store the store, not the broker, is the source of truth.
    # A checkpoint writes the stage state (as versioned blobs: "window", or
    # "join/<partition>" per source partition), the position after the last
    # batch processed of every source, and the stage watermark, in one
    # transaction fenced on the version this process loaded; the broker
    # commit of the same positions follows (for lag monitoring and for
    # sources that acknowledge). Rows read after the checkpoint only live in
    # the stage: after a crash or a rebalance the stage is restored from the
    # checkpoint and the sources seek back to its positions, so every row
    # reaches the state exactly once. Output emitted after the checkpoint is
    # emitted again on replay, which is why every emit checkpoints at once.

    async def _load(self) -> Checkpoint | None:
        """Connect the store and restore the stage from the last checkpoint;
        None when stopped while the store was down."""
        store = self._store
        assert store is not None
        if not await self._retry(store, store.open, "open"):
            return None
        loaded: list[Checkpoint] = []

        def load() -> None:
            loaded.append(store.load(self.name))

        if not await self._retry(store, load, "load"):
            return None
        checkpoint = loaded[0]
        await asyncio.to_thread(self._restore, checkpoint)
        if checkpoint.version:
            log.info(
                "resuming from checkpoint %d (%d state keys, positions of %d sources)",
                checkpoint.version,
                len(checkpoint.state),
                len(checkpoint.positions),
            )
        return checkpoint

    def _restore(self, checkpoint: Checkpoint) -> None:
        """Start the stage from ``checkpoint``'s state and watermark."""
        self._version = checkpoint.version
        self._state_keys = set(checkpoint.state)
        self._positions = {src.id: {} for src in self.sources}
        self._dirty = False
        self._checkpoint_at = time.monotonic()
        stage = self._timed
        if stage is None:
            return
        stage.close()
        stage.open()
        if isinstance(stage, WindowStage):
            blob = checkpoint.state.get("window")
            if blob is not None:
                stage.restore(blob)
        else:
            for key in sorted(checkpoint.state):
                if key.startswith("join/"):
                    stage.restore(checkpoint.state[key])
        wm = checkpoint.watermark_us
        if wm is not None:
            if stage.watermark_us is None or stage.watermark_us < wm:
                stage.advance(wm)  # nothing is open that it could close
            self._wm.restore(wm)

    def _snapshot(self) -> tuple[dict[str, bytes], set[str]]:
        """The stage state as store keys: (upserts, deletes of keys now empty)."""
        stage = self._timed
        if stage is None:
            return {}, set()
        if isinstance(stage, WindowStage):
            return {"window": stage.snapshot()}, set()
        upserts = {f"join/{p}": stage.snapshot([p]) for p in sorted(stage.partitions())}
        return upserts, {k for k in self._state_keys if k not in upserts}

    async def _checkpoint(self) -> bool:
        """Commit state, positions and watermark to the store in one
        transaction (retrying while it is down), then to the sources."""
        store = self._store
        assert store is not None
        started = time.perf_counter()
        upserts, deletes = await asyncio.to_thread(self._snapshot)
        positions = {k: dict(v) for k, v in self._positions.items() if v}
        watermark = self._timed.watermark_us if self._timed is not None else None
        versions: list[int] = []

        def commit() -> None:
            versions.append(
                store.commit(
                    self.name,
                    upserts,
                    deletes,
                    positions,
                    watermark,
                    expected_version=self._version,
                )
            )

        if not await self._retry(store, commit, "commit"):
            return False
        self._version = versions[-1]
        self._state_keys = (self._state_keys | set(upserts)) - deletes
        self._dirty = False
        self._checkpoint_at = time.monotonic()
        m.CHECKPOINTS.labels(self.name).inc()
        m.CHECKPOINT_SECONDS.labels(self.name).observe(time.perf_counter() - started)
        m.STATE_BYTES.labels(self.name).set(sum(len(v) for v in upserts.values()))
        by_id = {s.id: s for s in self.sources}
        for source_id, position in positions.items():
            await self._acknowledge(by_id[source_id], position)
            self._positions[source_id] = {}
        return True

    # -- observability ----------------------------------------------------------

    def _update_ready(self) -> None:
        for source in self.sources:
            if not getattr(source, "connected", True):
                self._wm.touch(source.id)  # still joining: it holds the watermark, not idle
        connected = all(getattr(s, "connected", True) for s in self.sources)
        if connected:
            m.HEALTH.set_ready(True)
        else:
            m.HEALTH.set_ready(False, "waiting for source partitions")
        for source in self.sources:
            lag = getattr(source, "lag", None)
            if lag is None:
                continue
            current = lag()
            # A partition that moved to another process must stop being reported here.
            for part in self._lag_labels.get(source.id, set()) - set(current):
                m.CONSUMER_LAG.remove(self.name, source.id, part)
            for part, value in current.items():
                m.CONSUMER_LAG.labels(self.name, source.id, part).set(value)
            self._lag_labels[source.id] = set(current)

    def _export_watermarks(self) -> None:
        for source in self.sources:
            us = self._wm.source(source.id)
            if us is not None:
                m.SOURCE_WATERMARK.labels(self.name, source.id).set(us / 1e6)
        g = self._wm.global_us()
        if g is not None:
            m.WATERMARK.labels(self.name).set(g / 1e6)
        if self._window is not None:
            m.WINDOWS_ACTIVE.labels(self.name).set(self._window.active_windows())
            m.STATE_GROUPS.labels(self.name).set(self._window.state_size())
        if self._join is not None:
            left, right = self._join.buffer_rows()
            m.JOIN_BUFFER_ROWS.labels(self.name, "left").set(left)
            m.JOIN_BUFFER_ROWS.labels(self.name, "right").set(right)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, waking early when a stop is requested."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), timeout=seconds)


def _source_names(spec: PipelineSpec) -> str:
    """What a stored watermark was measured on: each source's kind, query and group."""
    names = []
    for src in spec.all_sources:
        group = getattr(src, "group_id", None) or spec.pipeline_name
        names.append(f"{src.kind}:{spec.query_of(src)}:{group}")
    return ";".join(sorted(names))


def _tagged(batch: Batch) -> pa.Table:
    """``batch``'s rows with their source partition in ``__partition`` (the
    source id when the source does not name partitions)."""
    if batch.row_partitions is not None:
        parts = batch.row_partitions.cast(pa.string())
    else:
        parts = pa.repeat(pa.scalar(batch.source_id, pa.string()), batch.num_rows)
    return batch.data.append_column(PARTITION, parts)


def _quietly(action: Callable[[], None]) -> None:
    try:
        action()
    except (SluiceError, OSError) as exc:
        log.debug("ignored while closing: %s", exc)
