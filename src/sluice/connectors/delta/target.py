"""Delta Lake targets (``delta_local``, ``delta_s3``) through the ``deltalake`` package.

**Plain targets** (:class:`DeltaTarget`): ``append`` adds each batch as one
commit (``write_deltalake``; a column the table lacks is added);
``merge`` runs one ``MERGE`` per batch on ``[target.table] primary_key`` (the
last row of a key in a batch wins); ``truncate`` overwrites the table in one
commit (readers see the old version until then); ``scd2`` applies the rules
of :mod:`sluice.connectors.sql.modes` in one ``MERGE`` (:meth:`DeltaTarget._scd2`).
A missing table is created by the first batch, partitioned by
``partition_by``. Every flush is one Delta commit: durable when it returns.

**CDC** (:class:`DeltaCdcTarget`) applies a change table
(:mod:`sluice.connectors.cdc_apply` has the rules) with one ``MERGE`` per
batch. Where the idempotency gate lives, so that it commits with the data:

* Each row carries its gate in three hidden columns, ``_sluice_cdc_ts_ms``,
  ``_sluice_cdc_seq`` and ``_sluice_cdc_hash``, written by the same MERGE as
  the row (and re-checked by its predicates). A Delta commit is atomic, so a
  live row and its gate never disagree.
* A hard-deleted row is gone, and its gate with it; yet an old create re-sent
  after the delete must not bring it back. Delta has no second table in one
  commit, so the deleted keys' versions are kept in a companion Delta table,
  ``<table>/_sluice_cdc_deletes`` (Delta readers and VACUUM ignore folders
  starting with ``_``), written by a second commit *after* the MERGE. A crash
  between the two commits leaves the markers one batch behind the table;
  the offsets of that batch were not committed, so it is read again and its
  deletes are applied (no-ops) and marked again before anything later. The
  only trace: a re-read that splits the batch differently may briefly show a
  deleted row again until the rest of the batch is applied.

The alternative, keeping deleted rows as hidden tombstone rows in the table,
commits in one step but leaves rows every reader has to filter out; a mirror
should be the source table, so the markers live beside it.

Decisions (which events pass the gate, the newest per key) are made in Arrow
from the versions read for the batch's keys; the MERGE predicates check the
versions again, so even a concurrent writer never makes a row older.

The key comes from ``[target.table] primary_key`` (Delta tables carry no key);
a key column the table does not have fails :meth:`open` naming it. Updates
write every column present in some image of the batch (a column an image
lacks becomes null) and leave the other columns as they are.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson

from sluice import faults
from sluice.config.spec import CdcSpec
from sluice.connectors.api import Position
from sluice.connectors.cdc_apply import (
    Applied,
    Evolution,
    changes_of,
    table_types,
)
from sluice.connectors.delta.spec import DeltaLocalTarget as DeltaLocalSpec
from sluice.connectors.delta.spec import DeltaS3Target as DeltaS3Spec
from sluice.connectors.registry import Context
from sluice.connectors.sql import modes
from sluice.errors import ConnectorError, TransientError
from sluice.formats import cdc as env

try:
    import deltalake
    from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
    from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError
    from deltalake.schema import Field, PrimitiveType
except ModuleNotFoundError as exc:  # pragma: no cover - exercised without the extra
    raise ModuleNotFoundError("deltalake", name="deltalake") from exc

log = logging.getLogger(__name__)

DeltaSpec = DeltaLocalSpec | DeltaS3Spec

#: The hidden gate columns of a CDC mirror row.
TS_COLUMN = "_sluice_cdc_ts_ms"
SEQ_COLUMN = "_sluice_cdc_seq"
HASH_COLUMN = "_sluice_cdc_hash"
GATE_COLUMNS = (TS_COLUMN, SEQ_COLUMN, HASH_COLUMN)
#: Folder (inside the table) of the deleted keys' versions.
DELETES_DIR = "_sluice_cdc_deletes"

_OP = "_sluice_op"
_N = "_sluice_n"
#: Up to this many keys, a batch reads the stored versions with an IN list;
#: beyond, the keys' range (an IN list of 10k integers costs ~0.15 s to plan).
_IN_LIST_KEYS = 1_000


def location(spec: DeltaSpec) -> tuple[str, dict[str, str] | None]:
    """The table URI and the object-store options of ``spec``."""
    if isinstance(spec, DeltaLocalSpec):
        return spec.path, None
    prefix = (spec.prefix or "").strip("/")
    uri = f"s3://{spec.bucket}/{prefix}" if prefix else f"s3://{spec.bucket}"
    options: dict[str, str] = {}
    if spec.endpoint:
        options["AWS_ENDPOINT_URL"] = spec.endpoint
        if spec.endpoint.startswith("http://"):
            options["AWS_ALLOW_HTTP"] = "true"
    if spec.region:
        options["AWS_REGION"] = spec.region
    if spec.access_key_id:
        options["AWS_ACCESS_KEY_ID"] = spec.access_key_id
    if spec.secret_access_key:
        options["AWS_SECRET_ACCESS_KEY"] = spec.secret_access_key
    return uri, options or None


def _fail(target_id: str, what: str, exc: Exception) -> Exception:
    """A Delta failure as a sluice error: a lost commit race or I/O is transient."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, CommitFailedError | OSError):
        return TransientError(f"{target_id}: {what}: {text}")
    return ConnectorError(f"{target_id}: {what}: {text}")


