"""What a conformance suite needs to know about one connector and its system.

A harness says how to make the connector's spec for a fresh topic / table /
folder, how to put input into the real system, how to read back what landed
(through a connection of its own), and, where the connector holds a network
connection, how to drop it. The suites (:mod:`sluice.testing.sources`,
:mod:`sluice.testing.targets`) write the checks once; each connector runs
them with its harness (``tests/conformance/``), like Redpanda Connect's
``integration.StreamTests`` and Vector's sink compliance.

Connectors are built the way ``flow consume`` builds them: a pipeline file
(TOML) loaded by :func:`sluice.config.load_text`, then the registry
(:func:`sluice.connectors.registry.build_source` / ``build_target``) or, for
CDC, :func:`sluice.engine.cdc.build_targets`.
"""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from sluice.config import PipelineSpec, load_text
from sluice.connectors import registry
from sluice.connectors.api import Source, Target
from sluice.engine.cdc import build_targets

#: Input rows of the source suite: ``{"id": int, "name": str}``.
Row = Mapping[str, Any]


def unique(prefix: str) -> str:
    """A name no other run uses (topics, tables, folders, consumer groups)."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def toml_value(value: Any) -> str:
    """``value`` as a TOML value: strings, ints, floats, bools, lists, inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # A JSON string (ASCII, \\uXXXX escapes) is a valid TOML basic string.
        return json.dumps(value)
    if isinstance(value, Mapping):
        return (
            "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
        )
    if isinstance(value, Sequence):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def load_pipeline(pipeline: Mapping[str, Any]) -> PipelineSpec:
    """Load a pipeline given as a dict through the config loader (all its checks)."""
    text = "\n".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in pipeline.items())
    return load_text(text + "\n", "<conformance pipeline>")


class SourceHarness(ABC):
    """Drives one source connector against its real system for the source suite.

    The suite names the consumer identity (Kafka group, local checkpoint)
    through ``pipeline_name``: :meth:`source` must not pin it (no
    ``group_id``).
    """

    #: Shown in test ids and failure messages.
    name: str = "source"

    @abstractmethod
    def new_stream(self) -> str:
        """Create a fresh, empty stream (topic, folder prefix); returns the source query."""

    @abstractmethod
    def source(self, stream: str) -> dict[str, Any]:
        """The ``[source]`` table reading ``stream`` (kind and connection keys)."""

    @abstractmethod
    def produce(self, stream: str, rows: Sequence[Row]) -> list[int]:
        """Put ``rows`` (JSON objects) into ``stream``, durably, in order.

        Returns the ``_event_ts`` each row must get, in microseconds since the
        epoch, by the system's rule (Kafka: the message timestamp; files: the
        file's modification time).
        """

    @abstractmethod
    def produce_bad(self, stream: str) -> bytes:
        """Put one record that cannot decode into ``stream``; returns its raw bytes."""

    def pipeline(self, stream: str, group: str) -> PipelineSpec:
        """A pipeline reading ``stream`` as consumer ``group`` (its target is never built)."""
        return load_pipeline(
            {
                "pipeline_name": group,
                "source_query": stream,
                "source": self.source(stream),
                "target": {"kind": "sqlite", "path": "unused.sqlite", "table": {"name": "t"}},
            }
        )

    def build(self, stream: str, group: str) -> Source:
        """The source connector, built as ``flow consume`` builds it."""
        spec = self.pipeline(stream, group)
        (source_spec,) = spec.all_sources
        return registry.build_source(source_spec, registry.Context(spec))


class TargetHarness(ABC):
    """Drives one target connector against its real system for the target suite."""

    name: str = "target"

    #: Whether the connector holds a connection that can drop (a server).
    #: Embedded systems (SQLite, DuckDB, local Delta) say False: the suite
    #: then checks the retry after an abandoned write instead of a drop.
    has_connection: bool = True

    def new_table(self) -> str:
        """A fresh table name (nothing exists under it yet)."""
        return unique("conf")

    @abstractmethod
    def target(
        self, table: str, *, mode: str = "append", key: Sequence[str] = ()
    ) -> dict[str, Any]:
        """The ``[target]`` table writing ``table`` (kind, connection, table, mode)."""

    @abstractmethod
    def read_back(self, table: str) -> pa.Table | None:
        """Everything committed in ``table``, read through a new connection
        (``None`` when the table does not exist)."""

    def drop_connection(self, table: str) -> int:
        """Kill, server side, the connections of the targets writing ``table``;
        returns how many were killed. Only called when :attr:`has_connection`."""
        raise NotImplementedError(f"{self.name}: has_connection is set but drop_connection is not")

    def pipeline(
        self,
        table: str,
        *,
        mode: str = "append",
        key: Sequence[str] = (),
        pipeline_name: str | None = None,
        **transform: Any,
    ) -> PipelineSpec:
        """A pipeline writing ``table`` (its source is never built), named
        ``pipeline_name`` (default: a fresh name)."""
        data: dict[str, Any] = {
            "pipeline_name": pipeline_name or unique("conf"),
            "source_query": "unused",
            "source": {"kind": "kafka", "bootstrap_servers": "unused:9092"},
            "target": self.target(table, mode=mode, key=key),
        }
        if transform:
            data["transform"] = transform
        return load_pipeline(data)

    def build(
        self,
        table: str,
        *,
        mode: str = "append",
        key: Sequence[str] = (),
        pipeline_name: str | None = None,
    ) -> Target:
        """The target connector, built as ``flow consume`` builds it."""
        spec = self.pipeline(table, mode=mode, key=key, pipeline_name=pipeline_name)
        (target_spec,) = spec.all_targets
        return registry.build_target(target_spec, registry.Context(spec), 0)


class CdcTargetHarness(TargetHarness):
    """A target harness whose connector also applies ``[transform.cdc]`` change streams."""

    def build_cdc(self, table: str, cdc: Mapping[str, Any], key: Sequence[str] = ("id",)) -> Target:
        """The CDC target of a pipeline with ``[transform.cdc] = cdc``, built as
        ``flow consume`` builds it."""
        spec = self.pipeline(table, key=key, cdc=dict(cdc))
        (target,) = build_targets(spec)
        return target
