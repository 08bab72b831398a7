"""The contracts between the engine and every connector.

A :class:`Source` yields :class:`Batch` es; a :class:`Target` takes Arrow and
makes it durable on :meth:`Target.flush`. The engine alone decides when a
source commits: only after every target flushed the rows a batch's
:attr:`Batch.ack` token covers.

What a source can do beyond that is declared by the capability protocols it
implements, and the engine asks ``isinstance(source, Seekable)`` (never
``getattr``):

* :class:`Seekable`: the source can read again from a :data:`Position`
  (Kafka offsets, the last file read). Its batches carry ``position``; a
  window or join can then rebuild its state by replay, without a durable
  state store.
* :class:`Partitioned`: the broker assigns the source partitions, and
  reassigns them on a rebalance (counted by ``epoch``).
* :class:`Observable`: the source reports whether it is connected and how
  far behind it is.

A source that is not :class:`Seekable` is *ack-only* (a RabbitMQ queue, a
Pub/Sub subscription): what it acknowledged is gone for good, so a window or
join over it needs a durable ``[state_store]`` (the validator says so).

Positions mean "the next record to read" (Kafka: ``offset + 1``), keyed by a
stable string per partition / shard / file stream, so they can be stored in a
state store and handed back to :meth:`Source.open` on restart.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias, runtime_checkable

import pyarrow as pa

#: Partition key (``"events:0"``) -> next record to read. Values are ints
#: (offsets, sequence numbers) or strings (file names, sequence tokens).
Position = dict[str, int | str]

#: What :meth:`Source.commit` takes: the :attr:`Batch.ack` of a batch that
#: source made. Opaque to the engine (a Kafka source uses its position, an AMQP
#: source a delivery tag); only the source that made it reads it. ``Any``
#: because each source narrows it to its own type.
Ack: TypeAlias = Any

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

    ``ack`` is the token :meth:`Source.commit` takes: committing it
    acknowledges these rows and every earlier batch of the same source.
    ``position`` is where the source would read again after these rows, set
    only by a :class:`Seekable` source (``None``: the source cannot replay);
    a state store keeps it and hands it back to :meth:`Source.open`. ``raw`` keeps the undecoded
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
    ack: Ack
    position: Position | None = None
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
        position = self.position or {}
        return ", ".join(f"{k} up to {v}" for k, v in position.items()) or "(no position)"


@runtime_checkable
class Source(Protocol):
    """A stream of batches with commit-after-durable-write semantics.

    Every method may block on I/O; the engine calls them from worker threads
    and never two at once on the same source.
    """

    id: str

    def open(self, resume: Position | None) -> None:
        """Connect. With ``resume`` (a :class:`Seekable` source's positions
        from a state store), continue from those positions instead of the
        source's own committed ones; a source that cannot seek ignores it."""

    def read(self, timeout_s: float) -> Batch | None:
        """Return the next batch, or ``None`` when nothing arrived within
        ``timeout_s`` seconds. Never blocks longer than that (plus one
        network round trip)."""

    def commit(self, ack: Ack) -> None:
        """Acknowledge to the system (synchronously) the batch whose
        :attr:`Batch.ack` is ``ack`` and every batch this source handed out
        before it. Called in read order, only after every target flushed
        those rows."""

    def close(self) -> None:
        """Release connections. Idempotent; a closed source may be opened again."""


@runtime_checkable
class Seekable(Protocol):
    """A source that can read again from a position (a replayable log).

    Its batches carry :attr:`Batch.position`, and :meth:`Source.open` honours
    ``resume``.
    """

    def rewind(self, position: Position | None) -> None:
        """Read again from ``position`` (a state store's checkpoint; it is also
        where a later partition assignment starts), or, with ``None``, from
        what the source last committed. Batches read past that point and not
        committed are forgotten; they are read again."""


@runtime_checkable
class Partitioned(Protocol):
    """A source whose partitions the broker assigns, and may move (a rebalance).

    ``epoch`` counts the assignments so far; each :class:`Batch` carries the
    epoch it was read in, so a newer one tells the engine that partitions
    moved.
    """

    epoch: int

    def assignment(self) -> tuple[str, ...]:
        """The partitions (position keys) assigned to this source now, whether
        or not they delivered yet; empty before the first assignment. Each
        holds the engine's watermark from its assignment on (see
        ``engine/watermark.py``). Cheap: called after every read."""

    def track(self, *, row_partitions: bool, wait_on_revoke: bool) -> None:
        """Configure before :meth:`Source.open`. ``row_partitions``: fill
        :attr:`Batch.row_partitions` (per-partition watermarks and state).
        ``wait_on_revoke``: a revoke waits (bounded) until the batches handed
        out are committed, so their positions land before the partitions go;
        off when the engine holds commits back on purpose (it reads again
        after a rebalance instead)."""

    def release_in_flight(self) -> None:
        """The engine will not commit the batches handed out so far (it is
        stopping or reading again): a revoke must not wait for them."""


@runtime_checkable
class Alignable(Protocol):
    """A partitioned source that can stop fetching some partitions for a while
    (watermark alignment, ``[watermark] max_drift_ms``)."""

    def align(self, paused: Collection[str]) -> None:
        """From the next read on, fetch none of ``paused`` (position keys) and
        every other assigned partition. Nothing is skipped: a partition that
        is fetched again continues after the last row handed out. Called from
        the engine's loop while a read may be running on another thread."""


@runtime_checkable
class Observable(Protocol):
    """A source that reports its connection and its lag."""

    @property
    def connected(self) -> bool:
        """Whether the source reads data now (a consumer still joining its
        group does not): until then it is not idle and not ready."""

    def lag(self) -> dict[str, int]:
        """Records the system holds that this source has not handed out yet,
        per partition it reads now, as measured at the end of its last
        :meth:`Source.read` (so it agrees with the batches handed out so
        far). A partition is missing until it is measured (the broker has
        not answered for it yet); the engine then counts it as behind. A
        partition at 0 has delivered everything the system held at that
        read: only such a partition may go idle for the watermark."""


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