def _arrow_schema(table: DeltaTable) -> pa.Schema:
    return pa.schema(table.schema().to_arrow())


def _quote(name: str) -> str:
    """A column name for a deltalake (DataFusion SQL) expression."""
    return "`" + name.replace("`", "``") + "`"


def _last_per_key(data: pa.Table, key: list[str], order: list[str]) -> pa.Table:
    """The last row of each key, ``order`` ascending (vectorised: sort, then compare neighbours)."""
    if data.num_rows <= 1:
        return data
    data = data.sort_by([(k, "ascending") for k in key] + [(o, "ascending") for o in order])
    last = np.zeros(data.num_rows, dtype=bool)
    last[-1] = True
    for k in key:
        col = data[k].combine_chunks()
        head, tail = col.slice(0, len(col) - 1), col.slice(1)
        differs = pc.fill_null(pc.not_equal(head, tail), True)
        both_null = pc.and_(pc.is_null(head), pc.is_null(tail))
        last[:-1] |= np.asarray(pc.and_not(differs, both_null))
    return data.filter(pa.array(last))


#: The commit-info key (suffixed with the pipeline name) listing the source
#: positions a target holds; the values of the integer ones are read back
#: from the app transactions, which are authoritative.
POSITIONS_KEY = "sluice.positions/"
#: How many recent commits are searched first for the positions (then all).
_RECENT_COMMITS = 50


def app_id(pipeline: str, source: str, partition: str) -> str:
    """The Delta app-transaction id of one source partition of a pipeline."""
    return f"sluice/{pipeline}/{source}/{partition}"


