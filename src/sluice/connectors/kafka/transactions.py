"""Exactly-once Kafka → Kafka (``delivery = "exactly_once"``): the target's
transactions carry the source offsets.

:class:`TransactionalKafkaTarget` is a
:class:`~sluice.connectors.sql.positions.RecordsPositions` target, so it
fits the stateless exactly-once policy
(:class:`~sluice.engine.commit.Immediate`) like the SQL and Delta targets:

* **Positions are the consumer group's committed offsets.** The policy
  stages the positions after a round (:meth:`stage_positions`); the round's
  :meth:`flush` is one transaction: ``begin_transaction``, every row
  produced, ``send_offsets_to_transaction`` (each source's offsets, for its
  consumer group), ``commit_transaction``. Rows and offsets become visible
  together or not at all; a round without rows commits its offsets alone.
  The sources do not commit again (:attr:`commits_source_positions`): their
  offsets went in the transaction.
* **On start** (and after a rebalance or an abort) :meth:`held_positions`
  reads the group's committed offsets (``isolation.level=read_committed``,
  so librdkafka asks for stable offsets: none of a transaction still being
  decided); the sources resume there.
* **transactional.id** is stable across restarts:
  ``sluice.<pipeline>.<group(s)>.<topic>`` (or ``librdkafka =
  {"transactional.id" = ...}``). :meth:`open` calls ``init_transactions``,
  which fences any earlier producer with that id and aborts the transaction
  it left open: a process SIGKILLed mid-transaction leaves rows no
  ``read_committed`` consumer ever sees, and offsets that never moved.
* **Abortable errors** (``txn_requires_abort``, an undelivered message, a
  commit that timed out): the transaction is aborted and
  :class:`TransactionAborted` (a
  :class:`~sluice.errors.PositionsMoved`) makes the run loop read again
  from the committed offsets (after a backoff, 0.1 s doubling to 5 s while
  aborts follow each other). The same batch is never simply produced
  again: a commit whose answer was lost may have landed, and only the
  committed offsets say. When the abort itself fails, the next
  :meth:`held_positions` first makes a new producer, whose
  ``init_transactions`` settles the transaction at the coordinator. A
  message ``produce()`` refuses (too large) fails the run, as with the
  plain target, after an abort.
* **A fenced producer** (``_FENCED`` / ``PRODUCER_FENCED``: another process
  with the same transactional.id started) raises
  :class:`~sluice.errors.Fenced`: the process stops with that message,
  without restarting.

Consumer group metadata: a consumer of the target's own, not a member of the
group (generation -1), gives ``send_offsets_to_transaction`` its group; the
brokers accept such offsets without a generation check. Zombie fencing is
therefore by transactional.id alone (one process per pipeline: ``replicas``
is refused with ``exactly_once``), not by group generation (KIP-447).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from sluice.connectors.api import Position
from sluice.connectors.kafka.spec import KafkaSource as KafkaSourceSpec
from sluice.connectors.kafka.spec import KafkaTarget as KafkaTargetSpec
from sluice.connectors.kafka.target import FLUSH_TIMEOUT_S, KafkaTarget
from sluice.connectors.registry import Context
from sluice.errors import ConnectorError, Fenced, PositionsMoved, TransientError

try:
    import confluent_kafka as ck
except ModuleNotFoundError as exc:  # pragma: no cover - exercised without the extra
    raise ModuleNotFoundError("confluent_kafka", name="confluent_kafka") from exc

log = logging.getLogger(__name__)

TXN_TIMEOUT_S = 10.0  # longest one transactional call (init, offsets, commit, abort) waits
ABORT_BACKOFF_S = 0.1  # wait before reading again after an abort, doubling per abort in a row
MAX_ABORT_BACKOFF_S = 5.0
_FENCED = {ck.KafkaError._FENCED, ck.KafkaError.PRODUCER_FENCED}


class TransactionAborted(PositionsMoved):
    """The round's transaction was aborted: nothing of it is visible and the
    offsets did not move; read again from the committed offsets."""


class TransactionalKafkaTarget(KafkaTarget):
    """A Kafka target whose every flush is one transaction with the source offsets."""

    #: The flush commits the sources' offsets itself: the sources must not.
    commits_source_positions = True

    def __init__(self, spec: KafkaTargetSpec, ctx: Context, index: int) -> None:
        super().__init__(spec, ctx, index)
        pipeline = ctx.pipeline
        # Source id (its query) -> (its spec, consumer group, topics).
        self._sources: dict[str, tuple[KafkaSourceSpec, str, list[str]]] = {}
        for src in pipeline.all_sources:
            if not isinstance(src, KafkaSourceSpec):  # refused by the config rules
                raise ConnectorError(f'{self.id}: delivery = "exactly_once" needs Kafka sources')
            query = pipeline.query_of(src)
            topics = [t.strip() for t in query.split(",") if t.strip()]
            self._sources[query] = (src, src.reader_group(pipeline.pipeline_name), topics)
        groups = sorted({group for _, group, _ in self._sources.values()})
        own = spec.librdkafka.get("transactional.id")
        self.transactional_id = (
            str(own) if own else f"sluice.{pipeline.pipeline_name}.{'+'.join(groups)}.{spec.topic}"
        )
        self._staged: dict[str, dict[str, int]] = {}  # source id -> partition -> next offset
        self._groups: dict[str, Any] = {}  # group -> a consumer of ours (metadata, committed())
        self._broken = False  # a transaction's end is unknown: make a new producer first
        self._aborts = 0  # transactions aborted in a row (the re-reads back off)

    # -- RecordsPositions ----------------------------------------------------

    @property
    def database(self) -> str | None:
        """No database: a state store never shares this target's transaction."""
        return None

    def held_positions(self) -> dict[str, Position]:
        """The source groups' committed offsets (stable ones: none of a
        transaction still open), per source id and ``topic:partition``."""
        from sluice.connectors.kafka.source import partition_key

        if self._aborts:  # read again, but not in a hot loop while the cause lasts
            time.sleep(min(ABORT_BACKOFF_S * 2 ** (self._aborts - 1), MAX_ABORT_BACKOFF_S))
        if self._broken:
            self._new_producer()
        out: dict[str, Position] = {}
        for source_id, (_spec, group, topics) in self._sources.items():
            consumer = self._group(group)
            try:
                known = consumer.list_topics(timeout=10).topics
                tps = [
                    ck.TopicPartition(t, p)
                    for t in topics
                    if t in known
                    for p in sorted(known[t].partitions)
                ]
                committed = consumer.committed(tps, timeout=TXN_TIMEOUT_S) if tps else []
            except ck.KafkaException as exc:
                raise TransientError(f"{self.id}: reading the committed offsets: {exc}") from exc
            for tp in committed:
                if tp.error is not None:
                    raise TransientError(
                        f"{self.id}: committed offset of {tp.topic}:{tp.partition}: {tp.error}"
                    )
                if tp.offset >= 0:
                    out.setdefault(source_id, {})[partition_key(tp.topic, tp.partition)] = tp.offset
        return out

    def stage_positions(
        self, positions: Mapping[str, Position], also: Callable[[Any], None] | None = None
    ) -> None:
        """Send ``positions`` with the next transaction (merged per partition)."""
        if also is not None:  # database is None: no store joins this target
            raise ConnectorError(f"{self.id}: a state store cannot commit in a Kafka transaction")
        for source_id, parts in positions.items():
            if source_id not in self._sources:
                raise ConnectorError(f"{self.id}: positions of an unknown source {source_id!r}")
            staged = self._staged.setdefault(source_id, {})
            for part, offset in parts.items():
                if isinstance(offset, int):
                    staged[part] = offset

    # -- lifecycle -------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        conf = super()._config()
        conf["transactional.id"] = self.transactional_id
        return conf

    def open(self) -> None:
        """Create the producer and ``init_transactions``: fences any earlier
        producer with this transactional.id and aborts what it left open."""
        super().open()
        self._broken = False
        try:
            self._producer.init_transactions(TXN_TIMEOUT_S)
        except ck.KafkaException as exc:
            err = exc.args[0]
            if isinstance(err, ck.KafkaError) and (err.retriable() or not err.fatal()):
                raise TransientError(f"{self.id}: init_transactions: {err.str()}") from exc
            raise ConnectorError(f"{self.id}: init_transactions: {exc}") from exc
        log.info(
            "%s: transactional producer %r ready (delivery = exactly_once)",
            self.id,
            self.transactional_id,
        )

    def close(self) -> None:
        """Drop the producer and the group consumers."""
        self._drop_producer()
        groups, self._groups = self._groups, {}
        for consumer in groups.values():
            try:
                consumer.close()
            except (ck.KafkaException, RuntimeError) as exc:
                log.debug("closing a group consumer: %s", exc)

    def _drop_producer(self) -> None:
        """Nothing outside a committed transaction matters: drop it unsent (an
        open transaction is aborted by the next ``init_transactions``)."""
        producer, self._producer = self._producer, None
        self._pending = []
        if producer is not None:
            try:
                producer.purge()
            except (ck.KafkaException, RuntimeError) as exc:
                log.debug("purging the producer: %s", exc)

    def _new_producer(self) -> None:
        """After a transaction whose end is unknown: a new producer, whose
        ``init_transactions`` waits for the coordinator to settle it."""
        self._drop_producer()
        self.open()

    def _group(self, group: str) -> Any:
        consumer = self._groups.get(group)
        if consumer is None:
            from sluice.connectors.kafka.source import client_config

            spec = next(s for s, g, _ in self._sources.values() if g == group)
            conf = client_config(spec)
            conf.update(
                {
                    "group.id": group,
                    "enable.auto.commit": False,
                    "isolation.level": "read_committed",
                    "log_level": 3,
                }
            )
            consumer = ck.Consumer(conf, logger=log)
            self._groups[group] = consumer
        return consumer

    # -- writing ---------------------------------------------------------------

    def flush(self) -> None:
        """One transaction: the rows staged, the offsets staged, committed."""
        producer = self._producer
        if producer is None:
            raise ConnectorError(f"{self.id} is not open")
        if not self._pending and not self._staged:
            return
        failures: list[Any] = []

        def delivered(err: Any, _msg: Any) -> None:
            if err is not None:
                failures.append(err)

        try:
            producer.begin_transaction()
            for table in self._pending:
                self._produce(producer, table, delivered)
            left = producer.flush(FLUSH_TIMEOUT_S)
            if failures or left:
                err = failures[0] if failures else None
                if err is not None and err.code() in _FENCED:
                    self._fenced(err)
                detail = err.str() if err is not None else f"{left} message(s) not acknowledged"
                self._abort(f"{len(failures) or left} message(s) not delivered: {detail}")
            for group, offsets in self._offsets().items():
                producer.send_offsets_to_transaction(
                    offsets, self._group(group).consumer_group_metadata(), TXN_TIMEOUT_S
                )
            producer.commit_transaction(TXN_TIMEOUT_S)
        except ck.KafkaException as exc:
            self._failed(exc)
        except ConnectorError as exc:
            cause = exc.__cause__
            if isinstance(cause, ck.KafkaException):  # produce() refused a message
                err = cause.args[0] if cause.args else None
                if isinstance(err, ck.KafkaError) and err.code() in _FENCED:
                    self._fenced(err)
                # The same rows would be refused again: fail as the plain
                # target does, leaving nothing of the transaction behind.
                self._quietly_abort()
            raise
        self._pending = []
        self._staged = {}
        self._aborts = 0

    def _offsets(self) -> dict[str, list[Any]]:
        """The staged offsets as TopicPartitions, per consumer group."""
        from sluice.connectors.kafka.source import _split

        out: dict[str, list[Any]] = {}
        for source_id, parts in self._staged.items():
            group = self._sources[source_id][1]
            for part, offset in sorted(parts.items()):
                topic, partition = _split(part)
                out.setdefault(group, []).append(ck.TopicPartition(topic, partition, offset))
        return out

    def _failed(self, exc: ck.KafkaException) -> None:
        """A transactional call failed: stop when fenced, fail when fatal,
        else abort and read again."""
        err = exc.args[0] if exc.args else None
        if not isinstance(err, ck.KafkaError):
            raise ConnectorError(f"{self.id}: {exc}") from exc
        if err.code() in _FENCED:
            self._fenced(err)
        if err.fatal():
            raise ConnectorError(f"{self.id}: fatal producer error: {err.str()}") from exc
        self._abort(err.str())

    def _fenced(self, err: Any) -> None:
        raise Fenced(
            f"{self.id}: the producer was fenced ({err.str()}): another process with "
            f"transactional.id {self.transactional_id!r} took over this pipeline; stopping "
            "(run one process per pipeline, or give each its own transactional.id)"
        )

    def _quietly_abort(self) -> None:
        self._pending = []
        self._staged = {}
        try:
            self._producer.abort_transaction(TXN_TIMEOUT_S)
        except ck.KafkaException as exc:
            log.debug("%s: abort_transaction: %s", self.id, exc)
            self._broken = True

    def _abort(self, why: str) -> None:
        """Abort the open transaction (or leave it to the next producer) and
        raise :class:`TransactionAborted`."""
        self._pending = []
        self._staged = {}
        producer = self._producer
        try:
            producer.abort_transaction(TXN_TIMEOUT_S)
        except ck.KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if isinstance(err, ck.KafkaError) and err.code() in _FENCED:
                self._fenced(err)
            log.warning(
                "%s: abort_transaction failed (%s); a new producer settles it", self.id, exc
            )
            self._broken = True
        self._aborts += 1
        raise TransactionAborted(
            f"{self.id}: transaction aborted ({why}); reading again from the committed offsets"
        )
