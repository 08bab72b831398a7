"""The pipeline.toml contract as frozen, typed msgspec Structs.

These classes are the single source of truth for which keys exist, their
types, defaults and one-line descriptions (``flow schema`` prints them as JSON
schema). A component is chosen by its ``kind`` key (msgspec tagged unions).
Specs are inert data: runtime code reads these, never raw dicts.

The source, target and lookup kinds come from the connector packages: each
``sluice.connectors.<kind>`` declares its spec structs in its ``CONNECTOR``
descriptor, and the unions :data:`Source`, :data:`Target`, :data:`Lookup`
are built from the registry's list (:func:`pipeline_type` rebuilds them after
:func:`sluice.connectors.registry.register`). This module holds the rest of
the pipeline: transform, state, watermark.

Keys marked "(ours)" in a description are sluice extensions; the rest follow
the ematix-flow daemon's format (``shared/PIPELINE_TOML.md``).
"""

from __future__ import annotations

import typing
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec

from sluice.config.base import (
    LocalPath,
    LookupSpec,
    Ms,
    NonEmptyStr,
    PositiveInt,
    PositiveMs,
    SourceSpec,
    Spec,
    Tagged,
    TargetSpec,
    doc,
)

AggFunction = Literal[
    "count", "count_col", "sum", "avg", "min", "max", "first", "last", "count_distinct"
]


class Aggregation(Spec, frozen=True, kw_only=True):
    """One [[transform.window.aggregations]] entry."""

    agg: Annotated[AggFunction, doc("aggregate function")]
    as_: Annotated[NonEmptyStr, doc("output column name")] = msgspec.field(name="as")
    column: Annotated[str | None, doc("input column (all but count)")] = None
    mode: Annotated[
        Literal["approximate", "exact"] | None,
        doc("count_distinct: approximate (HLL, default) or exact"),
    ] = None
    max_distinct_values_per_group: Annotated[
        PositiveInt | None, doc("count_distinct exact: fail-loud cap per group")
    ] = None


LateData = Literal["drop", "reopen", "dlq"]


class WindowSpec(Tagged, frozen=True, kw_only=True):
    """Keys every window kind takes."""

    aggregations: Annotated[list[Aggregation], doc("aggregates computed per window and group")]
    group_by: Annotated[list[NonEmptyStr], doc("group key columns")] = msgspec.field(
        default_factory=list
    )
    event_time_column: Annotated[NonEmptyStr, doc("event-time column")] = "_event_ts"
    late_data: Annotated[LateData, doc("drop, reopen (re-emit corrected), dlq (ours)")] = "drop"
    allowed_lateness_ms: Annotated[Ms | None, doc("reopen: keep state this long past the end")] = (
        None
    )
    max_groups_per_window: Annotated[
        PositiveInt,
        doc(
            "fail-loud cap on groups in one window (the reference requires it; the default is ours)"
        ),
    ] = 1_000_000
    window_start_column: Annotated[NonEmptyStr, doc("output column of the window start")] = (
        "window_start"
    )
    window_end_column: Annotated[NonEmptyStr, doc("output column of the window end")] = "window_end"


class TumblingWindow(WindowSpec, tag="tumbling", tag_field="kind", frozen=True, kw_only=True):
    """Fixed, non-overlapping windows."""

    duration_ms: Annotated[PositiveMs, doc("window length")]


class HoppingWindow(WindowSpec, tag="hopping", tag_field="kind", frozen=True, kw_only=True):
    """Fixed windows that overlap: a new one starts every hop_ms."""

    duration_ms: Annotated[PositiveMs, doc("window length")]
    hop_ms: Annotated[PositiveMs, doc("distance between window starts")]


class SessionWindow(WindowSpec, tag="session", tag_field="kind", frozen=True, kw_only=True):
    """Per-key windows closed by a gap of inactivity."""

    gap_ms: Annotated[PositiveMs, doc("inactivity that closes a session")]
    max_session_duration_ms: Annotated[PositiveMs, doc("hard cap on one session's length")]
    session_id_column: Annotated[NonEmptyStr, doc("output column of the session id")] = "session_id"


