"""Delta sources (``delta_local``, ``delta_s3``): each new table version read once.

The table is ``path`` (local) or ``s3://bucket/prefix``, joined with
``source_query`` when that is a relative path (``source_query`` may also be
the table's absolute path or ``s3://`` URI). The position (under the key
``source_query``) is the next version to read and the next row in it; a new
source starts at version 0.

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
read it. A version is read in batches of at most ``max_batch_rows`` rows
(its files in log order, each streamed by row group), so memory does not
depend on the version's size; the position is the version and the next row
in it (:func:`encode`), so a crash mid-version resumes mid-version.
``_event_ts`` is the version's commit time. Positions are also kept in the
source's own file under the state directory of the object-store source
(:func:`sluice.connectors.object_store.source.state_root`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from sluice.connectors.api import EVENT_TS, EVENT_TS_TYPE, Batch, Position
from sluice.connectors.delta.spec import DeltaLocalSource, DeltaS3Source
from sluice.connectors.object_store.source import parquet_batches, state_root
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


#: A position is ``(version + 1) * PER_VERSION + row``: the next row to read
#: of that version (readable in decimal: 30000000042 is row 42 of version 2).
#: A value below ``PER_VERSION`` is a plain version (positions before
#: versions were streamed in batches): its row 0.
PER_VERSION = 10**10


def encode(version: int, row: int) -> int:
    """The position of ``row`` of ``version``."""
    if row >= PER_VERSION:
        raise ConnectorError(f"a Delta version of {row} rows or more is not supported")
    return (version + 1) * PER_VERSION + row


def decode(position: int) -> tuple[int, int]:
    """(version, row) of a position."""
    if position < PER_VERSION:
        return position, 0
    return position // PER_VERSION - 1, position % PER_VERSION


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
        self._rows = spec.max_batch_rows
        self._table: DeltaTable | None = None
        self._committed = 0  # position, as last committed
        self._version = 0  # the version being read, or next to read
        self._row = 0  # its next row
        # The version being read: its pieces, the next one (read ahead, so the
        # last piece of a version carries the next version's position), commit time.
        self._pieces: Iterator[pa.Table] | None = None
        self._ahead: pa.Table | None = None
        self._ts_ms = 0

    def open(self, resume: Position | None) -> None:
        """Find the table (a missing one is an error); start at ``resume`` or
        the last committed position."""
        try:
            self._table = DeltaTable(self.uri, storage_options=self.options)
        except TableNotFoundError as exc:
            raise ConnectorError(f"source {self.id}: no Delta table at {self.uri}") from exc
        except (DeltaError, OSError) as exc:
            raise TransientError(f"source {self.id}: {exc}") from exc
        own = read_json(self._checkpoint) or {}
        self._committed = int(own.get("position", own.get("next_version", 0)))
        self.rewind(resume)

    def rewind(self, position: Position | None) -> None:
        """Read next from ``position``, else from the last committed one."""
        self._stop_version()
        at = (position or {}).get(self.query)
        self._version, self._row = decode(int(at) if isinstance(at, int) else self._committed)

    def _stop_version(self) -> None:
        if self._pieces is not None:
            self._pieces.close()  # type: ignore[attr-defined]  # a generator
        self._pieces = None
        self._ahead = None

    def close(self) -> None:
        """Close the version being read."""
        self._stop_version()
        self._table = None

    def commit(self, position: Position) -> None:
        """Record the position (atomic rename, fsynced)."""
        at = position.get(self.query)
        if isinstance(at, int):
            self._committed = at
            version, row = decode(at)
            write_json(
                self._checkpoint,
                {"table": self.uri, "position": at, "version": version, "row": row},
            )

    def read(self, timeout_s: float) -> Batch | None:
        """The next rows of the version being read (at most ``max_batch_rows``),
        or of the next version; ``None`` when the table has no newer version.
        A version without data rows (a compaction) is one batch of none."""
        table = self._table
        if table is None:
            raise ConnectorError(f"source {self.id}: read before open")
        version = self._version
        try:
            if self._pieces is None:
                if version > table.version():
                    table.update_incremental()
                    if version > table.version():
                        return None
                cdf = table.metadata().configuration.get("delta.enableChangeDataFeed") == "true"
                self._pieces = self._version_pieces(table, version, self._row, cdf)
                self._ahead = next(self._pieces, None)
            piece = self._ahead
            self._ahead = next(self._pieces, None) if piece is not None else None
        except (DeltaError, OSError) as exc:
            self._stop_version()
            raise ConnectorError(
                f"source {self.id}: cannot read version {version} of {self.uri} "
                f"(vacuumed, or its log entry expired?): {exc}"
            ) from exc
        except ConnectorError:
            self._stop_version()
            raise
        data = _stamped(piece if piece is not None else pa.table({}), self._ts_ms)
        if self._ahead is None:  # the version's last piece
            self._stop_version()
            self._version, self._row = version + 1, 0
        else:
            self._row += data.num_rows
        position: Position = {self.query: encode(self._version, self._row)}
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

    def _version_pieces(
        self, table: DeltaTable, version: int, start: int, cdf: bool
    ) -> Iterator[pa.Table]:
        """The rows of ``version`` from row ``start``, at most ``max_batch_rows``
        per piece, in a fixed order (the files in log order, each front to back).

        Without the change data feed: the files added with dataChange = true.
        With it (the protocol's rules, as ``load_cdf``): the version's change
        files when it has any, else its added files as inserts and its
        removed files (dataChange = true) as deletes; with ``_change_type``,
        ``_commit_version`` and ``_commit_timestamp``."""
        actions, self._ts_ms = self._commit(version)
        schema = pa.schema(
            [
                pa.field(f.name, pa.string()) if f.type == pa.string_view() else f
                for f in pa.schema(table.schema().to_arrow())
            ]
        )
        files: list[tuple[dict[str, Any], str | None]] = []  # (action, change type)
        if cdf and any("cdc" in a for a in actions):
            files = [(a["cdc"], None) for a in actions if "cdc" in a]
        else:
            for action in actions:
                add, remove = action.get("add"), action.get("remove")
                if add and add.get("dataChange", True):
                    files.append((add, "insert"))
                elif cdf and remove and remove.get("dataChange", True):
                    files.append((remove, "delete"))
        skip = start
        for action, change in files:
            if action.get("deletionVector"):
                raise ConnectorError(
                    f"source {self.id}: version {version} has deletion vectors, "
                    "which this source cannot read"
                )
            path = posixpath.join(self.root, unquote(action["path"]))
            try:
                f = self.fs.open_input_file(path)
            except FileNotFoundError as exc:
                raise ConnectorError(
                    f"source {self.id}: version {version} of {self.uri}: data file "
                    f"{action['path']} is gone (vacuumed): the version cannot be read"
                ) from exc
            with f:
                rows = pq.ParquetFile(f).metadata.num_rows
                if skip >= rows:
                    skip -= rows
                    continue
                for batch in parquet_batches(f, skip, self._rows):
                    yield self._shaped(
                        pa.Table.from_batches([batch]), action, change, schema, version, cdf
                    )
                skip = 0

    def _shaped(
        self,
        data: pa.Table,
        action: dict[str, Any],
        change: str | None,
        schema: pa.Schema,
        version: int,
        cdf: bool,
    ) -> pa.Table:
        """The table's columns in its order (partition values added), then the
        change columns of the change data feed."""
        n = data.num_rows
        values = action.get("partitionValues") or {}
        columns = []
        for field in schema:
            if field.name in values:
                column = pa.array([values[field.name]] * n, pa.string()).cast(field.type)
            elif field.name in data.column_names:
                column = data[field.name].cast(field.type)
            else:
                column = pa.nulls(n, field.type)
            columns.append(column)
        out = pa.Table.from_arrays(columns, schema=schema)
        if not cdf:
            return out
        kind = (
            data["_change_type"].cast(pa.string())
            if change is None
            else pa.array([change] * n, pa.string())
        )
        stamp = pa.array(np.full(n, self._ts_ms, np.int64)).cast(pa.timestamp("ms"))
        return (
            out.append_column("_change_type", kind)
            .append_column("_commit_version", pa.array(np.full(n, version, np.uint64)))
            .append_column("_commit_timestamp", stamp)
        )


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
