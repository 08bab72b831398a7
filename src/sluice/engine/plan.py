"""The pipeline spec compiled into a graph: sources → stages → targets.

The plan is what ``flow plan`` prints and what the run loop executes: each
source node reads Arrow batches, stage nodes (union, sql, window, join, cdc)
transform them in order, and every target node receives the stage output.
Each edge says what it carries. Node details are redacted: no secret ever
appears in a plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from sluice.config.base import TableSpec
from sluice.config.redact import redact_value
from sluice.config.spec import (
    HoppingWindow,
    PipelineSpec,
    SessionWindow,
    TumblingWindow,
)
from sluice.connectors import registry

Role = Literal["source", "stage", "target", "dlq"]

BATCH = "Arrow record batches: payload columns + _event_ts (timestamp[us, UTC])"
RAW_BATCH = "Arrow record batches: value (binary) + _event_ts (timestamp[us, UTC])"


@dataclass(frozen=True, slots=True)
class Node:
    """One step of the plan. ``id`` is unique; ``detail`` is redacted."""

    id: str
    role: Role
    kind: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Edge:
    """Data flowing from ``src`` to ``dst``; ``carries`` says what it is."""

    src: str
    dst: str
    carries: str


@dataclass(frozen=True, slots=True)
class Plan:
    """The compiled pipeline: nodes in execution order and the edges between them."""

    pipeline: str
    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    delivery: str

    def by_role(self, role: Role) -> list[Node]:
        """The nodes of one role, in execution order."""
        return [n for n in self.nodes if n.role == role]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (``flow plan --json``)."""
        return {
            "pipeline": self.pipeline,
            "delivery": self.delivery,
            "nodes": [
                {"id": n.id, "role": n.role, "kind": n.kind, "detail": n.detail} for n in self.nodes
            ],
            "edges": [{"from": e.src, "to": e.dst, "carries": e.carries} for e in self.edges],
        }

    def to_text(self) -> str:
        """A human-readable form (``flow plan``)."""
        lines = [f"pipeline {self.pipeline}", f"  delivery: {self.delivery}", ""]
        for role, title in (
            ("source", "sources"),
            ("stage", "stages"),
            ("target", "targets"),
            ("dlq", "dead letters"),
        ):
            nodes = self.by_role(role)  # type: ignore[arg-type]  # literal from the tuple above
            if not nodes:
                continue
            lines.append(title)
            for n in nodes:
                detail = " ".join(f"{k}={_fmt(v)}" for k, v in n.detail.items())
                lines.append(f"  [{n.id}] {n.kind}  {detail}".rstrip())
            lines.append("")
        lines.append("flow")
        lines.extend(f"  {e.src} -> {e.dst}: {e.carries}" for e in self.edges)
        return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}={_fmt(v)}" for k, v in value.items()) + "}"
    return str(value)


