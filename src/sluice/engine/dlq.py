"""Dead letters: records a policy set aside, written durably before offsets move.

A dead letter is the record as the source delivered it (raw key and
payload), where it came from (pipeline, source, partition, offset, source
timestamp) and why it was set aside (stage and error text). The run loop
writes a batch's dead letters, and waits until they are durable, before it
commits that batch's positions; a crash in between re-delivers the batch, so
a dead letter may be written twice but is never lost.

Destinations (``dlq_store`` / ``dead_letter_topic``):

* **Kafka topic**: value = raw payload, key = raw key, headers
  ``sluice.pipeline``, ``sluice.source``, ``sluice.stage``, ``sluice.error``,
  ``sluice.partition``, ``sluice.offset``, ``sluice.timestamp_ms``. Produced
  with ``acks=all`` and idempotence; durable once every delivery report came
  back without error. A Kafka source's own ``dead_letter_topic`` takes the
  records of that source.
* **Postgres table** (``postgres:SCHEMA.TABLE``; ``table`` = the first
  Postgres target's schema, table ``sluice_dead_letters``): created when
  missing, written with COPY, durable on commit.
* **JSON Lines file** (a path ending in ``.jsonl``; the fallback of ``auto``
  is ``$SLUICE_STATE_DIR/<pipeline>.dlq.jsonl``): one object per record,
  ``key`` / ``payload`` as text when they are UTF-8, else ``key_base64`` /
  ``payload_base64``; durable after fsync.
"""

from __future__ import annotations

import base64
import contextlib
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import msgspec

from sluice.config.spec import KafkaSource, PipelineSpec, PostgresStateStore, PostgresTarget
from sluice.connectors.api import RawRecord
from sluice.errors import ConnectorError, TransientError
from sluice.localstate import state_dir

DEFAULT_TABLE = "sluice_dead_letters"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record set aside by a policy."""

    pipeline: str
    source: str
    stage: str  # decode, sql, late
    error: str
    record: RawRecord

    def headers(self) -> list[tuple[str, bytes]]:
        """The record's provenance as Kafka headers."""
        r = self.record
        pairs = {
            "sluice.pipeline": self.pipeline,
            "sluice.source": self.source,
            "sluice.stage": self.stage,
            "sluice.error": self.error,
            "sluice.partition": r.partition,
            "sluice.offset": "" if r.offset is None else str(r.offset),
            "sluice.timestamp_ms": "" if r.timestamp_ms is None else str(r.timestamp_ms),
        }
        return [(k, v.encode()) for k, v in pairs.items()]


class DeadLetterSink(Protocol):
    """A durable destination for dead letters (retried like a target)."""

    id: str

    def open(self) -> None:
        """Connect (create the destination when missing)."""

    def write(self, letters: list[DeadLetter]) -> None:
        """Write ``letters``; durable when this returns, or raise."""

    def close(self) -> None:
        """Release connections. Idempotent."""


# ---------------------------------------------------------------------------
# Kafka


class KafkaDeadLetters:
    """Produces dead letters to a topic and waits for every acknowledgement."""

    def __init__(self, topic: str, source: KafkaSource) -> None:
        self.topic = topic
        self.source = source
        self.id = f"dlq:kafka:{topic}"
        self._producer: Any = None

    def open(self) -> None:
        """Create the producer (connections are made on first send)."""
        import confluent_kafka as ck

        from sluice.connectors.kafka.source import client_config

        conf = client_config(self.source)
        conf.update({"acks": "all", "enable.idempotence": True, "linger.ms": 5, "log_level": 3})
        self._producer = ck.Producer(conf)

    def write(self, letters: list[DeadLetter]) -> None:
        """Produce every letter; raise unless all were acknowledged."""
        import confluent_kafka as ck

        producer = self._producer
        if producer is None:
            raise ConnectorError(f"{self.id} is not open")
        failures: list[str] = []

        def delivered(err: Any, _msg: Any) -> None:
            if err is not None:
                failures.append(err.str())

        for letter in letters:
            while True:
                try:
                    producer.produce(
                        self.topic,
                        value=letter.record.payload,
                        key=letter.record.key,
                        headers=letter.headers(),
                        on_delivery=delivered,
                    )
                    break
                except BufferError:
                    producer.poll(0.1)  # local queue full: let deliveries drain
                except ck.KafkaException as exc:
                    raise ConnectorError(f"{self.id}: {exc}") from exc
        left = producer.flush(30)
        if left or failures:
            detail = failures[0] if failures else f"{left} message(s) not acknowledged in 30 s"
            raise TransientError(f"{self.id}: {detail}")

    def close(self) -> None:
        """Drop the producer (nothing is pending: write() waited for every ack)."""
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.flush(1)


