"""Commit policies: when the run loop tells the sources (and a state store)
that rows are done with.

The policy is chosen once per run, from the pipeline's shape, by
:func:`choose`; the loop then calls the same four methods whatever it is:

1. :meth:`CommitPolicy.restore` before the sources open, and again after a
   rebalance: start the stateful stage from the last commit and say where the
   sources read from.
2. :meth:`CommitPolicy.on_batch` once the batches' rows are durable in every
   target (and dead-letter sink).
3. :meth:`CommitPolicy.on_advance` when the stage state changed without a
   batch (an idle tick moved the watermark).
4. :meth:`CommitPolicy.commit` after every write round and idle tick, and
   once more (``final``) on a clean stop. It is the only code that commits.

The order of a commit never changes: every target was flushed before the
call → state and source positions in one store transaction (checkpoint
policy) → the sources acknowledge, each in read order.

* :class:`Immediate`: no window or join, no durable store. Every batch
  written is acknowledged at the next commit.
* :class:`HoldBack`: a window or join without a durable store. The stage
  state lives in memory only, so a batch is acknowledged only once no open
  window or buffered row needs its rows (they are replayed after a crash);
  the stage's watermark goes to a :class:`WatermarkFile` first, so replayed
  rows of windows already emitted count as late. Needs
  :class:`~sluice.connectors.api.Seekable` sources.
* :class:`Checkpointing`: a durable ``[state_store]``. The store, not the
  broker, is the source of truth: a checkpoint writes the stage state
  (:meth:`~sluice.engine.stages.base.StatefulStage.snapshot`), the position
  after the last batch of every source and the stage watermark in one
  transaction fenced on the version this process loaded; the sources'
  acknowledgements follow (for lag monitoring, and for sources that only
  acknowledge). Rows read after a checkpoint live only in the stage: after a
  crash or a rebalance the stage is restored from the checkpoint and the
  sources seek back to its positions, so every row reaches the state exactly
  once. Output emitted after a checkpoint would be emitted again on replay,
  which is why every emit checkpoints at once.

**Positions in the targets** (exactly-once into SQL targets). A target whose
connector declares ``transactional_positions``
(:class:`~sluice.connectors.sql.positions.RecordsPositions`) stores the source
positions in the transaction of its rows: :meth:`CommitPolicy.before_write`
hands it the positions after the round's batches, before the runner writes
and flushes. Then:

* :class:`Immediate` (stateless): on start the sources resume from the lowest
  position any such target holds per partition (the broker's commit only
  where no target holds one). A fan-out target that holds more (a crash fell
  between two targets' flushes) is given the replayed batches without the
  rows below its positions (:meth:`CommitPolicy.held_back`; the runner runs
  the stateless stages again for it), so each target gets each row once. A
  round without output still records its positions (a flush of positions
  only), so a filter that drops everything does not make the replay grow.
* :class:`Checkpointing` *joined*: a durable Postgres store in the same
  database as the pipeline's only target (a Postgres one). Every round that
  writes output commits the checkpoint (stage state, positions, watermark)
  in the target's transaction (``PostgresStore.commit_on``): state, output
  rows and positions are one transaction, so a replay after a crash emits
  nothing twice. With a store elsewhere, output emitted after the last
  checkpoint is emitted again after a crash: absorbed by merge targets
  (the output key: the window / group columns, the join keys and times),
  duplicated by append targets (at least once).
* :class:`HoldBack`: positions are not recorded; at least once.

The sources' acknowledgement still follows (for lag monitoring), but the
positions the targets hold win on restart. A target that commits the
positions to the sources' own broker (``commits_source_positions``: a Kafka
target with ``delivery = "exactly_once"`` sends the consumer offsets in its
transaction) replaces the acknowledgement: the sources then commit nothing.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from sluice import faults
from sluice.connectors.api import Ack, Batch, Partitioned, Position, Seekable, Source, Target
from sluice.connectors.sql.positions import DefersCommits, RecordsPositions, ahead, lowest
from sluice.engine import metrics as m
from sluice.engine.retry import STOPPED, Retry, Stopped
from sluice.engine.stages.base import TimedStage
from sluice.engine.watermark import END_OF_INPUT_US, WatermarkFile, Watermarks, mark_keys
from sluice.errors import PositionsMoved
from sluice.state import StateStore
from sluice.state.base import ClaimingStore, PartitionsMoved

log = logging.getLogger("sluice")


class CommitPolicy(Protocol):
    """How a run acknowledges what it has durably written (see the module docstring)."""

    @property
    def rewinds_on_rebalance(self) -> bool:
        """Whether state or commits are held across batches, so that a
        partition reassignment must drop what was read since the last commit
        and read it again (and a revoke must not wait for held commits)."""

    @property
    def checkpoints_state(self) -> bool:
        """Whether the stage state goes to a store keyed by source partition
        (the join then tags each row with its partition)."""

    async def restore(self) -> dict[str, Position] | Stopped:
        """(Re)start the stage from the last commit and forget every batch
        not committed yet. Returns, per source id, the position to read
        from (a source not named reads from its own committed position);
        :data:`STOPPED` when stopped while the store was down."""

    def on_batch(self, batches: Sequence[Batch], tops_us: Sequence[int | None]) -> None:
        """``batches`` (in read order) are durably written. ``tops_us[i]``:
        the largest event time of ``batches[i]``'s rows that reached the
        stateful stage (``None``: none did)."""

    def on_advance(self) -> None:
        """The stage state changed without a batch (the watermark moved)."""

    def before_write(self, batches: Sequence[Batch], rows: bool) -> None:
        """The runner is about to write a round's output (``rows``: it has
        rows, so every target is written and flushed next) that ``batches``
        (in read order; none for an idle tick) produced: hand each target that
        records positions what its flush must record."""

    def write_behind(self, rows: bool) -> bool:
        """Whether the round just handed to :meth:`before_write` may be
        written and committed (:meth:`on_batch`, :meth:`commit`) while the
        next round runs through the stage. True only once the policy has
        taken from the stage everything that commit reads, so the next
        round's changes cannot leak into it; :meth:`stage_free` says when the
        stage may change again."""

    async def stage_free(self) -> None:
        """Return once the stage may change again after :meth:`write_behind`."""

    def held_back(self, target: str, batches: Sequence[Batch]) -> list[Batch] | None:
        """``batches`` without the rows target ``target`` already holds (a
        fan-out target ahead of the replay), or ``None`` when it takes them
        all (always, but right after a restart)."""

    async def commit(self, *, emitted: bool = False, final: bool = False) -> bool:
        """Acknowledge what may be forgotten. ``emitted``: this round wrote
        rows; ``final``: the run is stopping cleanly. False when stopped
        while the store was down (nothing was acknowledged then)."""

    def moved(self) -> bool:
        """Whether the last commit found partitions of this replica claimed
        by another (nothing was committed): the loop must read again."""


class JoinableStore(Protocol):
    """A state store that can commit inside a target's transaction
    (:class:`~sluice.state.postgres.PostgresStore`)."""

    @property
    def database(self) -> str | None:
        """The database it writes to, as :attr:`RecordsPositions.database` names one."""

    def commit_on(
        self,
        connection: object,
        pipeline: str,
        upserts: Mapping[str, bytes],
        deletes: Collection[str],
        positions: Mapping[str, Position],
        watermark_us: int | None,
        *,
        expected_version: int,
    ) -> int:
        """Apply a checkpoint in ``connection``'s open transaction; the new version."""