def _detail(spec: msgspec.Struct, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields a user set (differing from defaults), redacted."""
    out: dict[str, Any] = {}
    for f in msgspec.structs.fields(spec):
        name = f.name
        if name in skip:
            continue
        value = getattr(spec, name)
        if value is None or value in ([], {}):
            continue
        if not f.required and f.default is not msgspec.NODEFAULT and value == f.default:
            continue
        if isinstance(value, TableSpec):
            out["table"] = _table_name(value)
            if value.primary_key:
                out["primary_key"] = list(value.primary_key)
            continue
        if isinstance(value, msgspec.Struct):
            value = msgspec.to_builtins(value)
        out[f.encode_name] = redact_value(name, value)
    return out


def _table_name(table: TableSpec) -> str:
    return ".".join(p for p in (table.schema, table.name) if p)


def build_plan(spec: PipelineSpec) -> Plan:
    """Compile a validated spec into its plan graph."""
    nodes: list[Node] = []
    edges: list[Edge] = []

    source_ids: list[str] = []
    carries: dict[str, str] = {}
    for src in spec.all_sources:
        query = spec.query_of(src)
        node_id = f"source:{query}"
        detail = {"query": query, **_detail(src, skip=("query",))}
        detail.update(src.derived_keys(spec.pipeline_name))
        nodes.append(Node(node_id, "source", src.kind, detail))
        source_ids.append(node_id)
        carries[node_id] = RAW_BATCH if src.raw_payload else BATCH

    transform = spec.transform
    upstream: list[str] = source_ids
    last_carries = BATCH

    def stage(node: Node, carried: str) -> None:
        nonlocal upstream, last_carries
        nodes.append(node)
        for up in upstream:
            edges.append(Edge(up, node.id, carries.get(up, last_carries)))
        upstream = [node.id]
        last_carries = carried

    join = transform.join if transform else None
    if join is not None:
        stage(
            Node("stage:join", "stage", "join", _detail(join)),
            f"joined rows: {join.left_column_prefix}* and {join.right_column_prefix}* columns",
        )
    elif len(source_ids) > 1:
        stage(
            Node("stage:union", "stage", "union", {"inputs": len(source_ids)}),
            "unioned Arrow batches (columns of every source; absent ones null)",
        )
    elif source_ids:
        last_carries = carries[source_ids[0]]

    if transform is not None and transform.sql and transform.sql.strip():
        sql_detail: dict[str, Any] = {"dialect": transform.dialect, "on_error": transform.on_error}
        if transform.lookups:
            sql_detail["lookups"] = {
                name: {"kind": lk.kind, "table": ".".join(p for p in (lk.schema, lk.table) if p)}
                for name, lk in transform.lookups.items()
            }
        if transform.udf_modules:
            sql_detail["udf_modules"] = list(transform.udf_modules)
        stage(Node("stage:sql", "stage", "sql", sql_detail), "rows of the SQL result")

    window = transform.window if transform else None
    if window is not None:
        cols = [window.window_start_column, window.window_end_column]
        if isinstance(window, SessionWindow):
            cols.append(window.session_id_column)
        aggs = [f"{a.as_}={a.agg}({a.column or '*'})" for a in window.aggregations]
        w_detail = _detail(window, skip=("aggregations",))
        w_detail["aggregations"] = aggs
        carried = "one row per closed window and group: " + ", ".join(
            [*cols, *window.group_by, *(a.as_ for a in window.aggregations)]
        )
        assert isinstance(window, TumblingWindow | HoppingWindow | SessionWindow)
        stage(Node("stage:window", "stage", window.kind, w_detail), carried)

    cdc = transform.cdc if transform else None
    if cdc is not None:
        stage(
            Node("stage:cdc", "stage", "cdc", _detail(cdc)),
            "change events (newest per key) applied as upsert / delete in one transaction",
        )

    for i, tgt in enumerate(spec.all_targets):
        node = Node(f"target:{i}", "target", tgt.kind, _detail(tgt))
        nodes.append(node)
        edges.extend(Edge(up, node.id, carries.get(up, last_carries)) for up in upstream)

    dlq = _dlq(spec)
    if dlq is not None:
        nodes.append(Node("dlq", "dlq", dlq[0], dlq[1]))
        # Undecodable messages leave at the sources, failed batches at the SQL stage.
        origins = [n.id for n in nodes if n.role == "source" or n.id == "stage:sql"]
        edges.extend(
            Edge(o, "dlq", "rejected messages: raw payload + error, source, partition, offset")
            for o in origins
        )
        if window is not None and window.late_data == "dlq":
            edges.append(
                Edge(
                    "stage:window",
                    "dlq",
                    "late rows: raw payload (the row as JSON after SQL) + reason",
                )
            )

    if spec.delivery == "exactly_once":  # Kafka -> Kafka (checked by the config rules)
        delivery = (
            "exactly once; each round is one Kafka transaction: the output messages and the "
            "source offsets (send_offsets_to_transaction) commit together (read the output "
            "with isolation.level=read_committed)"
        )
    elif spec.state_store is not None:
        delivery = (
            "at least once; targets flushed, then operator state and source positions "
            f"committed in one {spec.state_store.kind} transaction, then sources acked"
        )
    else:
        delivery = "at least once; every target flushed before the sources commit"
    return Plan(spec.pipeline_name, tuple(nodes), tuple(edges), delivery)


def _dlq(spec: PipelineSpec) -> tuple[str, dict[str, Any]] | None:
    """The dead-letter node: (kind, detail), or ``None`` when nothing routes there."""
    holders = []  # sources whose connection holds dead letters in a topic
    for s in spec.all_sources:
        support = registry.of(s).dead_letters
        if support is not None and support.word == "topic":
            holders.append((s.kind, support.own(s) if support.own else None))
    own = next((topic for _, topic in holders if topic), None)
    topic = spec.dead_letter_topic or own
    if topic:
        return (holders[0][0] if holders else "topic"), {"topic": topic}
    if spec.dlq_store:
        store = spec.dlq_store
        prefix, colon, _ = store.partition(":")
        if store in ("auto", "topic", "table"):
            kind = store
        elif colon and any(prefix in c.kinds for c in registry.connectors() if c.dead_letters):
            kind = prefix
        else:
            kind = "jsonl"
        return kind, {"store": redact_value("dlq_store", store)}
    return None
