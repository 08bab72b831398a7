"""The contracts between the engine and every connector.

A :class:`Source` yields :class:`Batch` es; a :class:`Target` takes Arrow and
makes it durable on :meth:`Target.flush`. The engine alone decides when a
source commits: only after every target flushed the rows a position covers.

Positions mean "the next record to read" (Kafka: ``offset + 1``), keyed by a
stable string per partition / shard / file stream, so they can be stored in a
state store and handed back to :meth:`Source.open` on restart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import pyarrow as pa

#: Partition key (``"events:0"``) -> next record to read. Values are ints
#: (offsets, sequence numbers) or strings (file names, sequence tokens).
Position = dict[str, int | str]

EVENT_TS = "_event_ts"
EVENT_TS_TYPE = pa.timestamp("us", tz="UTC")


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One record as the source delivered it, before decoding."""

    partition: str  # position key, e.g. "events:0"
    offset: int | str | None
    timestamp_ms: int | None
    key: bytes | None
    payload: bytes | None


class RawRecords(Protocol):
    """The undecoded records of a batch, in read order (for dead letters and errors)."""

    def __len__(self) -> int:
        """How many records the source read."""

    def record(self, index: int) -> RawRecord:
        """The ``index``-th record read."""

    def where(self, index: int) -> str:
        """Where the ``index``-th record sits, e.g. ``topic events partition 0 offset 12``."""

    def span(self) -> str:
        """Where the records sit, e.g. ``topic events partition 0 offsets 10-19``."""


@dataclass(frozen=True, slots=True)
class Batch:
    """Rows read from one source, and where that source stands after them.

    ``position`` covers exactly these rows and everything read before them;
    committing it acknowledges all of them. ``raw`` keeps the undecoded
    records when the source has them (for dead letters); ``bad`` lists the
    records that could not be decoded, by index into ``raw``, with the reason.
    ``rows`` maps each decoded row to its index in ``raw`` (``None``: one row
    per record, in order). ``epoch`` counts the source's partition
    assignments: a batch of a newer epoch than the one before followed a
    rebalance. ``row_partitions``, when the source tracks them, names the
    partition of each decoded row (for per-partition watermarks);
    ``partitions`` lists every partition the source reads right now.
    """

    source_id: str
    data: pa.Table
    position: Position
    raw_count: int = 0
    partitions: tuple[str, ...] = field(default=())
    raw: RawRecords | None = None
    bad: tuple[tuple[int, str], ...] = ()
    rows: tuple[int, ...] | None = None
    epoch: int = 0
    row_partitions: pa.Array | None = None

    @property
    def num_rows(self) -> int:
        """Decoded rows in the batch."""
        return int(self.data.num_rows)

    def span(self) -> str:
        """Where this batch's records sit in the source, for error messages."""
        if self.raw is not None:
            return self.raw.span()
        return ", ".join(f"{k} up to {v}" for k, v in self.position.items()) or "(no position)"


@runtime_checkable
class Source(Protocol):
    """A stream of batches with commit-after-durable-write semantics.

    Every method may block on I/O; the engine calls them from worker threads
    and never two at once on the same source.
    """

    id: str

    def open(self, resume: Position | None) -> None:
        """Connect. With ``resume``, continue from those positions instead of
        the source's own committed ones."""

    def read(self, timeout_s: float) -> Batch | None:
        """Return the next batch, or ``None`` when nothing arrived within
        ``timeout_s`` seconds. Never blocks longer than that (plus one
        network round trip)."""

    def commit(self, position: Position) -> None:
        """Acknowledge everything up to ``position`` to the system (sync)."""

    def close(self) -> None:
        """Release connections. Idempotent; a closed source may be opened again."""


@runtime_checkable
class Target(Protocol):
    """A destination that takes Arrow and makes it durable on flush."""

    id: str

    def open(self) -> None:
        """Connect and check the destination (create it when missing)."""

    def write(self, data: pa.Table) -> None:
        """Stage ``data`` for the next flush (may already send it)."""

    def flush(self) -> None:
        """Make every row written since the last flush durable, or raise."""

    def close(self) -> None:
        """Release connections. Idempotent; a closed target may be opened again."""