class DeltaTarget:
    """Appends or merges batches into one Delta table, one commit per flush.

    **Positions** (capability ``transactional_positions``): the source
    positions the commit policy stages go into the same Delta commit as the
    rows, one app transaction (``txn`` action) per integer position,
    ``app_id = sluice/<pipeline>/<source>/<partition>`` and ``version`` = the
    position; the commit info also lists every position the target holds
    (``sluice.positions/<pipeline>``), so a restart knows which app ids to
    read back with :meth:`DeltaTable.transaction_version`. A round without
    rows commits its positions alone (a commit with no files). A flush whose
    staged positions are all at or below the ones the table holds is a replay
    of rows already committed: skipped. With ``flush_rows`` /
    ``flush_interval_ms`` a flush that carries positions is kept for a later
    commit (:class:`~sluice.connectors.sql.positions.DefersCommits`: the
    sources are acknowledged only after it). Text positions (no Delta
    transaction can hold them) are not recorded: those sources resume from
    their own commits (at least once).
    """

    def __init__(self, spec: DeltaSpec, ctx: Context, index: int) -> None:
        self.spec = spec
        self.uri, self.options = location(spec)
        self.id = f"{spec.kind}:{self.uri}"
        self.key = list(spec.table.primary_key or []) if spec.table else []
        self.pipeline = ctx.pipeline.pipeline_name
        self._pending: list[pa.Table] = []  # written since the last flush
        self._staged: dict[str, Position] = {}  # positions staged since the last flush
        # Taken by a flush, not committed yet (deferred): kept across close / open,
        # so a retry after a failed commit commits them.
        self._rows: list[pa.Table] = []
        self._accepted: dict[str, Position] = {}
        self._held: dict[str, Position] = {}  # what the table holds (loaded, then as committed)
        self._defer = spec.flush_rows is not None or spec.flush_interval_ms is not None
        self._last_commit = time.monotonic()
        modes.check(self.id, spec, self.key)
        self._prepared: pa.Schema | None = None  # a load's schema: truncate writes it even empty
        self._committed_rows = 0  # rows the last commit wrote (scd2: versions inserted + closed)
        if spec.mode == "merge" and not self.key:
            raise ConnectorError(f'{self.id}: mode = "merge" needs [target.table] primary_key')

    def open(self) -> None:
        """Check the table (when it exists) has the key columns."""
        table = self._table()
        if table is not None and self.key:
            names = set(_arrow_schema(table).names)
            missing = [k for k in self.key if k not in names]
            if missing:
                raise ConnectorError(
                    f"{self.id}: primary_key column(s) {missing} are not columns of the table "
                    f"(it has {', '.join(sorted(names))})"
                )

    def close(self) -> None:
        """Forget what was not flushed."""
        self._pending = []
        self._staged = {}
        self._prepared = None

    # -- loads (sluice.connectors.sql.load) -----------------------------------------

    def prepare(self, schema: pa.Schema, *, create: bool = True) -> None:
        """Begin a load of batches of ``schema``: check the table (``create``
        false: it must exist with those columns); ``truncate`` replaces the
        table at the commit even when no row came. The table itself is
        created or widened by the commit (one Delta commit)."""
        if not create:
            table = self._table()
            have = set(_arrow_schema(table).names) if table is not None else set()
            want = modes.with_scd2(schema) if self.spec.mode == "scd2" else schema
            missing = [n for n in want.names if n not in have]
            if table is None or missing:
                raise ConnectorError(
                    f"{self.id}: "
                    + ("the table does not exist" if table is None else f"no column(s) {missing}")
                    + " and the load may not create them (create = false)"
                )
        self._prepared = pa.schema([f for f in schema if not pa.types.is_null(f.type)])

    def committed_rows(self) -> int:
        """Rows the last flush committed (append, truncate, merge: written;
        scd2: versions inserted and closed)."""
        return self._committed_rows

    def insert_select(self, select_sql: str, *, create: bool = True) -> None:
        """A Delta table runs no SQL of its own."""
        raise ConnectorError(f"{self.id}: a Delta table has no INSERT ... SELECT; stream batches")

    # -- positions (RecordsPositions) ---------------------------------------------

    @property
    def database(self) -> str | None:
        """A Delta table shares no transaction with a state store."""
        return None

    def held_positions(self) -> dict[str, Position]:
        """The positions the table holds for this pipeline (see the class docstring)."""
        table = self._table()
        self._held = {}
        if table is None:
            return {}
        key = POSITIONS_KEY + self.pipeline
        listed: dict[str, Position] | None = None
        try:
            for limit in (_RECENT_COMMITS, None):
                for commit in table.history(limit):
                    if key in commit:
                        listed = json.loads(commit[key])
                        break
                if listed is not None or table.version() < _RECENT_COMMITS:
                    break
            for source, parts in (listed or {}).items():
                for part, value in parts.items():
                    if isinstance(value, int):
                        version = table.transaction_version(app_id(self.pipeline, source, part))
                        if version is None:
                            continue
                        value = version
                    self._held.setdefault(source, {})[part] = value
        except (DeltaError, OSError) as exc:
            raise _fail(self.id, "cannot read the positions", exc) from exc
        return {s: dict(p) for s, p in self._held.items()}

    def stage_positions(
        self, positions: Mapping[str, Position], also: Callable[[Any], None] | None = None
    ) -> None:
        """Record ``positions`` in the next flush's commit."""
        if also is not None:  # pragma: no cover - database is None: never joined
            raise ConnectorError(f"{self.id}: a state store cannot commit in a Delta commit")
        for source, parts in positions.items():
            self._staged.setdefault(source, {}).update(parts)

    def _replayed(self) -> bool:
        """Whether every staged position is at or below what the table holds."""
        staged = [(s, p, v) for s, parts in self._accepted.items() for p, v in parts.items()]
        return bool(staged) and all(
            isinstance(v, int)
            and isinstance(held := self._held.get(s, {}).get(p), int)
            and v <= held
            for s, p, v in staged
        )

    def _commit_properties(self) -> CommitProperties | None:
        if not self._accepted:
            return None
        merged = {s: dict(p) for s, p in self._held.items()}
        for source, parts in self._accepted.items():
            merged.setdefault(source, {}).update(parts)
        return CommitProperties(
            custom_metadata={POSITIONS_KEY + self.pipeline: json.dumps(merged)},
            app_transactions=[
                Transaction(app_id(self.pipeline, s, p), v)
                for s, parts in self._accepted.items()
                for p, v in parts.items()
                if isinstance(v, int)
            ],
        )

    def _committed(self) -> None:
        for source, parts in self._accepted.items():
            self._held.setdefault(source, {}).update(parts)
        self._accepted = {}
        self._last_commit = time.monotonic()
        faults.reached("DELTA_COMMITS")  # crash tests: between this commit and the source's

    def _table(self) -> DeltaTable | None:
        try:
            return DeltaTable(self.uri, storage_options=self.options)
        except TableNotFoundError:
            return None
        except (DeltaError, OSError) as exc:
            raise _fail(self.id, "cannot open the table", exc) from exc

    def write(self, data: pa.Table) -> None:
        """Keep ``data`` for the next flush."""
        if data.num_rows:
            names = [
                n for n in data.column_names if not pa.types.is_null(data.schema.field(n).type)
            ]
            self._pending.append(data.select(names))

    def flush(self) -> None:
        """Take what was written since the last flush, with the staged
        positions, and commit it as one Delta commit (positions alone when no
        rows came) — or, with ``flush_rows`` / ``flush_interval_ms`` and
        positions staged, keep it for :meth:`commit_deferred` until due."""
        self._rows.extend(self._pending)
        for source, parts in self._staged.items():
            self._accepted.setdefault(source, {}).update(parts)
        defer = bool(self._staged) and self._defer
        self._pending, self._staged = [], {}
        if not defer or self._due():
            self._commit()

    @property
    def deferred(self) -> bool:
        """Whether rows or positions taken by a flush wait for their commit."""
        return bool(self._rows or self._accepted)

    def commit_deferred(self, force: bool) -> None:
        """Commit what waits when ``flush_rows`` / ``flush_interval_ms`` say so, or ``force``."""
        if self.deferred and (force or self._due()):
            self._commit()

    def _due(self) -> bool:
        rows = sum(t.num_rows for t in self._rows)
        flush_rows = self.spec.flush_rows
        interval_ms = self.spec.flush_interval_ms
        if flush_rows is not None and rows >= flush_rows:
            return True
        return (
            interval_ms is not None and (time.monotonic() - self._last_commit) * 1000 >= interval_ms
        )

    def _commit(self) -> None:
        """One Delta commit of the taken rows and positions."""
        replace = self.spec.mode == "truncate" and self._prepared is not None
        self._committed_rows = 0
        if not self._rows and not self._accepted and not replace:
            return
        if self._replayed():
            log.warning(
                "%s: skipping a replayed batch: the table holds its positions already", self.id
            )
            self._rows, self._accepted = [], {}
            return
        props = self._commit_properties()
        try:
            table = self._table()
            if not self._rows and not replace:
                if table is not None and props is not None:
                    table.create_write_transaction(
                        [], mode="append", schema=table.schema(), commit_properties=props
                    )
                self._committed()
                return
            if self._rows:
                data = pa.concat_tables(self._rows, promote_options="permissive")
            else:
                assert self._prepared is not None
                data = self._prepared.empty_table()
            if self.spec.mode in ("merge", "scd2"):  # the last row of a key wins
                data = data.append_column(_N, pa.array(np.arange(data.num_rows, dtype=np.int64)))
                data = _last_per_key(data, self.key, [_N]).drop_columns([_N])
            if self.spec.mode == "scd2":
                self._committed_rows = self._scd2(table, data, props)
            elif self.spec.mode == "merge" and table is not None:
                self._merge(table, data, props)
                self._committed_rows = data.num_rows
            else:
                write_deltalake(
                    self.uri,
                    data,
                    mode="overwrite" if self.spec.mode == "truncate" else "append",
                    partition_by=self.spec.partition_by or None,
                    schema_mode="merge",
                    storage_options=self.options,
                    commit_properties=props,
                )
                self._committed_rows = data.num_rows
        except (DeltaError, OSError) as exc:
            raise _fail(self.id, "write failed", exc) from exc
        self._rows = []
        self._prepared = None
        self._committed()

    def _merge(self, table: DeltaTable, data: pa.Table, props: CommitProperties | None) -> None:
        """Upsert ``data`` (one row per key) on the primary key: one MERGE, one commit."""
        on = " AND ".join(f"t.{_quote(k)} = s.{_quote(k)}" for k in self.key)
        (
            table.merge(
                data,
                on,
                source_alias="s",
                target_alias="t",
                merge_schema=True,
                commit_properties=props,
            )
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .execute()
        )

    def _scd2(
        self, table: DeltaTable | None, data: pa.Table, props: CommitProperties | None
    ) -> int:
        """Apply ``data`` (one row per key) as scd2 versions (the rules of
        :mod:`sluice.connectors.sql.modes`) in one MERGE: the rows whose
        current version changed (found in Arrow from the current versions of
        the batch's keys) come twice, once keyed to close that version and
        once unkeyed to be inserted. The versions inserted and closed."""
        names = data.column_names
        clash = [n for n in modes.SCD2_COLUMNS if n in names]
        if clash:
            raise ConnectorError(f"{self.id}: the rows carry {clash}, which scd2 maintains itself")
        compare = (
            [c for c in names if c not in self.key]
            if self.spec.compare_columns is None
            else list(self.spec.compare_columns)
        )
        unknown = [c for c in compare if c not in names]
        if unknown:
            raise ConnectorError(f"{self.id}: compare_columns {unknown} are not in the rows")
        ts = self.spec.event_timestamp_column
        if ts is not None and ts not in names:
            raise ConnectorError(f"{self.id}: event_timestamp_column {ts!r} is not in the rows")
        utc = pa.timestamp("us", tz="UTC")
        now = datetime.now(UTC)
        valid_from = pc.cast(data[ts], utc) if ts else pa.repeat(pa.scalar(now, utc), data.num_rows)
        if table is None:  # created empty, then merged into (a new table: nobody saw it)
            write_deltalake(
                self.uri,
                modes.with_scd2(data.schema).empty_table(),
                partition_by=self.spec.partition_by or None,
                storage_options=self.options,
            )
            table = DeltaTable(self.uri, storage_options=self.options)
        have = set(_arrow_schema(table).names)
        new = [data.schema.field(n) for n in names if n not in have]
        if new:  # a column the table lacks: added first (nullable; the MERGE fills it)
            table.alter.add_columns([Field.from_arrow(f) for f in new])
            table = DeltaTable(self.uri, storage_options=self.options)
        changed = self._changed(table, data, compare)
        marks = [f"_sluice_mk_{i}" for i in range(len(self.key))]
        keyed = data.append_column("valid_from", valid_from).append_column(
            "_sluice_changed", changed
        )
        for mark, k in zip(marks, self.key, strict=True):
            keyed = keyed.append_column(mark, data[k])
        again = keyed.filter(changed)
        for mark in marks:
            again = again.set_column(
                again.schema.get_field_index(mark), mark, pa.nulls(again.num_rows, again[mark].type)
            )
        staged = pa.concat_tables([keyed, again.cast(keyed.schema)])
        on = " AND ".join(
            f"t.{_quote(k)} = s.{_quote(m)}" for k, m in zip(self.key, marks, strict=True)
        )
        parts = modes.hash_parts(compare, lambda c: f"cast(s.{_quote(c)} as string)")
        insert = {c: f"s.{_quote(c)}" for c in names}
        insert |= {
            "valid_from": "s.valid_from",
            "valid_to": "NULL",
            "is_current": "true",
            "row_hash": f"md5(concat_ws(chr(31), {', '.join(parts)}))" if parts else "md5('')",
        }
        merger = (
            table.merge(
                staged,
                f"{on} AND t.is_current",
                source_alias="s",
                target_alias="t",
                commit_properties=props,
            )
            .when_matched_update(
                {"is_current": "false", "valid_to": "s.valid_from"}, predicate="s._sluice_changed"
            )
            .when_not_matched_insert(insert)
        )
        if self.spec.ttl_seconds is not None:
            cutoff = now - timedelta(seconds=self.spec.ttl_seconds)
            merger = merger.when_not_matched_by_source_update(
                {"is_current": "false", "valid_to": _ts_literal(now)},
                predicate=f"t.is_current AND t.valid_from < {_ts_literal(cutoff)}",
            )
        metrics = merger.execute()
        return int(metrics["num_target_rows_inserted"]) + int(metrics["num_target_rows_updated"])

    def _changed(self, table: DeltaTable, data: pa.Table, compare: list[str]) -> pa.Array:
        """For each row of ``data``: whether its key's current version differs
        in a ``compare`` column (null-safe; a column the table lacks counts as
        null there)."""
        have = set(_arrow_schema(table).names)
        stored = [c for c in compare if c in have]
        current = _rows_for_keys(
            table, self.key, data.select(self.key), [*self.key, *stored, "is_current"]
        )
        current = current.filter(pc.fill_null(current["is_current"], False)).drop_columns(
            ["is_current"]
        )
        current = current.rename_columns([*self.key, *(f"_sluice_old_{c}" for c in stored)])
        current = current.append_column("_sluice_has", pa.repeat(pa.scalar(True), current.num_rows))
        rows = data.select([*self.key, *compare]).append_column(
            _N, pa.array(np.arange(data.num_rows, dtype=np.int64))
        )
        joined = rows.join(current, self.key, join_type="left outer").sort_by(_N)
        differs = pa.repeat(pa.scalar(False), joined.num_rows)
        for c in compare:
            new = joined[c]
            if c in have:
                old = joined[f"_sluice_old_{c}"]
                if new.type != old.type:
                    new, old = pc.cast(new, pa.string()), pc.cast(old, pa.string())
                same = pc.or_(
                    pc.fill_null(pc.equal(new, old), False),
                    pc.and_(pc.is_null(new), pc.is_null(old)),
                )
            else:
                same = pc.is_null(new)
            differs = pc.or_(differs, pc.invert(same))
        has = pc.fill_null(joined["_sluice_has"], False)
        out = pc.and_(has, differs)
        return out.combine_chunks() if isinstance(out, pa.ChunkedArray) else out


