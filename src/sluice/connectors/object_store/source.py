"""Object-store source (``object_store_local``, ``object_store_s3``): every file
under the prefix in ``source_query``, streamed in bounded batches.

**Which files.** Files whose extension names a format (``.parquet`` / ``.pq``,
``.csv`` / ``.tsv``, ``.jsonl`` / ``.ndjson`` / ``.json``, ``.orc``; text
formats optionally compressed: ``.gz``, ``.bz2``, ``.zst``, ``.lz4``); with
``format`` set, also files without a known extension. Names starting with
``.`` or ``_`` (temporary files, ``_SUCCESS``, ``_delta_log/``) are skipped.
Files are read one at a time, in key order.

**Listing.** Local folders are walked at every poll. S3 lists only the keys
after the greatest one seen (``StartAfter``), and lists the whole prefix
again every ``rescan_interval_ms``: a file arriving with an earlier name, or
a file that grew, is found then. Nothing is skipped silently: every file is
read, or reported (below).

**Positions** are per file (key -> next unit to read), so a crash mid-file
resumes mid-file (the per-file positions are kept for the files present: a
whole listing drops those of files gone since, so a file deleted and later
written again under the same name is read as a new file when a listing saw
it gone, else reported as rewritten; the engine's stores keep the last
position of every file they were given):

* uncompressed JSON lines / CSV: the byte offset of the next line. A file
  that grew past it (lines appended) is read on from there; one that shrank
  is reported;
* compressed text: the offset in the decompressed stream; Parquet / ORC:
  the next row. A file read to its end holds :data:`FINISHED` + its size in
  bytes; a later listing with another size reports it (it was rewritten).

A report is one bad record of the batch, handled by ``on_error`` like an
undecodable line. Positions are stored by the engine (a target with
``transactional_positions``, a ``[state_store]``) and, on :meth:`commit`, in
the source's own file ``<state_dir>/<pipeline>/<prefix>-<hash>.json``;
``state_dir`` is absolute: the ``state_dir`` key, else ``$SLUICE_STATE_DIR``
(made absolute), else ``$XDG_STATE_HOME/sluice`` (``~/.local/state/sluice``).
The hash is of the store's absolute URL and prefix, so two folders never
share positions.

**Records.** Text files are read ``max_batch_bytes`` at a time, cut at the
last line break, at most ``max_batch_rows`` lines per batch; a line longer
than ``max_record_bytes`` is a bad record (its first 64 KiB kept). Memory is
bounded by those, whatever the file size. The stream's types are inferred
from the first batch's record lines, or from its first
``schema_infer_max_records`` lines when ``[read_options.csv]`` /
``[read_options.json]`` set it; the schema is locked then. Bad lines (invalid JSON, not an
object, a value that does not fit the locked schema, a CSV line with the
wrong number of cells) are bad records named by file, line and byte offset.
A Parquet / ORC file that cannot be read, or whose columns do not fit the
locked schema, is one bad record (the rest of the file is not read).

``_event_ts`` is the file's modification time unless the file has that column.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.orc as paorc
import pyarrow.parquet as pq

from sluice.connectors.api import EVENT_TS, EVENT_TS_TYPE, Batch, Position, RawRecord
from sluice.connectors.object_store.decode import (
    Csv,
    JsonLines,
    Lines,
    decode_inferring,
    split_lines,
)
from sluice.connectors.object_store.spec import ObjectStoreS3Source, ObjectStoreSourceSpec
from sluice.connectors.object_store.stores import Entry, LocalStore, S3Store, Store
from sluice.connectors.registry import Context
from sluice.errors import ConnectorError
from sluice.formats import with_event_ts
from sluice.localstate import read_json, safe_name, write_json

log = logging.getLogger(__name__)

#: Positions at or above this mean "read to the end": FINISHED + the file's
#: size in bytes then. Far above any offset or row count, within a signed
#: 64-bit integer (SQL BIGINT, Delta app-transaction versions).
FINISHED = 1 << 62
#: Bytes of an over-long line kept as its raw payload.
_HEAD_BYTES = 64 << 10
#: Bytes per read when skipping or counting lines in a file (error path, resume).
_SCAN_BYTES = 4 << 20

_EXTENSIONS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "csv",
    ".jsonl": "json_lines",
    ".ndjson": "json_lines",
    ".json": "json_lines",
    ".orc": "orc",
}
#: The rows of a batch that has none (a file's end, a report).
_EMPTY = pa.table({EVENT_TS: pa.array([], EVENT_TS_TYPE)})
_COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".lz4": "lz4"}


def file_format(key: str, configured: str | None) -> tuple[str, str | None] | None:
    """(format, compression) of ``key``: from its extension (compression
    stripped), else ``configured``; ``None`` when it is not a file to read."""
    name = key.rsplit("/", 1)[-1].lower()
    compression = None
    for ext, codec in _COMPRESSIONS.items():
        if name.endswith(ext):
            compression, name = codec, name[: -len(ext)]
            break
    fmt = next((f for ext, f in _EXTENSIONS.items() if name.endswith(ext)), None)
    wanted = None if configured is None else ("json_lines" if configured == "jsonl" else configured)
    if fmt is None:
        fmt = wanted
    elif wanted is not None and fmt != wanted:
        return None
    if fmt is None:
        return None
    if compression is not None and fmt in ("parquet", "orc"):
        return None  # they compress inside; a .parquet.gz is not readable as either
    return fmt, compression


def state_root(configured: str | None) -> Path:
    """The absolute folder of the sources' own position files (see the module docstring)."""
    if configured is not None:
        path = Path(configured)
        if not path.is_absolute():
            raise ConnectorError(f"state_dir must be an absolute path, got {configured!r}")
        return path
    env = os.environ.get("SLUICE_STATE_DIR")
    if env:
        return Path(env).absolute()
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "sluice"