def choose(
    pipeline: str,
    sources: Sequence[Source],
    stage: TimedStage | None,
    watermarks: Watermarks,
    retry: Retry,
    store: StateStore | None,
    checkpoint_interval_ms: int,
    watermark_file: WatermarkFile | None,
    targets: Sequence[Target] = (),
    transactional: Sequence[bool] | None = None,
    replicas: Callable[[], Collection[str]] | None = None,
) -> CommitPolicy:
    """The policy for a run: :class:`Checkpointing` with a durable ``store``,
    :class:`HoldBack` with a window or join (``stage``) and no store (then
    ``watermark_file`` is required), :class:`Immediate` otherwise.

    ``targets`` are the run's targets; ``transactional[i]``: whether
    ``targets[i]``'s connector declares ``transactional_positions`` (``None``:
    ask the targets alone, e.g. injected test doubles). Those that do and
    implement :class:`RecordsPositions` record positions (see the module
    docstring). ``replicas``: the run is one of several replicas (``replicas
    = true``); it returns the partitions the sources are assigned now, which
    a checkpointing replica claims (see :class:`Checkpointing`)."""
    recording = [
        t
        for i, t in enumerate(targets)
        if isinstance(t, RecordsPositions) and (transactional is None or transactional[i])
    ]
    if store is not None:
        joined: RecordsPositions | None = None
        if (
            replicas is None
            and stage is not None
            and len(targets) == 1
            and len(recording) == 1
            and hasattr(store, "commit_on")  # only PostgresStore can
        ):
            shared = getattr(store, "database", None)
            if shared is not None and shared == recording[0].database:
                joined = recording[0]
        return Checkpointing(
            pipeline,
            sources,
            stage,
            watermarks,
            retry,
            store,
            checkpoint_interval_ms / 1000,
            joined,
            replicas,
        )
    if stage is not None:
        if watermark_file is None:
            raise ValueError("the hold-back policy needs a watermark file")
        return HoldBack(pipeline, sources, stage, watermarks, watermark_file)
    return Immediate(pipeline, sources, retry, recording)