def _no_views(table: pa.Table) -> pa.Table:
    """``table`` with string / binary view columns as plain ones (joins take no views)."""
    fields = []
    for f in table.schema:
        if pa.types.is_string_view(f.type):
            f = f.with_type(pa.string())
        elif pa.types.is_binary_view(f.type):
            f = f.with_type(pa.binary())
        fields.append(f)
    return table.cast(pa.schema(fields))


def _ts_literal(at: datetime) -> str:
    """A UTC timestamp (microseconds) literal for a deltalake expression."""
    text = at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return f"arrow_cast('{text}', 'Timestamp(Microsecond, Some(\"UTC\"))')"


def _rows_for_keys(
    table: DeltaTable, key: list[str], keys: pa.Table, columns: list[str]
) -> pa.Table:
    """``columns`` of the rows whose ``key`` is in ``keys``.

    Read with deltalake's own engine (``DeltaTable.scan``), not a pyarrow
    dataset: a process that made one aborts at exit ("terminate called
    without an active exception"), which would turn every clean stop into
    a crash. The scan is narrowed by the batch's keys (an IN list for up
    to :data:`_IN_LIST_KEYS` keys, else their range), then joined in Arrow.
    """
    first = key[0]
    values = pc.unique(keys[first].combine_chunks()).drop_null()
    predicate = _key_predicate(first, values)
    found = _no_views(pa.table(table.scan(columns=columns, predicate=predicate)))
    if found.num_rows:
        wanted = keys.group_by(key).aggregate([])
        found = found.join(wanted, key, join_type="inner")
    return found.select(columns)