Window = TumblingWindow | HoppingWindow | SessionWindow


class JoinSpec(Spec, frozen=True, kw_only=True):
    """[transform.join]: a keyed, time-bounded stream-stream join."""

    left_source: Annotated[NonEmptyStr, doc("query of the left [[sources]] entry")]
    right_source: Annotated[NonEmptyStr, doc("query of the right [[sources]] entry")]
    left_keys: Annotated[list[NonEmptyStr], doc("key columns on the left")]
    right_keys: Annotated[list[NonEmptyStr], doc("key columns on the right")]
    kind: Annotated[
        Literal["inner", "left_outer", "right_outer", "full_outer", "stream_stream_join"],
        doc("join kind (stream_stream_join = inner)"),
    ] = "inner"
    time_window_ms: Annotated[
        PositiveMs | None, doc("symmetric window: |right - left| <= this")
    ] = None
    min_delta_ms: Annotated[int | None, doc("asymmetric: right - left >= this")] = None
    max_delta_ms: Annotated[int | None, doc("asymmetric: right - left <= this")] = None
    event_time_column: Annotated[NonEmptyStr, doc("event-time column on both sides")] = "_event_ts"
    late_data: Annotated[Literal["drop", "reopen"], doc("drop, or reopen (longer retention)")] = (
        "drop"
    )
    allowed_lateness_ms: Annotated[Ms | None, doc("reopen: extra buffer retention")] = None
    left_column_prefix: Annotated[str, doc("prefix of left output columns")] = "left_"
    right_column_prefix: Annotated[str, doc("prefix of right output columns")] = "right_"
    max_buffer_rows: Annotated[
        PositiveInt, doc("(ours) fail-loud cap on the rows buffered by both sides together")
    ] = 10_000_000


CdcOp = Literal["create", "update", "delete", "read"]


class CdcSpec(Spec, frozen=True, kw_only=True):
    """[transform.cdc]: apply a change stream to a mirror table."""

    envelope: Annotated[Literal["debezium", "maxwell", "custom"], doc("envelope format")]
    key_field: Annotated[str | None, doc("path of the key in the envelope, e.g. after.id")] = None
    op_field: Annotated[str | None, doc("path of the operation")] = None
    op_map: Annotated[
        dict[str, CdcOp] | None, doc("operation value -> create/update/delete/read")
    ] = None
    before_field: Annotated[str | None, doc("path of the row before the change")] = None
    after_field: Annotated[str | None, doc("path of the row after the change")] = None
    ts_field: Annotated[str | None, doc("path of the change time in ms")] = None
    delete_mode: Annotated[
        Literal["hard", "soft"], doc("delete rows, or set soft_delete_column")
    ] = "hard"
    soft_delete_column: Annotated[str | None, doc("soft deletes: column set to now()")] = None
    schema_evolution: Annotated[
        Literal["skip", "fail", "add_columns"],
        doc("unknown columns: skip, fail the batch, or add_columns (ours)"),
    ] = "skip"
    out_of_order_tolerance_ms: Annotated[Ms, doc("reserved: warn window for backwards time")] = (
        5_000
    )


class TlsSpec(Spec, frozen=True, kw_only=True):
    """[transform.tls]: the reference daemon's mesh TLS (accepted; sluice runs single-node)."""

    ca_cert_pem_path: Annotated[LocalPath, doc("CA certificate")]
    domain_name_override: Annotated[str | None, doc("TLS server name")] = None
    client_identity: Annotated[dict[str, str] | None, doc("cert_pem_path / key_pem_path")] = None