async def _acknowledge(pipeline: str, source: Source, ack: Ack) -> None:
    """Commit ``ack`` to the source (the broker), after the durable writes."""
    faults.reached("SOURCE_COMMITS")  # crash tests: written, not yet acknowledged
    await asyncio.to_thread(source.commit, ack)
    m.COMMITS.labels(pipeline, source.id).inc()


class Immediate:
    """Acknowledge every batch written, at the next commit; with targets that
    record positions, resume from them (see the module docstring)."""

    checkpoints_state = False

    def __init__(
        self,
        pipeline: str,
        sources: Sequence[Source],
        retry: Retry | None = None,
        recording: Sequence[RecordsPositions] = (),
    ) -> None:
        self._pipeline = pipeline
        self._sources = list(sources)
        self._retry = retry
        self._recording = list(recording)
        self._seekable = {s.id for s in self._sources if isinstance(s, Seekable)}
        # With positions in the targets, a partition assigned later must start
        # from what the targets hold now (not from the broker's commit, which
        # may lag them by a round, nor from the positions read at start): a
        # rebalance restores from the targets and rewinds.
        self.rewinds_on_rebalance = bool(self._recording and self._seekable)
        self._acks: dict[str, Ack] = {}  # source id -> ack of its last batch written
        # Target id -> source id -> partition -> the position it holds, where
        # that is ahead of where the sources resumed (cleared as they pass it).
        self._ahead: dict[str, dict[str, Position]] = {}
        self._unflushed = False  # positions staged that no flush recorded yet
        self._moved = False
        # A target whose flush commits the positions to the sources' own
        # broker (Kafka transactions: send_offsets_to_transaction): the
        # sources must not acknowledge them again, outside that transaction.
        self._committed_by_target = any(
            getattr(t, "commits_source_positions", False) for t in self._recording
        )

    async def restore(self) -> dict[str, Position] | Stopped:
        """Resume from the lowest position the recording targets hold per
        partition (seekable sources only); other sources and partitions read
        from their own commits."""
        self._acks.clear()
        self._ahead = {}
        self._unflushed = False
        if not self._recording or not self._seekable:
            return {}
        assert self._retry is not None  # given with recording targets
        held: dict[str, dict[str, Position]] = {}
        for target in self._recording:
            # Rows a deferring target took before a rebalance commit first, with
            # their positions, so the rewind starts after them (never twice).
            if isinstance(target, DefersCommits) and target.deferred:

                def now(t: DefersCommits = target) -> None:
                    t.commit_deferred(True)

                if await self._retry(target, now, "commit") is STOPPED:
                    return STOPPED
        for target in self._recording:
            got = await self._retry(target, target.held_positions, "read positions")
            if got is STOPPED:
                return STOPPED
            held[target.id] = {s: p for s, p in got.items() if s in self._seekable}
        resume = lowest(held.values())
        for target_id, holds in held.items():
            over = ahead(holds, resume)
            if over:
                self._ahead[target_id] = over
        if resume:
            log.info("resuming from the positions the targets hold: %s", resume)
        return resume

    def before_write(self, batches: Sequence[Batch], rows: bool) -> None:
        """Stage the positions after ``batches`` in every recording target."""
        after = {b.source_id: b.position for b in batches if b.position}
        if not after or not self._recording:
            return
        for target in self._recording:
            target.stage_positions(after)
        self._unflushed = not rows

    def write_behind(self, rows: bool) -> bool:
        """Never: no stage holds rows across rounds."""
        return False

    async def stage_free(self) -> None:
        """Nothing is taken from a stage."""

    def held_back(self, target: str, batches: Sequence[Batch]) -> list[Batch] | None:
        """See :meth:`CommitPolicy.held_back`."""
        over = self._ahead.get(target)
        if not over:
            return None
        kept = [_without_held(b, over.get(b.source_id, {})) for b in batches]
        for b in batches:  # a partition read up to the target's position no longer skips
            parts = over.get(b.source_id)
            if parts and b.position:
                for part, pos in b.position.items():
                    held = parts.get(part)
                    if isinstance(pos, int) and isinstance(held, int) and pos >= held:
                        del parts[part]
                if not parts:
                    del over[b.source_id]
        if not over:
            del self._ahead[target]
        return kept

    def on_batch(self, batches: Sequence[Batch], tops_us: Sequence[int | None]) -> None:
        """Remember each source's last batch."""
        for b in batches:
            self._acks[b.source_id] = b.ack

    def on_advance(self) -> None:
        """No stage state: nothing to do."""

    def moved(self) -> bool:
        """Whether the last commit found a target's positions moved by another
        process (a stateless replica's partitions taken over)."""
        return self._moved

    async def commit(self, *, emitted: bool = False, final: bool = False) -> bool:
        """Record staged positions no output flush recorded (a round without
        output), commit what deferring targets hold when due (always when
        ``final``), then acknowledge each source's last batch written, in
        source order: not while a target still defers (the acknowledgement
        waits for its commit)."""
        self._moved = False
        if self._unflushed and not emitted:
            assert self._retry is not None
            for target in self._recording:
                try:
                    if await self._retry(target, target.flush, "flush positions") is STOPPED:
                        return False
                except PositionsMoved as exc:  # another replica wrote there since: read again
                    log.info("%s; reading again", exc)
                    self._unflushed = False
                    self._acks.clear()
                    self._moved = True
                    return True
        self._unflushed = False
        deferring = [t for t in self._recording if isinstance(t, DefersCommits)]
        for target in deferring:
            if target.deferred:
                assert self._retry is not None

                def due(t: DefersCommits = target) -> None:
                    t.commit_deferred(final)

                if await self._retry(target, due, "commit") is STOPPED:
                    return False
        if any(t.deferred for t in deferring):
            return True
        if self._committed_by_target:  # the positions went in the target's transaction
            self._acks.clear()
            return True
        for source in self._sources:
            if source.id in self._acks:
                await _acknowledge(self._pipeline, source, self._acks.pop(source.id))
        return True


