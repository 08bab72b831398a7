"""Several Kafka sources of one pipeline read through one consumer.

A pipeline run as replicas (``replicas = true``) with a join or a window
over several topics needs partition ``p`` of every topic on the same
replica: the join matches ``orders:p`` with ``payments:p``. Separate
consumers in one group are balanced per topic independently, so one consumer
subscribes to every topic, with the ``range`` assignor, which gives the same
partition numbers of same-sized topics to the same member.

:class:`TopicView` is one source (one topic) of that consumer: a read takes
its topic's batch of the last consume call, or makes one (the other topics'
batches wait for their views); positions, rewinds, assignment and lag are the
topic's share. The views of one consumer are read from threads at once: a
lock makes one consume call at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Sequence
from typing import Any

import msgspec

from sluice.connectors.api import Ack, Batch, Position
from sluice.connectors.kafka.source import KafkaSource, registry_settings
from sluice.connectors.kafka.spec import KafkaSource as KafkaSourceSpec
from sluice.connectors.registry import Context
from sluice.errors import ConnectorError
from sluice.formats import decoder_for


class SharedConsumer:
    """One consumer over the topics of several sources (see the module docstring)."""

    def __init__(self, specs: Sequence[KafkaSourceSpec], ctx: Context) -> None:
        pipeline = ctx.pipeline
        topics = [pipeline.query_of(s) for s in specs]
        first = specs[0]
        librdkafka = {"partition.assignment.strategy": "range", **first.librdkafka}
        merged = msgspec.structs.replace(first, librdkafka=librdkafka)
        self.topics = topics
        self.kafka = KafkaSource(merged, _Ctx(ctx, ",".join(topics)))  # type: ignore[arg-type]
        cdc = pipeline.transform.cdc if pipeline.transform else None
        self._decoders = {
            t: decoder_for(
                s.payload_format,
                cdc,
                pipeline.pipeline_name,
                registry_settings(s),
                validate=s.json_schema_validation,
            )
            for t, s in zip(topics, specs, strict=True)
        }
        self._lock = threading.Lock()
        self._pending: dict[str, list[Batch]] = {t: [] for t in topics}
        self._resume: Position = {}
        self._opened: set[str] = set()
        self._open = False
        self.paused: dict[str, frozenset[str]] = {}  # per topic: what its view wants paused

    def open(self, topic: str, resume: Position | None) -> None:
        """Open the consumer once every view opened (each brings its topic's positions)."""
        with self._lock:
            self._resume.update(resume or {})
            self._opened.add(topic)
            if not self._open and self._opened >= set(self.topics):
                self.kafka.open(self._resume)
                self._open = True
                self._check_partitions()

    def _check_partitions(self) -> None:
        """The topics must have one partition count: partition p of each is
        matched with partition p of the others (co-partitioned)."""
        counts = self.kafka.partition_counts()
        if len(set(counts.values())) > 1:
            shown = ", ".join(f"{t}: {n}" for t, n in sorted(counts.items()))
            raise ConnectorError(
                "replicas = true reads these topics as co-partitioned (partition p of each "
                f"on the same replica), so they need the same partition count; got {shown}"
            )

    def read(self, topic: str, timeout_s: float) -> Batch | None:
        with self._lock:
            if not self._open:
                return None
            if not self._pending[topic]:
                for b in self.kafka.read_topics(timeout_s, self._decoders):
                    self._pending[b.source_id].append(b)
            queue = self._pending[topic]
            return queue.pop(0) if queue else None

    def rewind(self, topic: str, positions: Position | None) -> None:
        with self._lock:
            self._pending[topic] = []
            self.kafka.rewind(positions or {}, topics=(topic,))

    def close(self, topic: str) -> None:
        with self._lock:
            self._opened.discard(topic)
            self._pending[topic] = []
            if self._open and not self._opened:
                self.kafka.close()
                self._open = False


class TopicView:
    """One source of a :class:`SharedConsumer`: the batches of one topic."""

    def __init__(self, shared: SharedConsumer, topic: str) -> None:
        self._shared = shared
        self.id = topic
        self.spec = shared.kafka.spec

    @property
    def epoch(self) -> int:
        return self._shared.kafka.epoch

    @property
    def connected(self) -> bool:
        return self._shared.kafka.connected

    def open(self, resume: Position | None) -> None:
        self._shared.open(self.id, resume)

    def read(self, timeout_s: float) -> Batch | None:
        return self._shared.read(self.id, timeout_s)

    def commit(self, ack: Ack) -> None:
        self._shared.kafka.commit(ack)

    def close(self) -> None:
        self._shared.close(self.id)

    def rewind(self, position: Position | None) -> None:
        self._shared.rewind(self.id, position)

    def assignment(self) -> tuple[str, ...]:
        prefix = f"{self.id}:"
        return tuple(k for k in self._shared.kafka.assignment() if k.startswith(prefix))

    def track(self, *, row_partitions: bool, wait_on_revoke: bool) -> None:
        self._shared.kafka.track(row_partitions=row_partitions, wait_on_revoke=wait_on_revoke)

    def release_in_flight(self) -> None:
        self._shared.kafka.release_in_flight()

    def align(self, paused: Collection[str]) -> None:
        """Pause ``paused`` of this topic; the other topics' choices stay."""
        self._shared.paused[self.id] = frozenset(paused)
        self._shared.kafka.align(frozenset().union(*self._shared.paused.values()))

    def lag(self) -> dict[str, int]:
        prefix = f"{self.id}:"
        return {k: v for k, v in self._shared.kafka.lag().items() if k.startswith(prefix)}


class _Ctx:
    """A :class:`Context` whose pipeline answers ``query_of`` with the topics."""

    def __init__(self, ctx: Context, query: str) -> None:
        self.pipeline = _Pipeline(ctx.pipeline, query)
        self.source_id = query


class _Pipeline:
    def __init__(self, pipeline: Any, query: str) -> None:
        self._pipeline = pipeline
        self._query = query

    def query_of(self, spec: Any) -> str:
        return self._query

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipeline, name)


def build_sources(specs: Sequence[KafkaSourceSpec], ctx: Context) -> list[TopicView]:
    """One view per spec, all reading through one consumer."""
    shared = SharedConsumer(specs, ctx)
    return [TopicView(shared, t) for t in shared.topics]