@dataclass(frozen=True, slots=True)
class _Bad:
    """A record set aside: where it starts (position units), its raw bytes, why."""

    offset: int
    payload: bytes | None
    reason: str


class _Records:
    """The raw records of one batch (one file): record lines, then bad records."""

    def __init__(
        self,
        key: str,
        label: str,
        mtime_ms: int,
        lines: Lines | None,
        base: int,
        line_of: Any,
        bad: list[_Bad],
    ) -> None:
        self._key = key
        self._label = label
        self._mtime_ms = mtime_ms
        self._lines = lines
        self._base = base
        self._line_of = line_of
        self._bad = bad
        self._n = 0 if lines is None else len(lines)

    def __len__(self) -> int:
        return self._n + len(self._bad)

    def offset(self, index: int) -> int:
        if index < self._n:
            assert self._lines is not None
            return self._base + int(self._lines.starts[index])
        return self._bad[index - self._n].offset

    def record(self, index: int) -> RawRecord:
        if index < self._n:
            assert self._lines is not None
            payload: bytes | None = self._lines.line(index)
        else:
            payload = self._bad[index - self._n].payload
        return RawRecord(self._key, self.offset(index), self._mtime_ms, None, payload)

    def where(self, index: int) -> str:
        line = self._line_of(self.offset(index)) if self._line_of is not None else None
        at = f" line {line}" if line is not None else ""
        unit = "byte" if self._line_of is not None else "record"
        return f"file {self._label}{at} ({unit} {self.offset(index)})"

    def span(self) -> str:
        return f"file {self._label}"


