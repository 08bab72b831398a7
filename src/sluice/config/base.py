"""The building blocks of every spec: field types, the closed base Struct, and
the keys every source, target and lookup kind takes.

Connector packages (``sluice.connectors.<kind>.spec``) build their spec
structs from these; :mod:`sluice.config.spec` assembles the pipeline from
the connectors' specs. This module imports no connector.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import msgspec
from msgspec import Meta

from sluice.config.redact import redact_value

# ---------------------------------------------------------------------------
# Shared field types. The unit is in the name (``_ms``) and in the constraint.

# The largest duration a ``*_ms`` key takes: about 31.7 years. Durations are
# added to event times in microseconds (int64), so an unbounded value
# (9223372036854775807) overflows at run time; this bound fails it in
# ``flow validate`` instead, with room to spare.
MAX_MS = 1_000_000_000_000
# Counts and sizes are 64-bit integers wherever they end up (Arrow, SQL).
MAX_INT = 2**63 - 1

Ms = Annotated[int, Meta(ge=0, le=MAX_MS)]
PositiveMs = Annotated[int, Meta(gt=0, le=MAX_MS)]
PositiveInt = Annotated[int, Meta(gt=0, le=MAX_INT)]
NonEmptyStr = Annotated[str, Meta(min_length=1)]
# A file or folder on this machine. A relative one is resolved from the
# folder of the pipeline file that names it (not the working directory), so
# the same file runs the same from anywhere. URLs (``s3://``) and
# ``:memory:`` are left as they are.
LocalPath = Annotated[str, Meta(min_length=1, extra={"local_path": True})]


def doc(text: str) -> Meta:
    """The one-line description of a key (``flow schema`` prints it)."""
    return Meta(description=text)


class Spec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of every spec: closed (unknown keys are errors), frozen, keyword-only.

    ``repr`` redacts secrets (passwords, secret keys, passwords inside URLs).
    """

    def __repr__(self) -> str:
        parts = []
        for name in self.__struct_fields__:
            value = getattr(self, name)
            parts.append(f"{name}={redact_value(name, value)!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    __str__ = __repr__


class Tagged(Spec, frozen=True, kw_only=True):
    """Base of the specs chosen by a ``kind`` key (sources, targets, lookups, ...)."""

    @property
    def kind(self) -> str:
        """The ``kind`` this spec was chosen by."""
        tag = self.__struct_config__.tag
        return tag if isinstance(tag, str) else ""


# ---------------------------------------------------------------------------
# Sources


class SourceSpec(Tagged, frozen=True, kw_only=True):
    """Keys every source kind takes."""

    ROLE: ClassVar[str] = "source"

    query: Annotated[
        str | None,
        doc(
            "what this source reads (topic, queue, subscription, stream, prefix); "
            "required in [[sources]], use top-level source_query with [source]"
        ),
    ] = None
    max_batch_rows: Annotated[PositiveInt, doc("(ours) most rows read into one batch")] = 50_000
    max_batch_wait_ms: Annotated[
        PositiveMs, doc("(ours) longest wait to fill a batch before handing it on")
    ] = 200

    def derived_keys(self, pipeline_name: str) -> dict[str, Any]:
        """Keys the file left to a default derived from the pipeline (``flow plan`` shows them)."""
        return {}

    def reader_group(self, pipeline_name: str) -> str:
        """Who reads (a consumer group): positions and stored watermarks belong to it.
        Sources without groups read as the pipeline."""
        return pipeline_name

    @property
    def raw_payload(self) -> bool:
        """Whether batches carry the undecoded payload (a binary ``value`` column)."""
        return False


# ---------------------------------------------------------------------------
# Targets

WriteMode = Literal["append", "merge", "scd2", "truncate"]


class TableSpec(Spec, frozen=True, kw_only=True):
    """Base of every ``[target.table]``: the table's name, schema and key.

    ``flow plan`` prints these three whatever the target kind.
    """

    name: Annotated[str | None, doc("table name")] = None
    schema: Annotated[str | None, doc("schema")] = None
    primary_key: Annotated[list[NonEmptyStr] | None, doc("key columns")] = None


class DbTable(TableSpec, frozen=True, kw_only=True):
    """A database table: [target.table]."""

    name: Annotated[NonEmptyStr, doc("table name")]
    schema: Annotated[
        str | None, doc("schema; the database's default when omitted (public / main)")
    ] = None
    primary_key: Annotated[
        list[NonEmptyStr] | None, doc("key columns; reflected from the table when omitted")
    ] = None


class TargetSpec(Tagged, frozen=True, kw_only=True):
    """Keys every target kind takes."""

    ROLE: ClassVar[str] = "target"


class ModalTarget(TargetSpec, frozen=True, kw_only=True):
    """Keys of a target whose ``mode`` may be ``scd2`` (SQL databases, Delta)."""

    compare_columns: Annotated[
        list[NonEmptyStr] | None,
        doc("(ours) scd2: columns whose change makes a new version; default all non-key columns"),
    ] = None
    event_timestamp_column: Annotated[
        NonEmptyStr | None,
        doc("(ours) scd2: valid_from from this column; default the load time"),
    ] = None
    ttl_seconds: Annotated[
        PositiveInt | None,
        doc("(ours) scd2: close current versions older than this that a load did not carry"),
    ] = None


class LookupSpec(Tagged, frozen=True, kw_only=True):
    """Keys every lookup kind takes."""

    table: Annotated[NonEmptyStr, doc("table to load")]
    schema: Annotated[str | None, doc("schema of the table")] = None
    refresh_interval_ms: Annotated[
        PositiveMs | None, doc("reload in the background this often; never when omitted")
    ] = None
