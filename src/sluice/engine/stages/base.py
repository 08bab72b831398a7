"""What the run loop asks of its stages.

Two kinds of stage sit between the sources and the targets:

* a :class:`Stage` maps one batch to one batch and keeps nothing between
  batches that a restart would need (SQL with its lookups);
* a :class:`TimedStage` (window, join) keeps rows across batches, keyed by
  event time, and emits when the watermark passes. Its state survives
  restarts through :meth:`StatefulStage.snapshot` /
  :meth:`StatefulStage.restore`, which the commit policy
  (``engine/commit.py``) stores with the source positions.

The run loop reaches every stateful stage through these protocols only,
never through a concrete class, so a checkpoint test exercises the same path
as production.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import pyarrow as pa


class Stage(Protocol):
    """A stateless transform between the sources and the targets (SQL)."""

    def open(self) -> None:
        """Prepare (load lookups, register functions)."""

    def process(self, data: pa.Table) -> pa.Table:
        """Transform one batch; a failure is a :class:`~sluice.errors.StageError`."""

    def close(self) -> None:
        """Release what :meth:`open` took."""


class StatefulStage(Protocol):
    """A stage whose state outlives a batch and is checkpointed as named blobs."""

    def open(self) -> None:
        """Start empty: no state, no watermark."""

    def close(self) -> None:
        """Drop the state (what no snapshot holds is lost)."""

    def snapshot(self) -> dict[str, bytes]:
        """The whole state as store keys -> versioned blobs; the state is not changed.

        The keys are the stage's own (``"window"``;
        ``"join/<partition>/<bucket>"``). A key absent from the result holds
        nothing now: a checkpoint that stored it before deletes it. Raises
        :class:`~sluice.errors.StageError`.
        """

    def snapshot_delta(self) -> tuple[dict[str, bytes], set[str], Any]:
        """What a checkpoint writes after the last durable one: the
        :meth:`snapshot` keys whose blobs changed since, every key the whole
        snapshot has (a stored key not among them is deleted), and a token
        for :meth:`checkpointed`. A stage that does not track its changes
        returns its whole snapshot. The state is not changed."""

    def checkpointed(self, token: Any) -> None:
        """The delta of ``token`` is durable: what it held is no longer due."""

    def restore(self, state: Mapping[str, bytes]) -> None:
        """Load a :meth:`snapshot` (possibly merged from several processes'
        partitions) into a freshly opened stage.

        Keys the stage does not own are ignored. Raises
        :class:`~sluice.errors.StageError` (an unknown format version, a
        damaged blob, a mismatched schema) and then leaves the state as it was.
        """


class Emission(Protocol):
    """What a timed stage's call yields: the rows to write."""

    @property
    def emitted(self) -> pa.Table:
        """Rows for the targets (possibly none)."""


class LatePolicy(Protocol):
    """The part of a timed stage's spec the run loop reads."""

    @property
    def late_data(self) -> str:
        """``drop`` | ``reopen`` | ``dlq``: what happens to rows behind the watermark."""


class TimedStage(StatefulStage, Protocol):
    """A window or join: buffers rows by event time and emits as the watermark passes."""

    @property
    def spec(self) -> LatePolicy:
        """The stage's configuration."""

    @property
    def watermark_us(self) -> int | None:
        """The stage's watermark (µs since the epoch): the largest it was given."""

    def advance(self, watermark_us: int) -> Emission:
        """Raise the watermark without new rows and emit what it closed."""

    def open_floor_us(self) -> int | None:
        """The smallest event time (µs) the state still needs; ``None``: none.

        A batch whose rows all lie below it may be forgotten by the source
        (its effect on the state is final); see the hold-back policy.
        """