class _Text:
    """Reads one text file (JSON lines / CSV) from an offset, a chunk of whole lines at a time."""

    def __init__(self, store: Store, entry: Entry, compression: str | None, start: int) -> None:
        self.store = store
        self.entry = entry
        self.compression = compression
        self.pos = start  # offset of the first byte not handed out (of carry, if any)
        self._carry = b""
        self._discarding = False  # inside an over-long line, dropping to its end
        self._eof = False
        self._raw = store.open(entry.key)
        if compression is None:
            self._raw.seek(start)
            self._stream: pa.NativeFile = self._raw
            self._limit = entry.size  # read what was listed; growth is found by the next listing
        else:
            self._stream = pa.CompressedInputStream(self._raw, compression)
            self._limit = -1
            _skip(self._stream, start)
        self._read_to = start  # stream offset read so far
        self._lines: int | None = 0 if start == 0 else None  # line breaks before self.pos
        self.needs_header = start == 0  # (CSV) the header line is still ahead

    def close(self) -> None:
        self._stream.close()
        if self._stream is not self._raw:
            self._raw.close()

    def _block(self, n: int) -> bytes:
        if self._limit >= 0:
            n = min(n, self._limit - self._read_to)
            if n <= 0:
                return b""
        data = self._stream.read(n)
        self._read_to += len(data)
        if self._limit >= 0 and self._read_to >= self._limit:
            self._eof = True
        return bytes(data)

    @property
    def finished(self) -> bool:
        """Whether every byte of the file (as listed) was handed out."""
        return self._eof and not self._carry and not self._discarding

    @property
    def lines(self) -> int | None:
        """Line breaks before :attr:`pos` (``None``: not counted, resumed mid-file)."""
        return self._lines

    def _growing(self) -> bool:
        """Whether the file is longer now than when it was listed (being appended to)."""
        return self._limit >= 0 and self._raw.size() > self._limit

    def header(self, max_record: int, comment: int | None) -> bytes | None:
        """The file's first line (from a fresh reader when resuming mid-file)."""
        if self.pos == 0:
            return None
        reader = _Text(self.store, self.entry, self.compression, 0)
        try:
            while (got := reader.chunk(1 << 16, 1000, max_record)) is not None:
                lines = split_lines(got[0], comment)
                if len(lines):
                    return lines.line(0)
            return None
        finally:
            reader.close()

    def chunk(
        self, max_bytes: int, max_rows: int, max_record: int
    ) -> tuple[bytes, int, list[_Bad]] | None:
        """The next run of whole lines (at most ``max_rows``), its start
        offset, and the over-long lines dropped before it; ``None`` at the end."""
        bad: list[_Bad] = []
        while True:
            want = max_bytes - len(self._carry)
            data = self._block(want) if want > 0 and not self._eof else b""
            if want > 0 and not data:
                self._eof = True
            buf = self._carry + data if self._carry else data
            base = self.pos
            if self._discarding:
                nl = buf.find(b"\n")
                if nl < 0:
                    self.pos += len(buf)
                    self._carry = b""
                    if self._eof:
                        self._discarding = False
                        return (b"", self.pos, bad) if bad else None
                    continue
                self._discarding = False
                self.pos += nl + 1
                if self._lines is not None:
                    self._lines += 1
                buf = buf[nl + 1 :]
                base = self.pos
            if not buf:
                self._carry = b""
                if self._eof:
                    return (b"", self.pos, bad) if bad else None
                continue
            last = buf.rfind(b"\n")
            if self._eof and last < len(buf) - 1 and self._growing():
                # An unterminated last line of a file being appended to: wait
                # for its end (the next listing sees the file grown).
                if last < 0:
                    self._carry = buf
                    return (b"", self.pos, bad) if bad else None
                tail, buf = buf[last + 1 :], buf[: last + 1]
            else:
                tail = b""
            if last < 0 and not self._eof:
                if len(buf) > max_record:
                    bad.append(
                        _Bad(
                            base,
                            buf[:_HEAD_BYTES],
                            f"line longer than {max_record} bytes "
                            "(max_record_bytes); its first 64 KiB kept",
                        )
                    )
                    self._discarding = True
                    self.pos += len(buf)
                    self._carry = b""
                    return (b"", self.pos, bad)
                self._carry = buf
                if want <= 0:  # the carry is full and holds no line break: read more
                    max_bytes = len(buf) + max(max_bytes, 1 << 16)
                continue
            cut = len(buf) if last < 0 else last + 1
            arr = np.frombuffer(buf, np.uint8, count=cut)
            breaks = np.flatnonzero(arr == 10)
            if len(breaks) > max_rows:
                cut = int(breaks[max_rows - 1]) + 1
            chunk, self._carry = buf[:cut], buf[cut:] + tail
            self.pos = base + cut
            if self._lines is not None:
                self._lines += min(len(breaks), max_rows)
            return chunk, base, bad

    def line_of(self, offset: int) -> int:
        """The 1-based line number at byte ``offset`` (counts line breaks before it)."""
        reader = _Text(self.store, self.entry, self.compression, 0)
        try:
            count, left = 0, offset
            while left > 0:
                data = reader._block(min(left, _SCAN_BYTES))
                if not data:
                    break
                count += data.count(b"\n")
                left -= len(data)
            return count + 1
        finally:
            reader.close()