class TransformSpec(Spec, frozen=True, kw_only=True):
    """[transform]: what happens between the sources and the targets."""

    sql: Annotated[str | None, doc("DataFusion SQL over the table `source` and the lookups")] = None
    dialect: Annotated[Literal["datafusion"], doc("SQL dialect")] = "datafusion"
    engine: Annotated[
        Literal["auto", "datafusion", "distributed"],
        doc("auto / datafusion run in-process; distributed is not supported (scale by replicas)"),
    ] = "auto"
    peers: Annotated[
        list[NonEmptyStr], doc("reference daemon's mesh peers; must be empty here")
    ] = msgspec.field(default_factory=list)
    tls: Annotated[TlsSpec | None, doc("reference daemon's mesh TLS (unused single-node)")] = None
    on_error: Annotated[
        Literal["fail", "drop", "dlq"], doc("a batch that fails to decode or transform")
    ] = "fail"
    lookups: Annotated[dict[str, Lookup], doc("lookup tables by name")] = msgspec.field(
        default_factory=dict
    )
    udf_modules: Annotated[
        list[NonEmptyStr], doc("(ours) modules whose @sluice.udf functions are registered")
    ] = msgspec.field(default_factory=list)
    window: Annotated[Window | None, doc("event-time window aggregation")] = None
    join: Annotated[JoinSpec | None, doc("stream-stream join of two [[sources]]")] = None
    cdc: Annotated[CdcSpec | None, doc("change-data-capture apply")] = None


# ---------------------------------------------------------------------------
# State and watermarks


class StateStoreSpec(Tagged, frozen=True, kw_only=True):
    """Keys every state store kind takes."""

    checkpoint_interval_ms: Annotated[PositiveMs, doc("how often dirty state is written")] = 60_000


class PostgresStateStore(
    StateStoreSpec, tag="postgres", tag_field="kind", frozen=True, kw_only=True
):
    """Operator state and source positions in PostgreSQL, one transaction per commit."""

    url: Annotated[NonEmptyStr, doc("postgres://user:password@host:port/db")]
    schema: Annotated[NonEmptyStr, doc("schema of the state tables")] = "public"


class InMemoryStateStore(
    StateStoreSpec, tag="in_memory", tag_field="kind", frozen=True, kw_only=True
):
    """Process-local state (tests; lost on restart)."""


StateStore = PostgresStateStore | InMemoryStateStore


class WatermarkSpec(Spec, frozen=True, kw_only=True):
    """[watermark]: how event time advances."""

    lateness_ms: Annotated[Ms, doc("slack subtracted from each source's max event time")] = 0
    source_idleness_ms: Annotated[
        PositiveMs, doc("a source silent this long stops holding the watermark back")
    ] = 60_000
    max_drift_ms: Annotated[
        Ms | None,
        doc(
            "watermark alignment: a Kafka partition whose event time runs this far ahead of "
            "the watermark is not fetched while a partition behind it has a backlog; 0: off; "
            "unset: 300000 for windows, off for joins"
        ),
    ] = None


# ---------------------------------------------------------------------------
# The pipeline


class PipelineSpec(Spec, frozen=True, kw_only=True):
    """One pipeline.toml."""

    pipeline_name: Annotated[NonEmptyStr, doc("names metrics labels, state rows, DLQ records")]
    source_query: Annotated[str | None, doc("what the single [source] reads")] = None
    idle_pause_ms: Annotated[Ms, doc("sleep after an empty read")] = 500
    delivery: Annotated[
        Literal["auto", "at_least_once", "exactly_once"],
        doc(
            "auto / at_least_once; exactly_once: Kafka to Kafka transactions that carry the "
            "consumer offsets (Kafka sources, one Kafka target, no window / join / CDC)"
        ),
    ] = "auto"
    dead_letter_topic: Annotated[str | None, doc("app-level DLQ topic (Kafka source)")] = None
    dlq_store: Annotated[
        str | None,
        doc(
            "DLQ store: auto / topic / table as the reference; ours: kafka:TOPIC, "
            "postgres:SCHEMA.TABLE or a .jsonl file path"
        ),
    ] = None
    dlq_max_attempts: Annotated[PositiveInt | None, doc("tries of a failing batch before DLQ")] = (
        None
    )
    replicas: Annotated[
        bool,
        doc(
            "(ours) may run as several processes in one consumer group: state and fencing per "
            "source partition; windows and joins need input partitioned by their keys"
        ),
    ] = False
    write_behind: Annotated[
        bool,
        doc(
            "(ours) a window or join writes and commits a round while the next round runs "
            "its stages; false: one round at a time, a round's rows less in memory"
        ),
    ] = True
    source: Annotated[Source | None, doc("the one source")] = None
    sources: Annotated[list[Source] | None, doc("several sources, each with its query")] = None
    target: Annotated[Target | None, doc("the one target")] = None
    targets: Annotated[list[Target] | None, doc("several targets, all written before a commit")] = (
        None
    )
    transform: Annotated[TransformSpec | None, doc("stages between sources and targets")] = None
    state_store: Annotated[StateStore | None, doc("where operator state and positions live")] = None
    watermark: Annotated[WatermarkSpec | None, doc("event-time watermark tuning")] = None

    @property
    def all_sources(self) -> list[Source]:
        """The sources in file order, whichever form the file used."""
        if self.sources is not None:
            return list(self.sources)
        return [self.source] if self.source is not None else []

    @property
    def all_targets(self) -> list[Target]:
        """The targets in file order, whichever form the file used."""
        if self.targets is not None:
            return list(self.targets)
        return [self.target] if self.target is not None else []

    def query_of(self, source: Source) -> str:
        """What ``source`` reads: its own ``query`` or the top-level ``source_query``."""
        return source.query or self.source_query or ""