class HoldBack:
    """Acknowledge a batch once the in-memory window / join no longer needs its rows.

    Batches wait, per source and in read order, with the largest event time
    they brought to the stage; a commit acknowledges each source's longest
    prefix of batches whose event times lie below the stage's open floor (a
    batch that brought no rows never holds back). The stage's watermark is
    stored (fsynced) before, and restored on start, so rows replayed after a
    crash that belong to windows already emitted are late, and the windows
    still open are rebuilt from their replayed rows alone.
    """

    rewinds_on_rebalance = True
    checkpoints_state = False

    def __init__(
        self,
        pipeline: str,
        sources: Sequence[Source],
        stage: TimedStage,
        watermarks: Watermarks,
        watermark_file: WatermarkFile,
    ) -> None:
        self._pipeline = pipeline
        self._sources = list(sources)
        self._stage = stage
        self._wm = watermarks
        self._file = watermark_file
        # Per source: (ack, largest event time it brought) of the batches not acknowledged.
        self._pending: dict[str, collections.deque[tuple[Ack, int | None]]] = {
            s.id: collections.deque() for s in self._sources
        }
        # A round written behind: the stage's watermark and open floor right
        # after it, for its commit (the stage has moved on by then).
        self._taken: tuple[int | None, int | None] | None = None

    async def restore(self) -> dict[str, Position] | Stopped:
        """Start the stage empty, at the watermark the last run stored; the
        sources read again from their own commits."""
        for queue in self._pending.values():
            queue.clear()
        self._taken = None
        await asyncio.to_thread(self._restart_stage)
        return {}

    def _restart_stage(self) -> None:
        self._stage.close()
        self._stage.open()
        self._wm.reset()  # the rows since the commit are read again (see Checkpointing)
        stored = self._file.load()
        if stored is not None:
            self._stage.advance(stored)
            self._wm.restore(stored)

    def on_batch(self, batches: Sequence[Batch], tops_us: Sequence[int | None]) -> None:
        """Queue the batches behind the ones still held."""
        for b, top in zip(batches, tops_us, strict=True):
            self._pending[b.source_id].append((b.ack, top))

    def on_advance(self) -> None:
        """The watermark file follows at the next commit."""

    def before_write(self, batches: Sequence[Batch], rows: bool) -> None:
        """Positions are not recorded in the targets (at least once)."""

    def write_behind(self, rows: bool) -> bool:
        """Always: the commit reads only the stage's watermark and open
        floor, taken now."""
        self._taken = (self._stage.watermark_us, self._stage.open_floor_us())
        return True

    async def stage_free(self) -> None:
        """Free already: :meth:`write_behind` read what it needs."""

    def held_back(self, target: str, batches: Sequence[Batch]) -> list[Batch] | None:
        """Never: every target takes every row."""
        return None

    def moved(self) -> bool:
        """Never: no partition is claimed."""
        return False

    async def commit(self, *, emitted: bool = False, final: bool = False) -> bool:
        """Store the stage watermark, then acknowledge what lies below the open
        floor (both as the round written behind left them, if it is this one)."""
        taken, self._taken = self._taken, None
        mark, floor = (
            (self._stage.watermark_us, self._stage.open_floor_us()) if taken is None else taken
        )
        await asyncio.to_thread(self._file.save, mark)
        for source in self._sources:
            queue = self._pending[source.id]
            last: Ack | None = None
            released = False
            while queue and (floor is None or queue[0][1] is None or queue[0][1] < floor):
                last = queue.popleft()[0]
                released = True
            if released:
                await _acknowledge(self._pipeline, source, last)
        return True


