"""Kafka source (confluent-kafka): consumer group, manual commits, bulk decode.

* ``enable.auto.commit`` is off; :meth:`KafkaSource.commit` synchronously
  commits ``offset + 1`` of the last row per partition.
* Partitions revoked during a read: their messages in that read are dropped
  (they were never written, so nothing is lost; the new owner reads them
  from the last commit). The engine reads one batch ahead, so the revoke
  callback first waits until the batch handed out before that read is
  committed: its offsets land before the partitions go.
* On assignment with a resume position (state store), partitions seek to it.
* Every assignment starts a new ``epoch``; batches carry the epoch they were
  read in. A window pipeline holds offsets back for the open windows, so it
  turns ``wait_on_revoke`` off (:meth:`KafkaSource.track`) and, after a
  rebalance, drops its windows and calls :meth:`KafkaSource.rewind` to read
  again from the committed offsets.
* Lag (:meth:`KafkaSource.lag`) is measured at the end of every read, from
  the broker's high watermark of its last fetch response (``cached=True``:
  an uncached query returns a wrong high watermark on tansu) and the next
  offset to read. ``enable.partition.eof`` is forced on: the end-of-partition
  event is what tells a partition that was never read from (empty, or read
  to the end by an earlier run) is caught up, as the consumer has no
  position for it.
* The source is :class:`~sluice.connectors.api.Seekable`,
  :class:`~sluice.connectors.api.Partitioned` and
  :class:`~sluice.connectors.api.Observable`; a batch's ack token is its
  position.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection, Sequence
from typing import Any, overload

import numpy as np
import pyarrow as pa

from sluice.connectors.api import Batch, Position, RawRecord
from sluice.connectors.kafka.spec import KafkaSource as KafkaSourceSpec
from sluice.connectors.registry import Context
from sluice.errors import ConnectorError, TransientError
from sluice.formats import HeaderAware, decoder_for, event_table
from sluice.formats.registry import RegistrySettings

try:
    import confluent_kafka as ck
except ModuleNotFoundError as exc:  # pragma: no cover - exercised without the extra
    raise ModuleNotFoundError("confluent_kafka", name="confluent_kafka") from exc

log = logging.getLogger(__name__)

#: Most messages one poll asks for (a batch is one or more polls).
_CHUNK = 10_000
_REVOKE_WAIT_S = 30.0  # longest a revoke waits for the batch in flight to be committed
# Commit failures that mean "you no longer own this partition": the rows were
# written, the new owner re-reads them (at least once), so they are not fatal.
_LOST_OWNERSHIP = {
    ck.KafkaError.REBALANCE_IN_PROGRESS,
    ck.KafkaError.ILLEGAL_GENERATION,
    ck.KafkaError.UNKNOWN_MEMBER_ID,
    ck.KafkaError._NO_OFFSET,
    ck.KafkaError._STATE,
}


def client_config(spec: KafkaSourceSpec | Any) -> dict[str, Any]:
    """librdkafka connection / security properties from a Kafka spec."""
    conf: dict[str, Any] = {"bootstrap.servers": spec.bootstrap_servers}
    if spec.security_protocol:
        conf["security.protocol"] = spec.security_protocol.upper()
    if spec.sasl_mechanism:
        conf["sasl.mechanism"] = spec.sasl_mechanism
    if spec.sasl_plain_username:
        conf["sasl.username"] = spec.sasl_plain_username
        conf["sasl.password"] = spec.sasl_plain_password or ""
    if getattr(spec, "sasl_scram_username", None):
        conf["sasl.mechanism"] = "SCRAM-" + (spec.sasl_scram_mechanism or "sha-512").upper()
        conf["sasl.username"] = spec.sasl_scram_username
        conf["sasl.password"] = spec.sasl_scram_password or ""
        conf.setdefault("security.protocol", "SASL_SSL")
    for key, prop in (
        ("ssl_ca_location", "ssl.ca.location"),
        ("ssl_certificate_location", "ssl.certificate.location"),
        ("ssl_key_location", "ssl.key.location"),
        ("ssl_key_password", "ssl.key.password"),
    ):
        value = getattr(spec, key, None)
        if value:
            conf[prop] = value
    if getattr(spec, "msk_iam_region", None):
        raise ConnectorError("msk_iam_region (MSK IAM auth) is not supported yet by sluice")
    return conf


def registry_settings(spec: Any) -> RegistrySettings | None:
    """The schema registry a Kafka spec names, if any."""
    if not spec.schema_registry_url:
        return None
    return RegistrySettings(
        spec.schema_registry_url,
        spec.schema_registry_basic_auth_user,
        spec.schema_registry_basic_auth_password,
    )


def partition_key(topic: str, partition: int) -> str:
    """The position key of one partition: ``topic:partition``."""
    return f"{topic}:{partition}"


#: How the consumer fetches (the benchmarks' floor uses the same).
#: Prefetch (the read-ahead librdkafka does) bounded by bytes. Measured on 1M
#: events (benchmarks/results/kafka_to_postgres-ab-*): its defaults (64 MiB,
#: 1M messages) held ~150 MB more than these, for no more throughput; below
#: them a fetch that finds the queue full backs off for fetch.queue.backoff.ms
#: (1 s by default, which halved the throughput: 20 ms here). A broker
#: answers a fetch with nothing new after fetch.wait.max.ms (librdkafka:
#: 500 ms, which a slow stream's rows then wait).
FETCHING: dict[str, int] = {
    "queued.min.messages": 50_000,
    "queued.max.messages.kbytes": 8 << 10,
    "max.partition.fetch.bytes": 2 << 20,
    "fetch.max.bytes": 8 << 20,
    "fetch.queue.backoff.ms": 20,
    "fetch.wait.max.ms": 50,
}


#: ``max_batch_bytes`` when unset. Measured on 1M events
#: (benchmarks/results/kafka_to_postgres-ab-2026-12-07.md): the append at 4 MiB
#: read as fast as at 8 MiB for ~30 MB less and less CPU; a tumbling window
#: and a join read 6-15 % slower at 4 MiB (more rounds, each merging into the
#: open windows or buffers, a join's each with a checkpoint), so they keep 8.
BATCH_BYTES = 4 << 20
STATEFUL_BATCH_BYTES = 8 << 20


class KafkaSource:
    """Reads one or more topics (comma-separated query) through a consumer group."""

    def __init__(self, spec: KafkaSourceSpec, ctx: Context) -> None:
        self.spec = spec
        query = ctx.pipeline.query_of(spec)
        self.id = query
        self.topics = [t.strip() for t in query.split(",") if t.strip()]
        self.group_id = spec.reader_group(ctx.pipeline.pipeline_name)
        self._consumer: ck.Consumer | None = None
        cdc = ctx.pipeline.transform.cdc if ctx.pipeline.transform else None
        self._decoder = decoder_for(
            spec.payload_format,
            cdc,
            ctx.pipeline.pipeline_name,
            registry_settings(spec),
            validate=spec.json_schema_validation,
        )
        self._resume: Position = {}
        self._assigned: set[str] = set()
        self._revoked: set[str] = set()
        self._assignment: tuple[str, ...] = ()  # sorted snapshot of _assigned, for other threads
        self._next: dict[str, int] = {}  # next offset to read, per assigned partition, when known
        self._lag: dict[str, int] = {}  # replaced whole at the end of each read
        self.connected = False
        # Batches handed out and not yet committed (the engine reads one ahead).
        self._in_flight = 0
        self._settled = threading.Condition()
        self.wait_on_revoke = True  # off when offsets are held back (windows)
        self.track_partitions = False  # name each row's partition (per-partition watermarks)
        self.epoch = 0  # partition assignments so far
        # Mean value size of the last poll (bytes): how many messages the next
        # poll may ask for within max_batch_bytes. A guess before the first.
        self._mean_bytes = 1024
        # Watermark alignment: the partitions the engine wants paused (set
        # whole from its thread), and those paused on the consumer (reading
        # thread only).
        self._want_paused: frozenset[str] = frozenset()
        self._paused: set[str] = set()

    # -- lifecycle --------------------------------------------------------

    def open(self, resume: Position | None) -> None:
        """Join the consumer group; with ``resume``, seek assigned partitions there."""
        self._resume = dict(resume or {})
        session_ms = self.spec.session_timeout_ms
        conf = client_config(self.spec)
        conf.update(
            {
                "group.id": self.group_id,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": self.spec.auto_offset_reset,
                "session.timeout.ms": session_ms,
                "heartbeat.interval.ms": max(100, session_ms // 4),
                **FETCHING,
                # librdkafka logs through Python logging only on errors.
                "log_level": 3,
            }
        )
        conf.update(self.spec.librdkafka)
        # After the user's properties on purpose: without end-of-partition
        # events a partition never read from could not be told caught up, and
        # would hold the watermark forever (see lag()).
        conf["enable.partition.eof"] = True
        self._consumer = ck.Consumer(conf, logger=log)
        self._consumer.subscribe(
            self.topics,
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )

    def close(self) -> None:
        """Leave the group (partitions move to the other members at once)."""
        consumer, self._consumer = self._consumer, None
        self.connected = False
        self.release_in_flight()  # nothing handed out will be committed now: a revoke must not wait
        if consumer is not None:
            try:
                consumer.close()
            except (ck.KafkaException, RuntimeError) as exc:  # already closed / broker gone
                log.debug("closing consumer: %s", exc)

    # -- rebalance callbacks (run inside consume(), on the reading thread) --

    def _on_assign(self, consumer: ck.Consumer, partitions: list[ck.TopicPartition]) -> None:
        for tp in partitions:
            key = partition_key(tp.topic, tp.partition)
            self._assigned.add(key)
            self._revoked.discard(key)
            stored = self._resume.get(key)
            self._next.pop(key, None)
            if isinstance(stored, int):
                tp.offset = stored
                self._next[key] = stored
        consumer.assign(partitions)
        stale = [tp for tp in partitions if partition_key(tp.topic, tp.partition) in self._paused]
        if stale:  # a fresh assignment starts fetching; align() pauses it again if need be
            consumer.resume(stale)
            self._paused -= {partition_key(tp.topic, tp.partition) for tp in stale}
        self._assignment = tuple(sorted(self._assigned))
        self.epoch += 1
        self.connected = True

    def _on_revoke(self, consumer: ck.Consumer, partitions: list[ck.TopicPartition]) -> None:
        # The engine reads the next batch while the previous one is written:
        # hold the partitions until that batch is committed, so its offsets
        # land before another member takes over (its rows are then not
        # re-delivered). Bounded: a batch stuck on a down target gives up the
        # partitions after _REVOKE_WAIT_S and is re-delivered to the new owner.
        with self._settled:
            if self.wait_on_revoke and not self._settled.wait_for(
                lambda: self._in_flight == 0, _REVOKE_WAIT_S
            ):
                log.warning("kafka %s: giving up partitions with a batch still in flight", self.id)
        for tp in partitions:
            key = partition_key(tp.topic, tp.partition)
            self._assigned.discard(key)
            self._revoked.add(key)
            self._next.pop(key, None)
            self._paused.discard(key)
        self._assignment = tuple(sorted(self._assigned))
        self._lag = {k: v for k, v in self._lag.items() if k in self._assigned}
        consumer.unassign()

    # -- reading ------------------------------------------------------------

    def read(self, timeout_s: float) -> Batch | None:
        """Up to ``max_batch_rows`` messages within ``timeout_s`` (at most ``max_batch_wait_ms``)."""
        consumer, good = self._fetch(timeout_s)
        batch = self._to_batch(good, consumer) if good else None
        # After the batch: the lag then agrees with what was handed out.
        self._measure_lag(consumer)
        if batch is None:
            return None
        with self._settled:
            self._in_flight += 1
        return batch

    def read_topics(self, timeout_s: float, decoders: dict[str, Any]) -> list[Batch]:
        """Like :meth:`read`, one batch per topic that delivered, each with
        its topic as source id, decoded by ``decoders[topic]`` (several
        sources read through this one consumer, see ``shared.py``)."""
        consumer, good = self._fetch(timeout_s)
        by_topic: dict[str, list[Any]] = {}
        for m in good:
            by_topic.setdefault(m.topic() or "", []).append(m)
        batches = [
            self._to_batch(msgs, consumer, topic, decoders[topic])
            for topic, msgs in by_topic.items()
        ]
        self._measure_lag(consumer)
        with self._settled:
            self._in_flight += len(batches)
        return batches

    def _fetch(self, timeout_s: float) -> tuple[ck.Consumer, list[Any]]:
        """The messages of one consume call, without errors and revoked partitions."""
        consumer = self._require()
        self._revoked.clear()
        if self._want_paused & self._assigned != self._paused:
            self._apply_pauses(consumer)
        try:
            msgs = self._consume(consumer, min(timeout_s, self.spec.max_batch_wait_ms / 1000))
        except ck.KafkaException as exc:
            raise TransientError(f"kafka consume from {self.id}: {exc}") from exc
        good = msgs
        failed = [m for m in msgs if m.error() is not None]  # rare: one C call per message
        if failed:
            for m in failed:
                err = m.error()
                if err is None:
                    continue
                if err.fatal():
                    raise ConnectorError(f"kafka {self.id}: fatal error: {err.str()}")
                if err.code() == ck.KafkaError._PARTITION_EOF:
                    # Read up to the end: the event's offset is the next one to read.
                    key = partition_key(m.topic() or "", m.partition() or 0)
                    if key in self._assigned and (m.offset() or 0) >= 0:
                        self._next[key] = int(m.offset() or 0)
                else:
                    log.warning("kafka %s: %s", self.id, err.str())
            good = [m for m in msgs if m.error() is None]
        if self._revoked:
            good = [
                m
                for m in good
                if partition_key(m.topic() or "", m.partition() or 0) in self._assigned
            ]
        return consumer, good

    def _consume(self, consumer: ck.Consumer, wait_s: float) -> list[Any]:
        """The messages of one batch (errors and end-of-partition events included).

        Adaptive: the batch is handed on when it holds ``max_batch_rows``
        messages or ``max_batch_bytes`` of values; when a poll of
        ``batch_linger_ms`` brought fewer messages than it asked for (the
        stream is not backlogged: what is here waits no longer); or after
        ``wait_s``. A backlog therefore reads full batches at once, a slow
        stream's rows wait about ``batch_linger_ms``. A poll asks for at most
        :data:`_CHUNK` messages and for no more than the bytes left at the
        values' mean size so far, so a batch ends near ``max_batch_bytes``.
        """
        spec = self.spec
        rows, max_bytes = spec.max_batch_rows, spec.max_batch_bytes
        if max_bytes is None:  # the stages' default (track_partitions: a window or join)
            max_bytes = STATEFUL_BATCH_BYTES if self.track_partitions else BATCH_BYTES
        linger = spec.batch_linger_ms / 1000
        deadline = time.monotonic() + wait_s
        msgs: list[Any] = []
        size = 0
        data = False  # a message among msgs (not only end-of-partition events)
        while True:
            ask = min(rows - len(msgs), _CHUNK, -(-(max_bytes - size) // self._mean_bytes))
            left = deadline - time.monotonic()
            got = consumer.consume(num_messages=ask, timeout=max(0.0, min(linger, left)))
            if got:
                msgs += got
                got_bytes = sum(map(len, got))  # len(message): its value's bytes
                size += got_bytes
                self._mean_bytes = max(1, (got_bytes + len(got) - 1) // len(got))
            if len(msgs) >= rows or size >= max_bytes or left <= linger:
                return msgs
            if len(got) == ask:
                data = True
            elif data or any(m.error() is None for m in got):
                return msgs

    def align(self, paused: Collection[str]) -> None:
        """See :meth:`sluice.connectors.api.Alignable.align`. librdkafka drops
        what it prefetched of a paused partition and, on resume, fetches from
        the offset after the last message it handed out."""
        self._want_paused = frozenset(paused)

    def _apply_pauses(self, consumer: ck.Consumer) -> None:
        want = self._want_paused & self._assigned
        pause = sorted(want - self._paused)
        resume = sorted(self._paused - want)
        try:
            if pause:
                consumer.pause([ck.TopicPartition(*_split(k)) for k in pause])
            if resume:
                consumer.resume([ck.TopicPartition(*_split(k)) for k in resume])
        except ck.KafkaException as exc:
            raise TransientError(f"kafka {self.id}: pause / resume: {exc}") from exc
        self._paused = set(want)
        log.debug("kafka %s: paused %s, resumed %s", self.id, pause, resume)

    def partition_counts(self, timeout_s: float = 30) -> dict[str, int]:
        """The number of partitions of each topic this source reads (broker metadata)."""
        consumer = self._require()
        try:
            meta = consumer.list_topics(timeout=timeout_s)
        except ck.KafkaException as exc:
            raise TransientError(f"kafka {self.id}: reading topic metadata: {exc}") from exc
        missing = [t for t in self.topics if t not in meta.topics or meta.topics[t].error]
        if missing:
            raise ConnectorError(f"kafka {self.id}: no such topic: {', '.join(missing)}")
        return {t: len(meta.topics[t].partitions) for t in self.topics}

    def assignment(self) -> tuple[str, ...]:
        """See :meth:`sluice.connectors.api.Partitioned.assignment`."""
        return self._assignment

    def track(self, *, row_partitions: bool, wait_on_revoke: bool) -> None:
        """See :meth:`sluice.connectors.api.Partitioned.track`."""
        self.track_partitions = row_partitions
        self.wait_on_revoke = wait_on_revoke

    def release_in_flight(self) -> None:
        """The engine will not commit the batches handed out (it is stopping)."""
        with self._settled:
            self._in_flight = 0
            self._settled.notify_all()

    def _to_batch(
        self,
        msgs: list[Any],
        consumer: ck.Consumer,
        topic: str | None = None,
        decoder: Any = None,
    ) -> Batch:
        """``msgs`` as a batch of this source (``topic``: of that topic only,
        decoded by ``decoder``, with the topic as source id)."""
        # Per-message work here is what bounds the source: one pass for the
        # timestamps, one for the values; positions come from the consumer.
        position = self._positions(consumer, msgs)
        assigned = sorted(self._assigned)
        if topic is not None:
            prefix = f"{topic}:"
            position = {k: v for k, v in position.items() if k.startswith(prefix)}
            assigned = [k for k in assigned if k.startswith(prefix)]
        for key, offset in position.items():
            if isinstance(offset, int):
                self._next[key] = offset
        # A list comprehension, then one array: ~20 % less than np.fromiter
        # over a generator (0.15 against 0.19 CPU-s per 1M messages).
        ts_ms = np.array([m.timestamp()[1] for m in msgs], dtype=np.int64)
        values = [m.value() for m in msgs]
        dec = decoder or self._decoder
        if isinstance(dec, HeaderAware):  # a schema id may be in a header
            decoded = dec.decode_with_headers(values, [m.headers() for m in msgs])
        else:
            decoded = dec.decode(values, _Offsets(msgs))
        table = event_table(decoded, ts_ms * 1000)
        rows, bad = decoded.rows, tuple(decoded.bad)
        row_partitions = self._row_partitions(msgs, topic) if self.track_partitions else None
        if rows is not None and row_partitions is not None:
            row_partitions = row_partitions.take(pa.array(rows, pa.int64()))
        return Batch(
            self.id if topic is None else topic,
            table,
            position,
            position=position,
            raw_count=len(msgs),
            partitions=tuple(assigned),
            raw=_Records(msgs),
            bad=bad,
            rows=None if rows is None else tuple(rows),
            epoch=self.epoch,
            row_partitions=row_partitions,
        )

    def _row_partitions(self, msgs: list[Any], topic: str | None = None) -> pa.Array:
        """The ``topic:partition`` of every message (all of ``topic`` when
        given), dictionary-encoded."""
        if topic is not None or len(self.topics) == 1:
            name = topic if topic is not None else self.topics[0]
            parts = np.array([m.partition() for m in msgs], dtype=np.int32)
            top = int(parts.max()) if len(parts) else 0
            names = pa.array([partition_key(name, p) for p in range(top + 1)])
            return pa.DictionaryArray.from_arrays(pa.array(parts), names)
        keys = [partition_key(m.topic() or "", m.partition() or 0) for m in msgs]
        return pa.array(keys).dictionary_encode()

    def _positions(self, consumer: ck.Consumer, msgs: list[Any]) -> Position:
        """Next offset to read per assigned partition, right after ``msgs`` were consumed.

        The consumer's own position (last message handed to us + 1) is one C
        call per batch; it covers every message of ``msgs`` (they come from
        assigned partitions only). Falls back to scanning the messages.
        """
        tps = [ck.TopicPartition(*_split(k)) for k in self._assigned]
        try:
            current = consumer.position(tps)
        except ck.KafkaException:
            current = []
        position: Position = {
            partition_key(tp.topic, tp.partition): tp.offset for tp in current if tp.offset >= 0
        }
        if not position:
            # Offsets rise within a partition: the last one seen is the newest.
            last = {(m.topic(), m.partition()): m.offset() for m in msgs}
            position = {partition_key(t, p): o + 1 for (t, p), o in last.items()}
        return position

    def rewind(self, positions: Position | None = None, topics: Collection[str] = ()) -> None:
        """Read every assigned partition again from ``positions`` (a state
        store's checkpoint; from now on also where a new assignment starts),
        else from its committed offset.

        Partitions in neither go to ``auto_offset_reset``. Messages already
        fetched past that point are discarded by the consumer.
        """
        consumer = self._require()
        if self._paused:  # fetch from the seek; align() pauses again if need be
            consumer.resume([ck.TopicPartition(*_split(k)) for k in sorted(self._paused)])
            self._paused.clear()
            self._want_paused = frozenset()
        keys = sorted(self._assigned)
        if topics:  # only these topics' partitions (one of several sources sharing the consumer)
            keys = [k for k in keys if _split(k)[0] in topics]
            self._resume = {k: v for k, v in self._resume.items() if _split(k)[0] not in topics}
            self._resume.update(positions or {})
        elif positions is not None:
            self._resume = dict(positions)
        tps = [ck.TopicPartition(*_split(k)) for k in keys]
        if not tps:
            return
        try:
            committed = consumer.committed(tps, timeout=30)
        except ck.KafkaException as exc:
            raise TransientError(f"kafka {self.id}: reading committed offsets: {exc}") from exc
        reset = ck.OFFSET_BEGINNING if self.spec.auto_offset_reset == "earliest" else ck.OFFSET_END
        for tp in committed:
            stored = self._resume.get(partition_key(tp.topic, tp.partition))
            offset = stored if isinstance(stored, int) else tp.offset
            key = partition_key(tp.topic, tp.partition)
            if offset >= 0:
                self._next[key] = offset
            else:
                self._next.pop(key, None)  # known again at the first message or end event
            target = ck.TopicPartition(tp.topic, tp.partition, offset if offset >= 0 else reset)
            try:
                consumer.seek(target)
            except ck.KafkaException as exc:
                raise TransientError(
                    f"kafka {self.id}: seek {tp.topic}:{tp.partition}: {exc}"
                ) from exc

    # -- committing ------------------------------------------------------------

    def commit(self, position: Position) -> None:
        """Synchronously commit ``position`` (a batch's ack token) for the
        partitions still assigned."""
        try:
            self._commit(position)
        finally:
            with self._settled:
                self._in_flight = max(0, self._in_flight - 1)
                self._settled.notify_all()

    def _commit(self, position: Position) -> None:
        consumer = self._require()
        offsets = []
        for key, offset in position.items():
            if key not in self._assigned or not isinstance(offset, int):
                continue
            topic, _, part = key.rpartition(":")
            offsets.append(ck.TopicPartition(topic, int(part), offset))
        if not offsets:
            return
        try:
            consumer.commit(offsets=offsets, asynchronous=False)
        except ck.KafkaException as exc:
            err = exc.args[0] if exc.args else None
            code = err.code() if isinstance(err, ck.KafkaError) else None
            if code in _LOST_OWNERSHIP:
                log.warning("kafka %s: commit skipped, partitions moved: %s", self.id, exc)
                return
            raise TransientError(f"kafka commit to {self.id}: {exc}") from exc

    # -- observability -------------------------------------------------------

    def lag(self) -> dict[str, int]:
        """See :meth:`sluice.connectors.api.Observable.lag`: messages behind
        the high watermark of the last fetch response, per assigned partition
        the broker answered for."""
        return self._lag

    def _measure_lag(self, consumer: ck.Consumer) -> None:
        """Lag per assigned partition, right after a read: high watermark of
        the broker's last fetch response (cached, no round trip) minus the
        next offset to read. A partition nothing was read from yet counts
        from the log start, an upper bound, until its first message or its
        end-of-partition event says where it stands."""
        lag: dict[str, int] = {}
        for key in self._assignment:
            tp = ck.TopicPartition(*_split(key))
            try:
                low, high = consumer.get_watermark_offsets(tp, cached=True)
            except ck.KafkaException:
                continue
            if high < 0:
                continue  # the broker has not answered for it yet: unmeasured
            start = self._next.get(key, low)
            if start >= 0:
                lag[key] = max(0, high - start)
        self._lag = lag  # one assignment: other threads see the old or the new dict

    def _require(self) -> ck.Consumer:
        if self._consumer is None:
            raise ConnectorError(f"kafka source {self.id} is not open")
        return self._consumer


class _Offsets(Sequence[int]):
    """The offsets of a batch's messages, read from them when first asked
    for: only CDC's decoder uses them (0.05 CPU-s per 1M messages saved for
    every other format)."""

    def __init__(self, msgs: list[Any]) -> None:
        self._msgs = msgs
        self._offsets: list[int] | None = None

    def _all(self) -> list[int]:
        if self._offsets is None:
            self._offsets = [m.offset() for m in self._msgs]
        return self._offsets

    def __len__(self) -> int:
        return len(self._msgs)

    @overload
    def __getitem__(self, index: int) -> int: ...

    @overload
    def __getitem__(self, index: slice) -> list[int]: ...

    def __getitem__(self, index: int | slice) -> int | list[int]:
        return self._all()[index]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray[Any, Any]:
        return np.asarray(self._all(), dtype=dtype)


class _Records:
    """The messages of one batch, kept for dead letters and error messages."""

    def __init__(self, msgs: list[Any]) -> None:
        self._msgs = msgs

    def __len__(self) -> int:
        return len(self._msgs)

    def record(self, index: int) -> RawRecord:
        msg = self._msgs[index]
        ts = msg.timestamp()[1]
        return RawRecord(
            partition_key(msg.topic(), msg.partition()),
            msg.offset(),
            ts if ts >= 0 else None,
            msg.key(),
            msg.value(),
        )

    def where(self, index: int) -> str:
        msg = self._msgs[index]
        return f"topic {msg.topic()} partition {msg.partition()} offset {msg.offset()}"

    def span(self) -> str:
        ranges: dict[tuple[str, int], list[int]] = {}
        for msg in self._msgs:
            offset = msg.offset()
            r = ranges.setdefault((msg.topic(), msg.partition()), [offset, offset])
            r[0], r[1] = min(r[0], offset), max(r[1], offset)
        return ", ".join(
            f"topic {t} partition {p} offsets {lo}-{hi}"
            for (t, p), (lo, hi) in sorted(ranges.items())
        )


def _split(key: str) -> tuple[str, int]:
    topic, _, part = key.rpartition(":")
    return topic, int(part)


def build_source(spec: KafkaSourceSpec, ctx: Context) -> KafkaSource:
    """Registry hook."""
    return KafkaSource(spec, ctx)
