"""Dead letters: records a policy set aside, written durably before offsets move.

A dead letter is the record as the source delivered it (raw key and
payload), where it came from (pipeline, source, partition, offset, source
timestamp) and why it was set aside (stage and error text). The run loop
writes a batch's dead letters, and waits until they are durable, before it
commits that batch's positions; a crash in between re-delivers the batch, so
a dead letter may be written twice but is never lost.

Destinations (``dlq_store`` / ``dead_letter_topic``):

* **A connector with the ``dead_letters`` capability**: its descriptor's
  :class:`~sluice.connectors.descriptor.DeadLetters` says which
  ``dlq_store`` word it serves (``topic``: a Kafka source's brokers, with a
  source's own ``dead_letter_topic`` taking that source's records;
  ``table``: a Postgres target's or state store's database,
  ``<schema>.sluice_dead_letters`` by default) and builds the sink; the
  sinks live in the connector packages (``connectors/kafka/dlq.py``,
  ``connectors/postgres/dlq.py``). ``dlq_store = "<kind>:<destination>"``
  names one directly.
* **JSON Lines file** (a path ending in ``.jsonl``; the fallback of ``auto``
  is ``$SLUICE_STATE_DIR/<pipeline>.dlq.jsonl``): one object per record,
  ``key`` / ``payload`` as text when they are UTF-8, else ``key_base64`` /
  ``payload_base64``; durable after fsync.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msgspec

from sluice.config.spec import PipelineSpec
from sluice.connectors import registry
from sluice.connectors.api import RawRecord
from sluice.connectors.descriptor import Connector, DeadLetters
from sluice.errors import ConnectorError
from sluice.localstate import state_dir


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


@dataclass(frozen=True, slots=True)
class _Holder:
    """A spec of the pipeline whose connection can hold dead letters."""

    kind: str
    support: DeadLetters
    spec: Any

    def sink(self, destination: str) -> DeadLetterSink:
        c = registry.of_kind(self.support.role, self.kind) or _state_connector(self.kind)
        extra = c.extra if c is not None else "all"
        build = registry.resolve(self.support.sink, self.kind, "dead-letter", extra)
        built: DeadLetterSink = build(self.spec, destination)
        return built


def _state_connector(kind: str) -> Connector | None:
    """The connector whose database a state store of ``kind`` lives in, if it holds dead letters."""
    return next(
        (c for c in registry.connectors() if c.dead_letters is not None and kind in c.kinds), None
    )


def _holders(spec: PipelineSpec, word: str | None = None, kind: str | None = None) -> list[_Holder]:
    """Specs that can hold dead letters, in order: sources, targets, then the state store
    (a state store in a connector's database holds them there too)."""
    found: list[tuple[Connector | None, Any]] = [
        *((registry.of(s), s) for s in spec.all_sources),
        *((registry.of(t), t) for t in spec.all_targets),
    ]
    if spec.state_store is not None:
        found.append((_state_connector(spec.state_store.kind), spec.state_store))
    out = []
    for connector, s in found:
        support = connector.dead_letters if connector is not None else None
        if support is None or (word is not None and support.word != word):
            continue
        if kind is not None and s.kind != kind:
            continue
        if s is not spec.state_store and support.role != s.ROLE:
            continue
        if s is spec.state_store and support.role != "target":
            continue
        out.append(_Holder(s.kind, support, s))
    return out


def _needs(word_or_kind: str, role: str) -> str:
    return f"a {word_or_kind} {role}" + (" or state store" if role == "target" else "")


def _default_sink(spec: PipelineSpec) -> DeadLetterSink:
    store = spec.dlq_store or "auto"
    prefix, colon, destination = store.partition(":")
    named = registry.of_kind("source", prefix) or registry.of_kind("target", prefix)
    if colon and named is not None and named.dead_letters is not None:
        holders = _holders(spec, kind=prefix)
        if not holders:
            role = named.dead_letters.role
            raise ConnectorError(f'dlq_store = "{store}" needs {_needs(prefix, role)}')
        return holders[0].sink(destination)
    if store.endswith(".jsonl"):
        return FileDeadLetters(Path(store))
    if store in ("auto", "topic"):
        topics = _holders(spec, word="topic")
        if spec.dead_letter_topic and topics:
            return topics[0].sink(spec.dead_letter_topic)
        for holder in topics:
            own = holder.support.own(holder.spec) if holder.support.own else None
            if own:
                return holder.sink(own)
        if store == "topic":
            raise ConnectorError('dlq_store = "topic" needs dead_letter_topic')
    tables = _holders(spec, word="table")
    if tables and tables[0].support.default is not None:
        return tables[0].sink(tables[0].support.default(tables[0].spec))
    if store == "table":
        kinds = [
            c.name
            for c in registry.connectors()
            if c.dead_letters and c.dead_letters.word == "table"
        ]
        raise ConnectorError(f'dlq_store = "table" needs {_needs(" or ".join(kinds), "target")}')
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
        support = registry.of(source).dead_letters
        if support is None or support.own is None:
            continue
        topic = support.own(source)
        if topic:
            own[source_ids[i]] = _Holder(source.kind, support, source).sink(topic)
    return own, _default_sink(spec)