class DeltaCdcTarget:
    """Applies change tables to one Delta table: one MERGE (one commit) per batch."""

    def __init__(
        self, spec: DeltaSpec, ctx: Context, index: int, cdc: CdcSpec, *, count: bool
    ) -> None:
        self.spec = spec
        self.cdc = cdc
        self.pipeline = ctx.pipeline.pipeline_name
        self.uri, self.options = location(spec)
        self.deletes_uri = self.uri.rstrip("/") + "/" + DELETES_DIR
        self.id = f"{spec.kind}:{self.uri}"
        self.key = list(spec.table.primary_key or []) if spec.table else []
        if not self.key:
            raise ConnectorError(
                f"{self.id}: [transform.cdc] into Delta needs [target.table] primary_key"
            )
        self._decoder = env.EnvelopeDecoder(cdc, self.pipeline)
        self._evolution = Evolution(cdc, self.id)
        self._count = count
        self._pending: list[pa.Table] = []
        self._schema: pa.Schema | None = None  # the table's data columns (no gate columns)

    # -- lifecycle ------------------------------------------------------------

    def open(self) -> None:
        """Read the table's schema; a primary key column it lacks fails here, named."""
        table = self._table(self.uri)
        self._schema = None if table is None else self._data_schema(table)
        if self._schema is not None:
            self._check_key(self._schema.names)

    def close(self) -> None:
        """Forget what was not flushed."""
        self._pending = []

    def _check_key(self, names: list[str]) -> None:
        missing = [k for k in self.key if k not in names]
        if missing:
            raise ConnectorError(
                f"{self.id}: primary_key column(s) {', '.join(repr(k) for k in missing)} are not "
                f"columns of the table (it has {', '.join(names)})"
            )

    def _table(self, uri: str) -> DeltaTable | None:
        try:
            return DeltaTable(uri, storage_options=self.options)
        except TableNotFoundError:
            return None
        except (DeltaError, OSError) as exc:
            raise _fail(self.id, "cannot open the table", exc) from exc

    @staticmethod
    def _data_schema(table: DeltaTable) -> pa.Schema:
        schema = _arrow_schema(table)
        return pa.schema([f for f in schema if f.name not in GATE_COLUMNS])

    # -- one batch --------------------------------------------------------------

    def write(self, data: pa.Table) -> None:
        """Keep the batch's changes for :meth:`flush` (Delta commits are the MERGE itself)."""
        changes = changes_of(data, self._decoder, self.id)
        if changes.num_rows:
            self._pending.append(changes)

    def flush(self) -> None:
        """Apply the changes written since the last flush: MERGE, then the delete markers."""
        if not self._pending:
            return
        changes = pa.concat_tables(self._pending)
        applied = Applied()
        try:
            self._apply(changes, applied)
        except (DeltaError, OSError) as exc:
            raise _fail(self.id, "apply failed", exc) from exc
        except pa.ArrowInvalid as exc:
            raise ConnectorError(
                f"{self.id}: the change events do not fit the table's columns: {exc}"
            ) from exc
        self._pending = []
        if self._count:
            applied.record(self.pipeline)

    def _apply(self, changes: pa.Table, applied: Applied) -> None:
        table = self._table(self.uri)
        if table is None:
            table = self._create(changes)
        have = set(_arrow_schema(table).names)
        hidden = [c for c in GATE_COLUMNS if c not in have]
        if hidden:  # a table written before CDC: its rows have no gate yet
            table.alter.add_columns([deltalake.Field(c, PrimitiveType("long")) for c in hidden])
        schema = self._data_schema(table)
        self._check_key(schema.names)
        present, added = self._evolution.check(changes, schema.names)
        if added:
            table.alter.add_columns(
                [deltalake.Field.from_arrow(pa.field(n, t)) for n, t in added.items()]
            )
            schema = self._data_schema(table)
            present = [*present, *added]
        self._schema = schema
        rows = self._rows(changes, schema)
        events = pa.table(
            {
                **{k: rows[k] for k in self.key},
                _OP: changes[env.OP],
                TS_COLUMN: changes[env.TS],
                SEQ_COLUMN: changes[env.SEQ],
                HASH_COLUMN: changes[env.HASH],
                _N: pa.array(np.arange(changes.num_rows, dtype=np.int64)),
            }
        )
        state, marked = self._versions(table, events)
        accepted = self._newer(events, state)
        ops = events[_OP].filter(accepted)
        counts = {op: int(n) for op, n in zip(*_value_counts(ops), strict=True)}
        applied.add_ops(counts, changes.num_rows)
        if not counts:
            return
        columns = [c for c in schema.names if c in set(present) | set(self.key)]
        soft = self.cdc.soft_delete_column if self.cdc.delete_mode == "soft" else None
        winners = rows.select(columns).append_column(_OP, changes[env.OP])
        for name in (TS_COLUMN, SEQ_COLUMN, HASH_COLUMN, _N):
            winners = winners.append_column(name, events[name])
        winners = _last_per_key(
            winners.filter(accepted), self.key, [TS_COLUMN, SEQ_COLUMN, _N]
        ).drop_columns([_N])
        self._merge(table, winners, columns, soft, schema)
        self._mark_deletes(winners, marked)

    def _create(self, changes: pa.Table) -> DeltaTable:
        """Create the missing table from the images' columns (types inferred from JSON)."""
        types = table_types(changes)
        self._check_key(list(types))
        if self.cdc.soft_delete_column and self.cdc.soft_delete_column not in types:
            types[self.cdc.soft_delete_column] = pa.timestamp("us", tz="UTC")
        fields = [pa.field(n, t) for n, t in types.items()]
        fields += [pa.field(c, pa.int64()) for c in GATE_COLUMNS]
        return DeltaTable.create(
            self.uri,
            pa.schema(fields),
            partition_by=self.spec.partition_by or None,
            storage_options=self.options,
        )

    def _rows(self, changes: pa.Table, schema: pa.Schema) -> pa.Table:
        """The images as typed rows of the table's schema (pyarrow's JSON reader, one call)."""
        # One JSON document per line: each image plus "\n", then the values
        # buffer of that array is the whole input (no copy through Python).
        lines = pc.binary_join_element_wise(changes[env.IMAGE].combine_chunks(), "", "\n")
        offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32)[lines.offset :][
            : len(lines) + 1
        ]
        text = lines.buffers()[2][int(offsets[0]) : int(offsets[-1])]
        parse = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
        read = pajson.ReadOptions(block_size=max(1 << 20, text.size + 1))
        rows = pajson.read_json(pa.BufferReader(text), read_options=read, parse_options=parse)
        if rows.num_rows != changes.num_rows:  # pragma: no cover - one image per line
            raise ConnectorError(f"{self.id}: {rows.num_rows} rows from {changes.num_rows} images")
        return rows.select(schema.names)

    def _versions(self, table: DeltaTable, events: pa.Table) -> tuple[pa.Table, pa.Table]:
        """The stored version of each key of ``events``: its row's hidden columns or,
        for a deleted key, its marker. Also the keys that have a marker."""
        wanted = [*self.key, *GATE_COLUMNS]
        keys = events.select(self.key)
        found = [self._lookup(table, keys, wanted)]
        markers = self._table(self.deletes_uri)
        marked = (
            self._lookup(markers, keys, wanted)
            if markers is not None
            else pa.schema([events.schema.field(c) for c in wanted]).empty_table()
        )
        found.append(marked)
        state = pa.concat_tables([f.cast(found[0].schema) for f in found])
        state = _last_per_key(state, self.key, [TS_COLUMN, SEQ_COLUMN])
        return state, marked.select(self.key)

    def _lookup(self, table: DeltaTable, keys: pa.Table, columns: list[str]) -> pa.Table:
        """``columns`` of the rows whose key is in ``keys`` (:func:`_rows_for_keys`)."""
        return _rows_for_keys(table, self.key, keys, columns)

    def _newer(self, events: pa.Table, state: pa.Table) -> pa.Array:
        """Which events pass the gate (see :mod:`sluice.connectors.cdc_apply`)."""
        stored = state.rename_columns([*self.key, "_g_ts", "_g_seq", "_g_hash"])
        joined = events.join(stored, self.key, join_type="left outer").sort_by(_N)
        ts, seq, h = joined[TS_COLUMN], joined[SEQ_COLUMN], joined[HASH_COLUMN]
        g_ts, g_seq, g_hash = joined["_g_ts"], joined["_g_seq"], joined["_g_hash"]
        newer = pc.or_(
            pc.greater(ts, g_ts),
            pc.and_(
                pc.equal(ts, g_ts),
                pc.and_(pc.greater(seq, g_seq), pc.not_equal(h, g_hash)),
            ),
        )
        accepted = pc.or_(pc.is_null(g_ts), pc.fill_null(newer, False))
        return accepted.combine_chunks() if isinstance(accepted, pa.ChunkedArray) else accepted

    def _merge(
        self,
        table: DeltaTable,
        winners: pa.Table,
        columns: list[str],
        soft: str | None,
        schema: pa.Schema,
    ) -> None:
        on = " AND ".join(f"t.{_quote(k)} = s.{_quote(k)}" for k in self.key)
        ts, seq, h = (_quote(c) for c in GATE_COLUMNS)
        newer = (
            f"(t.{ts} IS NULL OR s.{ts} > t.{ts} OR "
            f"(s.{ts} = t.{ts} AND s.{seq} > t.{seq} AND s.{h} <> t.{h}))"
        )
        gate = {c: f"s.{_quote(c)}" for c in GATE_COLUMNS}
        data = {c: f"s.{_quote(c)}" for c in columns if c not in self.key}
        is_delete = f"s.{_quote(_OP)} = 'd'"
        if soft is not None:
            flag = pa.types.is_boolean(schema.field(soft).type)
            stamp = (
                pa.scalar(True)
                if flag
                else pa.scalar(datetime.now(UTC), pa.timestamp("us", tz="UTC"))
            )
            winners = winners.append_column("_sluice_deleted", pa.repeat(stamp, winners.num_rows))
            data.setdefault(soft, "false" if flag else "NULL")
        merger = table.merge(winners, on, source_alias="s", target_alias="t")
        if soft is None:
            merger = merger.when_matched_delete(predicate=f"{is_delete} AND {newer}")
        else:
            merger = merger.when_matched_update(
                updates={soft: "s._sluice_deleted", **gate}, predicate=f"{is_delete} AND {newer}"
            )
        merger = merger.when_matched_update(
            updates={**data, **gate}, predicate=f"NOT {is_delete} AND {newer}"
        )
        inserts = {c: f"s.{_quote(c)}" for c in self.key} | data | gate
        merger = merger.when_not_matched_insert(updates=inserts, predicate=f"NOT {is_delete}")
        merger.execute()

    def _mark_deletes(self, winners: pa.Table, marked: pa.Table) -> None:
        """After the MERGE: keep the versions of hard-deleted keys, forget re-created ones."""
        if self.cdc.delete_mode == "soft":
            return
        ops = winners[_OP]
        deletes = winners.filter(pc.equal(ops, "d"))
        recreated = pa.table({})
        if marked.num_rows:
            upserted = winners.filter(pc.not_equal(ops, "d"))
            recreated = upserted.join(marked, self.key, join_type="inner")
        if deletes.num_rows == 0 and recreated.num_rows == 0:
            return
        columns = [*self.key, *GATE_COLUMNS]
        source = pa.concat_tables(
            [t.select([*columns, _OP]) for t in (deletes, recreated) if t.num_rows]
        )
        markers = self._table(self.deletes_uri)
        if markers is None:
            if deletes.num_rows == 0:
                return
            write_deltalake(
                self.deletes_uri,
                deletes.select(columns),
                mode="append",
                storage_options=self.options,
            )
            return
        on = " AND ".join(f"t.{_quote(k)} = s.{_quote(k)}" for k in self.key)
        is_delete = f"s.{_quote(_OP)} = 'd'"
        values = {c: f"s.{_quote(c)}" for c in columns}
        (
            markers.merge(source, on, source_alias="s", target_alias="t")
            .when_matched_update(updates=values, predicate=is_delete)
            .when_matched_delete(predicate=f"NOT {is_delete}")
            .when_not_matched_insert(updates=values, predicate=is_delete)
            .execute()
        )