def _skip(stream: pa.NativeFile, count: int) -> None:
    """Read and drop ``count`` bytes of a sequential stream."""
    while count > 0:
        data = stream.read(min(count, _SCAN_BYTES))
        if not data:
            return
        count -= len(data)


def parquet_batches(f: pa.NativeFile, start: int, rows: int) -> Iterator[pa.RecordBatch]:
    """Record batches of a Parquet file from row ``start``, at most ``rows`` each,
    reading only the row groups from the one holding ``start``."""
    pf = pq.ParquetFile(f)
    first, skip = 0, start
    meta = pf.metadata
    while first < meta.num_row_groups and skip >= meta.row_group(first).num_rows:
        skip -= meta.row_group(first).num_rows
        first += 1
    if first >= meta.num_row_groups:
        return
    groups = list(range(first, meta.num_row_groups))
    for batch in pf.iter_batches(batch_size=rows, row_groups=groups):
        if skip:
            if skip >= batch.num_rows:
                skip -= batch.num_rows
                continue
            batch, skip = batch.slice(skip), 0
        yield batch


def _orc_batches(f: pa.NativeFile, start: int, rows: int) -> Iterator[pa.RecordBatch]:
    """Record batches of an ORC file from row ``start``, a stripe at a time."""
    of = paorc.ORCFile(f)
    skip = start
    for i in range(of.nstripes):
        stripe = of.read_stripe(i)
        if skip >= stripe.num_rows:
            skip -= stripe.num_rows
            continue
        stripe, skip = stripe.slice(skip), 0
        for at in range(0, stripe.num_rows, rows):
            yield stripe.slice(at, rows)


class _Columnar:
    """Reads one Parquet / ORC file from a row, a record batch at a time."""

    def __init__(self, store: Store, entry: Entry, fmt: str, start: int, rows: int) -> None:
        self._f = store.open(entry.key)
        self.pos = start
        read = parquet_batches if fmt == "parquet" else _orc_batches
        self._batches = read(self._f, start, rows)

    def next(self) -> pa.RecordBatch | None:
        """The next batch (``pos`` moves past it), ``None`` at the end."""
        batch = next(self._batches, None)
        if batch is not None:
            self.pos += batch.num_rows
        return batch

    def close(self) -> None:
        self._f.close()


