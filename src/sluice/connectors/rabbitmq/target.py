"""RabbitMQ target (pika): one message per row, published with confirms.

* :meth:`RabbitMQTarget.write` only stages the batch; :meth:`RabbitMQTarget.flush`
  encodes every staged row in ``payload_format``
  (:class:`~sluice.formats.encode.PayloadEncoder`: a JSON object by default,
  column at a time; Avro / Protobuf / JSON Schema through a schema registry
  with the queue as the subject's topic name), publishes them persistent (``delivery_mode = 2``) and
  ``mandatory`` to the default exchange with the queue as routing key, and
  returns once the broker confirmed every one of them. Nothing is visible
  before the flush.
* Confirms are asynchronous: the messages go out in chunks on the link's I/O
  thread while the broker's ``Basic.Ack`` s (often ``multiple``) come back,
  so a flush costs one round trip, not one per message.
* Durable = every message confirmed. A message the broker returns
  (unroutable: the queue is gone) raises :class:`~sluice.errors.ConnectorError`;
  a ``Basic.Nack`` (the broker could not take it), a lost connection or no
  confirm within :data:`CONFIRM_TIMEOUT_S` raise
  :class:`~sluice.errors.TransientError`, and the engine publishes the batch
  again on a new connection (at least once: a message confirmed before the
  failure is published twice).
* The queue is declared (durable, with ``queue_args``) on open, so a message
  routed to it is never dropped for want of a queue.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pyarrow as pa

from sluice.connectors.rabbitmq.link import Link
from sluice.connectors.rabbitmq.spec import RabbitMQTarget as RabbitMQTargetSpec
from sluice.connectors.registry import Context
from sluice.errors import ConnectorError, TransientError
from sluice.formats.encode import PayloadEncoder

log = logging.getLogger(__name__)

#: Longest wait for the broker to confirm a flush's messages, seconds.
CONFIRM_TIMEOUT_S = 120.0
#: Messages published per turn of the I/O loop: between turns the loop sends
#: what is queued and reads the confirms and heartbeats that came in.
_CHUNK = 2_000


class _Confirms:
    """Publisher confirms of one flush, counted as the broker sends them.

    Delivery tags of a confirm channel number the messages published on it
    from 1; a ``multiple`` ack or nack settles every tag up to its own.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.published = 0  # tags handed out on this channel so far
        self.floor = 0  # every tag <= floor is settled
        self.above: set[int] = set()  # tags > floor settled one by one
        self.target = 0  # the flush is done when floor reaches this (and above is empty)
        self.nacked = 0
        self.returned = 0
        self.returned_why = ""

    def on_confirm(self, frame: Any) -> None:
        """``Basic.Ack`` / ``Basic.Nack`` from the broker (I/O thread)."""
        method = frame.method
        nack = type(method).__name__ == "Nack"
        tag = int(method.delivery_tag)
        with self.cond:
            if method.multiple:
                settled = max(0, tag - self.floor - sum(1 for t in self.above if t <= tag))
                self.above = {t for t in self.above if t > tag}
                self.floor = max(self.floor, tag)
            else:
                settled = 1 if tag > self.floor and tag not in self.above else 0
                if tag > self.floor:
                    self.above.add(tag)
            # Tags settled one by one right above the floor join it (the
            # broker may nack 3-5 before it acks 1-2 with one multiple ack).
            while self.floor + 1 in self.above:
                self.above.discard(self.floor + 1)
                self.floor += 1
            if nack:
                self.nacked += settled
            self.cond.notify_all()

    def on_return(self, method: Any, props: Any, body: bytes) -> None:
        """A ``mandatory`` message the broker could not route (I/O thread).
        The broker sends the return before the message's ack."""
        with self.cond:
            self.returned += 1
            if not self.returned_why:
                self.returned_why = f"{method.reply_code} {method.reply_text}"

    def settled(self) -> bool:
        return self.floor >= self.target and not self.above


