"""RabbitMQ sources (pika): a queue consumed with manual acks, and a stream
queue read from a stored offset.

**Queues** (classic, quorum): ack-only. The consumer asks ``basic.qos`` for
``prefetch_count`` unacknowledged messages (default twice the batch size, at
most 65535; never less than a batch, so a batch never waits for messages the
broker holds back until an acknowledgement). A batch's ack token is the
connection generation and the last delivery tag of the batch; the engine
commits it after every target flushed, and :meth:`RabbitMQSource.commit`
sends ``basic.ack(tag, multiple=True)`` on the channel that delivered the
tag. Tags of a connection that was lost since (the broker closed it, the
network dropped) are never acknowledged, on any channel: the broker delivers
those messages again, and a ``merge`` target absorbs the repeat (at least
once). ``queue_args`` are passed when the queue is declared (durable).

**Heartbeats**: the connection runs on its own I/O thread
(:class:`~sluice.connectors.rabbitmq.link.Link`), so heartbeats are answered
while a slow target writes. ``?heartbeat=SECONDS`` in ``amqp_url`` sets the
interval.

**Lost connections** are opened again by :meth:`RabbitMQSource.read`, with
backoff (0.5 s doubling to 30 s); messages delivered on the lost one and not
handed out yet are dropped (they come back). Errors no retry can mend (bad
credentials, the queue declared with other arguments) raise
:class:`~sluice.errors.ConnectorError`.

The source is :class:`~sluice.connectors.api.Observable` for its connection
(``connected``; its lag is not measured).

**_event_ts** is the AMQP ``timestamp`` property (whole seconds since the
epoch, as the AMQP 0-9-1 specification defines it), else the time the
message was received.

**Streams** (``x-queue-type = "stream"``): :class:`RabbitMQStreamSource` is
seekable. Each message carries its offset (``x-stream-offset``); a batch's
position is ``{queue: last offset + 1}``, kept like a Kafka offset (in the
targets' ``_sluice_positions`` or the state store) and, on every commit, in a
small file under ``$SLUICE_STATE_DIR`` (the broker keeps no offsets for AMQP
consumers). A new reader with no stored offset starts at the first message.
Its acknowledgements are only the broker's credit: sent when a batch is
handed out, so a pipeline that holds commits back is never starved.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from sluice.connectors.api import Batch, Position, RawRecord
from sluice.connectors.rabbitmq.link import Link
from sluice.connectors.rabbitmq.spec import RabbitMQSource as RabbitMQSourceSpec
from sluice.connectors.registry import Context
from sluice.errors import TransientError
from sluice.formats import decoder_for, event_table
from sluice.localstate import read_json, safe_name, state_dir, write_json

log = logging.getLogger(__name__)

FIRST_BACKOFF_S = 0.5  # first wait before connecting again after a failure
MAX_BACKOFF_S = 30.0  # waits double up to this


@dataclass(frozen=True, slots=True)
class Ack:
    """A batch's ack token: the connection it came on and its last delivery tag."""

    generation: int
    tag: int