class ObjectStoreSource:
    """Streams the files under ``source_query`` (see the module docstring)."""

    def __init__(self, spec: ObjectStoreSourceSpec, ctx: Context) -> None:
        self.spec = spec
        self.prefix = ctx.pipeline.query_of(spec)
        self.id = self.prefix
        self.store: Store = (
            S3Store(spec) if isinstance(spec, ObjectStoreS3Source) else LocalStore(spec.path)  # type: ignore[attr-defined]  # the local spec has path
        )
        digest = hashlib.sha1(f"{self.store.url}/{self.prefix}".encode()).hexdigest()[:12]
        self._checkpoint = (
            state_root(spec.state_dir)
            / safe_name(ctx.pipeline.pipeline_name)
            / f"{safe_name(self.prefix)}-{digest}.json"
        )
        options = spec.read_options
        self._csv_options = options.csv if options else None
        json_rows = options.json.batch_size if options and options.json else None
        self._infer = {
            "csv": options.csv.schema_infer_max_records if options and options.csv else None,
            "json_lines": (
                options.json.schema_infer_max_records if options and options.json else None
            ),
        }
        self._max_rows = min(spec.max_batch_rows, json_rows or spec.max_batch_rows)
        self._decoders: dict[str, Any] = {}
        self._schema: pa.Schema | None = None  # locked schema of Parquet / ORC batches
        self._committed: Position = {}
        self._read: Position = {}  # committed + what was handed out since
        self._listed: dict[str, Entry] = {}
        self._last_key: str | None = None
        self._full_at = -1.0  # monotonic time of the last whole listing (<0: due)
        self._todo: list[str] = []
        self._warned: set[str] = set()
        self._text: _Text | None = None
        self._columnar: _Columnar | None = None
        self._entry: Entry | None = None

    # -- lifecycle ---------------------------------------------------------------

    def open(self, resume: Position | None) -> None:
        """Check the folder / bucket exists; continue from ``resume`` per file,
        and from the source's own position file for the files it does not name."""
        self.store.check(self.prefix)
        own = read_json(self._checkpoint) or {}
        self._committed = {str(k): int(v) for k, v in own.get("positions", {}).items()}
        self._committed.update(resume or {})
        self.rewind(resume)

    def rewind(self, position: Position | None) -> None:
        """Forget what was read and not committed; read from ``position`` (per
        file) and the committed positions."""
        self._close_file()
        self._read = dict(self._committed)
        self._read.update(position or {})
        self._todo = []
        self._full_at = -1.0

    def close(self) -> None:
        """Close the file being read."""
        self._close_file()

    def _close_file(self) -> None:
        for reader in (self._text, self._columnar):
            if reader is not None:
                reader.close()
        self._text = self._columnar = None
        self._entry = None

    def commit(self, position: Position) -> None:
        """Record the positions of a batch written durably (its ack token) in
        the source's own position file (atomic rename, fsynced)."""
        if not position:
            return
        self._committed.update(position)
        self._write_own()

    def _write_own(self) -> None:
        write_json(
            self._checkpoint,
            {"store": self.store.url, "prefix": self.prefix, "positions": self._committed},
        )

    # -- listing -----------------------------------------------------------------

    def _poll(self) -> None:
        """List (whole when due, else after the last key) and queue the files with something to read."""
        now = time.monotonic()
        whole = (
            not self.store.incremental
            or self._full_at < 0
            or now - self._full_at >= self.spec.rescan_interval_ms / 1000
        )
        entries = self.store.list(self.prefix, None if whole else self._last_key)
        if whole:
            self._full_at = now
        todo = set(self._todo)
        if whole:
            if not entries:
                self.store.check(self.prefix)  # gone (unmounted, renamed) is an error
            self._forget({e.key for e in entries})
            todo &= {e.key for e in entries}
        for entry in entries:
            self._listed[entry.key] = entry
            if self._last_key is None or entry.key > self._last_key:
                self._last_key = entry.key
            if entry.key not in todo and self._pending(entry):
                todo.add(entry.key)
        self._todo = sorted(todo)

    def _forget(self, present: set[str]) -> None:
        """Drop what is kept per file for the files a whole listing no longer
        has (deleted or moved away), but the one being read: the positions
        stay bounded by the files present, and a gone file cannot be read again."""
        reading = self._entry.key if self._entry is not None else None
        gone = [k for k in self._committed if k not in present and k != reading]
        for held in (self._read, self._committed, self._listed):
            for key in [k for k in held if k not in present and k != reading]:
                del held[key]
        self._warned &= present
        if gone:
            log.info("source %s: forgetting the positions of %d file(s) gone", self.id, len(gone))
            self._write_own()

    def _pending(self, entry: Entry) -> bool:
        fmt = file_format(entry.key, self.spec.format)
        if fmt is None:
            if entry.key not in self._warned:
                self._warned.add(entry.key)
                log.warning(
                    "source %s: not reading %s/%s: its extension names no format "
                    "(or another than format = %r)",
                    self.id,
                    self.store.url,
                    entry.key,
                    self.spec.format,
                )
            return False
        pos = self._read.get(entry.key)
        if not isinstance(pos, int):
            return True
        if pos >= FINISHED:
            return entry.size != pos - FINISHED  # rewritten since: reported
        if fmt[1] is None and fmt[0] in ("json_lines", "csv"):
            return pos != entry.size  # grew (read on) or shrank (reported)
        return True

    # -- reading -----------------------------------------------------------------

    def read(self, timeout_s: float) -> Batch | None:
        """The next batch of the file being read, or of the next file with
        something to read; ``None`` when there is none."""
        if self._entry is None:
            if not self._todo:
                self._poll()
            if not self._todo:
                return None
            entry = self._listed[self._todo.pop(0)]
            return self._start(entry)
        return self._next()

    def _label(self, key: str) -> str:
        return f"{self.store.url}/{key}"

    def _start(self, entry: Entry) -> Batch:
        """Open ``entry`` at its position (or report it as changed)."""
        fmt, compression = file_format(entry.key, self.spec.format) or ("", None)
        pos = self._read.get(entry.key)
        start = pos if isinstance(pos, int) else 0
        text = fmt in ("json_lines", "csv")
        if start >= FINISHED or (text and compression is None and start > entry.size):
            was = start - FINISHED if start >= FINISHED else start
            unit = "size" if start >= FINISHED else "read up to byte"
            end = entry.size if text and compression is None else FINISHED + entry.size
            why = (
                f"file {self._label(entry.key)} changed after it was read ({unit} {was}, now "
                f"{entry.size} bytes); it is not read again"
            )
            return self._report(entry, start, why, end)
        self._entry = entry
        try:
            if text:
                self._text = _Text(self.store, entry, compression, start)
                decoder = self._decoder(fmt)
                if decoder.has_header and start > 0:
                    decoder.header(self._text.header(self.spec.max_record_bytes, decoder.comment))
            else:
                self._columnar = _Columnar(self.store, entry, fmt, start, self._max_rows)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            self._close_file()
            return self._report(entry, start, f"cannot read: {exc}", FINISHED + entry.size)
        except OSError as exc:
            self._close_file()
            raise ConnectorError(f"source {self.id}: {self._label(entry.key)}: {exc}") from exc
        return self._next()

    def _decoder(self, fmt: str) -> Any:
        decoder = self._decoders.get(fmt)
        if decoder is None:
            decoder = JsonLines() if fmt == "json_lines" else Csv(self._csv_options)
            self._decoders[fmt] = decoder
        return decoder

    def _report(self, entry: Entry, offset: int, why: str, end: int) -> Batch:
        """A batch of one bad record standing for the file (or its rest); the
        file's position moves to ``end``."""
        position: Position = {entry.key: end}
        self._read.update(position)
        raw = _Records(
            entry.key,
            self._label(entry.key),
            entry.mtime_us // 1000,
            None,
            0,
            None,
            [_Bad(offset, None, why)],
        )
        return Batch(
            self.id,
            _EMPTY,
            position,
            position=position,
            raw_count=1,
            partitions=(self.id,),
            raw=raw,
            bad=((0, why),),
        )

    def _next(self) -> Batch:
        entry = self._entry
        assert entry is not None
        try:
            if self._text is not None:
                return self._next_text(entry, self._text)
            assert self._columnar is not None
            return self._next_columnar(entry, self._columnar)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            reader = self._text or self._columnar
            at = reader.pos if reader is not None else 0
            self._close_file()
            return self._report(entry, at, f"cannot read: {exc}", FINISHED + entry.size)
        except OSError as exc:
            self._close_file()
            raise ConnectorError(f"source {self.id}: {self._label(entry.key)}: {exc}") from exc

    def _finish(self, entry: Entry, end: int) -> Position:
        self._close_file()
        position: Position = {entry.key: end}
        self._read.update(position)
        return position

    def _next_text(self, entry: Entry, reader: _Text) -> Batch:
        fmt, compression = file_format(entry.key, self.spec.format) or ("json_lines", None)
        decoder = self._decoder(fmt)
        limits = (self.spec.max_batch_bytes, self._max_rows, self.spec.max_record_bytes)
        lines_known = reader.lines
        got = reader.chunk(*limits)
        if got is None:
            end = reader.pos if compression is None else FINISHED + entry.size
            done = self._finish(entry, end)
            return Batch(self.id, _EMPTY, done, position=done, partitions=(self.id,))
        chunk, base, dropped = got
        lines = split_lines(chunk, getattr(decoder, "comment", None))
        if decoder.has_header and reader.needs_header and len(lines):
            # The file's first record line is its header: take it, read on.
            decoder.header(lines.line(0))
            reader.needs_header = False
            lines = Lines(chunk, lines.starts[1:], lines.ends[1:])
        decoded = decode_inferring(decoder, lines, self._infer.get(fmt))
        pos = reader.pos
        finished = reader.finished
        if finished and compression is not None:
            pos = FINISHED + entry.size
        position: Position = {entry.key: pos}
        self._read.update(position)
        if finished:
            self._close_file()

        # Line numbers: known when the file was read from its start; else
        # counted from the file's start, on the error path only.
        line_base = lines_known
        nl = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10)

        def line_of(offset: int) -> int:
            nonlocal line_base
            if line_base is None:
                line_base = reader.line_of(base) - 1
            inside = int(np.searchsorted(nl, offset - base))
            return line_base + inside + 1

        bad_records = [
            _Bad(b.offset, b.payload, f"line {line_of(b.offset)}: {b.reason}") for b in dropped
        ]
        raw = _Records(
            entry.key,
            self._label(entry.key),
            entry.mtime_us // 1000,
            lines,
            base,
            line_of,
            bad_records,
        )
        n = len(lines)
        bad = [(i, f"line {line_of(raw.offset(i))}: {why}") for i, why in decoded.bad]
        bad.extend((n + j, b.reason) for j, b in enumerate(bad_records))
        table = with_event_ts(decoded.table, entry.mtime_us)
        return Batch(
            self.id,
            table,
            position,
            position=position,
            raw_count=len(raw),
            partitions=(self.id,),
            raw=raw,
            bad=tuple(bad),
            rows=None if decoded.rows is None else tuple(decoded.rows),
        )

    def _next_columnar(self, entry: Entry, reader: _Columnar) -> Batch:
        start = reader.pos
        batch = reader.next()
        if batch is None:
            position = self._finish(entry, FINISHED + entry.size)
            return Batch(self.id, _EMPTY, position, position=position, partitions=(self.id,))
        try:
            table = self._conform(pa.Table.from_batches([batch]))
        except _Misfit as exc:
            self._close_file()
            return self._report(
                entry, start, f"{exc}; the rest of the file is not read", FINISHED + entry.size
            )
        position = {entry.key: reader.pos}
        self._read.update(position)
        return Batch(
            self.id,
            with_event_ts(table, entry.mtime_us),
            position,
            position=position,
            raw_count=table.num_rows,
            partitions=(self.id,),
        )

    def _conform(self, table: pa.Table) -> pa.Table:
        """Lock the schema (first batch), add new columns, widen int64 to
        float64; raise :class:`_Misfit` for a column of another type."""
        if self._schema is None:
            self._schema = table.schema
            return table
        schema = self._schema
        for f in table.schema:
            i = schema.get_field_index(f.name)
            if i < 0:
                schema = schema.append(f)
                continue
            have = schema.field(i).type
            if have == f.type:
                continue
            if pa.types.is_integer(have) and pa.types.is_floating(f.type):
                schema = schema.set(i, pa.field(f.name, pa.float64()))
            elif not _fits(f.type, have):
                raise _Misfit(f"column {f.name!r} is {f.type}, the stream's schema has {have}")
        self._schema = schema
        columns = []
        for f in schema:
            if f.name in table.column_names:
                col = table[f.name]
                columns.append(col if col.type == f.type else col.cast(f.type))
            else:
                columns.append(pa.nulls(table.num_rows, f.type))
        return pa.Table.from_arrays(columns, schema=schema)


class _Misfit(Exception):
    """A Parquet / ORC column does not fit the locked schema."""


def _fits(got: pa.DataType, have: pa.DataType) -> bool:
    """Whether values of ``got`` cast to ``have`` without loss of meaning
    (a narrower integer or float, a string / binary of another width)."""
    t = pa.types
    if t.is_integer(got) and (t.is_integer(have) or t.is_floating(have)):
        return True
    if t.is_floating(got) and t.is_floating(have):
        return True
    if (t.is_string(got) or t.is_large_string(got)) and (
        t.is_string(have) or t.is_large_string(have)
    ):
        return True
    return bool(t.is_timestamp(got) and t.is_timestamp(have))


def build_source(spec: ObjectStoreSourceSpec, ctx: Context) -> ObjectStoreSource:
    """Registry hook."""
    return ObjectStoreSource(spec, ctx)
