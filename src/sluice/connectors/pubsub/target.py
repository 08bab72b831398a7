"""Pub/Sub target: rows published as messages, durable when every message id came back.

:meth:`PubSubTarget.write` only stages the rows (nothing is visible before
:meth:`PubSubTarget.flush`); ``flush`` encodes them in ``payload_format``
(:class:`~sluice.formats.encode.PayloadEncoder`: JSON by default, Arrow
kernels; Avro / Protobuf / JSON Schema through a schema registry with the
topic's short name as the subject's topic name), publishes them through the
client's batching publisher and waits for the message id of every one. A
failed publish raises (transient for the retryable gRPC codes): the engine
then writes the batch again (at least once). With ``ordering_key_column``
the publisher orders by key; after a failure it resumes publishing the keys
that failed, so the retry is accepted.
"""

from __future__ import annotations

import contextlib
import logging
from concurrent import futures
from typing import Any

import pyarrow as pa
import pyarrow.compute as pac

from sluice.connectors.pubsub import client as pc
from sluice.connectors.pubsub.source import RPC_TIMEOUT_S, path
from sluice.connectors.pubsub.spec import PubSubTarget as PubSubTargetSpec
from sluice.connectors.registry import Context
from sluice.errors import ConnectorError, TransientError
from sluice.formats.encode import PayloadEncoder

log = logging.getLogger(__name__)

#: Publisher batching: messages per publish request, bytes per request (the
#: service caps a request at 10 MB), and how long a partial request waits, s.
BATCH_MESSAGES = 1000
BATCH_BYTES = 9 << 20
BATCH_LATENCY_S = 0.01
#: Longest a flush waits for the message ids, seconds.
FLUSH_TIMEOUT_S = 120.0


class PubSubTarget:
    """Publishes to one topic; see the module docstring."""

    def __init__(self, spec: PubSubTargetSpec, ctx: Context, index: int) -> None:
        self.spec = spec
        self.topic = path("topics", spec.project_id, spec.topic)
        self.id = f"pubsub:{self.topic}"
        self._publisher: Any = None
        self._staged: list[pa.Table] = []
        self._encoder = PayloadEncoder(spec, spec.topic, self.id)

    def open(self) -> None:
        """Connect; create the topic when it is missing."""
        settings = pc.pubsub_v1.types.BatchSettings(
            max_messages=BATCH_MESSAGES, max_bytes=BATCH_BYTES, max_latency=BATCH_LATENCY_S
        )
        self._publisher = pc.publisher(
            self.spec, settings, ordered=self.spec.ordering_key_column is not None
        )
        try:
            self._publisher.get_topic(topic=self.topic, timeout=RPC_TIMEOUT_S)
        except pc.gexc.NotFound:
            with contextlib.suppress(pc.gexc.AlreadyExists):
                self._publisher.create_topic(name=self.topic, timeout=RPC_TIMEOUT_S)
        except pc.gexc.GoogleAPICallError as exc:
            raise TransientError(f"pubsub: reading topic {self.topic}: {exc}") from exc

    def write(self, data: pa.Table) -> None:
        """Stage ``data``; nothing is published before :meth:`flush`."""
        if data.num_rows:
            self._staged.append(data)

    def flush(self) -> None:
        """Publish every staged row; returns once each has its message id."""
        publisher = self._require()
        staged, self._staged = self._staged, []
        try:
            for data in staged:
                self._publish(publisher, data)
        except BaseException:
            self._staged = staged + self._staged  # the retry publishes them again
            raise

    def _publish(self, publisher: Any, data: pa.Table) -> None:
        messages = self._encoder.bodies(data)
        column = self.spec.ordering_key_column
        if column is not None:
            if column not in data.column_names:
                raise ConnectorError(
                    f"pubsub target {self.topic}: ordering_key_column {column!r} is not a "
                    f"column of the output ({', '.join(data.column_names)})"
                )
            keys = pac.cast(data[column], pa.string()).to_pylist()
            sent = [
                publisher.publish(self.topic, m, ordering_key=k or "")
                for m, k in zip(messages, keys, strict=True)
            ]
        else:
            keys = None
            sent = [publisher.publish(self.topic, m) for m in messages]
        _done, pending = futures.wait(sent, timeout=FLUSH_TIMEOUT_S)
        if pending:
            raise TransientError(
                f"pubsub target {self.topic}: {len(pending)} message(s) not acknowledged "
                f"by the service within {FLUSH_TIMEOUT_S:.0f} s"
            )
        failed = [(i, f.exception()) for i, f in enumerate(sent) if f.exception() is not None]
        if not failed:
            return
        if keys is not None:
            for key in {keys[i] or "" for i, _ in failed}:
                publisher.resume_publish(self.topic, key)
        first = failed[0][1]
        message = f"pubsub target {self.topic}: {len(failed)} message(s) failed: {first}"
        if isinstance(first, pc.gexc.GoogleAPICallError) and not isinstance(
            first,
            pc.gexc.ServiceUnavailable
            | pc.gexc.DeadlineExceeded
            | pc.gexc.InternalServerError
            | pc.gexc.Aborted
            | pc.gexc.ResourceExhausted
            | pc.gexc.Unknown,
        ):
            raise ConnectorError(message)
        raise TransientError(message)

    def close(self) -> None:
        """Drop the staged rows and the client."""
        self._staged = []
        publisher, self._publisher = self._publisher, None
        if publisher is None:
            return
        try:
            publisher.stop()
        except Exception as exc:  # already stopped / channel broken
            log.debug("pubsub target %s: stop: %s", self.topic, exc)

    def _require(self) -> Any:
        if self._publisher is None:
            raise ConnectorError(f"pubsub target {self.topic} is not open")
        return self._publisher


def build_target(spec: PubSubTargetSpec, ctx: Context, index: int) -> PubSubTarget:
    """Registry hook."""
    return PubSubTarget(spec, ctx, index)