class _Deliveries:
    """Messages one connection delivered that no batch has taken yet.

    Filled on the I/O thread (:meth:`on_message`), taken by ``read``. Only
    the bodies and what ``_event_ts`` and the error messages need are kept.
    """

    def __init__(self, want: int, start_offset: int | None = None) -> None:
        self.want = want  # wake the reader once this many are here
        self.start = start_offset  # streams: offsets below it are skipped
        self.cond = threading.Condition(threading.Lock())
        self.tags: list[int] = []
        self.bodies: list[bytes] = []
        self.stamps_ms: list[int] = []
        self.keys: list[str] = []
        self.redelivered: list[bool] = []
        self.offsets: list[int] = []  # streams only

    def on_message(self, channel: Any, method: Any, props: Any, body: bytes) -> None:
        """pika's consumer callback (I/O thread)."""
        self._append(method, props, body, None)

    def on_stream_message(self, channel: Any, method: Any, props: Any, body: bytes) -> None:
        """The consumer callback of a stream: skips what lies before the start
        offset (a stream delivers from the start of the chunk holding it)."""
        offset = (props.headers or {}).get("x-stream-offset")
        if not isinstance(offset, int):
            offset = -1
        if self.start is not None and offset < self.start:
            channel.basic_ack(method.delivery_tag)  # credit only: nothing is committed
            return
        self._append(method, props, body, offset)

    def _append(self, method: Any, props: Any, body: bytes, offset: int | None) -> None:
        ts = props.timestamp
        stamp = ts * 1000 if isinstance(ts, int) else int(time.time() * 1000)
        with self.cond:
            self.tags.append(method.delivery_tag)
            self.bodies.append(body)
            self.stamps_ms.append(stamp)
            self.keys.append(method.routing_key)
            self.redelivered.append(bool(method.redelivered))
            if offset is not None:
                self.offsets.append(offset)
            if len(self.tags) >= self.want:
                self.cond.notify()

    def take(self, most: int, wait_s: float) -> _Taken | None:
        """Up to ``most`` messages, waiting up to ``wait_s`` for ``most`` to arrive."""
        with self.cond:
            if len(self.tags) < most:
                self.cond.wait_for(lambda: len(self.tags) >= most, wait_s)
            n = min(most, len(self.tags))
            if not n:
                return None
            taken = _Taken(
                self.tags[:n],
                self.bodies[:n],
                self.stamps_ms[:n],
                self.keys[:n],
                self.redelivered[:n],
                self.offsets[:n],
            )
            del self.tags[:n], self.bodies[:n], self.stamps_ms[:n], self.keys[:n]
            del self.redelivered[:n], self.offsets[:n]
            return taken


@dataclass(frozen=True, slots=True)
class _Taken:
    tags: list[int]
    bodies: list[bytes]
    stamps_ms: list[int]
    keys: list[str]
    redelivered: list[bool]
    offsets: list[int]