# ---------------------------------------------------------------------------
# Postgres


class PostgresDeadLetters:
    """Copies dead letters into a Postgres table, one transaction per write."""

    def __init__(self, url: str, schema: str, table: str) -> None:
        self.url = url
        self.schema = schema
        self.table = table
        self.id = f"dlq:postgres:{schema}.{table}"
        self._conn: Any = None

    def _ident(self) -> Any:
        from psycopg import sql

        return sql.Identifier(self.schema, self.table)

    def open(self) -> None:
        """Connect and create the table when missing."""
        import psycopg
        from psycopg import sql

        try:
            self._conn = psycopg.connect(self.url, connect_timeout=10)
            with self._conn.transaction():
                self._conn.execute(
                    sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema))
                )
                self._conn.execute(
                    sql.SQL(
                        "CREATE TABLE IF NOT EXISTS {} ("
                        "id bigserial PRIMARY KEY, pipeline text NOT NULL, source text NOT NULL, "
                        "stage text NOT NULL, error text NOT NULL, partition text, "
                        '"offset" text, source_timestamp timestamptz, key bytea, payload bytea, '
                        "failed_at timestamptz NOT NULL DEFAULT now())"
                    ).format(self._ident())
                )
        except psycopg.OperationalError as exc:
            self.close()
            raise TransientError(f"{self.id}: cannot connect: {exc}") from exc
        except psycopg.Error as exc:
            self.close()
            raise ConnectorError(f"{self.id}: {exc}") from exc

    def write(self, letters: list[DeadLetter]) -> None:
        """COPY the letters in and commit."""
        import psycopg
        from psycopg import sql

        if self._conn is None:
            raise ConnectorError(f"{self.id} is not open")
        statement = sql.SQL(
            'COPY {} (pipeline, source, stage, error, partition, "offset", '
            "source_timestamp, key, payload) FROM STDIN"
        ).format(self._ident())
        try:
            with self._conn.transaction(), self._conn.cursor() as cur, cur.copy(statement) as copy:
                for d in letters:
                    r = d.record
                    ts = (
                        None
                        if r.timestamp_ms is None
                        else datetime.fromtimestamp(r.timestamp_ms / 1000, UTC)
                    )
                    offset = None if r.offset is None else str(r.offset)
                    copy.write_row(
                        (
                            d.pipeline,
                            d.source,
                            d.stage,
                            d.error,
                            r.partition,
                            offset,
                            ts,
                            r.key,
                            r.payload,
                        )
                    )
        except psycopg.OperationalError as exc:
            raise TransientError(f"{self.id}: {exc}") from exc
        except psycopg.Error as exc:
            raise ConnectorError(f"{self.id}: {exc}") from exc

    def close(self) -> None:
        """Close the connection."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


# ---------------------------------------------------------------------------
# JSON Lines file


def _text(name: str, value: bytes | None, into: dict[str, Any]) -> None:
    if value is None:
        into[name] = None
        return
    try:
        into[name] = value.decode("utf-8")
    except UnicodeDecodeError:
        into[f"{name}_base64"] = base64.b64encode(value).decode("ascii")


class FileDeadLetters:
    """Appends dead letters to a JSON Lines file, fsynced before returning."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.id = f"dlq:file:{path}"
        self._encoder = msgspec.json.Encoder()

    def open(self) -> None:
        """Create the parent folder."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConnectorError(f"{self.id}: {exc}") from exc

    def write(self, letters: list[DeadLetter]) -> None:
        """Append one line per letter and fsync."""
        lines = []
        for d in letters:
            r = d.record
            obj: dict[str, Any] = {
                "pipeline": d.pipeline,
                "source": d.source,
                "stage": d.stage,
                "error": d.error,
                "partition": r.partition,
                "offset": r.offset,
                "timestamp_ms": r.timestamp_ms,
            }
            _text("key", r.key, obj)
            _text("payload", r.payload, obj)
            lines.append(self._encoder.encode(obj))
        try:
            with self.path.open("ab") as f:
                f.write(b"\n".join(lines) + b"\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise ConnectorError(f"{self.id}: {exc}") from exc

    def close(self) -> None:
        """Nothing to release."""


# ---------------------------------------------------------------------------
# Routing


def _postgres_url(spec: PipelineSpec) -> tuple[str, str] | None:
    """(url, schema) of the first Postgres target, else of a Postgres state store."""
    for target in spec.all_targets:
        if isinstance(target, PostgresTarget):
            return target.url, target.table.schema or "public"
    if isinstance(spec.state_store, PostgresStateStore):
        return spec.state_store.url, spec.state_store.schema
    return None


def _kafka_sources(spec: PipelineSpec) -> list[KafkaSource]:
    return [s for s in spec.all_sources if isinstance(s, KafkaSource)]


def _default_sink(spec: PipelineSpec) -> DeadLetterSink:
    store = spec.dlq_store or "auto"
    kafka = _kafka_sources(spec)
    source_topics = [s for s in kafka if s.dead_letter_topic]
    if store.startswith("kafka:"):
        return KafkaDeadLetters(store.removeprefix("kafka:"), kafka[0])
    if store.startswith("postgres:"):
        schema, _, table = store.removeprefix("postgres:").partition(".")
        found = _postgres_url(spec)
        if found is None:
            raise ConnectorError(f'dlq_store = "{store}" needs a postgres target or state store')
        return PostgresDeadLetters(found[0], schema, table)
    if store.endswith(".jsonl"):
        return FileDeadLetters(Path(store))
    if store in ("auto", "topic"):
        if spec.dead_letter_topic and kafka:
            return KafkaDeadLetters(spec.dead_letter_topic, kafka[0])
        if source_topics:
            first = source_topics[0]
            return KafkaDeadLetters(first.dead_letter_topic or "", first)
        if store == "topic":
            raise ConnectorError('dlq_store = "topic" needs dead_letter_topic')
    found = _postgres_url(spec)
    if found is not None:
        return PostgresDeadLetters(found[0], found[1], DEFAULT_TABLE)
    if store == "table":
        raise ConnectorError('dlq_store = "table" needs a postgres target or state store')
    return FileDeadLetters(state_dir() / f"{spec.pipeline_name}.dlq.jsonl")


def build_sinks(
    spec: PipelineSpec, source_ids: dict[int, str]
) -> tuple[dict[str, DeadLetterSink], DeadLetterSink]:
    """The sink of each source that has its own (by source id), and the default sink.

    ``source_ids`` maps the index of a source spec in ``spec.all_sources`` to
    the id its connector reports.
    """
    own: dict[str, DeadLetterSink] = {}
    for i, source in enumerate(spec.all_sources):
        if isinstance(source, KafkaSource) and source.dead_letter_topic:
            own[source_ids[i]] = KafkaDeadLetters(source.dead_letter_topic, source)
    return own, _default_sink(spec)
