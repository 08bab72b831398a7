"""What the embedded database targets (SQLite, DuckDB) share.

Both create a missing table from the batch schema, add new columns, and
write in every mode of :mod:`sluice.connectors.sql.modes` (``merge``: upsert
on the primary key, the last row of a batch wins). Writes go into an open
transaction that ``flush`` commits.
"""

from __future__ import annotations

from sluice.errors import ConnectorError


def quote(name: str) -> str:
    """``name`` as a double-quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def require_key(target_id: str, mode: str, key: list[str], creating: bool) -> None:
    """Merge upserts on a primary key: the table's, or the configured one to create it with."""
    if mode == "merge" and not key:
        where = "[target.table] primary_key to create the table" if creating else "a primary key"
        raise ConnectorError(f'{target_id}: mode = "merge" needs {where}')


def check_cdc_mode(target_id: str, mode: str) -> None:
    """A ``[transform.cdc]`` target applies the change stream itself: ``mode``
    may stay ``append`` (or say ``merge``); ``truncate`` and ``scd2`` would
    contradict it."""
    if mode not in ("append", "merge"):
        raise ConnectorError(
            f'{target_id}: mode = "{mode}" does not apply to a [transform.cdc] target, '
            "which mirrors the change stream (leave mode out, or use merge)"
        )
