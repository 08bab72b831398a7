"""Delta sources (``delta_local``, ``delta_s3``): each new table version read once.

The table is ``path`` (local) or ``s3://bucket/prefix``, joined with
``source_query`` when that is a relative path (``source_query`` may also be
the table's absolute path or ``s3://`` URI). The position is the next version
to read, under the key ``source_query``; a new source starts at version 0.

* With the change data feed on (``delta.enableChangeDataFeed``), a version
  is its change rows (``load_cdf``): inserts, update pre- and post-images and
  deletes, with ``_change_type``, ``_commit_version`` and
  ``_commit_timestamp``.
* Without it, a version is the rows of the files it added with
  ``dataChange = true`` (read from the version's commit in ``_delta_log``),
  partition columns included. Deletes and updates are not seen.

Either way a compaction (``OPTIMIZE``: files rewritten with ``dataChange =
false``) emits nothing. A version whose log entry or data files are gone
(``VACUUM``, log retention) is an error naming the version: the source cannot
read it. A version is one batch (its size is what its writer committed).
``_event_ts`` is the version's commit time. Positions are also kept in the
source's own file under the state directory of the object-store source
(:func:`sluice.connectors.object_store.source.state_root`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from sluice.connectors.api import EVENT_TS, EVENT_TS_TYPE, Batch, Position
from sluice.connectors.delta.spec import DeltaLocalSource, DeltaS3Source
from sluice.connectors.object_store.source import state_root
from sluice.connectors.registry import Context
from sluice.errors import ConnectorError, TransientError
from sluice.localstate import read_json, safe_name, write_json

try:
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError, TableNotFoundError
except ModuleNotFoundError as exc:  # pragma: no cover - exercised without the extra
    raise ModuleNotFoundError("deltalake", name="deltalake") from exc

log = logging.getLogger(__name__)

DeltaSourceSpec = DeltaLocalSource | DeltaS3Source


def _where(
    spec: DeltaSourceSpec, query: str
) -> tuple[str, dict[str, str] | None, pafs.FileSystem, str]:
    """(table URI, deltalake storage options, pyarrow file system, table root in it)."""
    if isinstance(spec, DeltaLocalSource):
        folder = (Path(query) if Path(query).is_absolute() else Path(spec.path) / query).absolute()
        return str(folder), None, pafs.LocalFileSystem(), folder.as_posix()
    if query.startswith("s3://"):
        bucket, _, prefix = query[5:].partition("/")
    else:
        bucket = spec.bucket
        prefix = posixpath.join((spec.prefix or "").strip("/"), query.strip("/")).strip("/")
    options: dict[str, str] = {}
    kwargs: dict[str, Any] = {}
    if spec.endpoint:
        options["AWS_ENDPOINT_URL"] = spec.endpoint
        kwargs["endpoint_override"] = spec.endpoint
        if spec.endpoint.startswith("http://"):
            options["AWS_ALLOW_HTTP"] = "true"
    if spec.region:
        options["AWS_REGION"] = spec.region
        kwargs["region"] = spec.region
    if spec.access_key_id:
        options["AWS_ACCESS_KEY_ID"] = spec.access_key_id
        options["AWS_SECRET_ACCESS_KEY"] = spec.secret_access_key or ""
        kwargs["access_key"] = spec.access_key_id
        kwargs["secret_key"] = spec.secret_access_key or ""
    uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    base = f"{bucket}/{prefix}" if prefix else bucket
    return uri, options or None, pafs.S3FileSystem(**kwargs), base


class DeltaSource:
    """Reads each new version of one Delta table once (see the module docstring)."""

    def __init__(self, spec: DeltaSourceSpec, ctx: Context) -> None:
        self.spec = spec
        self.query = ctx.pipeline.query_of(spec)
        self.id = self.query
        self.uri, self.options, self.fs, self.root = _where(spec, self.query)
        digest = hashlib.sha1(self.uri.encode()).hexdigest()[:12]
        self._checkpoint = (
            state_root(None)
            / safe_name(ctx.pipeline.pipeline_name)
            / f"delta-{safe_name(self.query)}-{digest}.json"
        )
        self._table: DeltaTable | None = None
        self._committed = 0  # next version, as last committed
        self._next = 0  # next version to read

    def open(self, resume: Position | None) -> None:
        """Find the table (a missing one is an error); start at ``resume`` or
        the last committed version."""
        try:
            self._table = DeltaTable(self.uri, storage_options=self.options)
        except TableNotFoundError as exc:
            raise ConnectorError(f"source {self.id}: no Delta table at {self.uri}") from exc
        except (DeltaError, OSError) as exc:
            raise TransientError(f"source {self.id}: {exc}") from exc
        own = read_json(self._checkpoint) or {}
        self._committed = int(own.get("next_version", 0))
        self.rewind(resume)

    def rewind(self, position: Position | None) -> None:
        """Read next from ``position``'s version, else from the last committed one."""
        at = (position or {}).get(self.query)
        self._next = int(at) if isinstance(at, int) else self._committed

    def close(self) -> None:
        """Nothing held open."""
        self._table = None

    def commit(self, position: Position) -> None:
        """Record the next version to read (atomic rename, fsynced)."""
        at = position.get(self.query)
        if isinstance(at, int):
            self._committed = at
            write_json(self._checkpoint, {"table": self.uri, "next_version": at})

    def read(self, timeout_s: float) -> Batch | None:
        """The next version's rows (maybe none: a compaction), or ``None``
        when the table has no newer version."""
        table = self._table
        if table is None:
            raise ConnectorError(f"source {self.id}: read before open")
        try:
            if self._next > table.version():
                table.update_incremental()
                if self._next > table.version():
                    return None
            version = self._next
            cdf = table.metadata().configuration.get("delta.enableChangeDataFeed") == "true"
            data = self._changes(table, version) if cdf else self._added(table, version)
        except (DeltaError, OSError) as exc:
            raise ConnectorError(
                f"source {self.id}: cannot read version {version} of {self.uri} "
                f"(vacuumed, or its log entry expired?): {exc}"
            ) from exc
        self._next = version + 1
        position: Position = {self.query: self._next}
        return Batch(
            self.id,
            data,
            position,
            position=position,
            raw_count=data.num_rows,
            partitions=(self.query,),
        )

    def _commit(self, version: int) -> tuple[list[dict[str, Any]], int]:
        """The version's log entry: its actions and commit time (ms)."""
        path = posixpath.join(self.root, "_delta_log", f"{version:020d}.json")
        try:
            with self.fs.open_input_stream(path) as f:
                text = f.read().decode()
        except FileNotFoundError as exc:
            raise ConnectorError(
                f"source {self.id}: version {version} of {self.uri} is gone from the log "
                "(log retention / cleanup): it cannot be read"
            ) from exc
        actions = [json.loads(line) for line in text.splitlines() if line.strip()]
        info: dict[str, Any] = next((a["commitInfo"] for a in actions if "commitInfo" in a), {})
        return actions, int(info.get("timestamp", 0))

    def _added(self, table: DeltaTable, version: int) -> pa.Table:
        """The rows of the files ``version`` added with dataChange = true."""
        actions, ts_ms = self._commit(version)
        schema = pa.schema(table.schema().to_arrow())
        parts: list[pa.Table] = []
        for action in actions:
            add = action.get("add")
            if not add or not add.get("dataChange", True):
                continue
            if add.get("deletionVector"):
                raise ConnectorError(
                    f"source {self.id}: version {version} has deletion vectors, "
                    "which this source cannot read (enable the change data feed)"
                )
            path = posixpath.join(self.root, unquote(add["path"]))
            try:
                data = pq.read_table(path, filesystem=self.fs)
            except FileNotFoundError as exc:
                raise ConnectorError(
                    f"source {self.id}: version {version} of {self.uri}: data file "
                    f"{add['path']} is gone (vacuumed): the version cannot be read"
                ) from exc
            for name, value in (add.get("partitionValues") or {}).items():
                field = schema.field(name) if name in schema.names else pa.field(name, pa.string())
                column = pa.array([value] * data.num_rows, pa.string()).cast(field.type)
                data = data.append_column(name, column)
            parts.append(data)
        if not parts:
            return _stamped(pa.table({}), ts_ms)
        data = pa.concat_tables(parts, promote_options="permissive")
        return _stamped(data, ts_ms)

    def _changes(self, table: DeltaTable, version: int) -> pa.Table:
        """The change rows of ``version`` from the change data feed."""
        reader = table.load_cdf(starting_version=version, ending_version=version)
        data = pa.table(reader.read_all())
        if not data.num_rows:
            return _stamped(pa.table({}), 0)
        _, ts_ms = self._commit(version)
        return _stamped(data, ts_ms)


def _stamped(data: pa.Table, ts_ms: int) -> pa.Table:
    """``data`` with ``_event_ts`` = the commit time (string views made plain strings)."""
    fields = [
        pa.field(f.name, pa.string()) if f.type == pa.string_view() else f for f in data.schema
    ]
    data = data.cast(pa.schema(fields))
    ts = pa.array(np.full(data.num_rows, ts_ms * 1000, np.int64)).cast(EVENT_TS_TYPE)
    if EVENT_TS in data.column_names:
        data = data.drop_columns([EVENT_TS])
    return data.append_column(pa.field(EVENT_TS, EVENT_TS_TYPE), ts)


def build_source(spec: DeltaSourceSpec, ctx: Context) -> DeltaSource:
    """Registry hook."""
    return DeltaSource(spec, ctx)