class Checkpointing:
    """Commit stage state, positions and watermark to a durable store, then ack.

    A checkpoint is taken when a round emitted rows, on the final commit,
    once ``interval_s`` passed since the last one, or after an idle round
    while an ack-only source's acknowledgement is pending (the broker sends
    it nothing more until then), and only when something changed since.
    ``joined``: the only target, in the store's database: a round's
    checkpoint then commits in the transaction of its output rows (staged by
    :meth:`before_write`, adopted by :meth:`commit`); the stage's delta is
    encoded on a thread of its own while the target writes those rows.
    """

    rewinds_on_rebalance = True
    checkpoints_state = True

    def __init__(
        self,
        pipeline: str,
        sources: Sequence[Source],
        stage: TimedStage | None,
        watermarks: Watermarks,
        retry: Retry,
        store: StateStore,
        interval_s: float,
        joined: RecordsPositions | None = None,
        replicas: Callable[[], Collection[str]] | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._joined = joined
        # Replicas: the current assignment, and the generation of each claim held.
        self._replicas = replicas
        self._owned: dict[str, int] = {}
        self._moved = False
        # The checkpoint the joined target's flush wrote: (version, keys written, keys deleted).
        self._landed: tuple[int, set[str], set[str], Callable[[], None]] | None = None
        self._sources = list(sources)
        self._stage = stage
        self._wm = watermarks
        self._retry = retry
        self._store = store
        self._interval_s = interval_s
        self._version = 0  # the store's checkpoint version this process continues
        self._keys: set[str] = set()  # state keys the store holds for this pipeline
        self._sizes: dict[str, int] = {}  # their sizes (bytes), for the state gauge
        self._positions: dict[str, Position] = {}  # since the last checkpoint, merged
        self._acks: dict[str, Ack] = {}  # source id -> ack of its last batch since then
        self._dirty = False  # batches processed (or the watermark moved) since then
        self._at = time.monotonic()
        # Sources that only acknowledge (a queue): the broker sends them no
        # more than its prefetch of unacknowledged messages, so once that is
        # read they get nothing until the next checkpoint acknowledges it.
        self._ack_only = {s.id for s in self._sources if not isinstance(s, Seekable)}
        self._fresh = False  # on_batch ran since the last commit (not an idle round)
        # Joined: encodes a round's checkpoint while the target writes its rows.
        self._encoder = (
            None
            if joined is None
            else concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sluice-checkpoint")
        )
        # The last round's checkpoint being encoded from the stage (joined).
        self._delta: concurrent.futures.Future[Any] | None = None
        # A joined checkpoint that landed while the stage may be running the
        # next round: the stage learns it is durable (``checkpointed``) once
        # it is still again, at the next before_write, checkpoint or restore.
        self._unmarked: Callable[[], None] | None = None

    async def restore(self) -> dict[str, Position] | Stopped:
        """Load the last checkpoint (connecting the store first) and start the
        stage from it; its positions. A replica claims the partitions it is
        assigned now and loads only theirs (:meth:`_claim`)."""
        store = self._store
        if await self._retry(store, store.open, "open") is STOPPED:
            return STOPPED
        if self._replicas is not None:
            return await self._claim()
        checkpoint = await self._retry(store, lambda: store.load(self._pipeline), "load")
        if checkpoint is STOPPED:
            return STOPPED
        self._version = checkpoint.version
        self._keys = set(checkpoint.state)
        self._sizes = {k: len(v) for k, v in checkpoint.state.items()}
        self._positions = {}
        self._acks = {}
        self._dirty = False
        self._landed = None
        self._unmarked = None  # the restored stage starts from the store's state
        self._at = time.monotonic()
        stage = self._stage
        if stage is not None:

            def restart() -> None:
                stage.close()
                stage.open()
                if checkpoint.state:
                    stage.restore(checkpoint.state)
                # The rows read since the checkpoint are read again: the
                # watermark they raised goes with them (a join would find
                # them late against it), and is measured again from there,
                # each partition from the event time it had at the checkpoint.
                self._wm.reset()
                self._wm.seed(checkpoint.state)
                wm = checkpoint.watermark_us
                if wm is not None:
                    if stage.watermark_us is None or stage.watermark_us < wm:
                        stage.advance(wm)  # nothing is open that it could close
                    self._wm.restore(wm)

            await asyncio.to_thread(restart)
        if self._joined is not None:
            log.info(
                "checkpoints of rounds with output commit in the transaction of the output rows "
                "(%s shares the state store's database)",
                self._joined.id,
            )
        if checkpoint.version:
            log.info(
                "resuming from checkpoint %d (%d state keys, positions of %d sources)",
                checkpoint.version,
                len(checkpoint.state),
                len(checkpoint.positions),
            )
        return checkpoint.positions

    async def _claim(self) -> dict[str, Position] | Stopped:
        """A replica's restore: claim the assigned partitions (fencing their
        previous owner), start the stage from their state alone, each
        partition group at its own watermark, and measure the pipeline's
        watermark afresh (it may go back: a group taken over may be behind)."""
        assert self._replicas is not None
        store: ClaimingStore = self._store  # type: ignore[assignment]  # checked by the config
        stage = self._stage
        partitions = list(self._replicas())
        keys = sorted({*_keys_for(stage, partitions), *mark_keys(partitions)})
        claimed = await self._retry(
            store, lambda: store.claim(self._pipeline, partitions, keys), "claim"
        )
        if claimed is STOPPED:
            return STOPPED
        self._owned = dict(claimed.generations)
        self._keys = set(claimed.checkpoint.state)
        self._sizes = {k: len(v) for k, v in claimed.checkpoint.state.items()}
        self._positions, self._acks = {}, {}
        self._dirty = self._moved = False
        self._landed = None
        self._at = time.monotonic()
        state = claimed.checkpoint.state

        def restart() -> None:
            if stage is not None:
                stage.close()
                stage.open()
                if state:
                    stage.restore(state)
            # Measured afresh for this assignment, each claimed partition from
            # the event time it had reached at its checkpoint: one restored
            # at the end of its records must not hold the others back.
            self._wm.reset()
            for source in self._sources:
                if isinstance(source, Partitioned):
                    self._wm.assign(source.id, source.assignment())
            self._wm.seed(state)

        await asyncio.to_thread(restart)
        if partitions:
            log.info(
                "replica: claimed %d partition(s) (%s), %d state key(s)",
                len(partitions),
                _shorten(partitions),
                len(state),
            )
        return claimed.checkpoint.positions

    def moved(self) -> bool:
        """See :meth:`CommitPolicy.moved`."""
        return self._moved

    def on_batch(self, batches: Sequence[Batch], tops_us: Sequence[int | None]) -> None:
        """Remember where each source stands after ``batches``."""
        for b in batches:
            if b.position is not None:
                self._positions.setdefault(b.source_id, {}).update(b.position)
            self._acks[b.source_id] = b.ack
        self._dirty = True
        self._fresh = True

    def on_advance(self) -> None:
        """The watermark moved (a join may have evicted): worth a checkpoint."""
        self._dirty = True

    def before_write(self, batches: Sequence[Batch], rows: bool) -> None:
        """Joined: stage this round's checkpoint (and the target's positions)
        in the target, so its flush commits them with the output rows."""
        self._mark_durable()
        joined = self._joined
        self._delta = None
        if joined is None or not rows:
            return
        for b in batches:
            if b.position is not None:
                self._positions.setdefault(b.source_id, {}).update(b.position)
        # The stage does not change until this round is written: its delta is
        # encoded on another thread while the target writes the output rows,
        # and the flush waits for it (the checkpoint goes in last).
        assert self._encoder is not None  # made with joined
        stage = self._stage
        delta = None if stage is None else self._encoder.submit(stage.snapshot_delta)
        self._delta = delta
        marks = self._marks()
        keys = self._keys
        positions = {k: dict(v) for k, v in self._positions.items() if v}
        watermark = self._stored_watermark()
        store: JoinableStore = self._store  # type: ignore[assignment]  # checked by choose()
        expected = self._version

        def checkpoint(connection: object) -> None:
            upserts, live, done = self._snapshot(None if delta is None else delta.result(), marks)
            deletes = keys - live
            version = store.commit_on(
                connection,
                self._pipeline,
                upserts,
                deletes,
                positions,
                watermark,
                expected_version=expected,
            )
            self._landed = (version, set(upserts), deletes, done)

        joined.stage_positions(positions, checkpoint)

    def write_behind(self, rows: bool) -> bool:
        """When the round's checkpoint goes in the target's transaction (joined,
        rows to write, not a replica): :meth:`before_write` took the stage's
        delta, watermark and positions, and the commit adopts that checkpoint
        without reading the stage again."""
        return self._delta is not None and self._replicas is None

    async def stage_free(self) -> None:
        """Once the round's delta is encoded. Its errors are the flush's to
        raise (the checkpoint reads the same future)."""
        delta = self._delta
        if delta is not None:
            with contextlib.suppress(Exception):
                await asyncio.wrap_future(delta)

    def _mark_durable(self) -> None:
        """Tell the stage which checkpoint landed (see ``_unmarked``)."""
        unmarked, self._unmarked = self._unmarked, None
        if unmarked is not None:
            unmarked()

    def held_back(self, target: str, batches: Sequence[Batch]) -> list[Batch] | None:
        """Never: positions come from the store, every target takes every row."""
        return None

    async def commit(self, *, emitted: bool = False, final: bool = False) -> bool:
        """Checkpoint when due (see the class docstring), then acknowledge.

        Also due after an idle round while an ack-only source waits for its
        acknowledgement: it may be starved by the broker's prefetch, not idle.
        """
        idle, self._fresh = not self._fresh, False
        landed, self._landed = self._landed, None
        if landed is not None:  # the joined target's flush committed this round's checkpoint
            landed_version, written, deleted, done = landed
            self._version = landed_version
            self._keys = (self._keys | written) - deleted
            self._unmarked = done  # the stage may be running the next round
            self._dirty = False
            self._at = time.monotonic()
            self._positions = {}
            m.CHECKPOINTS.labels(self._pipeline).inc()
            await self._acknowledge()
            if not final:
                return True
        starved = idle and any(source in self._acks for source in self._ack_only)
        due = time.monotonic() - self._at >= self._interval_s or starved
        if not (self._dirty and (emitted or final or due)):
            return True
        started = time.perf_counter()
        self._mark_durable()  # no round runs now: only a joined round is written behind
        upserts, live, done = await asyncio.to_thread(self._snapshot)
        deletes = self._keys - live
        positions = {k: dict(v) for k, v in self._positions.items() if v}
        watermark = self._stored_watermark()
        store = self._store

        def write() -> int:
            return store.commit(
                self._pipeline,
                upserts,
                deletes,
                positions,
                watermark,
                expected_version=self._version,
            )

        if self._replicas is not None:
            owned = self._owned
            mine = {
                s: {p: v for p, v in parts.items() if p in owned} for s, parts in positions.items()
            }
            claiming: ClaimingStore = store  # type: ignore[assignment]  # checked by the config

            def write_owned() -> int:
                return claiming.commit_owned(
                    self._pipeline, upserts, deletes, {s: p for s, p in mine.items() if p}, owned
                )

            try:
                version = await self._retry(store, write_owned, "commit")
            except PartitionsMoved as exc:
                log.info("replica: %s; reading again for the new assignment", exc)
                self._moved = True
                return True
        else:
            version = await self._retry(store, write, "commit")
        if version is STOPPED:
            return False
        self._version = version
        self._keys = (self._keys | set(upserts)) - deletes
        done()
        self._dirty = False
        self._at = time.monotonic()
        m.CHECKPOINTS.labels(self._pipeline).inc()
        m.CHECKPOINT_SECONDS.labels(self._pipeline).observe(time.perf_counter() - started)
        for key in deletes:
            self._sizes.pop(key, None)
        self._sizes.update((k, len(v)) for k, v in upserts.items())
        m.STATE_BYTES.labels(self._pipeline).set(sum(self._sizes.values()))
        await self._acknowledge()
        self._positions = {}
        return True

    def _snapshot(
        self,
        delta: tuple[dict[str, bytes], set[str], int] | None = None,
        marks: dict[str, bytes] | None = None,
    ) -> tuple[dict[str, bytes], set[str], Callable[[], None]]:
        """What a checkpoint stores: the stage's state (its keys that changed
        since the last durable checkpoint, ``snapshot_delta``, unless given)
        and the event time each partition reached (:meth:`_marks`, unless
        given); every key the whole state has (a stored key not among them is
        deleted); and what to call once the checkpoint is durable."""
        stage = self._stage
        if stage is None:
            return {}, set(), _nothing
        upserts, live, token = stage.snapshot_delta() if delta is None else delta
        marks = self._marks() if marks is None else marks
        upserts.update(marks)
        return upserts, live | set(marks), functools.partial(stage.checkpointed, token)

    def _marks(self) -> dict[str, bytes]:
        """The event time each partition reached (a replica: of the partitions it owns)."""
        return self._wm.snapshot(None if self._replicas is None else set(self._owned))

    def _stored_watermark(self) -> int | None:
        """The stage watermark a checkpoint stores: during a drain (the stage at
        the end of input) the pipeline's real one instead."""
        stage = self._stage
        if stage is None:
            return None
        if stage.watermark_us is not None and stage.watermark_us >= END_OF_INPUT_US:
            return self._wm.global_us()
        return stage.watermark_us

    async def _acknowledge(self) -> None:
        for source in self._sources:
            if source.id in self._acks:
                await _acknowledge(self._pipeline, source, self._acks.pop(source.id))


def _nothing() -> None:
    """Nothing to do once a checkpoint is durable (a stage without deltas)."""


def _keys_for(stage: TimedStage | None, partitions: Collection[str]) -> list[str]:
    """The state keys a replica owning ``partitions`` loads (its stage's scheme)."""
    if stage is None:
        return []
    return sorted(stage.keys_for(partitions))  # type: ignore[attr-defined]  # a partitioned stage


def _shorten(items: Sequence[str], most: int = 6) -> str:
    return ", ".join(items[:most]) + (" ..." if len(items) > most else "")


def _without_held(batch: Batch, held: Position) -> Batch:
    """``batch`` without its rows below ``held`` (partition -> position a
    target holds). Reads each row's partition and offset from the raw
    records: per-row Python, on the replayed batches after a restart only."""
    raw = batch.raw
    if not held or raw is None or not batch.num_rows:
        return batch
    index = batch.rows if batch.rows is not None else range(batch.num_rows)
    keep = np.ones(batch.num_rows, dtype=bool)
    for row, i in enumerate(index):
        record = raw.record(i)
        below = held.get(record.partition)
        if isinstance(below, int) and isinstance(record.offset, int) and record.offset < below:
            keep[row] = False
    if keep.all():
        return batch
    mask = pa.array(keep)
    return dataclasses.replace(
        batch,
        data=batch.data.filter(mask),
        rows=None if batch.rows is None else tuple(np.asarray(index)[keep].tolist()),
        row_partitions=None if batch.row_partitions is None else batch.row_partitions.filter(mask),
    )
