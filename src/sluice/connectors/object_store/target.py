"""Object-store targets (``object_store_local``, ``object_store_s3``): each flush
writes the rows as files (Parquet, CSV, JSON lines, ORC) under ``prefix``.

**Files.** A flush is commit number ``seq`` of the pipeline. Its rows are
split by ``partition_by`` into hive folders (``col=value/``, a null value as
``__HIVE_DEFAULT_PARTITION__``), then into files of at most
``max_file_rows`` rows and about ``max_file_bytes`` bytes of Arrow data
(with ``flush_rows`` / ``flush_interval_ms``, the rows of several batches
wait for one commit, so files are fewer and larger: the sources are
acknowledged only after it),
named ``part-<pipeline>-<seq>-<n>.<ext>``. Each file is written atomically:
locally to a hidden temporary name renamed into place, on S3 as one upload
that appears whole when it completes.

**Commit and positions** (capability ``transactional_positions``). After
the files, the flush writes its manifest ``<prefix>/_sluice/<pipeline>/<seq>.json``
(the files, and every source position the target holds after them): the
manifest is the commit. On start the target reads the newest manifest:
its positions are where the sources resume, and files of a later ``seq``
(written by a flush that crashed before its manifest) are deleted, so the
replayed rows are written again under the same names instead of beside
them. Readers that list the folder while a flush runs may see its files
before its manifest (no isolation); after a crash, until the restart, they
may see the crashed flush's files. Older manifests are deleted (the newest
two are kept).

Names start with ``part-``; the source of this package skips ``_sluice``
and hidden names, so a folder written here can be read by an
``object_store_*`` source.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.orc as paorc
import pyarrow.parquet as pq

from sluice import faults
from sluice.connectors.api import Position
from sluice.connectors.object_store.encode import csv_bytes, csv_chars_problem
from sluice.connectors.object_store.spec import ObjectStoreS3Target, ObjectStoreTargetSpec
from sluice.connectors.registry import Context
from sluice.errors import ConnectorError, TransientError
from sluice.formats.jsontext import to_json_text

log = logging.getLogger(__name__)

_EXT = {"parquet": "parquet", "csv": "csv", "json_lines": "jsonl", "jsonl": "jsonl", "orc": "orc"}
_NULL_PARTITION = "__HIVE_DEFAULT_PARTITION__"
_KEEP_MANIFESTS = 2


def _filesystem(spec: ObjectStoreTargetSpec) -> tuple[pafs.FileSystem, str, str]:
    """(file system, root path in it, URL for messages)."""
    if isinstance(spec, ObjectStoreS3Target):
        kwargs: dict[str, Any] = {}
        if spec.endpoint:
            kwargs["endpoint_override"] = spec.endpoint
        if spec.region:
            kwargs["region"] = spec.region
        if spec.access_key_id:
            kwargs["access_key"] = spec.access_key_id
            kwargs["secret_key"] = spec.secret_access_key or ""
        return pafs.S3FileSystem(**kwargs), spec.bucket, f"s3://{spec.bucket}"
    root = Path(spec.path).absolute()  # type: ignore[attr-defined]  # the local spec has path
    return pafs.LocalFileSystem(), root.as_posix(), root.as_uri()


def _hive_value(value: Any) -> str:
    if value is None:
        return _NULL_PARTITION
    text = str(value)
    return "".join(c if c.isalnum() or c in "-_.:@ " else f"%{ord(c):02X}" for c in text)


class ObjectStoreTarget:
    """Writes each flush as files plus a manifest (see the module docstring)."""

    def __init__(self, spec: ObjectStoreTargetSpec, ctx: Context, index: int) -> None:
        self.spec = spec
        self.pipeline = ctx.pipeline.pipeline_name
        self.fs, self.root, url = _filesystem(spec)
        self.prefix = (spec.prefix or "").strip("/")
        self.id = f"{spec.kind}:{url}/{self.prefix}"
        self.format = "json_lines" if spec.format == "jsonl" else spec.format
        problem = csv_chars_problem(
            spec.csv_delimiter, spec.csv_quote, spec.csv_escape, spec.csv_null_value
        )
        if problem is not None:  # the config rule refuses it first; built directly: here
            raise ConnectorError(f"{self.id}: {problem[0]}: {problem[1]}")
        self._pending: list[pa.Table] = []  # written since the last flush
        self._staged: dict[str, Position] = {}  # positions staged since the last flush
        # Taken by a flush, not committed yet (deferred): kept across close / open.
        self._rows: list[pa.Table] = []
        self._accepted: dict[str, Position] = {}
        self._defer = spec.flush_rows is not None or spec.flush_interval_ms is not None
        self._last_commit = time.monotonic()
        self._held: dict[str, Position] = {}
        self._seq = 0  # the last committed flush
        self._client: Any = None
        self._opened = False

    def _s3(self) -> Any:
        """The boto3 client that PUTs objects (S3 only)."""
        if self._client is None:
            import boto3

            spec = self.spec
            assert isinstance(spec, ObjectStoreS3Target)
            self._client = boto3.client(
                "s3",
                endpoint_url=spec.endpoint,
                region_name=spec.region,
                aws_access_key_id=spec.access_key_id,
                aws_secret_access_key=spec.secret_access_key,
            )
        return self._client

    # -- paths -------------------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return (
            posixpath.join(self.root, self.prefix, *parts)
            if self.prefix
            else posixpath.join(self.root, *parts)
        )

    @property
    def _manifests(self) -> str:
        return self._path("_sluice", self.pipeline)

    # -- lifecycle ---------------------------------------------------------------

    def open(self) -> None:
        """Read the newest manifest; delete the files of a flush that never committed."""
        try:
            self._load()
        except OSError as exc:
            raise TransientError(f"{self.id}: {exc}") from exc
        self._opened = True

    def _load(self) -> None:
        manifests = self._list(self._manifests, recursive=False)
        seqs = sorted(int(posixpath.basename(p)[:-5]) for p in manifests if p.endswith(".json"))
        self._seq = seqs[-1] if seqs else 0
        self._held = {}
        if seqs:
            with self.fs.open_input_stream(
                posixpath.join(self._manifests, f"{self._seq:012d}.json")
            ) as f:
                manifest = json.loads(f.read())
            self._held = {s: dict(p) for s, p in manifest.get("positions", {}).items()}
        mine = f"part-{self.pipeline}-"
        for path in self._list(self._path(), recursive=True):
            name = posixpath.basename(path)
            if not name.startswith(mine):
                continue
            seq = name[len(mine) :].split("-", 1)[0]
            if seq.isdigit() and int(seq) > self._seq:
                log.info("%s: deleting %s, written by a flush that did not commit", self.id, path)
                self.fs.delete_file(path)

    def _list(self, folder: str, *, recursive: bool) -> list[str]:
        try:
            infos = self.fs.get_file_info(
                pafs.FileSelector(folder, recursive=recursive, allow_not_found=True)
            )
        except FileNotFoundError:
            return []
        return [i.path for i in infos if i.type == pafs.FileType.File]

    def close(self) -> None:
        """Forget what was not flushed."""
        self._pending = []
        self._staged = {}

    # -- positions (RecordsPositions) ----------------------------------------------

    @property
    def database(self) -> str | None:
        """Files share no transaction with a state store."""
        return None

    def held_positions(self) -> dict[str, Position]:
        """The positions in the newest manifest."""
        if not self._opened:
            self.open()
        return {s: dict(p) for s, p in self._held.items()}

    def stage_positions(
        self, positions: Mapping[str, Position], also: Callable[[Any], None] | None = None
    ) -> None:
        """Record ``positions`` in the next flush's manifest."""
        if also is not None:  # pragma: no cover - database is None: never joined
            raise ConnectorError(f"{self.id}: a state store cannot commit with files")
        for source, parts in positions.items():
            self._staged.setdefault(source, {}).update(parts)

    # -- writing -------------------------------------------------------------------

    def write(self, data: pa.Table) -> None:
        """Keep ``data`` for the next flush."""
        if data.num_rows:
            self._pending.append(data)

    def flush(self) -> None:
        """Take the rows written since the last flush and the staged positions,
        and commit them (files, then the manifest) — or, with ``flush_rows`` /
        ``flush_interval_ms`` and positions staged, keep them for
        :meth:`commit_deferred` until due (files roll then)."""
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
        flush_rows, interval_ms = self.spec.flush_rows, self.spec.flush_interval_ms
        if flush_rows is not None and rows >= flush_rows:
            return True
        return (
            interval_ms is not None and (time.monotonic() - self._last_commit) * 1000 >= interval_ms
        )

    def _commit(self) -> None:
        """Write the taken rows' files, then the manifest (the commit)."""
        if not self._rows and not self._accepted:
            return
        seq = self._seq + 1
        files: list[str] = []
        try:
            if self._rows:
                data = pa.concat_tables(self._rows, promote_options="permissive")
                for folder, part in self._partitions(data):
                    for piece in self._pieces(part):
                        name = (
                            f"part-{self.pipeline}-{seq:012d}-{len(files):05d}.{_EXT[self.format]}"
                        )
                        path = posixpath.join(folder, name)
                        self._put(path, piece)
                        files.append(path)
            held = {s: dict(p) for s, p in self._held.items()}
            for source, parts in self._accepted.items():
                held.setdefault(source, {}).update(parts)
            faults.reached("FILE_PARTS")  # crash tests: files written, no manifest yet
            manifest = json.dumps({"seq": seq, "files": files, "positions": held}).encode()
            self._put_bytes(posixpath.join(self._manifests, f"{seq:012d}.json"), manifest)
        except OSError as exc:
            raise TransientError(f"{self.id}: write failed: {exc}") from exc
        faults.reached("FILE_COMMITS")  # crash tests: committed, the source not yet
        self._seq = seq
        self._held = held
        self._rows = []
        self._accepted = {}
        self._last_commit = time.monotonic()
        old = seq - _KEEP_MANIFESTS
        if old > 0:
            # Already gone (an earlier crash) or a race: harmless.
            with contextlib.suppress(OSError):
                self.fs.delete_file(posixpath.join(self._manifests, f"{old:012d}.json"))

    def _partitions(self, data: pa.Table) -> list[tuple[str, pa.Table]]:
        """(hive folder, rows) per partition value combination (the partition
        columns dropped from the rows), filtered column-wise, not per row."""
        cols = self.spec.partition_by
        if not cols:
            return [(self._path(), data)]
        missing = [c for c in cols if c not in data.column_names]
        if missing:
            raise ConnectorError(f"{self.id}: partition_by column(s) {missing} are not in the rows")
        keys = data.select(cols).group_by(cols, use_threads=False).aggregate([]).to_pylist()
        out = []
        rest = data.drop_columns(cols)
        for combo in keys:
            mask = None
            for c in cols:
                v = combo[c]
                m = pc.is_null(data[c]) if v is None else pc.fill_null(pc.equal(data[c], v), False)
                mask = m if mask is None else pc.and_(mask, m)
            folder = self._path(*(f"{c}={_hive_value(combo[c])}" for c in cols))
            out.append((folder, rest.filter(mask)))
        return out

    def _pieces(self, data: pa.Table) -> list[pa.Table]:
        """``data`` cut to ``max_file_rows`` rows and about ``max_file_bytes`` bytes."""
        rows = self.spec.max_file_rows
        if data.num_rows and data.nbytes > self.spec.max_file_bytes:
            per_row = data.nbytes / data.num_rows
            rows = min(rows, max(1, int(self.spec.max_file_bytes / per_row)))
        return [data.slice(at, rows) for at in range(0, data.num_rows, rows)] or [data]

    def _encode(self, data: pa.Table, sink: pa.NativeFile) -> None:
        spec = self.spec
        if self.format == "parquet":
            pq.write_table(data, sink, compression=spec.parquet_compression or "snappy")
        elif self.format == "orc":
            paorc.write_table(data, sink)
        elif self.format == "csv" and (spec.csv_quote not in (None, '"') or spec.csv_escape):
            # pyarrow's writer knows only '"' doubled: the column-wise writer.
            sink.write(
                csv_bytes(
                    data,
                    delimiter=spec.csv_delimiter or ",",
                    quote=spec.csv_quote or '"',
                    escape=spec.csv_escape,
                    null_value=spec.csv_null_value or "",
                    header=spec.csv_header is not False,
                )
            )
        elif self.format == "csv":
            options = pacsv.WriteOptions(
                include_header=spec.csv_header is not False,
                delimiter=spec.csv_delimiter or ",",
                null_string=spec.csv_null_value or "",
            )
            pacsv.write_csv(data, sink, write_options=options)
        else:
            sink.write(_json_lines(data))

    def _put(self, path: str, data: pa.Table) -> None:
        buf = pa.BufferOutputStream()
        self._encode(data, buf)
        self._put_bytes(path, buf.getvalue())

    def _put_bytes(self, path: str, body: bytes | pa.Buffer) -> None:
        """Write ``path`` whole or not at all (local: a hidden name renamed into place)."""
        folder = posixpath.dirname(path)
        if isinstance(self.fs, pafs.LocalFileSystem):
            self.fs.create_dir(folder, recursive=True)
            tmp = posixpath.join(folder, f".tmp-{uuid.uuid4().hex}")
            with self.fs.open_output_stream(tmp) as out:
                out.write(body)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self.fs.move(tmp, path)
        else:
            # One PUT: the object appears whole or not at all (and moto, unlike
            # S3, fails pyarrow's multipart uploads).
            bucket, _, key = path.partition("/")
            data = body.to_pybytes() if isinstance(body, pa.Buffer) else body
            try:
                self._s3().put_object(Bucket=bucket, Key=key, Body=data)
            except Exception as exc:  # botocore's errors share no base with OSError
                raise OSError(str(exc)) from exc


def _json_lines(data: pa.Table) -> bytes:
    """One JSON object per row, each line ending in ``\\n`` (column-wise encoding)."""
    if not data.num_rows:
        return b""
    struct = pa.StructArray.from_arrays(
        [c.combine_chunks() for c in data.columns], names=data.column_names
    )
    text = to_json_text(struct)
    lines = pc.binary_join_element_wise(text, pa.scalar("\n"), "")
    lines = lines.combine_chunks() if isinstance(lines, pa.ChunkedArray) else lines
    offsets = np.frombuffer(lines.buffers()[1], np.int32, len(lines) + 1, lines.offset * 4)
    body: bytes = lines.buffers()[2].to_pybytes()
    return body[int(offsets[0]) : int(offsets[-1])]


def build_target(spec: ObjectStoreTargetSpec, ctx: Context, index: int) -> ObjectStoreTarget:
    """Registry hook."""
    return ObjectStoreTarget(spec, ctx, index)
