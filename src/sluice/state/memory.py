"""``kind = "in_memory"``: checkpoints in a dict of this process.

Same contract as the Postgres store (validation, merge rules, fencing), so a
pipeline tested against it behaves the same against Postgres; but everything
is lost when the object is dropped. Keep one object across in-process
restarts to keep the state.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Mapping

from sluice.connectors.api import Position
from sluice.state.base import Checkpoint, check_commit, fenced


class InMemoryStore:
    """A :class:`~sluice.state.base.StateStore` in process memory.

    A commit builds the new checkpoint beside the old one and swaps it in
    under a lock, so a failure (or a concurrent reader) never sees half of it.
    """

    def __init__(self) -> None:
        self.id = "in_memory state store"
        self._lock = threading.Lock()
        self._checkpoints: dict[str, Checkpoint] = {}

    def open(self) -> None:
        """Nothing to connect to."""

    def close(self) -> None:
        """Nothing to release; the checkpoints stay for a later :meth:`open`."""

    def load(self, pipeline: str) -> Checkpoint:
        """A copy of ``pipeline``'s checkpoint (version 0 when none)."""
        with self._lock:
            cp = self._checkpoints.get(pipeline)
        if cp is None:
            return Checkpoint()
        return Checkpoint(
            state=dict(cp.state),
            positions={s: dict(p) for s, p in cp.positions.items()},
            watermark_us=cp.watermark_us,
            version=cp.version,
        )

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
        """See :meth:`sluice.state.base.StateStore.commit`."""
        check_commit(pipeline, upserts, deletes, positions, watermark_us, expected_version)
        with self._lock:
            old = self._checkpoints.get(pipeline) or Checkpoint()
            if expected_version is not None and expected_version != old.version:
                raise fenced(pipeline, expected_version, old.version)
            state = dict(old.state)
            for key in deletes:
                state.pop(key, None)
            for key, value in upserts.items():
                state[key] = value if isinstance(value, bytes) else bytes(value)
            merged = {s: dict(p) for s, p in old.positions.items()}
            for source, parts in positions.items():
                merged.setdefault(source, {}).update(parts)
            new = Checkpoint(
                state=state,
                positions=merged,
                watermark_us=old.watermark_us if watermark_us is None else watermark_us,
                version=old.version + 1,
            )
            self._checkpoints[pipeline] = new
            return new.version
