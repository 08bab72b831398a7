"""Windows and joins per source partition, for pipelines run as replicas.

A pipeline with ``replicas = true`` may run as several processes in one
consumer group. Each owns some partitions, and a partition's state must move
with it: so the window (or join) keeps one stage per *partition group* —
partition number ``p`` of every topic the pipeline reads (``orders:3`` and
``payments:3`` are group ``3``: the co-partitioned rows a join matches) —
each with its own state, watermark and snapshot keys:

* a window's group ``p`` is stored under ``window/p``;
* a join's partitions under ``join/<topic:p>`` as always.

A replica loads exactly the keys of the partitions it claims
(:meth:`keys_for`); a group behind the others (just taken over from a replica
that died) keeps its own, lower watermark, so its rows are not late because
this process's other partitions ran ahead.

The results equal one stage's when the input is partitioned by the window's
``group_by`` keys (a join's: by its keys, with the same partition count on
both topics), as Kafka Streams requires of its input: rows of one key must
be in one partition. Windows take the group in the ``__group`` column the
run loop adds; joins read it from ``__partition``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, Generic, TypeVar

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from sluice.config.spec import JoinSpec, Window
from sluice.engine.stages.join import _KEY as JOIN_KEY
from sluice.engine.stages.join import PARTITION, JoinOutput, JoinStage
from sluice.engine.stages.window import WindowOutput, WindowStage

GROUP = "__group"
"""The column that names each window input row's partition group."""

I64 = npt.NDArray[np.int64]
S = TypeVar("S", WindowStage, JoinStage)


def group_of(partition: str) -> str:
    """The group of a partition key: its number (``orders:3`` -> ``3``)."""
    return partition.rsplit(":", 1)[-1]