class RabbitMQSource:
    """Consumes one queue (``source_query``) with manual acks. Ack-only."""

    def __init__(self, spec: RabbitMQSourceSpec, ctx: Context) -> None:
        self.spec = spec
        self.queue = ctx.pipeline.query_of(spec)
        self.id = self.queue
        self.pipeline = ctx.pipeline.pipeline_name
        cdc = ctx.pipeline.transform.cdc if ctx.pipeline.transform else None
        self._decoder = decoder_for(spec.payload_format, cdc, self.pipeline)
        self._rows = spec.batch_rows
        self._link: Link | None = None
        self._deliveries: _Deliveries | None = None
        self._generation = 0  # connections made so far; acks carry theirs
        self._retry_at = 0.0  # monotonic time of the next connection attempt
        self._backoff = FIRST_BACKOFF_S

    # -- lifecycle --------------------------------------------------------

    def open(self, resume: Position | None) -> None:
        """Connect, declare the queue and start consuming. A broker that cannot
        be reached now is tried again by :meth:`read`; a configuration the
        broker refuses raises :class:`~sluice.errors.ConnectorError`."""
        self._retry_at = 0.0
        self._backoff = FIRST_BACKOFF_S
        self._connect()

    def close(self) -> None:
        """Close the connection: the broker requeues every unacknowledged message."""
        link, self._link = self._link, None
        self._deliveries = None
        if link is not None:
            link.close()

    def _connect(self) -> bool:
        """One connection attempt; False (and a later retry) on a transient failure."""
        deliveries = self._new_deliveries()
        link = Link(self.spec.amqp_url, f"sluice {self.pipeline} <- {self.queue}")
        try:
            link.open()
            self._setup(link, deliveries)
        except TransientError as exc:
            link.close()
            log.warning(
                "rabbitmq %s: cannot consume, retrying in %.1f s: %s", self.id, self._backoff, exc
            )
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(2 * self._backoff, MAX_BACKOFF_S)
            return False
        except BaseException:
            link.close()
            raise
        self._generation += 1
        self._link, self._deliveries = link, deliveries
        self._backoff = FIRST_BACKOFF_S
        return True

    def _new_deliveries(self) -> _Deliveries:
        return _Deliveries(self._rows)

    def _consume_args(self) -> dict[str, Any] | None:
        return None

    def _setup(self, link: Link, deliveries: _Deliveries) -> None:
        prefetch = self.spec.prefetch
        args = dict(self.spec.queue_args) or None
        queue = self.queue
        on_message = deliveries.on_stream_message if self.spec.stream else deliveries.on_message
        consume_args = self._consume_args()
        link.call(
            lambda ch, done: ch.basic_qos(prefetch_count=prefetch, callback=done),
            f"rabbitmq {queue}: basic.qos",
        )
        link.call(
            lambda ch, done: ch.queue_declare(queue, durable=True, arguments=args, callback=done),
            f"rabbitmq: declaring queue {queue}",
        )
        link.call(
            lambda ch, done: ch.basic_consume(
                queue, on_message, auto_ack=False, arguments=consume_args, callback=done
            ),
            f"rabbitmq: consuming from queue {queue}",
        )

    def _live(self, timeout_s: float) -> tuple[Link, _Deliveries] | None:
        """The connection to read from, connecting again when it was lost (not
        before the backoff allows); ``None`` while there is none."""
        link, deliveries = self._link, self._deliveries
        if link is not None and deliveries is not None and link.alive:
            return link, deliveries
        if link is not None:
            # Lost: what it delivered and no batch took comes back on the next one.
            self._link, self._deliveries = None, None
            link.close()
            self._retry_at = 0.0
        wait = self._retry_at - time.monotonic()
        if wait > 0:
            time.sleep(min(wait, timeout_s))
            if wait > timeout_s:
                return None
        if not self._connect():
            return None
        assert self._link is not None and self._deliveries is not None
        return self._link, self._deliveries

    # -- observability -------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether a connection consumes now (``/readyz`` answers 503 while
        not, and the source does not count as idle)."""
        link = self._link
        return link is not None and link.alive

    def lag(self) -> dict[str, int]:
        """Not measured (a queue's depth costs a round trip per read): empty,
        which the watermark reads as "no backlog known" for a whole source."""
        return {}

    # -- reading ------------------------------------------------------------

    def read(self, timeout_s: float) -> Batch | None:
        """Up to a batch of messages within ``timeout_s`` (at most ``max_batch_wait_ms``)."""
        live = self._live(timeout_s)
        if live is None:
            return None
        link, deliveries = live
        taken = deliveries.take(self._rows, min(timeout_s, self.spec.max_batch_wait_ms / 1000))
        if taken is None:
            return None
        if not link.alive:
            return None  # their tags died with the connection: the broker delivers them again
        return self._to_batch(taken)

    def _to_batch(self, taken: _Taken) -> Batch:
        decoded = self._decoder.decode(taken.bodies, self._offsets(taken))  # type: ignore[arg-type]  # list[bytes] is a list[bytes | None]
        table = event_table(decoded, np.asarray(taken.stamps_ms, dtype=np.int64) * 1000)
        rows = decoded.rows
        return Batch(
            self.id,
            table,
            self._ack(taken),
            position=self._position(taken),
            raw_count=len(taken.tags),
            partitions=(self.queue,),
            raw=_Records(self.queue, taken, stream=self.spec.stream),
            bad=tuple(decoded.bad),
            rows=None if rows is None else tuple(rows),
        )

    def _ack(self, taken: _Taken) -> Any:
        return Ack(self._generation, taken.tags[-1])

    def _offsets(self, taken: _Taken) -> list[int]:
        return taken.tags

    def _position(self, taken: _Taken) -> Position | None:
        return None

    # -- committing ----------------------------------------------------------

    def commit(self, ack: Ack) -> None:
        """``basic.ack`` (multiple) the batch's last tag on the channel that
        delivered it; nothing when that connection was lost since (its
        messages come again)."""
        link = self._link
        if link is None or ack.generation != self._generation or not link.alive:
            log.info(
                "rabbitmq %s: not acknowledging delivery tags up to %d of a lost connection "
                "(the broker delivers them again)",
                self.id,
                ack.tag,
            )
            return
        tag = ack.tag
        try:
            link.call(
                lambda ch, done: done(ch.basic_ack(tag, multiple=True)),
                f"rabbitmq {self.id}: basic.ack",
            )
        except TransientError as exc:
            log.warning(
                "rabbitmq %s: acknowledging up to delivery tag %d failed (the broker delivers "
                "them again): %s",
                self.id,
                tag,
                exc,
            )


class RabbitMQStreamSource(RabbitMQSource):
    """Reads a stream queue from an offset: seekable, positions like Kafka's."""

    def __init__(self, spec: RabbitMQSourceSpec, ctx: Context) -> None:
        super().__init__(spec, ctx)
        self._checkpoint = (
            state_dir() / safe_name(self.pipeline) / f"rabbitmq-stream-{safe_name(self.queue)}.json"
        )
        self._next: int | None = None  # offset the next connection starts at

    def open(self, resume: Position | None) -> None:
        """Start at ``resume``'s offset, else at the offset last committed
        here, else at the first message of the stream."""
        self._next = self._start(resume)
        super().open(resume)

    def rewind(self, position: Position | None) -> None:
        """Read again from ``position`` (else from the last commit): a new
        connection, so nothing read since is acknowledged."""
        self._next = self._start(position)
        self.close()
        self._retry_at = 0.0
        self._connect()

    def _start(self, position: Position | None) -> int | None:
        stored = (position or {}).get(self.queue)
        if isinstance(stored, int):
            return stored
        saved = (read_json(self._checkpoint) or {}).get("offset")
        return int(saved) if isinstance(saved, int) else None

    def _new_deliveries(self) -> _Deliveries:
        return _Deliveries(self._rows, self._next)

    def _consume_args(self) -> dict[str, Any] | None:
        return {"x-stream-offset": "first" if self._next is None else self._next}

    def _to_batch(self, taken: _Taken) -> Batch:
        batch = super()._to_batch(taken)
        self._next = taken.offsets[-1] + 1  # a reconnection goes on from here
        # A stream's acks are only the broker's credit (the offset is what is
        # committed): given as soon as a batch is handed out, so the consumer
        # is never starved while the engine holds commits back (checkpoints).
        # The prefetch still bounds what waits here, undelivered to the engine.
        link, tag = self._link, taken.tags[-1]
        if link is not None:
            link.post(lambda ch: ch.basic_ack(tag, multiple=True))
        return batch

    def _offsets(self, taken: _Taken) -> list[int]:
        return taken.offsets

    def _position(self, taken: _Taken) -> Position | None:
        return {self.queue: taken.offsets[-1] + 1}

    def _ack(self, taken: _Taken) -> Any:
        return _StreamAck(taken.offsets[-1] + 1)

    def commit(self, ack: _StreamAck) -> None:  # type: ignore[override]  # the stream's own token
        """Keep the position in the local file (the rows are durable whatever
        the connection does; the broker's credit was given at hand-out)."""
        write_json(self._checkpoint, {"offset": ack.offset})


@dataclass(frozen=True, slots=True)
class _StreamAck:
    """A stream batch's ack token: the offset after its last message."""

    offset: int


class _Records:
    """The messages of one batch, kept for dead letters and error messages."""

    def __init__(self, queue: str, taken: _Taken, *, stream: bool) -> None:
        self._queue = queue
        self._taken = taken
        self._stream = stream

    def __len__(self) -> int:
        return len(self._taken.tags)

    def _offset(self, index: int) -> int:
        return self._taken.offsets[index] if self._stream else self._taken.tags[index]

    def record(self, index: int) -> RawRecord:
        t = self._taken
        return RawRecord(
            self._queue,
            self._offset(index),
            t.stamps_ms[index],
            t.keys[index].encode(),
            t.bodies[index],
        )

    def where(self, index: int) -> str:
        if self._stream:
            return f"queue {self._queue} offset {self._offset(index)}"
        again = " (redelivered)" if self._taken.redelivered[index] else ""
        return f"queue {self._queue} delivery tag {self._taken.tags[index]}{again}"

    def span(self) -> str:
        what = "offsets" if self._stream else "delivery tags"
        return f"queue {self._queue} {what} {self._offset(0)}-{self._offset(len(self) - 1)}"


def build_source(spec: RabbitMQSourceSpec, ctx: Context) -> RabbitMQSource:
    """Registry hook: a stream queue reads from offsets, any other queue acks."""
    return RabbitMQStreamSource(spec, ctx) if spec.stream else RabbitMQSource(spec, ctx)
