"""Event-time watermarks: per source, global, and kept across restarts.

* A source's watermark is the largest event time it delivered minus
  ``[watermark] lateness_ms`` (per partition when the source names them:
  the smallest partition watermark, see :class:`Watermarks`).
* The global watermark is the smallest watermark of the sources (and
  partitions) that are not idle. A source or partition is idle once it has
  delivered no row for ``source_idleness_ms`` and has nothing left to read:
  one whose lag is above zero (the broker holds records it has not read) is
  never idle. A source that has delivered nothing yet counts from the start
  of the run, a partition from its assignment, so until then they hold the
  watermark back (a consumer still joining its group, or a partition the
  broker has not served yet, must not let windows close under it). When
  every source is idle the watermark stays where it is.
* The global watermark never goes back: a source that wakes up with older
  event times holds it, and does not lower it.
* :class:`WatermarkFile` keeps a window pipeline's watermark across
  restarts when there is no state store (see ``engine/runner.py``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from sluice.localstate import read_json, safe_name, state_dir, write_json

log = logging.getLogger("sluice")

_US_PER = {"s": 1_000_000, "ms": 1_000, "us": 1}

#: The watermark that ends the input (µs): 9999-12-31T00:00:00Z, "+∞" for a
#: drain. Not int64's maximum, so a stage adding a gap or a size to it cannot
#: overflow, and still a valid timestamp. Never stored: a later run over new
#: data would find every row late.
END_OF_INPUT_US = 253_402_214_400_000_000


def to_micros(column: pa.ChunkedArray | pa.Array) -> npt.NDArray[np.int64]:
    """Event times as µs since the epoch: a timestamp of any unit, or an
    integer already in µs (nulls must have been refused before)."""
    t = column.type
    raw: npt.NDArray[np.int64] = np.asarray(column.cast(pa.int64()).to_numpy(), dtype=np.int64)
    if pa.types.is_timestamp(t):
        return raw // 1000 if t.unit == "ns" else raw * _US_PER[t.unit]
    return raw


def max_event_us(column: pa.ChunkedArray | pa.Array) -> int | None:
    """The largest event time of ``column`` in µs since the epoch.

    A timestamp of any unit, or an integer of µs (as the window stage reads
    it). ``None`` when the column has no non-null value or another type.
    """
    t = column.type
    if not (pa.types.is_timestamp(t) or pa.types.is_integer(t)) or len(column) == 0:
        return None
    top = pc.max(column.cast(pa.int64()) if pa.types.is_timestamp(t) else column).as_py()
    return None if top is None else _to_us(int(top), t)


def _to_us(value: int, t: pa.DataType) -> int:
    if pa.types.is_timestamp(t):
        return value // 1000 if t.unit == "ns" else value * _US_PER[t.unit]
    return value


class Watermarks:
    """The watermarks of one pipeline's sources (times in µs since the epoch).

    A source that names the partition of each row (Kafka, in window
    pipelines) gets one watermark per partition, and its own watermark is the
    smallest of them, as in Flink and Kafka Streams: a consumer catching up
    on a backlog reads partitions at different speeds, and rows of a partition
    read late must not be late in event time because another partition ran
    ahead.

    Every partition the source is assigned (:meth:`assign`) holds the
    watermark from its assignment on, until it delivers or has been idle for
    ``source_idleness_ms``. A partition is idle only when it delivered no row
    for that long *and* its source reports it caught up (:meth:`report_lag`:
    no record left on the broker it has not read): a partition still behind
    is a backlog the broker has not served yet, never idle, whatever the
    clock says. A partition whose lag its source has not measured yet (or
    does not report) counts as behind. A source that does not name
    partitions goes idle on the clock alone, unless it reports a lag above
    zero.
    """

    def __init__(
        self,
        sources: Iterable[str],
        lateness_ms: int = 0,
        idle_after_ms: int = 60_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._lateness_us = lateness_ms * 1000
        self._idle_after_s = idle_after_ms / 1000
        now = clock()
        # Keyed by (source, partition); partition "" stands for the whole source.
        self._active_at: dict[tuple[str, str], float] = {(s, ""): now for s in sources}
        self._max: dict[tuple[str, str], int] = {}
        self._lag: dict[str, Mapping[str, int]] = {}  # source -> records behind, per partition
        self._global: int | None = None
        self._claimed: dict[str, frozenset[str]] = {}  # source -> partitions always counted
        self._ahead: dict[str, set[str]] = {}  # source -> partitions paused by alignment

    def claim(self, source_id: str, partitions: Iterable[str]) -> None:
        """``partitions`` of ``source_id`` are this pipeline's whatever the
        assignment says: each holds the watermark while it is not assigned
        too (it delivers when it comes back, or goes idle like any other).

        A pipeline that is not run as replicas reads every partition of its
        topics; one briefly assigned elsewhere (the consumer of a killed
        predecessor until its session times out, a rebalance between the
        consumers of two sources) must not let the others run the watermark
        ahead: its rows would be late when it comes back.
        """
        self._claimed[source_id] = frozenset(partitions)
        self.assign(source_id, ())

    def assign(self, source_id: str, partitions: Iterable[str]) -> None:
        """``source_id`` reads ``partitions`` now (its whole assignment).

        A new partition holds the watermark from now on; a partition that
        left stops counting. An empty assignment (a consumer still joining)
        changes nothing: the source as a whole holds until it has one.
        """
        keep = set(partitions) | self._claimed.get(source_id, frozenset())
        if not keep:
            return
        now = self._clock()
        self._drop_whole(source_id)
        for key in [k for k in self._active_at if k[0] == source_id and k[1] not in keep]:
            self._active_at.pop(key, None)
            self._max.pop(key, None)
        for part in keep:
            self._active_at.setdefault((source_id, part), now)

    def _drop_whole(self, source_id: str) -> None:
        """``source_id`` names its partitions: its whole-source entry goes."""
        self._active_at.pop((source_id, ""), None)
        self._max.pop((source_id, ""), None)

    def report_lag(self, source_id: str, lag: Mapping[str, int]) -> None:
        """How many records ``source_id`` has not read yet, per partition it
        reads (``Observable.lag()``, measured at its last read). Replaces the
        previous report; a partition missing from it is not measured yet."""
        self._lag[source_id] = dict(lag)

    def observe(
        self,
        source_id: str,
        column: pa.ChunkedArray | pa.Array | None,
        partitions: pa.Array | None = None,
        assigned: Iterable[str] = (),
    ) -> int | None:
        """Rows arrived from ``source_id``; ``column`` is their event time.

        ``partitions`` names each row's partition and ``assigned`` every
        partition the source reads now (see :meth:`assign`). Returns the
        largest event time of ``column`` (µs), ``None`` when it has none.
        """
        now = self._clock()
        if partitions is not None:
            self._drop_whole(source_id)
            self.assign(source_id, assigned)
        top = None if column is None else max_event_us(column)
        if partitions is None:
            self._raise((source_id, ""), top, now)
            return top
        if top is None or column is None:
            return top
        times = column.cast(pa.int64()) if pa.types.is_timestamp(column.type) else column
        table = pa.table({"p": partitions, "t": times})
        for part, mx in zip(*table.group_by("p").aggregate([("t", "max")]).columns, strict=True):
            if mx.as_py() is not None and part.as_py() is not None:
                self._raise((source_id, part.as_py()), _to_us(mx.as_py(), column.type), now)
        return top

    def observe_unaligned(
        self, source_id: str, column: pa.ChunkedArray | pa.Array, partitions: pa.Array
    ) -> int | None:
        """Rows from the partitions named in ``partitions`` arrived, but
        ``column`` (their event times, computed by SQL) is not aligned with it
        row by row.

        With one partition the largest event time is that partition's; with
        several, each is raised to the *smallest* event time only, which
        is never beyond what any of them delivered: the watermark may lag,
        but a row of a partition behind never becomes late because another
        partition of the same batch ran ahead. Returns the largest event time.
        """
        top = max_event_us(column)
        names = [p for p in pc.unique(partitions.cast(pa.string())).to_pylist() if p is not None]
        if top is None or not names:
            return top
        self._drop_whole(source_id)
        now = self._clock()
        low = top
        if len(names) > 1:
            low_raw = pc.min(
                column.cast(pa.int64()) if pa.types.is_timestamp(column.type) else column
            )
            low = _to_us(int(low_raw.as_py()), column.type)
        for part in names:
            self._raise((source_id, part), low, now)
        return top

    def touch(self, source_id: str) -> None:
        """``source_id`` is not reading yet (e.g. joining its group): not idle."""
        now = self._clock()
        for key in self._active_at:
            if key[0] == source_id:
                self._active_at[key] = now

    def _raise(self, key: tuple[str, str], top: int | None, now: float) -> None:
        self._active_at[key] = now
        if top is not None and top > self._max.get(key, top - 1):
            self._max[key] = top

    def _idle(self, key: tuple[str, str], since: float, now: float) -> bool:
        """Silent for the idle timeout, and nothing left unread (see the class docstring)."""
        if now - since < self._idle_after_s:
            return False
        lag = self._lag.get(key[0])
        if key[1] == "":  # a whole source: the clock decides, unless it reports a backlog
            return lag is None or all(v == 0 for v in lag.values())
        # A partition goes idle only once its source says it is caught up:
        # not measured yet (or a source that cannot tell) may hold a backlog.
        return lag is not None and lag.get(key[1], 1) == 0

    def source(self, source_id: str) -> int | None:
        """The watermark of one source, ``None`` before its first row."""
        marks = [v for (s, _), v in self._max.items() if s == source_id]
        return min(marks) - self._lateness_us if marks else None

    def global_us(self) -> int | None:
        """The pipeline's watermark now (``None`` until every active source has one)."""
        now = self._clock()
        active = [k for k, at in self._active_at.items() if not self._idle(k, at, now)]
        if active and all(k in self._max for k in active):
            mark = min(self._max[k] for k in active) - self._lateness_us
            if self._global is None or mark > self._global:
                self._global = mark
        return self._global

    def ahead(self, max_drift_us: int) -> dict[str, set[str]]:
        """Watermark alignment: per source, the partitions whose own watermark
        runs more than ``max_drift_us`` ahead of the pipeline's (to be paused),
        as in Flink's ``withWatermarkAlignment``. A partition stays in until it
        is no more than half that ahead, so a pause lasts a while.

        Only while a partition that is not ahead has a backlog (its source
        reported records left to read): pausing is what lets it catch up. When
        every partition behind is caught up, waiting would only delay the rows
        of those ahead (a live stream with a quiet partition), so none is
        paused. Empty with ``max_drift_us`` 0 or before there is a pipeline
        watermark.
        """
        mark = self.global_us()
        if max_drift_us <= 0 or mark is None:
            self._ahead = {}
            return {}
        ahead: dict[str, set[str]] = {}
        behind: list[tuple[str, str]] = [k for k in self._active_at if k not in self._max]
        for (source, part), top in self._max.items():
            drift = top - self._lateness_us - mark
            held = part in self._ahead.get(source, ())
            if part and (drift > max_drift_us or (held and drift > max_drift_us // 2)):
                ahead.setdefault(source, set()).add(part)
            else:
                behind.append((source, part))
        if not any(self._backlog(k) for k in behind):
            ahead = {}
        self._ahead = ahead
        return ahead

    def _backlog(self, key: tuple[str, str]) -> bool:
        """Records left to read, as last reported (unknown: no)."""
        lag = self._lag.get(key[0])
        if lag is None:
            return False
        if key[1] == "":
            return any(v > 0 for v in lag.values())
        return lag.get(key[1], 0) > 0

    def reset(self) -> None:
        """Forget every source's and partition's progress and the global
        watermark, as at the start of a run: a replica whose partitions moved
        restores each partition's state at its own watermark, and the global
        one is measured again from what they deliver (it may go back)."""
        now = self._clock()
        self._active_at = {(s, ""): now for s in {s for s, _ in self._active_at}}
        self._max = {}
        self._lag = {}
        self._global = None
        self._ahead = {}

    def restore(self, watermark_us: int) -> None:
        """Start no lower than ``watermark_us`` (the watermark a previous run stored)."""
        if self._global is None or watermark_us > self._global:
            self._global = watermark_us

    # -- checkpoints ---------------------------------------------------------------

    def snapshot(self, partitions: Collection[str] | None = None) -> dict[str, bytes]:
        """The largest event time each source and partition delivered, as
        state-store keys (see :func:`mark_keys`): ``mark/<partition>`` holds
        ``{source: µs}`` of that partition, ``mark`` the sources that do not
        name partitions. Only ``partitions`` (a replica's own) when given.

        A checkpoint stores them with its positions, so a partition restored
        at the end of what it had (nothing left to read) does not hold the
        pipeline's watermark back until it idles: it starts where it was
        (:meth:`seed`), as if the process had not stopped.
        """
        by_key: dict[str, dict[str, int]] = {}
        for (source, part), top in sorted(self._max.items()):
            if partitions is not None and part not in partitions:  # "" never is
                continue
            by_key.setdefault(f"{MARK_KEY}/{part}" if part else MARK_KEY, {})[source] = top
        return {k: json.dumps(v, sort_keys=True).encode() for k, v in by_key.items()}

    def seed(self, state: Mapping[str, bytes]) -> None:
        """Load what :meth:`snapshot` stored (other keys are ignored): each
        partition starts at the event time it had reached, never lower than
        what it delivered since. Only the event times: a partition holds the
        watermark from its assignment as always, so one that is not assigned
        yet (and has no stored mark) still holds it back; a stored partition,
        once assigned, counts with its stored time until it delivers more."""
        for key, blob in state.items():
            if key != MARK_KEY and not key.startswith(f"{MARK_KEY}/"):
                continue
            part = key[len(MARK_KEY) + 1 :]
            try:
                marks = json.loads(bytes(blob))
            except ValueError:
                marks = None
            if not isinstance(marks, dict):
                log.warning("state key %s holds no event times; ignored", key)
                continue
            for source, top in marks.items():
                k = (str(source), part)
                if k not in self._max or int(top) > self._max[k]:
                    self._max[k] = int(top)


MARK_KEY = "mark"
"""The state keys of :meth:`Watermarks.snapshot`: ``mark`` and ``mark/<partition>``."""


def mark_keys(partitions: Iterable[str]) -> set[str]:
    """The state keys holding the marks of ``partitions`` (a replica's claim)."""
    return {f"{MARK_KEY}/{p}" for p in partitions}


class WatermarkFile:
    """A pipeline's window watermark in ``$SLUICE_STATE_DIR/<pipeline>/watermark.json``.

    The file also names what the watermark was measured on (``sources``: the
    sources' kinds, queries and consumer groups). A stored watermark of other
    sources (the same pipeline name pointed at a new topic or group) is not
    restored: it would make every row of the new input late.
    """

    def __init__(self, pipeline: str, sources: str = "", directory: Path | None = None) -> None:
        self.path = (directory or state_dir()) / safe_name(pipeline) / "watermark.json"
        self.sources = sources
        self._saved: int | None = None

    def load(self) -> int | None:
        """The stored watermark (µs), ``None`` when nothing was stored for these sources."""
        value = read_json(self.path)
        if value is None or value.get("sources", "") != self.sources:
            if value is not None:
                log.warning(
                    "%s holds the watermark of other sources (%s); starting without one",
                    self.path,
                    value.get("sources"),
                )
            self._saved = None
            return None
        self._saved = int(value["watermark_us"])
        return self._saved

    def save(self, watermark_us: int | None) -> None:
        """Store ``watermark_us`` durably (fsynced) when it moved."""
        if watermark_us is None or watermark_us == self._saved:
            return
        write_json(self.path, {"watermark_us": watermark_us, "sources": self.sources})
        self._saved = watermark_us