def _key_predicate(column: str, values: pa.Array) -> str | None:
    """A scan predicate selecting ``values`` of ``column`` (None: read every row)."""
    t = values.type
    if len(values) == 0:
        return "false"
    if pa.types.is_integer(t):
        render: Any = str
    elif pa.types.is_string(t) or pa.types.is_large_string(t):

        def render(v: str) -> str:
            return "'" + v.replace("'", "''") + "'"

    else:
        return None
    name = _quote(column)
    if len(values) <= _IN_LIST_KEYS:
        return f"{name} IN ({', '.join(map(render, values.to_pylist()))})"
    bounds = pc.min_max(values)
    return (
        f"{name} >= {render(bounds['min'].as_py())} AND {name} <= {render(bounds['max'].as_py())}"
    )


def _value_counts(values: pa.Array | pa.ChunkedArray) -> tuple[list[str], list[int]]:
    counted = pc.value_counts(values)
    return (
        counted.field("values").to_pylist(),
        counted.field("counts").to_pylist(),
    )


def build_target(spec: DeltaSpec, ctx: Context, index: int) -> DeltaTarget:
    """Registry hook."""
    return DeltaTarget(spec, ctx, index)


__all__ = ["DeltaCdcTarget", "DeltaTarget", "build_target", "location"]