class Publisher:
    """A confirm channel that publishes messages and waits for their confirms.

    ``what`` names it in errors. Each message is ``(routing_key, body,
    properties)``, published ``mandatory`` to ``exchange``.
    """

    def __init__(self, url: str, name: str, what: str) -> None:
        self.url = url
        self.name = name
        self.what = what
        self._link: Link | None = None
        self._confirms = _Confirms()

    def open(self, declare: tuple[str, dict[str, Any]] | None = None) -> None:
        """Connect; with ``declare = (queue, queue_args)``, declare that queue (durable)."""
        self.close()
        confirms = _Confirms()
        link = Link(
            self.url,
            self.name,
            confirms=True,
            on_confirm=confirms.on_confirm,
            on_return=confirms.on_return,
        )
        link.open()
        try:
            if declare is not None:
                queue, args = declare[0], dict(declare[1]) or None
                link.call(
                    lambda ch, done: ch.queue_declare(
                        queue, durable=True, arguments=args, callback=done
                    ),
                    f"rabbitmq: declaring queue {queue}",
                )
        except BaseException:
            link.close()
            raise
        self._link, self._confirms = link, confirms

    def publish(self, exchange: str, messages: list[tuple[str, bytes, Any]]) -> None:
        """Publish ``messages`` and return once the broker confirmed every one.

        Raises :class:`ConnectorError` when the broker returned one
        (unroutable), :class:`TransientError` when it nacked one, the
        connection was lost or the confirms did not come in time.
        """
        if not messages:
            return
        link = self._link
        if link is None or not link.alive:
            raise TransientError(f"{self.what}: not connected")
        confirms = self._confirms
        with confirms.cond:
            first = confirms.published
            confirms.published += len(messages)
            confirms.target = confirms.published
            nacked, returned = confirms.nacked, confirms.returned
        link.post(lambda ch: _publish(link, ch, exchange, messages, 0))
        deadline = time.monotonic() + CONFIRM_TIMEOUT_S
        with confirms.cond:
            # Woken by each confirm; every 0.5 s at least, to notice a lost connection.
            while not confirms.settled() and link.alive and time.monotonic() < deadline:
                confirms.cond.wait(0.5)
            done = time.monotonic() < deadline
            nacked, returned = confirms.nacked - nacked, confirms.returned - returned
            why = confirms.returned_why
            confirms.returned_why = ""
        if not confirms.settled():
            failure = link.failure
            reason = f"connection lost: {failure}" if failure else "no confirm in time"
            late = "unconfirmed" if done else f"unconfirmed after {CONFIRM_TIMEOUT_S:.0f} s"
            raise TransientError(
                f"{self.what}: messages {first + 1}-{confirms.target} of this channel {late} "
                f"({reason}); publishing them again"
            )
        if returned:
            raise ConnectorError(
                f"{self.what}: the broker returned {returned} of {len(messages)} message(s) "
                f"as unroutable ({why})"
            )
        if nacked:
            raise TransientError(
                f"{self.what}: the broker refused (nacked) {nacked} of {len(messages)} message(s)"
            )

    def close(self) -> None:
        """Close the connection. Idempotent."""
        link, self._link = self._link, None
        if link is not None:
            link.close()


class RabbitMQTarget:
    """Publishes rows as messages to one queue, durable on flush."""

    def __init__(self, spec: RabbitMQTargetSpec, ctx: Context, index: int) -> None:
        self.spec = spec
        self.queue = spec.queue
        self.id = f"rabbitmq:{spec.queue}"
        self.pipeline = ctx.pipeline.pipeline_name
        name = f"sluice {self.pipeline} -> {spec.queue} (target {index})"
        self._publisher = Publisher(spec.amqp_url, name, self.id)
        self._staged: list[pa.Table] = []
        self._encoder = PayloadEncoder(spec, spec.queue, self.id)

    def open(self) -> None:
        """Connect with a confirm channel and declare the queue."""
        self._staged.clear()
        self._publisher.open((self.queue, self.spec.queue_args))

    def write(self, data: pa.Table) -> None:
        """Stage ``data`` for the next flush (nothing is sent yet)."""
        if data.num_rows:
            self._staged.append(data)

    def flush(self) -> None:
        """Publish every staged row and wait until the broker confirmed them all
        (an unroutable message: is the queue still there?)."""
        if not self._staged:
            return
        props = _properties(self._encoder.content_type)
        queue = self.queue
        bodies = [b for table in self._staged for b in self._encoder.bodies(table)]
        self._publisher.publish("", [(queue, body, props) for body in bodies])
        self._staged.clear()

    def close(self) -> None:
        """Drop what was staged and close the connection. Idempotent."""
        self._staged.clear()
        self._publisher.close()


def _properties(content_type: str) -> Any:
    import pika

    return pika.BasicProperties(content_type=content_type, delivery_mode=2)


def _publish(
    link: Link, ch: Any, exchange: str, messages: list[tuple[str, bytes, Any]], start: int
) -> None:
    """Publish ``messages[start:start + _CHUNK]`` (I/O thread), then the rest on a
    later turn of the loop, so confirms and heartbeats are read in between."""
    for key, body, props in messages[start : start + _CHUNK]:
        ch.basic_publish(exchange, key, body, props, mandatory=True)
    if start + _CHUNK < len(messages):
        link.post(lambda ch2: _publish(link, ch2, exchange, messages, start + _CHUNK))


def build_target(spec: RabbitMQTargetSpec, ctx: Context, index: int) -> RabbitMQTarget:
    """Registry hook."""
    return RabbitMQTarget(spec, ctx, index)