def groups_of(partitions: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The group of each partition key, as strings (one Python step per
    distinct partition, not per row)."""
    encoded = pc.dictionary_encode(partitions.cast(pa.string()))
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    names = pa.array([group_of(str(v)) for v in encoded.dictionary.to_pylist()], pa.string())
    return names.take(encoded.indices)


def _split(groups: pa.Array) -> dict[str, I64]:
    """Row indices per group value."""
    out: dict[str, I64] = {}
    if not len(groups):
        return out
    values = groups.to_numpy(zero_copy_only=False).astype(str)
    for g in np.unique(values):
        out[str(g)] = np.flatnonzero(values == g).astype(np.int64)
    return out


def _concat(tables: Iterable[pa.Table]) -> pa.Table:
    parts = [t for t in tables if t.num_columns]
    if not parts:
        return pa.table({})
    return parts[0] if len(parts) == 1 else pa.concat_tables(parts, promote_options="permissive")


class _PerGroup(Generic[S]):
    """One stage per partition group (see the module docstring)."""

    def __init__(self, make: Callable[[], S]) -> None:
        self._make: Callable[[], S] = make
        self._stages: dict[str, S] = {}
        self._open = False
        self.spec: Any = make().spec

    def open(self) -> None:
        self.close()
        self._open = True

    def close(self) -> None:
        for stage in self._stages.values():
            stage.close()
        self._stages = {}
        self._open = False

    def _stage(self, group: str) -> S:
        stage = self._stages.get(group)
        if stage is None:
            stage = self._make()
            stage.open()
            self._stages[group] = stage
        return stage

    def groups(self) -> list[str]:
        return sorted(self._stages)

    @property
    def watermark_us(self) -> int | None:
        """The lowest watermark of the groups (``None`` before any has one)."""
        marks = [s.watermark_us for s in self._stages.values() if s.watermark_us is not None]
        return min(marks) if marks else None

    def open_floor_us(self) -> int | None:
        floors = [f for s in self._stages.values() if (f := s.open_floor_us()) is not None]
        return min(floors) if floors else None


class PartitionedWindow(_PerGroup[WindowStage]):
    """A window per partition group; input rows carry their group in ``__group``."""

    def __init__(self, spec: Window, pipeline: str) -> None:
        super().__init__(lambda: WindowStage(spec, pipeline))

    def process(self, data: pa.Table, watermark_us: int | None) -> WindowOutput:
        groups = data[GROUP].combine_chunks() if data.num_rows else pa.array([], pa.string())
        rows = data.drop_columns([GROUP]) if GROUP in data.column_names else data
        emitted: list[pa.Table] = []
        late: list[I64] = []
        by_group = _split(groups)
        for g, index in by_group.items():
            out = self._stage(g).process(rows.take(pa.array(index)), watermark_us)
            emitted.append(out.emitted)
            late.append(index[out.late])
        if watermark_us is not None:
            for g, stage in self._stages.items():
                if g not in by_group:
                    emitted.append(stage.advance(watermark_us).emitted)
        merged = np.sort(np.concatenate(late)) if late else np.empty(0, np.int64)
        return WindowOutput(_concat(emitted), merged)

    def advance(self, watermark_us: int) -> WindowOutput:
        emitted = [s.advance(watermark_us).emitted for s in self._stages.values()]
        return WindowOutput(_concat(emitted), np.empty(0, np.int64))

    def snapshot(self) -> dict[str, bytes]:
        key = WindowStage.STATE_KEY
        return {f"{key}/{g}": s.snapshot()[key] for g, s in sorted(self._stages.items())}

    def snapshot_delta(self) -> tuple[dict[str, bytes], set[str], None]:
        """The whole :meth:`snapshot` every time (a key per group, rewritten whole)."""
        state = self.snapshot()
        return state, set(state), None

    def checkpointed(self, token: None) -> None:
        """Nothing is tracked between checkpoints."""

    def restore(self, state: Mapping[str, bytes]) -> None:
        key = WindowStage.STATE_KEY
        for name, blob in sorted(state.items()):
            if name.startswith(f"{key}/"):
                self._stage(name.split("/", 1)[1]).restore({key: blob})

    @staticmethod
    def keys_for(partitions: Collection[str]) -> set[str]:
        """The state keys of ``partitions``' groups."""
        return {f"{WindowStage.STATE_KEY}/{group_of(p)}" for p in partitions}

    def state_size(self) -> int:
        return sum(s.state_size() for s in self._stages.values())

    def active_windows(self) -> int:
        return sum(s.active_windows() for s in self._stages.values())


class PartitionedJoin(_PerGroup[JoinStage]):
    """A join per partition group (the co-partitioned rows of both topics);
    input rows carry their partition in ``__partition``."""

    def __init__(self, spec: JoinSpec, pipeline: str, max_buffer_rows: int) -> None:
        super().__init__(lambda: JoinStage(spec, pipeline, max_buffer_rows))

    def process(
        self, left: pa.Table | None, right: pa.Table | None, watermark_us: int | None
    ) -> JoinOutput:
        sides = [
            _split(groups_of(t[PARTITION])) if t is not None and t.num_rows else {}
            for t in (left, right)
        ]
        emitted: list[pa.Table] = []
        late: tuple[list[I64], list[I64]] = ([], [])
        touched = sorted(set(sides[0]) | set(sides[1]))
        for g in touched:
            parts = [
                None if t is None or g not in by else t.take(pa.array(by[g]))
                for t, by in zip((left, right), sides, strict=True)
            ]
            out = self._stage(g).process(parts[0], parts[1], watermark_us)
            emitted.append(out.emitted)
            for side, (by, rejected) in enumerate(
                zip(sides, (out.late_left, out.late_right), strict=True)
            ):
                if len(rejected):
                    late[side].append(by[g][rejected])
        if watermark_us is not None:
            for g, stage in self._stages.items():
                if g not in touched:
                    emitted.append(stage.advance(watermark_us).emitted)

        def merged(parts: list[I64]) -> I64:
            return np.sort(np.concatenate(parts)) if parts else np.empty(0, np.int64)

        return JoinOutput(_concat(emitted), merged(late[0]), merged(late[1]))

    def advance(self, watermark_us: int) -> JoinOutput:
        emitted = [s.advance(watermark_us).emitted for s in self._stages.values()]
        none = np.empty(0, np.int64)
        return JoinOutput(_concat(emitted), none, none)

    def snapshot(self) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for stage in self._stages.values():
            out.update(stage.snapshot())
        return out

    def snapshot_delta(self) -> tuple[dict[str, bytes], set[str], dict[str, object]]:
        """:meth:`JoinStage.snapshot_delta` of every group; the token is theirs."""
        changed: dict[str, bytes] = {}
        live: set[str] = set()
        tokens: dict[str, object] = {}
        for g, stage in self._stages.items():
            upserts, keys, tokens[g] = stage.snapshot_delta()
            changed.update(upserts)
            live |= keys
        return changed, live, tokens

    def checkpointed(self, token: Mapping[str, int]) -> None:
        for g, done in token.items():
            stage = self._stages.get(g)
            if stage is not None:
                stage.checkpointed(done)

    def restore(self, state: Mapping[str, bytes]) -> None:
        by_group: dict[str, dict[str, bytes]] = {}
        for name, blob in state.items():
            if name.startswith(f"{JOIN_KEY}/"):
                # join/<topic:p>/<bucket> (join/<topic:p> before buckets)
                by_group.setdefault(group_of(name.split("/")[1]), {})[name] = blob
        for g, part in sorted(by_group.items()):
            self._stage(g).restore(part)

    @staticmethod
    def keys_for(partitions: Collection[str]) -> set[str]:
        """The state keys of ``partitions``."""
        return {f"{JOIN_KEY}/{p}" for p in partitions}

    def buffer_rows(self) -> tuple[int, int]:
        counts = [s.buffer_rows() for s in self._stages.values()]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def partitions(self) -> set[str]:
        found: set[str] = set()
        for stage in self._stages.values():
            found |= stage.partitions()
        return found
