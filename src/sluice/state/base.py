"""The StateStore contract shared by every implementation.

A store keeps, per pipeline, one :class:`Checkpoint`: operator state blobs by
key, source positions by source and partition, the watermark, and a version
that every commit raises by one. :meth:`StateStore.commit` applies a delta
(upserted and deleted keys, changed positions) atomically: all of it or none
of it. The version doubles as a fencing token: a commit names the version it
expects to replace, and fails when another writer committed in between.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from sluice.connectors.api import Position
from sluice.errors import ConnectorError

#: Bounds of a Postgres ``bigint``; an integer position outside them cannot be stored.
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class Checkpoint:
    """What a pipeline last committed.

    ``state``: operator state blobs by key (``"window"``, ``"join/orders:3"``).
    ``positions``: source id -> partition key -> next record to read (Kafka:
    ``"topic:partition"`` -> ``offset + 1``). ``watermark_us``: the last
    watermark committed (µs since the epoch), ``None`` when none ever was.
    ``version``: the number of commits so far, 0 when nothing is stored.

    The dicts belong to the caller: a store hands out copies.
    """

    state: dict[str, bytes] = field(default_factory=dict)
    positions: dict[str, Position] = field(default_factory=dict)
    watermark_us: int | None = None
    version: int = 0


@runtime_checkable
class StateStore(Protocol):
    """Where operator state and source positions of pipelines live.

    Calls come from one thread at a time (the run loop); an implementation
    may serialise them but need not run them concurrently. ``id`` names the
    store in logs and metrics (never with a password).
    """

    id: str

    def open(self) -> None:
        """Connect and make the storage ready (create or migrate tables, check
        that their schema is one this sluice understands).

        Raises :class:`~sluice.errors.TransientError` when the storage cannot
        be reached (retry), :class:`~sluice.errors.ConnectorError` when it can
        never work (an unknown newer schema, bad credentials, a bad URL).
        """
        ...

    def load(self, pipeline: str) -> Checkpoint:
        """The last checkpoint committed for ``pipeline`` (version 0 and empty
        dicts when none was). Reads one consistent snapshot.

        Raises like :meth:`open`.
        """
        ...

    def commit(
        self,
        pipeline: str,
        upserts: Mapping[str, bytes],
        deletes: Collection[str],
        positions: Mapping[str, Position],
        watermark_us: int | None,
        *,
        expected_version: int | None,
    ) -> int:
        """Apply one delta to ``pipeline``'s checkpoint, atomically, and return
        the new version (``expected_version + 1``).

        ``upserts`` replace or add state keys, ``deletes`` remove keys (absent
        ones are ignored; a key may not be in both). ``positions`` are merged
        per source and partition: a partition not named keeps its stored
        position. ``watermark_us`` replaces the stored watermark; ``None``
        keeps it (watermarks never go back to unknown).

        ``expected_version`` is the version this writer last loaded or
        committed; when the stored version differs, another process committed
        in between and the call raises :class:`~sluice.errors.ConnectorError`
        (fenced) without writing anything. ``None`` skips that check (tools,
        not the run loop).

        Either everything is stored or nothing is. Raises
        :class:`~sluice.errors.TransientError` when the storage failed in a way
        worth retrying (connection lost, server restarting, lock timeout): retry
        the same delta with the same ``expected_version``.
        :class:`~sluice.errors.ConnectorError` for anything else: bad
        arguments, a constraint violation, being fenced.
        """
        ...

    def close(self) -> None:
        """Release the connection. Idempotent; never raises."""
        ...


def check_commit(
    pipeline: str,
    upserts: Mapping[str, bytes],
    deletes: Collection[str],
    positions: Mapping[str, Position],
    watermark_us: int | None,
    expected_version: int | None,
) -> None:
    """Reject a malformed :meth:`StateStore.commit` before it touches storage.

    Raises :class:`ConnectorError` naming the offending key. Costs one Python
    step per key and partition, never per byte of a blob.
    """
    if not isinstance(pipeline, str) or not pipeline:
        raise ConnectorError(
            f"state store: the pipeline name must be a non-empty string, got {pipeline!r}"
        )
    for key, value in upserts.items():
        _check_key(pipeline, key)
        if not isinstance(value, bytes | bytearray | memoryview):
            raise ConnectorError(
                f"state store: pipeline {pipeline!r}: the value of state key {key!r} must be "
                f"bytes, got {type(value).__name__}"
            )
    both = [k for k in deletes if k in upserts]
    if both:
        raise ConnectorError(
            f"state store: pipeline {pipeline!r}: key {both[0]!r} is both upserted and deleted "
            "in one commit"
        )
    for key in deletes:
        _check_key(pipeline, key)
    for source, parts in positions.items():
        _check_text(pipeline, "source id", source)
        for part, pos in parts.items():
            _check_text(pipeline, f"partition key of source {source!r}", part)
            where = f"state store: pipeline {pipeline!r}: position of {source!r} {part!r}"
            if isinstance(pos, bool) or not isinstance(pos, int | str):
                raise ConnectorError(f"{where} must be an int or a str, got {type(pos).__name__}")
            if isinstance(pos, int) and not INT64_MIN <= pos <= INT64_MAX:
                raise ConnectorError(f"{where} does not fit in 64 bits: {pos}")
            if isinstance(pos, str) and "\x00" in pos:
                raise ConnectorError(f"{where} contains a NUL character")
    if watermark_us is not None and (
        isinstance(watermark_us, bool)
        or not isinstance(watermark_us, int)
        or not INT64_MIN <= watermark_us <= INT64_MAX
    ):
        raise ConnectorError(
            f"state store: pipeline {pipeline!r}: watermark_us must be a 64-bit int or None, "
            f"got {watermark_us!r}"
        )
    if expected_version is not None and (
        isinstance(expected_version, bool)
        or not isinstance(expected_version, int)
        or expected_version < 0
    ):
        raise ConnectorError(
            f"state store: pipeline {pipeline!r}: expected_version must be an int >= 0 or None, "
            f"got {expected_version!r}"
        )


def _check_key(pipeline: str, key: object) -> None:
    _check_text(pipeline, "state key", key)


def _check_text(pipeline: str, what: str, value: object) -> None:
    if not isinstance(value, str) or not value or "\x00" in value:
        raise ConnectorError(
            f"state store: pipeline {pipeline!r}: a {what} must be a non-empty string without "
            f"NUL characters, got {value!r}"
        )


def fenced(pipeline: str, expected: int, found: int, by: str = "") -> ConnectorError:
    """The error of a commit that lost the race against another writer."""
    writer = f" (written by {by})" if by else ""
    return ConnectorError(
        f"state store: pipeline {pipeline!r} was committed by another writer: this process "
        f"expected checkpoint version {expected}, the store holds version {found}{writer}. "
        "Two processes are running this pipeline against the same state store, or this one "
        "resumed from a stale checkpoint; nothing was written. Stop the other process and "
        "restart this one so it loads the latest checkpoint."
    )


class PartitionsMoved(ConnectorError):
    """A replica's checkpoint names partitions another replica claimed since
    (a rebalance this process has not seen yet): nothing was written. The
    run loop reads again from the store for its current assignment."""

    def __init__(self, pipeline: str, moved: Collection[str]) -> None:
        self.moved = sorted(moved)
        shown = ", ".join(self.moved[:5]) + (" ..." if len(self.moved) > 5 else "")
        super().__init__(
            f"state store: pipeline {pipeline!r}: partitions {shown} are owned by another "
            "replica now; nothing was written"
        )


@dataclass(frozen=True)
class Claimed:
    """What :meth:`ClaimingStore.claim` returns: the checkpoint of the claimed
    partitions (their state keys and positions; no version or watermark) and
    the generation of each claim, which later commits must still hold."""

    checkpoint: Checkpoint
    generations: dict[str, int]


@runtime_checkable
class ClaimingStore(StateStore, Protocol):
    """A store that lets replicas of one pipeline own its partitions
    (``replicas = true``): state and fencing per source partition."""

    def claim(self, pipeline: str, partitions: Collection[str], keys: Collection[str]) -> Claimed:
        """Take ``partitions`` (position keys, ``topic:partition``) for this
        process, fencing any replica that held them, and read their positions
        and the state ``keys`` (with every key under one, ``key/...``) in the
        same transaction."""
        ...

    def commit_owned(
        self,
        pipeline: str,
        upserts: Mapping[str, bytes],
        deletes: Collection[str],
        positions: Mapping[str, Position],
        owned: Mapping[str, int],
    ) -> int:
        """:meth:`StateStore.commit` for a replica: instead of the pipeline's
        version, each partition in ``owned`` must still be held at its
        generation; raises :class:`PartitionsMoved` (nothing written) when
        not."""
        ...
