"""Loads: one batch-job run written to one table in one mode, as one unit.

API (stable; batch jobs write through it)::

    @dataclass(frozen=True)
    class LoadSpec:
        table: str                       # "name" or "schema.name"
        mode: Literal["append", "truncate", "merge", "scd2"] = "append"
        primary_key: tuple[str, ...] = ()    # merge / scd2 key (merge: else reflected)
        compare_columns: tuple[str, ...] | None = None  # scd2 (default: non-key columns)
        event_timestamp_column: str | None = None        # scd2 valid_from (default: load time)
        ttl_seconds: int | None = None                   # scd2: close stale current versions
        create: bool = True              # create the table / add new columns

    def open_load(connection: Connection, spec: LoadSpec, schema: pa.Schema) -> Load
    class Load:                          # nothing visible until commit
        def write(self, batch: pa.RecordBatch | pa.Table) -> None
        def commit(self) -> int          # rows written (append, truncate, merge) or
                                         # versions inserted + closed (scd2)
        def abort(self) -> None
        # also a context manager: commits on success, aborts on an exception
    def insert_select(connection: Connection, spec: LoadSpec, select_sql: str) -> int
        # same database: the rows of select_sql, in the mode, one transaction

``connection`` is a :class:`sluice.api.connections.Connection` of kind
``postgres``, ``mysql``, ``sqlite``, ``duckdb``, ``delta_local`` or
``delta_s3`` (its keys as a ``[target]`` table takes them).

A load is the streaming target of that kind (the same DDL, type mapping,
bulk path and mode statements: :mod:`sluice.connectors.sql.modes`) with one
transaction for the whole run: ``truncate`` deletes the old rows in the
transaction that inserts the new ones, so a reader sees the old table until
the commit and the new one after, never an empty one (Delta: one overwrite
commit). The table is created, or its new columns added, from ``schema``
when the load opens (MySQL commits DDL implicitly, so it happens before any
row is written); a later batch's new columns are added too (``create``), or
refused (``create=False``). A Delta load keeps its batches in memory until the commit (one
Delta commit); the SQL ones write each batch into the open transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol

import pyarrow as pa

from sluice.errors import ConnectorError

if TYPE_CHECKING:
    from sluice.api.connections import Connection

Mode = Literal["append", "truncate", "merge", "scd2"]

#: Connection kinds a load writes to.
KINDS = ("postgres", "mysql", "sqlite", "duckdb", "delta_local", "delta_s3")


@dataclass(frozen=True)
class LoadSpec:
    """Where and how a load writes; see the module docstring."""

    table: str
    mode: Mode = "append"
    primary_key: tuple[str, ...] = ()
    compare_columns: tuple[str, ...] | None = None
    event_timestamp_column: str | None = None
    ttl_seconds: int | None = None
    create: bool = True


class Loadable(Protocol):
    """What a target offers a load (the SQL and Delta targets)."""

    id: str

    def open(self) -> None: ...
    def close(self) -> None: ...
    def prepare(self, schema: pa.Schema, *, create: bool = True) -> None: ...
    def write(self, data: pa.Table) -> None: ...
    def flush(self) -> None: ...
    def committed_rows(self) -> int: ...
    def insert_select(self, select_sql: str, *, create: bool = True) -> None: ...


def _target(connection: Connection, spec: LoadSpec) -> Loadable:
    import msgspec

    from sluice.config.load import load_data
    from sluice.connectors import registry

    if connection.kind not in KINDS:
        raise ConnectorError(
            f"a load cannot write to a {connection.kind} connection (one of {', '.join(KINDS)})"
        )
    schema, _, name = spec.table.rpartition(".")
    table: dict[str, Any] = {"name": name}
    if schema:
        table["schema"] = schema
    if spec.primary_key:
        table["primary_key"] = list(spec.primary_key)
    # Only the keys a [target] of the kind takes (a postgres connection may
    # carry state-store keys, a lookup's ...).
    (kind_spec,) = [
        t for t in registry.specs("target") if t.__struct_config__.tag == connection.kind
    ]
    allowed = {f.encode_name for f in msgspec.structs.fields(kind_spec)}
    keys = {k: v for k, v in connection.keys.items() if k in allowed}
    target: dict[str, Any] = {**keys, "kind": connection.kind, "table": table, "mode": spec.mode}
    if connection.kind.startswith("delta"):
        # Delta: the table is a folder under the connection's path / prefix.
        target["table"] = {k: v for k, v in table.items() if k == "primary_key"}
        folder = spec.table.replace(".", "/")
        where = "path" if connection.kind == "delta_local" else "prefix"
        base = str(target.get(where) or "").rstrip("/")
        target[where] = f"{base}/{folder}" if base else folder
    if spec.compare_columns is not None:
        target["compare_columns"] = list(spec.compare_columns)
    if spec.event_timestamp_column is not None:
        target["event_timestamp_column"] = spec.event_timestamp_column
    if spec.ttl_seconds is not None:
        target["ttl_seconds"] = spec.ttl_seconds
    pipeline = load_data(
        {
            "pipeline_name": f"load:{spec.table}",
            "source_query": "unused",
            "source": {"kind": "kafka", "bootstrap_servers": "unused:9092"},
            "target": target,
        },
        f"load of {spec.table}",
    )
    (target_spec,) = pipeline.all_targets
    built: Loadable = registry.build_target(target_spec, registry.Context(pipeline), 0)  # type: ignore[assignment]
    if hasattr(built, "positions_table"):
        built.positions_table = False  # a load records no source positions
    return built


class Load:
    """One unit of writes to one table; see the module docstring."""

    def __init__(self, target: Loadable, spec: LoadSpec, schema: pa.Schema) -> None:
        self._target = target
        self._spec = spec
        self._names = set(schema.names)
        self._done = False

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        """Write ``batch`` into the open transaction."""
        if self._done:
            raise ConnectorError(f"{self._target.id}: the load is already committed or aborted")
        data = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
        extra = [n for n in data.column_names if n not in self._names]
        if extra and not self._spec.create:
            self.abort()
            raise ConnectorError(
                f"{self._target.id}: the batch has column(s) {extra} the load was not opened "
                "with, and it may not add them (create = false)"
            )
        try:
            self._target.write(data)
        except BaseException:
            self.abort()
            raise

    def commit(self) -> int:
        """Commit every batch written (one transaction); the rows it wrote or changed."""
        if self._done:
            raise ConnectorError(f"{self._target.id}: the load is already committed or aborted")
        try:
            self._target.flush()
            rows = self._target.committed_rows()
        except BaseException:
            self.abort()
            raise
        self._done = True
        self._target.close()
        return rows

    def abort(self) -> None:
        """Roll back everything written; the table is as it was."""
        if not self._done:
            self._done = True
            self._target.close()

    def __enter__(self) -> Load:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if kind is None:
            if not self._done:
                self.commit()
        else:
            self.abort()


def open_load(connection: Connection, spec: LoadSpec, schema: pa.Schema) -> Load:
    """Connect, create or migrate the table from ``schema`` (``spec.create``),
    and begin the unit (``truncate``: the old rows are deleted in it)."""
    target = _target(connection, spec)
    target.open()
    try:
        target.prepare(schema, create=spec.create)
    except BaseException:
        target.close()
        raise
    return Load(target, spec, schema)


def insert_select(connection: Connection, spec: LoadSpec, select_sql: str) -> int:
    """Write the rows of ``select_sql`` (run in the target database) in
    ``spec.mode``, in one transaction, without them leaving the database;
    the rows written or changed."""
    target = _target(connection, spec)
    target.open()
    try:
        target.insert_select(select_sql.strip().rstrip(";"), create=spec.create)
        target.flush()
        rows = target.committed_rows()
    finally:
        target.close()
    return rows
