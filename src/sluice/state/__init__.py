"""Operator state and source positions: the StateStore protocol and its implementations.

:func:`build_store` turns a ``[state_store]`` spec into a store (not yet
opened): :class:`InMemoryStore` for ``in_memory``,
:class:`sluice.state.postgres.PostgresStore` for ``postgres`` (imported only
then: it needs the ``postgres`` extra).
"""

from __future__ import annotations

from sluice.config import spec as cfg
from sluice.errors import MissingDependencyError
from sluice.state.base import Checkpoint, StateStore
from sluice.state.memory import InMemoryStore

__all__ = ["Checkpoint", "InMemoryStore", "StateStore", "build_store"]


def build_store(spec: cfg.StateStore | None) -> StateStore | None:
    """The store a ``[state_store]`` spec describes, not opened; ``None`` for none.

    Raises :class:`MissingDependencyError` when ``kind = "postgres"`` and
    psycopg is not installed.
    """
    if spec is None:
        return None
    if isinstance(spec, cfg.InMemoryStateStore):
        return InMemoryStore()
    try:
        from sluice.state.postgres import PostgresStore
    except ModuleNotFoundError as exc:
        if exc.name and not exc.name.startswith("sluice"):
            raise MissingDependencyError(
                f"[state_store] kind 'postgres' needs the Python package '{exc.name}': "
                "pip install 'sluice[postgres]'"
            ) from exc
        raise
    return PostgresStore(spec.url, spec.schema)
