"""Local object-store source: every new file under a prefix, read once.

Files are taken in lexicographic order of their path below the prefix (the
order object stores list in); the position is the last file committed. It
is kept in a small checkpoint file, written atomically, under
``$SLUICE_STATE_DIR`` (default ``.sluice-state`` in the working directory),
unless a state store holds positions. Files that arrive with a name sorting
before the position are not read (documented; name files by time).

``_event_ts`` is the file's modification time when the file has no such
column.

The source is :class:`~sluice.connectors.api.Seekable`: a batch's ack token
and position are both ``{prefix: file name}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.orc as paorc
import pyarrow.parquet as pq

from sluice.connectors.api import Batch, Position, RawRecord
from sluice.connectors.files.spec import ObjectStoreLocalSource as LocalSpec
from sluice.connectors.registry import Context
from sluice.errors import ConnectorError, DecodeError
from sluice.formats import with_event_ts
from sluice.localstate import read_json, safe_name, state_dir, write_json

_SUFFIXES = {
    "parquet": (".parquet", ".pq"),
    "csv": (".csv", ".tsv", ".csv.gz"),
    "json_lines": (".json", ".jsonl", ".ndjson", ".jsonl.gz", ".json.gz"),
    "orc": (".orc",),
}
_SUFFIXES["jsonl"] = _SUFFIXES["json_lines"]


class LocalFilesSource:
    """Reads new files under ``path/source_query``."""

    def __init__(self, spec: LocalSpec, ctx: Context) -> None:
        self.spec = spec
        self.prefix = ctx.pipeline.query_of(spec)
        self.id = self.prefix
        self.root = Path(spec.path) / self.prefix
        self._checkpoint = (
            state_dir() / safe_name(ctx.pipeline.pipeline_name) / f"{safe_name(self.prefix)}.json"
        )
        self._cursor = ""  # last file handed out (read, maybe not committed)

    def open(self, resume: Position | None) -> None:
        """Start after ``resume`` or after the last committed file."""
        self.rewind(resume)

    def rewind(self, position: Position | None) -> None:
        """Read next the file after ``position``'s, else after the last committed one."""
        last = (position or {}).get(self.prefix)
        if last is None:
            last = (read_json(self._checkpoint) or {}).get("last_file")
        self._cursor = str(last or "")

    def close(self) -> None:
        """Nothing to release."""

    def _pending(self) -> list[str]:
        if not self.root.exists():
            return []
        suffixes = _SUFFIXES[self.spec.format]
        names = []
        for p in self.root.rglob("*"):
            rel = p.relative_to(self.root).as_posix()
            if p.is_file() and rel.endswith(suffixes) and not p.name.startswith((".", "_")):
                names.append(rel)
        return sorted(n for n in names if n > self._cursor)

    def read(self, timeout_s: float) -> Batch | None:
        """The next unread file as one batch, or ``None`` when there is none."""
        pending = self._pending()
        if not pending:
            return None
        name = pending[0]
        path = self.root / name
        position: Position = {self.prefix: name}
        try:
            table = self._load(path)
        except pa.ArrowInvalid as exc:
            # A file that does not parse is one bad record: on_error decides
            # (fail naming the file, drop it, or dead-letter its bytes).
            self._cursor = name
            raw = _FileRecord(RawRecord(self.prefix, name, None, None, path.read_bytes()), path)
            return Batch(
                self.id,
                pa.table({}),
                position,
                position=position,
                raw_count=1,
                partitions=(self.prefix,),
                raw=raw,
                bad=((0, f"cannot read file {path}: {exc}"),),
            )
        except OSError as exc:
            raise DecodeError(f"cannot read file {path}: {exc}") from exc
        # A file without its own _event_ts is stamped with its modification time.
        table = with_event_ts(table, int(path.stat().st_mtime * 1_000_000))
        self._cursor = name
        return Batch(
            self.id,
            table,
            position,
            position=position,
            raw_count=table.num_rows,
            partitions=(self.prefix,),
        )

    def _load(self, path: Path) -> pa.Table:
        fmt = self.spec.format
        if fmt == "parquet":
            return pq.read_table(path)
        if fmt == "csv":
            return pacsv.read_csv(path)
        if fmt in ("json_lines", "jsonl"):
            return pajson.read_json(path)
        if fmt == "orc":
            return paorc.read_table(path)
        raise ConnectorError(f"unknown format {fmt}")  # pragma: no cover - the spec is closed

    def commit(self, position: Position) -> None:
        """Record the last file written durably (atomic rename, fsynced);
        ``position`` is a batch's ack token."""
        last = position.get(self.prefix)
        if last is None:
            return
        write_json(self._checkpoint, {"last_file": last})


@dataclass(frozen=True, slots=True)
class _FileRecord:
    """A whole file as the one raw record of a batch (a file that did not parse)."""

    record_: RawRecord
    path: Path

    def __len__(self) -> int:
        return 1

    def record(self, index: int) -> RawRecord:
        return self.record_

    def where(self, index: int) -> str:
        return f"file {self.path}"

    def span(self) -> str:
        return f"file {self.path}"


def build_source(spec: LocalSpec, ctx: Context) -> LocalFilesSource:
    """Registry hook."""
    return LocalFilesSource(spec, ctx)
