"""The run loop: read → stages → write every target → flush → commit.

One iteration handles one batch per source, start to finish; the next batch
is read (and decoded) meanwhile, so at most two batches per source are in
memory and a slow target slows the reads. When and what the sources
acknowledge is the commit policy's (``engine/commit.py``), chosen once per
run; the loop tells it what was written and asks it to commit.

The loop executes the graph ``flow plan`` prints: :meth:`Runner.edges` lists
the edges it wired, with the plan's node ids.

Connectors block; the loop runs them in worker threads (they release the GIL
in librdkafka, libpq and Arrow), so signals and timers stay responsive.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgspec
import numpy as np
import numpy.typing as npt
import pyarrow as pa

from sluice.config.spec import InMemoryStateStore, PipelineSpec, WatermarkSpec
from sluice.connectors import registry
from sluice.connectors.api import (
    EVENT_TS,
    Alignable,
    Batch,
    Observable,
    Partitioned,
    RawRecord,
    Seekable,
    Source,
    Target,
)
from sluice.engine import commit, dlq
from sluice.engine import metrics as m
from sluice.engine.lookups import LookupTables
from sluice.engine.retry import FIRST_WAIT_S, MAX_WAIT_S, STOPPED, Retry, quietly
from sluice.engine.stages.base import Stage, TimedStage
from sluice.engine.stages.join import PARTITION, JoinStage
from sluice.engine.stages.partitioned import GROUP, PartitionedJoin, PartitionedWindow, groups_of
from sluice.engine.stages.sql import SqlStage
from sluice.engine.stages.window import WindowStage
from sluice.engine.watermark import END_OF_INPUT_US, WatermarkFile, Watermarks, max_event_us
from sluice.errors import DecodeError, PositionsMoved, SluiceError, StageError
from sluice.functions import Function, collect
from sluice.state import StateStore, build_store

log = logging.getLogger("sluice")

#: Node id of the dead letters in the plan.
DLQ_NODE = "dlq"


@dataclass(frozen=True, slots=True)
class _Transformed:
    """What the stages made of one round's batches.

    ``out``: the rows to write (``None``: the round was set aside by
    ``on_error``). ``letters``: dead letters the round produced (late rows).
    ``tops_us``: per input batch, the largest event time of its rows that
    reached the window or join (``None``: none did).
    """

    out: pa.Table | None
    letters: list[dlq.DeadLetter] = field(default_factory=list)
    tops_us: tuple[int | None, ...] = ()


@dataclass
class RunOptions:
    """Run-time switches that are not part of the pipeline file."""

    stop_after_idle_ms: int | None = None  # stop cleanly once every source was idle this long
    # A run that stops for idleness drains: every open window and buffered
    # join row is emitted and written before the last commit (end of input).
    # False keeps them open for a run that resumes (``flow consume --no-drain``).
    drain: bool = True


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
        transform = spec.transform
        stateful = transform is not None and (transform.window or transform.join) is not None
        #: Run as one of several replicas in a consumer group: state and
        #: fencing per source partition (see engine/stages/partitioned.py).
        self._replicas = spec.replicas and stateful
        self.sources: list[Source] = sources or registry.build_sources(
            spec.all_sources, registry.Context(spec), shared=self._replicas
        )
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
        # What each source can do, asked once (isinstance on a protocol is not free).
        self._partitioned = [s for s in self.sources if isinstance(s, Partitioned)]
        self._seekable = [s for s in self.sources if isinstance(s, Seekable)]
        self._observable = [s for s in self.sources if isinstance(s, Observable)]
        self._idle_since: float | None = None
        self._input_ended = False  # stopped for idleness (a bounded run's end of input)
        self._lag_labels: dict[str, set[str]] = {}
        self._ahead: asyncio.Future[list[Batch | None]] | None = None
        # Write behind: a round's write and commit, still running while the
        # next round's stages run (see _iteration).
        self._behind: asyncio.Future[bool | None] | None = None
        self._retry = Retry(self.name, stop)
        transform = spec.transform
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
        self._window: WindowStage | PartitionedWindow | None = None
        self._join: JoinStage | PartitionedJoin | None = None
        if window is not None:
            self._window = (
                PartitionedWindow(window, self.name)
                if self._replicas
                else WindowStage(window, self.name)
            )
        if join is not None:
            self._join = (
                PartitionedJoin(join, self.name, join.max_buffer_rows)
                if self._replicas
                else JoinStage(join, self.name, join.max_buffer_rows)
            )
        self._timed: TimedStage | None = self._window or self._join
        # A window or join writes a round while the next one runs its stages
        # (``write_behind``, on by default) when the commit policy can take what
        # the commit needs beforehand; a stateless round is cheap next to its
        # write, and a replica's commit may find its partitions moved.
        self._writes_behind = spec.write_behind and self._timed is not None and not self._replicas
        # Watermark alignment (see Watermarks.ahead): only where a watermark matters.
        self._drift_us = 1000 * _max_drift_ms(wm, self._window is not None, self._join is not None)
        self._alignable = [s for s in self.sources if isinstance(s, Alignable)]
        # A durable store (postgres) holds the stage state and the source
        # positions. An in_memory store keeps state in the process, which the
        # window and join stages do anyway: restarts are then safe through the
        # hold-back policy and the watermark file.
        store_spec = spec.state_store
        durable = store_spec is not None and not isinstance(store_spec, InMemoryStateStore)
        self._store: StateStore | None = store or (build_store(store_spec) if durable else None)
        self._policy = commit.choose(
            self.name,
            self.sources,
            self._timed,
            self._wm,
            self._retry,
            self._store,
            store_spec.checkpoint_interval_ms if store_spec else 60_000,
            WatermarkFile(self.name, _source_names(spec))
            if timed and self._store is None
            else None,
            # exactly-once: targets that keep source positions in their transaction
            self.targets,
            _transactional(spec, self.targets),
            replicas=self._assignment if self._replicas else None,
        )
        # False once a batch was processed but not written: its effect on the
        # stage state must then not be committed.
        self._consistent = True
        # Epoch of each source's assignment the state was restored for. A
        # replica restores at its first assignment too (epoch 0 = none yet):
        # the partitions it is given are claimed, and their state loaded.
        self._epochs: dict[str, int] = (
            {s.id: 0 for s in self._partitioned} if self._replicas else {}
        )
        self._dlq_own: dict[str, dlq.DeadLetterSink] = {}
        self._dlq_default: dlq.DeadLetterSink | None = None
        if self.on_error == "dlq" or (window is not None and window.late_data == "dlq"):
            ids = {i: src.id for i, src in enumerate(self.sources)}
            self._dlq_own, self._dlq_default = dlq.build_sinks(spec, ids)

    def _assignment(self) -> list[str]:
        """Every partition the sources are assigned now (a replica's claim)."""
        return sorted({p for source in self._partitioned for p in source.assignment()})

    def edges(self) -> list[tuple[str, str]]:
        """The edges this runner wires, as (from, to) node ids of the plan
        (``engine/plan.py``): sources → stages → targets, and what leaves for
        the dead letters.

        SQL runs per source batch before a window (each source's event
        times count for its own watermark) and on the union otherwise; both
        are the plan's union → sql, as the rows are the same.
        """
        spec = self.spec
        names = (
            [f"source:{spec.query_of(s)}" for s in spec.all_sources]
            if len(spec.all_sources) == len(self.sources)
            else [f"source:{s.id}" for s in self.sources]
        )
        edges: list[tuple[str, str]] = []
        upstream = names
        chain: list[str] = []
        if self._join is not None:
            chain.append("stage:join")
        elif len(names) > 1:
            chain.append("stage:union")
        if self.stages:
            chain.append("stage:sql")
        if self._window is not None:
            chain.append("stage:window")
        if spec.transform is not None and spec.transform.cdc is not None:
            chain.append("stage:cdc")  # applied by the CDC targets (engine/cdc.py)
        for node in chain:
            edges.extend((up, node) for up in upstream)
            upstream = [node]
        for i in range(len(self.targets)):
            edges.extend((up, f"target:{i}") for up in upstream)
        if self._dlq_default is not None or self._dlq_own:
            if self.on_error == "dlq":
                edges.extend((n, DLQ_NODE) for n in names)  # undecodable messages
                # a batch a stage failed on (the SQL, the window or the join)
                edges.extend(
                    (n, DLQ_NODE) for n in chain if n in ("stage:sql", "stage:window", "stage:join")
                )
            if self._timed is not None and self._timed.spec.late_data == "dlq":
                edges.append(("stage:window" if self._window else "stage:join", DLQ_NODE))
        return list(dict.fromkeys(edges))

    # -- lifecycle ------------------------------------------------------------

    async def run(self) -> None:
        """Open everything, loop until ``stop`` is set, close everything.

        Raises the first non-transient error (decode, fatal connector, stage).
        """
        m.HEALTH.set_ready(False, "connecting")
        try:
            for endpoint in [*self.targets, *self._dlq_sinks()]:
                if await self._retry(endpoint, endpoint.open, "open") is STOPPED:
                    return
            for stage in self.stages:
                await asyncio.to_thread(stage.open)
            resume = await self._policy.restore()
            if resume is STOPPED:
                return
            held = self._policy.rewinds_on_rebalance
            for partitioned in self._partitioned:
                # Held commits are never waited for: a rebalance reads again instead.
                partitioned.track(row_partitions=self._timed is not None, wait_on_revoke=not held)
            for source in self.sources:
                await asyncio.to_thread(source.open, resume.get(source.id))
            if self._timed is not None and not self._replicas:
                await self._claim_partitions()
            m.UP.labels(self.name).set(1)
            while not self.stop.is_set():
                if not await self._iteration():
                    break
            if not await self._landed():
                self._consistent = False
            if self._consistent and self._input_ended and self.options.drain:
                await self._drain()
            if self._consistent:
                await self._policy.commit(final=True)  # a clean stop leaves nothing to replay
        finally:
            m.UP.labels(self.name).set(0)
            m.HEALTH.set_ready(False, "stopped")
            await self._drop_behind()
            await self._drop_read_ahead()
            for source in self.sources:
                await asyncio.to_thread(quietly, source.close)
            for target in self.targets:
                await asyncio.to_thread(quietly, target.close)
            for sink in self._dlq_sinks():
                await asyncio.to_thread(quietly, sink.close)
            for stage in self.stages:
                await asyncio.to_thread(quietly, stage.close)
            if self._timed is not None:
                await asyncio.to_thread(quietly, self._timed.close)
            if self._store is not None:
                await asyncio.to_thread(self._store.close)

    async def _claim_partitions(self) -> None:
        """Every partition of the sources' topics holds the watermark, assigned
        to this process or not yet (see :meth:`Watermarks.claim`): a pipeline
        not run as replicas owns them all. Sources that cannot list their
        partitions are left to their assignment."""
        for source in self._partitioned:
            counts = getattr(source, "partition_counts", None)
            if counts is None:
                continue
            try:
                per_topic: dict[str, int] = await asyncio.to_thread(counts)
            except SluiceError as exc:  # metadata not there yet: the assignment decides
                log.debug("source %s: partitions not listed: %s", source.id, exc)
                continue
            self._wm.claim(
                source.id,
                [f"{topic}:{p}" for topic, n in per_topic.items() for p in range(n)],
            )

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
            for partitioned in self._partitioned:
                partitioned.release_in_flight()  # a revoke inside that read must not wait for us
            with contextlib.suppress(Exception):
                await ahead

    async def _drop_behind(self) -> None:
        """On the way out after an error: stop waiting for a round written
        behind. Its write finishes or fails on its own thread; what it did
        not commit is read again on restart."""
        behind, self._behind = self._behind, None
        if behind is None:
            return
        if not behind.done():
            behind.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await behind
        elif not behind.cancelled() and (error := behind.exception()) is not None:
            # Retrieved without raising: the run is already ending on an error
            # (this one, if it left the loop first).
            log.debug("the round written behind failed: %s", error)

    async def _landed(self) -> bool:
        """Wait for the round written behind, if any (its write, flush and
        commit); False when the loop must end (stopped while a target or the
        store was down: the round will be read again). Its errors raise here."""
        behind, self._behind = self._behind, None
        if behind is None:
            return True
        done = await behind
        # Replicas never write behind (_writes_behind): no round behind finds
        # its partitions moved.
        assert done is not None
        return done

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
        if self._policy.rewinds_on_rebalance and self._rebalanced(batches):
            return await self._read_again(rebalanced=True)
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
        self._align()
        decoded = [b for b in batches if b.num_rows]
        result = await self._transform(decoded) if decoded else _Transformed(None)
        letters.extend(result.letters)
        out = result.out
        if letters and not await self._dead_letter(letters):
            log.warning("stopping with unwritten dead letters; the batch will be read again")
            self._consistent = False
            return False
        # The previous round, if written behind, is committed before this one
        # is handed to the policy: rounds are written and committed in order.
        if not await self._landed():
            return False
        rows = out is not None and out.num_rows > 0
        self._policy.before_write(batches, rows)  # positions
        decoded_tops = iter(result.tops_us)  # one per decoded batch, in order
        tops = [next(decoded_tops, None) if b.num_rows else None for b in batches]
        if self._writes_behind and self._policy.write_behind(rows):
            # Write behind: this round is written and committed while the next
            # one is read and run through the stages, once the policy has
            # taken from the stage what the commit needs (the checkpoint).
            # The commit needs no rows: the raw records and decoded rows go
            # now, not with the round.
            done_with = [dataclasses.replace(b, data=b.data.select([]), raw=None) for b in batches]
            self._behind = asyncio.ensure_future(self._finish(done_with, out, tops, started))
            await self._policy.stage_free()
            self._export_watermarks()
            return True
        done = await self._finish(batches, out, tops, started)
        if done is None:  # another replica took partitions of this round
            return await self._read_again()
        self._export_watermarks()
        return done

    async def _finish(
        self, batches: list[Batch], out: pa.Table | None, tops: list[int | None], started: float
    ) -> bool | None:
        """Write a round's output ``out`` (made of ``batches``, whose largest
        event times at the stage are ``tops``), then tell the policy and
        commit; False when the loop must end, ``None`` when it must read again
        (replicas)."""
        try:
            delivered = out is None or not out.num_rows or await self._deliver(out, batches)
        except PositionsMoved as exc:  # another replica wrote these partitions: nothing landed
            log.info("%s; reading again", exc)
            return None
        if not delivered:
            log.warning("stopping with an unwritten batch; it will be read again on restart")
            self._consistent = False
            return False
        self._policy.on_batch(batches, tops)
        if not await self._policy.commit(emitted=out is not None and out.num_rows > 0):
            return False
        if self._policy.moved():  # another replica took partitions of this checkpoint
            return None
        m.BATCHES.labels(self.name).inc()
        if out is not None:
            m.ROWS_WRITTEN.labels(self.name).inc(out.num_rows)
        m.BATCH_SECONDS.labels(self.name).observe(time.perf_counter() - started)
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
            at: dict[str, object] = {"source": batch.source_id, "rows": len(batch.bad)}
            if batch.raw is not None:
                record = batch.raw.record(first)
                at.update(partition=record.partition, offset=record.offset)
            log.warning(
                "source %s: dropped %d undecodable message(s), first at %s: %s",
                batch.source_id,
                len(batch.bad),
                where,
                reason,
                extra=at,
            )
            return []
        raw = batch.raw
        return [
            dlq.DeadLetter(self.name, batch.source_id, "decode", why, raw.record(i))
            for i, why in batch.bad
        ]

    async def _transform(self, batches: list[Batch]) -> _Transformed:
        """Run the stages over ``batches`` (each with rows); on failure apply
        on_error and return no rows (dead letters under ``dlq``)."""
        if not self.stages and self._timed is None:
            return _Transformed(self._union(batches))
        attempts = self.spec.dlq_max_attempts or 1
        error: StageError | None = None
        for attempt in range(1, attempts + 1):
            try:
                if self._window is not None:
                    return await self._windowed(self._window, batches)
                if self._join is not None:
                    return await self._joined(self._join, batches)
                out = self._union(batches)
                for stage in self.stages:
                    out = await asyncio.to_thread(stage.process, out)
                return _Transformed(out)
            except StageError as exc:
                m.ERRORS.labels(self.name, "stage").inc()
                error = exc
                if attempt < attempts:
                    log.warning(
                        "batch failed (attempt %d of %d): %s",
                        attempt,
                        attempts,
                        exc,
                        extra={"attempt": attempt},
                    )
                    await self._retry.sleep(min(FIRST_WAIT_S * 2 ** (attempt - 1), MAX_WAIT_S))
        spans = "; ".join(f"source {b.source_id} {b.span()}" for b in batches)
        if self.on_error == "fail":
            raise StageError(f"{error} (batch from {spans})") from error
        if self.on_error == "drop":
            rows = sum(b.num_rows for b in batches)
            m.ROWS_DROPPED.labels(self.name, "transform").inc(rows)
            log.warning(
                "dropped a batch of %d row(s) (%s): %s",
                rows,
                spans,
                error,
                extra={"rows": rows, "source": ",".join(b.source_id for b in batches)},
            )
            return _Transformed(None)
        letters = [letter for b in batches for letter in self._batch_letters(b, str(error))]
        return _Transformed(None, letters)

    # -- windows and joins ----------------------------------------------------------

    async def _windowed(
        self, window: WindowStage | PartitionedWindow, batches: list[Batch]
    ) -> _Transformed:
        """SQL per source batch (each source's event times count for its own
        watermark), then the window over all of them."""
        parts: list[pa.Table] = []
        tops: list[int | None] = []
        for b in batches:
            if isinstance(window, PartitionedWindow):
                out = await self._grouped(b)
            else:
                out = b.data
                for stage in self.stages:
                    out = await asyncio.to_thread(stage.process, out)
            column = out[self._event_column] if self._event_column in out.column_names else None
            if self._event_column not in b.data.column_names and column is not None:
                # Computed by the SQL, whose rows need not line up with the
                # batch's: per partition, conservatively (see observe_unaligned).
                if b.row_partitions is not None:
                    self._wm.observe_unaligned(b.source_id, column, b.row_partitions)
                else:
                    self._wm.observe(b.source_id, column)
            tops.append(None if column is None else max_event_us(column))
            parts.append(out)
        data = (
            parts[0] if len(parts) == 1 else pa.concat_tables(parts, promote_options="permissive")
        )
        result = await asyncio.to_thread(window.process, data, self._wm.global_us())
        letters = self._late_rows(result.late, batches, parts) if len(result.late) else []
        m.WINDOWS_EMITTED.labels(self.name).inc(result.emitted.num_rows)
        return _Transformed(result.emitted, letters, tuple(tops))

    async def _grouped(self, b: Batch) -> pa.Table:
        """A replica's window input: ``b``'s rows through the SQL, each with its
        partition group in ``__group``. With SQL, per group (the SQL's rows
        need not line up with the batch's); without, in the batch's order."""
        if b.row_partitions is None:
            raise StageError(f"source {b.source_id} does not name the partition of its rows")
        groups = groups_of(b.row_partitions)
        if not self.stages:
            return b.data.append_column(GROUP, groups)
        pieces: list[pa.Table] = []
        values = groups.to_numpy(zero_copy_only=False).astype(str)
        for g in sorted(set(values.tolist())):
            out = b.data.filter(pa.array(values == g))
            for stage in self.stages:
                out = await asyncio.to_thread(stage.process, out)
            pieces.append(out.append_column(GROUP, pa.repeat(pa.scalar(g), out.num_rows)))
        nonempty = [p for p in pieces if p.num_rows] or pieces[:1]
        return (
            nonempty[0]
            if len(nonempty) == 1
            else pa.concat_tables(nonempty, promote_options="permissive")
        )

    async def _joined(
        self, join: JoinStage | PartitionedJoin, batches: list[Batch]
    ) -> _Transformed:
        """The join over this round's batches, each source on its side."""
        sides: tuple[list[Batch], list[Batch]] = ([], [])
        tops: list[int | None] = []
        for b in batches:
            if b.source_id not in (join.spec.left_source, join.spec.right_source):
                raise StageError(f"join: source '{b.source_id}' is on neither side of the join")
            sides[b.source_id != join.spec.left_source].append(b)
            column = (
                b.data[self._event_column] if self._event_column in b.data.column_names else None
            )
            tops.append(None if column is None else max_event_us(column))
        # A policy that stores the state per source partition needs each
        # buffered row's partition.
        tag = self._policy.checkpoints_state

        def side(group: list[Batch]) -> pa.Table | None:
            if not group:
                return None
            tables = [_tagged(b) if tag else b.data for b in group]
            return (
                tables[0]
                if len(tables) == 1
                else pa.concat_tables(tables, promote_options="permissive")
            )

        result = await asyncio.to_thread(
            join.process, side(sides[0]), side(sides[1]), self._wm.global_us()
        )
        letters: list[dlq.DeadLetter] = []
        for group, late in zip(sides, (result.late_left, result.late_right), strict=True):
            if len(late):
                letters += self._late_rows(late, group, [b.data for b in group])
        return _Transformed(result.emitted, letters, tuple(tops))

    def _late_rows(
        self, late: npt.NDArray[np.int64], batches: list[Batch], parts: list[pa.Table]
    ) -> list[dlq.DeadLetter]:
        """Count late rows, or turn them into dead letters (``late_data = "dlq"``)."""
        assert self._timed is not None
        policy = self._timed.spec.late_data
        if policy != "dlq":
            m.LATE_ROWS_DROPPED.labels(self.name, policy).inc(len(late))
            return []
        ends = np.cumsum([p.num_rows for p in parts])
        owner = np.searchsorted(ends, late, side="right")
        reason = f"late: event time before the watermark (late_data = dlq, {self._event_column})"
        letters: list[dlq.DeadLetter] = []
        for k, (b, part) in enumerate(zip(batches, parts, strict=True)):
            local = late[owner == k] - (ends[k] - part.num_rows)
            if not len(local):
                continue
            if not self.stages and b.raw is not None:  # window input rows are the decoded rows
                index = b.rows
                raw = b.raw
                letters.extend(
                    dlq.DeadLetter(
                        self.name,
                        b.source_id,
                        "window",
                        reason,
                        raw.record(index[i] if index is not None else int(i)),
                    )
                    for i in local
                )
                continue
            # After SQL a row has no single raw record: the row itself, as JSON.
            letters.extend(self._row_letters(b, "window", reason, part.take(pa.array(local))))
        return letters

    def _rebalanced(self, batches: list[Batch]) -> bool:
        """Whether a batch comes from a newer partition assignment than the last one."""
        changed = False
        for b in batches:
            if self._epochs.setdefault(b.source_id, b.epoch) != b.epoch:
                changed = True
        return changed

    async def _read_again(self, *, rebalanced: bool = False) -> bool:
        """After a rebalance: forget the stage state and what was read since
        the last commit, and read again from there (the policy says where:
        a checkpoint's positions, else each source's committed ones). False
        when stopped while the store was down.

        A replica (``replicas = true``) first checkpoints what it processed
        for the partitions it still holds a claim on (every batch it
        processed was written), so the next owner of a partition revoked from
        it starts there rather than at an older checkpoint; a partition the
        next owner claimed already is fenced and simply not written."""
        log.warning(
            "partitions were reassigned: dropping the state read since the last commit and "
            "reading again from there"
        )
        if not await self._landed():  # a round written behind is committed first
            return False
        await self._drop_read_ahead()
        if (
            rebalanced
            and self._replicas
            and self._consistent
            and not await self._policy.commit(final=True)
        ):
            return False
        positions = await self._policy.restore()
        if positions is STOPPED:
            return False
        for seekable in self._seekable:
            await asyncio.to_thread(seekable.rewind, positions.get(seekable.id))
        for source in self.sources:
            self._epochs[source.id] = source.epoch if isinstance(source, Partitioned) else 0
        return True

    async def _window_tick(self, stage: TimedStage) -> bool:
        """Idle tick: emit what the watermark closed; False when stopped mid-write."""
        mark = self._wm.global_us()
        if mark is None or (stage.watermark_us is not None and mark <= stage.watermark_us):
            return True
        emitted = (await asyncio.to_thread(stage.advance, mark)).emitted
        self._policy.on_advance()  # the watermark moved; a join evicted
        if emitted.num_rows:
            if self._window is not None:
                m.WINDOWS_EMITTED.labels(self.name).inc(emitted.num_rows)
            self._policy.before_write((), True)  # positions (a joined checkpoint)
            if not await self._deliver(emitted):
                self._consistent = False
                return False
            m.ROWS_WRITTEN.labels(self.name).inc(emitted.num_rows)
        return await self._policy.commit(emitted=emitted.num_rows > 0)

    async def _drain(self) -> None:
        """End of input (a bounded run stopped for idleness): emit and write
        every open window and buffered join row, as Flink's stop-with-drain.

        The stage is given :data:`END_OF_INPUT_US`, then started again empty
        at the watermark it really had, which is what the commit stores (the
        watermark file, or the checkpoint with its now empty state): a later
        run over new data must not find every row late. What was drained is
        committed with the positions past its rows (the stage holds nothing
        now), so it is not read nor emitted again. A stop while the targets
        are down leaves the state uncommitted (``_consistent``): read again.
        """
        stage = self._timed
        if stage is None:
            return
        real = [w for w in (stage.watermark_us, self._wm.global_us()) if w is not None]
        emitted = (await asyncio.to_thread(stage.advance, END_OF_INPUT_US)).emitted
        if emitted.num_rows:
            if self._window is not None:
                m.WINDOWS_EMITTED.labels(self.name).inc(emitted.num_rows)
            self._policy.before_write((), True)  # positions (a joined checkpoint)
            if not await self._deliver(emitted):
                log.warning("stopped while draining; the open windows will be read again")
                self._consistent = False
                return
            m.ROWS_WRITTEN.labels(self.name).inc(emitted.num_rows)

        def restart() -> None:
            stage.close()
            stage.open()
            if real:
                stage.advance(max(real))  # nothing is open: emits nothing

        await asyncio.to_thread(restart)
        self._policy.on_advance()
        log.info(
            "end of input: drained %d row(s) from open windows / join buffers", emitted.num_rows
        )

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
        partition = ",".join(batch.partitions or tuple(batch.position or ()))
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
        groups: dict[str, tuple[dlq.DeadLetterSink, list[dlq.DeadLetter]]] = {}
        for letter in letters:
            sink = self._dlq_own.get(letter.source, self._dlq_default)
            if sink is None:  # on_error = dlq always builds a default sink
                raise SluiceError("no dead-letter destination configured")
            groups.setdefault(sink.id, (sink, []))[1].append(letter)
        for sink, group in groups.values():
            if await self._retry(sink, functools.partial(sink.write, group), "write") is STOPPED:
                return False
            m.DLQ_WRITES.labels(self.name).inc(len(group))
        return True

    async def _idle(self) -> bool:
        m.IDLE_ITERATIONS.labels(self.name).inc()
        if not await self._landed():  # the last round written behind, committed first
            return False
        if self._replicas and any(
            self._epochs.get(s.id) != s.epoch for s in self._partitioned if s.assignment()
        ):
            # A replica given partitions that have nothing new to read still
            # claims them and loads their state (their open windows must close).
            return await self._read_again(rebalanced=True)
        if self._timed is not None and not await self._window_tick(self._timed):
            return False
        if not await self._policy.commit():  # a checkpoint may be due by its interval
            return False
        if self._policy.moved():
            return await self._read_again()
        now = time.monotonic()
        # Idleness counts only once every source is connected: a consumer
        # still joining its group has not seen the data yet.
        if self._idle_since is None and self._connected():
            self._idle_since = now
        if self._idle_since is None:
            await self._retry.sleep(self.spec.idle_pause_ms / 1000)
            return True
        limit = self.options.stop_after_idle_ms
        pause_s = self.spec.idle_pause_ms / 1000
        if limit is not None:
            left_s = limit / 1000 - (now - self._idle_since)
            if left_s <= 0:
                self._input_ended = True
                return False
            pause_s = min(pause_s, left_s)  # a long idle_pause_ms must not outlast the limit
        self._export_watermarks()
        await self._retry.sleep(pause_s)
        return True

    def _union(self, batches: list[Batch]) -> pa.Table:
        if len(batches) == 1:
            return batches[0].data
        return pa.concat_tables([b.data for b in batches], promote_options="permissive")

    # -- delivery -------------------------------------------------------------

    async def _deliver(self, data: pa.Table, batches: list[Batch] | None = None) -> bool:
        """Write and flush ``data`` (made of ``batches``) to every target,
        retrying transient failures.

        False when a stop was requested before every target had it. A target
        that flushed is not written again for this batch, so a retry after a
        partial fan-out duplicates nothing. A target the policy holds back
        from rows it already has (a replay after a crash mid fan-out) gets the
        stateless stages' output of the rest of ``batches`` instead.
        """
        for target in self.targets:
            own: pa.Table | None = data
            held = self._policy.held_back(target.id, batches) if batches else None
            if held is not None:
                rest = [b for b in held if b.num_rows]
                own = (await self._transform(rest)).out if rest else None
                own = data.slice(0, 0) if own is None else own
            if await self._retry(
                target, functools.partial(_write_and_flush, self.name, target, own), "write"
            ) is (STOPPED):
                return False
        return True

    # -- observability ----------------------------------------------------------

    def _connected(self) -> bool:
        return all(s.connected for s in self._observable)

    def _update_ready(self) -> None:
        """After each read: readiness, lag gauges, and what the watermarks
        need to know of the sources (assignment, lag), measured at that read
        and before the next read-ahead starts, so it agrees with the batches
        the loop is about to observe."""
        for source in self._observable:
            if not source.connected:
                self._wm.touch(source.id)  # still joining: it holds the watermark, not idle
        if self._timed is not None:
            for partitioned in self._partitioned:
                self._wm.assign(partitioned.id, partitioned.assignment())
        if self._connected():
            m.HEALTH.set_ready(True)
        else:
            m.HEALTH.set_ready(False, "waiting for source partitions")
        for source in self._observable:
            current = source.lag()
            # A partition that moved to another process must stop being reported here.
            for part in self._lag_labels.get(source.id, set()) - set(current):
                m.CONSUMER_LAG.remove(self.name, source.id, part)
            for part, value in current.items():
                m.CONSUMER_LAG.labels(self.name, source.id, part).set(value)
            self._lag_labels[source.id] = set(current)
            self._wm.report_lag(source.id, current)

    def _align(self) -> None:
        """Pause the partitions that ran ``max_drift_ms`` ahead of the
        watermark, resume those back within half of it (from the next read on:
        the read ahead already running is not affected)."""
        if not self._drift_us or not self._alignable:
            return
        ahead = self._wm.ahead(self._drift_us)
        for source in self._alignable:
            paused = ahead.get(source.id, set())
            source.align(paused)  # every round: a rewind resumes what the source paused
            m.PARTITIONS_PAUSED.labels(self.name, source.id).set(len(paused))

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


#: ``[watermark] max_drift_ms`` when unset, for a window pipeline.
WINDOW_DRIFT_MS = 300_000


def _max_drift_ms(wm: WatermarkSpec | None, window: bool, join: bool) -> int:
    """Watermark alignment's drift: what ``[watermark]`` says, else on for
    windows and off for joins. Each batch a window folds is merged with every
    open window, so a backlog read partition by partition (the skew tansu and
    Kafka brokers show) costs CPU and memory in proportion to the skew:
    aligned, the 1M-event tumbling benchmark took 504 -> ~400 MB and 6.1 ->
    5.6-5.9 CPU-s at the same rows/s. A join probes its buffers by key, so
    alignment bought it no memory and, reading one partition at a time, cost
    rows/s (87-111k in four runs against 105-133k in two, 2026-12-07)."""
    if wm is not None and wm.max_drift_ms is not None:
        return wm.max_drift_ms if (window or join) else 0
    return WINDOW_DRIFT_MS if window else 0


def _source_names(spec: PipelineSpec) -> str:
    """What a stored watermark was measured on: each source's kind, query and group."""
    names = []
    for src in spec.all_sources:
        group = src.reader_group(spec.pipeline_name)
        names.append(f"{src.kind}:{spec.query_of(src)}:{group}")
    return ";".join(sorted(names))


def _transactional(spec: PipelineSpec, targets: list[Target]) -> list[bool] | None:
    """Per target, whether its connector declares ``transactional_positions``
    (``None`` when the targets are not the spec's, e.g. injected ones)."""
    specs = spec.all_targets
    if len(specs) != len(targets) or (spec.transform is not None and spec.transform.cdc):
        return None if len(specs) != len(targets) else [False] * len(targets)
    return [registry.of(t).capabilities.transactional_positions for t in specs]


def _tagged(batch: Batch) -> pa.Table:
    """``batch``'s rows with their source partition in ``__partition`` (the
    source id when the source does not name partitions)."""
    if batch.row_partitions is not None:
        parts = batch.row_partitions.cast(pa.string())
    else:
        parts = pa.repeat(pa.scalar(batch.source_id, pa.string()), batch.num_rows)
    return batch.data.append_column(PARTITION, parts)


def _write_and_flush(pipeline: str, target: Target, data: pa.Table) -> None:
    started = time.perf_counter()
    target.write(data)
    target.flush()
    m.TARGET_WRITE_SECONDS.labels(pipeline, target.id).observe(time.perf_counter() - started)
    m.TARGET_ROWS_WRITTEN.labels(pipeline, target.id).inc(data.num_rows)
