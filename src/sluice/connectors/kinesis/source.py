"""Kinesis source (boto3): every shard, children after their parents, positions per shard.

* **Shards.** The shard list is read at open, every ``shard_refresh_ms`` and
  whenever a shard ends (``ChildShards`` in its last ``GetRecords``). A shard
  is read only once every parent it has (``ParentShardId``,
  ``AdjacentParentShardId``) was read to its end (``NextShardIterator``
  absent): after a split or merge, every key's records of the parent come
  before its records in the children, in batch order too. A parent no longer
  listed (past retention) counts as ended. A shard that appears after the
  first listing starts at ``TRIM_HORIZON`` whatever ``start_position`` says,
  so a reshard loses nothing.
* **Positions.** The position of a shard (key ``<stream>:<shard id>``) is the
  sequence number of its last record handed out; reading resumes
  ``AFTER_SEQUENCE_NUMBER``. Every batch carries the positions of all shards
  read so far (it is :class:`~sluice.connectors.api.Seekable`), so a SQL
  target keeps them in its transaction (``_sluice_positions``) or a state
  store in its checkpoint, and :meth:`KinesisSource.open` resumes there.
  :meth:`KinesisSource.commit` also writes them to a small JSON file
  (``position_file``), used when nothing else holds positions.
* **Errors.** An expired iterator is fetched again from the shard's position
  (nothing read is skipped or read twice). Throttling
  (``ProvisionedThroughputExceededException``, ``LimitExceededException``)
  backs the shard off (0.1 s doubling to 5 s), never fatal. botocore's own
  retries are off: the backoff is per shard.
* ``_event_ts`` is each record's ``ApproximateArrivalTimestamp``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from sluice.connectors.api import Batch, Position, RawRecord
from sluice.connectors.kinesis import client as kc
from sluice.connectors.kinesis.spec import KinesisSource as KinesisSourceSpec
from sluice.connectors.registry import Context
from sluice.errors import ConnectorError, TransientError
from sluice.formats import decoder_for, event_table
from sluice.localstate import read_json, safe_name, state_dir, write_json

log = logging.getLogger(__name__)

#: Most records one GetRecords returns (the service's limit).
GET_LIMIT = 10_000
#: Throttling backoff of a shard: first pause and cap, seconds.
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0
#: Pause when no shard had anything, seconds (AWS allows 5 GetRecords/s per shard).
EMPTY_PAUSE_S = 0.2
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


@dataclass(slots=True)
class _Shard:
    """What the source knows about one shard."""

    id: str
    parents: tuple[str, ...]
    after: str | None  # sequence number of the last record handed out
    start: str  # iterator type without a position: TRIM_HORIZON or LATEST
    iterator: str | None = None
    ended: bool = False
    wait_until: float = 0.0  # throttled: not read before this (monotonic)
    backoff_s: float = 0.0


class KinesisSource:
    """Reads every shard of one stream; see the module docstring."""

    def __init__(self, spec: KinesisSourceSpec, ctx: Context) -> None:
        self.spec = spec
        query = ctx.pipeline.query_of(spec)
        self.id = query
        self.stream = spec.stream_name or query
        cdc = ctx.pipeline.transform.cdc if ctx.pipeline.transform else None
        self._decoder = decoder_for(spec.payload_format, cdc, ctx.pipeline.pipeline_name)
        self.position_file = Path(
            spec.position_file
            or state_dir()
            / f"{safe_name(ctx.pipeline.pipeline_name)}.kinesis.{safe_name(self.stream)}.json"
        )
        self.client: Any = None  # the boto3 client (tests hook botocore events on it)
        self._shards: dict[str, _Shard] = {}
        self._base: Position = {}  # where shards start: resume, else the position file
        self._refreshed = 0.0
        self._listed_once = False
        self._turn = 0  # rotates the shard read first

    def key(self, shard_id: str) -> str:
        """The position key of a shard: ``<stream>:<shard id>``."""
        return f"{self.stream}:{shard_id}"

    # -- lifecycle --------------------------------------------------------

    def open(self, resume: Position | None) -> None:
        """Connect, list the shards, and start each at ``resume``, else at the
        position file, else at ``start_position``."""
        self.client = kc.kinesis(self.spec)
        try:
            self.client.describe_stream_summary(StreamName=self.stream)
        except kc.ClientError as exc:
            if kc.code(exc) == "ResourceNotFoundException":
                raise ConnectorError(f"kinesis: stream {self.stream} does not exist") from exc
            raise TransientError(f"kinesis: describing stream {self.stream}: {exc}") from exc
        except kc.BotoCoreError as exc:
            raise TransientError(f"kinesis: describing stream {self.stream}: {exc}") from exc
        self._shards = {}
        self._listed_once = False
        self._base = dict(resume) if resume else self._stored()
        self._refresh()

    def close(self) -> None:
        """Drop the client and the shard state (a reopened source lists again)."""
        client, self.client = self.client, None
        self._shards = {}
        if client is not None:
            try:
                client.close()
            except Exception as exc:  # an old botocore without close(), a broken pool
                log.debug("kinesis %s: close: %s", self.id, exc)

    def _stored(self) -> Position:
        stored = read_json(self.position_file) or {}
        positions = stored.get("positions", {}) if isinstance(stored, dict) else {}
        return {str(k): str(v) for k, v in positions.items()}

    def _refresh(self) -> None:
        """Read the shard list; add the shards not known yet."""
        client = self._require()
        shards: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"StreamName": self.stream}
        try:
            while True:
                resp = client.list_shards(**kwargs)
                shards.extend(resp.get("Shards", []))
                token = resp.get("NextToken")
                if not token:
                    break
                kwargs = {"NextToken": token}
        except kc.ClientError as exc:
            if kc.code(exc) in kc.RETRYABLE:
                log.info("kinesis %s: list_shards throttled; later", self.id)
                return
            raise TransientError(f"kinesis: listing shards of {self.stream}: {exc}") from exc
        except kc.BotoCoreError as exc:
            raise TransientError(f"kinesis: listing shards of {self.stream}: {exc}") from exc
        start = "LATEST" if self.spec.start_position == "latest" and not self._listed_once else ""
        for s in shards:
            sid = s["ShardId"]
            if sid in self._shards:
                continue
            parents = tuple(
                p for p in (s.get("ParentShardId"), s.get("AdjacentParentShardId")) if p
            )
            stored = self._base.get(self.key(sid))
            self._shards[sid] = _Shard(
                sid,
                parents,
                str(stored) if stored is not None else None,
                start or "TRIM_HORIZON",
            )
        self._listed_once = True
        self._refreshed = time.monotonic()

    def _ready(self, shard: _Shard, now: float) -> bool:
        if shard.ended or shard.wait_until > now:
            return False
        # A parent not listed (past retention) has nothing left to read.
        return all(p not in self._shards or self._shards[p].ended for p in shard.parents)

    # -- reading ------------------------------------------------------------

    def read(self, timeout_s: float) -> Batch | None:
        """Records from every ready shard, up to ``max_batch_rows``, within
        ``timeout_s`` (and ``max_batch_wait_ms``)."""
        self._require()
        deadline = time.monotonic() + min(timeout_s, self.spec.max_batch_wait_ms / 1000)
        limit = self.spec.max_batch_rows
        got: list[tuple[str, dict[str, Any]]] = []
        while True:
            now = time.monotonic()
            if now - self._refreshed >= self.spec.shard_refresh_ms / 1000:
                self._refresh()
            moved = False
            # Every ready shard gets a share of the batch, the first turn
            # rotating: a shard with a backlog does not starve the others.
            ready = [s for s in self._shards.values() if self._ready(s, now)]
            self._turn += 1
            for i in range(len(ready)):
                if len(got) >= limit:
                    break
                shard = ready[(self._turn + i) % len(ready)]
                share = max(1, (limit - len(got)) // (len(ready) - i))
                moved = self._get(shard, share, got) or moved
            now = time.monotonic()
            if got or now >= deadline or len(got) >= limit:
                break
            if not moved:
                time.sleep(min(EMPTY_PAUSE_S, max(0.0, deadline - now)))
        if not got:
            return None
        return self._to_batch(got)

    def _get(self, shard: _Shard, want: int, got: list[tuple[str, dict[str, Any]]]) -> bool:
        """One GetRecords on ``shard`` into ``got``; whether the shard moved
        (records, or its end)."""
        client = self._require()
        try:
            if shard.iterator is None:
                shard.iterator = self._iterator(shard)
            resp = client.get_records(ShardIterator=shard.iterator, Limit=min(GET_LIMIT, want))
        except kc.ClientError as exc:
            code = kc.code(exc)
            if code == "ExpiredIteratorException":
                log.info("kinesis %s: iterator of %s expired; fetched again", self.id, shard.id)
                shard.iterator = None  # from the shard's position, at the next pass
                return True
            if code in kc.RETRYABLE:
                shard.backoff_s = min(BACKOFF_MAX_S, max(BACKOFF_FIRST_S, shard.backoff_s * 2))
                shard.wait_until = time.monotonic() + shard.backoff_s
                log.info("kinesis %s: %s on %s; %.1f s", self.id, code, shard.id, shard.backoff_s)
                return False
            if code == "ResourceNotFoundException":
                raise ConnectorError(f"kinesis: {self.stream} shard {shard.id}: {exc}") from exc
            raise TransientError(f"kinesis: reading {self.stream} shard {shard.id}: {exc}") from exc
        except kc.BotoCoreError as exc:
            raise TransientError(f"kinesis: reading {self.stream} shard {shard.id}: {exc}") from exc
        shard.backoff_s = 0.0
        records = resp.get("Records", [])
        if records:
            shard.after = str(records[-1]["SequenceNumber"])
            got.extend((shard.id, r) for r in records)
        shard.iterator = resp.get("NextShardIterator")
        if shard.iterator is None:
            shard.ended = True
            if any(c.get("ShardId") not in self._shards for c in resp.get("ChildShards", [])):
                self._refreshed = 0.0  # list again at the next pass: the children
            return True
        return bool(records)

    def _iterator(self, shard: _Shard) -> str:
        client = self._require()
        kwargs: dict[str, Any] = {"StreamName": self.stream, "ShardId": shard.id}
        if shard.after is not None:
            kwargs.update(
                ShardIteratorType="AFTER_SEQUENCE_NUMBER", StartingSequenceNumber=shard.after
            )
        else:
            kwargs["ShardIteratorType"] = shard.start
        iterator: str = client.get_shard_iterator(**kwargs)["ShardIterator"]
        return iterator

    def _to_batch(self, got: list[tuple[str, dict[str, Any]]]) -> Batch:
        ts_us = np.fromiter(
            ((r["ApproximateArrivalTimestamp"] - _EPOCH) // _US for _, r in got),
            dtype=np.int64,
            count=len(got),
        )
        decoded = self._decoder.decode([r["Data"] for _, r in got], list(range(len(got))))
        table = event_table(decoded, ts_us)
        position: Position = {
            self.key(s.id): s.after for s in self._shards.values() if s.after is not None
        }
        return Batch(
            self.id,
            table,
            position,
            position=position,
            raw_count=len(got),
            partitions=tuple(self.key(s) for s in self._shards),
            raw=_Records(self, got),
            bad=tuple(decoded.bad),
            rows=None if decoded.rows is None else tuple(decoded.rows),
        )

    def rewind(self, position: Position | None) -> None:
        """Read again from ``position`` (else from the position file); shards
        are read to their ends again before their children."""
        self._base = dict(position) if position is not None else self._stored()
        for shard in self._shards.values():
            stored = self._base.get(self.key(shard.id))
            shard.after = str(stored) if stored is not None else None
            shard.iterator = None
            shard.ended = False
            shard.wait_until = 0.0

    # -- committing ------------------------------------------------------------

    def commit(self, position: Position) -> None:
        """Write ``position`` (a batch's ack: every shard's last sequence number
        read) to the position file, atomically."""
        merged = {**self._stored(), **{k: str(v) for k, v in position.items()}}
        write_json(self.position_file, {"stream": self.stream, "positions": merged})

    def _require(self) -> Any:
        if self.client is None:
            raise ConnectorError(f"kinesis source {self.id} is not open")
        return self.client


class _Records:
    """The records of one batch, kept for dead letters and error messages."""

    def __init__(self, source: KinesisSource, got: list[tuple[str, dict[str, Any]]]) -> None:
        self._source = source
        self._got = got

    def __len__(self) -> int:
        return len(self._got)

    def record(self, index: int) -> RawRecord:
        shard, r = self._got[index]
        ts = (r["ApproximateArrivalTimestamp"] - _EPOCH) // timedelta(milliseconds=1)
        return RawRecord(
            self._source.key(shard),
            str(r["SequenceNumber"]),
            int(ts),
            str(r.get("PartitionKey", "")).encode() or None,
            bytes(r["Data"]),
        )

    def where(self, index: int) -> str:
        shard, r = self._got[index]
        return f"stream {self._source.stream} shard {shard} sequence number {r['SequenceNumber']}"

    def span(self) -> str:
        ranges: dict[str, list[str]] = {}
        for shard, r in self._got:
            ranges.setdefault(shard, []).append(str(r["SequenceNumber"]))
        return ", ".join(
            f"stream {self._source.stream} shard {s} sequence numbers {v[0]}..{v[-1]}"
            for s, v in ranges.items()
        )


def build_source(spec: KinesisSourceSpec, ctx: Context) -> KinesisSource:
    """Registry hook."""
    return KinesisSource(spec, ctx)