# ---------------------------------------------------------------------------
# The connector unions. Every connector spec is a ``SourceSpec`` /
# ``TargetSpec`` / ``LookupSpec`` subclass, so that is what code typed
# against these names sees; msgspec decodes by the runtime unions below,
# which the registry builds from its descriptors.

if TYPE_CHECKING:
    Source = SourceSpec
    Target = TargetSpec
    Lookup = LookupSpec
else:
    # Imported last: the connector packages build their specs from
    # sluice.config.base, and the registry imports them.
    from sluice.connectors import registry as _registry

    Source = _registry.union("source")
    Target = _registry.union("target")
    Lookup = _registry.union("lookup")

_UNION_FIELDS: dict[type[Any], tuple[str, ...]] = {
    PipelineSpec: ("source", "sources", "target", "targets", "transform"),
    TransformSpec: ("lookups",),
}
_built: dict[int, type[PipelineSpec]] = {}


def pipeline_type() -> type[PipelineSpec]:
    """The :class:`PipelineSpec` type that decodes every registered connector kind.

    With only the built-in connectors this is :class:`PipelineSpec` itself.
    After :func:`~sluice.connectors.registry.register` it is a subclass (same
    name, same keys) whose source / target / lookup unions include the new
    kinds: msgspec fixes a Struct's field types the first time it decodes
    one, so the unions cannot change in place.
    """
    from sluice.connectors import registry

    generation = registry.generation()
    if generation == 0:
        return PipelineSpec
    if generation not in _built:
        names = {role.capitalize(): registry.union(role) for role in ("source", "target", "lookup")}
        transform = _rebuild(TransformSpec, names)
        _built[generation] = _rebuild(PipelineSpec, {**names, "TransformSpec": transform})
    return _built[generation]


def _rebuild(cls: type[Any], names: dict[str, Any]) -> Any:
    """A subclass of ``cls`` whose union-typed fields resolve ``names`` anew."""
    hints = typing.get_type_hints(cls, globalns={**globals(), **names}, include_extras=True)
    fields: list[tuple[str, Any, Any]] = []
    for f in msgspec.structs.fields(cls):
        if f.name not in _UNION_FIELDS[cls]:
            continue
        default = (
            msgspec.field(default_factory=f.default_factory)
            if f.default_factory is not msgspec.NODEFAULT
            else f.default
        )
        fields.append((f.name, hints[f.name], default))
    rebuilt = msgspec.defstruct(
        cls.__name__,
        fields,
        bases=(cls,),
        module=cls.__module__,
        frozen=True,
        kw_only=True,
        forbid_unknown_fields=True,
    )
    rebuilt.__doc__ = cls.__doc__
    return rebuilt


__all__ = [
    "Aggregation",
    "CdcSpec",
    "JoinSpec",
    "Lookup",
    "PipelineSpec",
    "Source",
    "StateStore",
    "Target",
    "TransformSpec",
    "WatermarkSpec",
    "Window",
    "pipeline_type",
]
