"""Kafka target (confluent-kafka): an idempotent producer, durable on every delivery report.

* ``write`` stages the batch; ``flush`` encodes it (JSON, raw bytes, or Avro /
  Protobuf / JSON Schema through the schema registry,
  :class:`sluice.formats.encode.PayloadEncoder`), produces one
  message per row (key from ``message_key_column``, cast to text; message
  timestamp from ``_event_ts`` when the batch has it, which is then not part
  of the payload) and returns only when every delivery report came back
  without error. ``acks=all`` and ``enable.idempotence``: a librdkafka retry
  never writes a message twice.
* A failed delivery raises :class:`~sluice.errors.TransientError`; the
  engine then closes, reopens and writes the same batch again, so a batch
  partly delivered before the failure is delivered again: **at least
  once** (consumers of the topic see a redelivered batch twice; key the
  messages and compact, or dedupe downstream). Rows staged and never flushed
  are dropped by ``close``.
* The batch is produced in row order, so per key (per partition) order is
  the batch's order.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from sluice.connectors.api import EVENT_TS
from sluice.connectors.kafka.spec import KafkaTarget as KafkaTargetSpec
from sluice.connectors.registry import Context
from sluice.errors import ConnectorError, TransientError
from sluice.formats.encode import PayloadEncoder

try:
    import confluent_kafka as ck
except ModuleNotFoundError as exc:  # pragma: no cover - exercised without the extra
    raise ModuleNotFoundError("confluent_kafka", name="confluent_kafka") from exc

log = logging.getLogger(__name__)

FLUSH_TIMEOUT_S = 60.0  # longest flush() waits for delivery reports before failing the write


class KafkaTarget:
    """Produces every row of a batch to one topic and waits for all the acknowledgements."""

    def __init__(self, spec: KafkaTargetSpec, ctx: Context, index: int) -> None:
        self.spec = spec
        self.id = f"kafka:{spec.topic}"
        self._producer: Any = None
        self._pending: list[pa.Table] = []
        self._encoder: PayloadEncoder | None = None

    def _config(self) -> dict[str, Any]:
        """The producer's librdkafka properties."""
        from sluice.connectors.kafka.source import client_config

        conf = client_config(self.spec)
        conf.update(
            {
                "acks": "all",
                "enable.idempotence": True,
                "linger.ms": 5,
                "log_level": 3,
                # Room for a whole batch in librdkafka's queue (its default is 100k).
                "queue.buffering.max.messages": 1_000_000,
            }
        )
        conf.update(self.spec.librdkafka)
        return conf

    def open(self) -> None:
        """Create the producer (connections are made on first send)."""
        self._producer = ck.Producer(self._config(), logger=log)
        self._pending = []
        if self._encoder is None:
            self._encoder = PayloadEncoder(self.spec, self.spec.topic, self.id)

    def write(self, data: pa.Table) -> None:
        """Stage ``data`` for the next :meth:`flush`."""
        if self._producer is None:
            raise ConnectorError(f"{self.id} is not open")
        if data.num_rows:
            self._pending.append(data)

    def flush(self) -> None:
        """Produce everything staged; return once every message is acknowledged."""
        producer = self._producer
        if producer is None:
            raise ConnectorError(f"{self.id} is not open")
        failures: list[Any] = []

        def delivered(err: Any, _msg: Any) -> None:
            if err is not None:
                failures.append(err)

        for table in self._pending:
            self._produce(producer, table, delivered)
        left = producer.flush(FLUSH_TIMEOUT_S)
        if failures:
            err = failures[0]
            detail = f"{len(failures)} message(s) not delivered: {err.str()}"
            if err.fatal():
                raise ConnectorError(f"{self.id}: {detail}")
            raise TransientError(f"{self.id}: {detail}")
        if left:
            raise TransientError(
                f"{self.id}: {left} message(s) not acknowledged in {FLUSH_TIMEOUT_S:.0f} s"
            )
        self._pending = []

    def _produce(self, producer: Any, table: pa.Table, delivered: Any) -> None:
        spec = self.spec
        timestamps: list[Any] = [0] * table.num_rows
        if EVENT_TS in table.column_names:
            micros = pc.cast(table[EVENT_TS], pa.int64())
            timestamps = pc.fill_null(pc.divide(micros, 1000), 0).to_pylist()
            table = table.drop_columns([EVENT_TS])
        keys: list[Any] = [None] * table.num_rows
        if spec.message_key_column is not None:
            if spec.message_key_column not in table.column_names:
                raise ConnectorError(
                    f"{self.id}: message_key_column {spec.message_key_column!r} is not a column "
                    f"of the batch (columns: {', '.join(table.column_names)})"
                )
            column = table[spec.message_key_column]
            if not (pa.types.is_binary(column.type) or pa.types.is_string(column.type)):
                column = pc.cast(column, pa.string())
            keys = column.to_pylist()
        assert self._encoder is not None  # made by open()
        values = self._encoder.payloads(table)
        topic = spec.topic
        produce = producer.produce
        for value, key, ts in zip(values, keys, timestamps, strict=True):
            while True:
                try:
                    produce(topic, value, key, timestamp=ts, on_delivery=delivered)
                    break
                except BufferError:
                    producer.poll(0.1)  # local queue full: let deliveries drain
                except ck.KafkaException as exc:
                    raise ConnectorError(f"{self.id}: {exc}") from exc

    def close(self) -> None:
        """Drop the producer and anything staged and not flushed."""
        producer, self._producer = self._producer, None
        self._pending = []
        if producer is not None:
            producer.flush(1)


def build_target(spec: KafkaTargetSpec, ctx: Context, index: int) -> KafkaTarget:
    """Registry hook: with ``delivery = "exactly_once"`` the transactional target."""
    if ctx.pipeline.delivery == "exactly_once":
        from sluice.connectors.kafka.transactions import TransactionalKafkaTarget

        return TransactionalKafkaTarget(spec, ctx, index)
    return KafkaTarget(spec, ctx, index)
