"""What the embedded database targets (SQLite, DuckDB) share.

Both create a missing table from the batch schema, add new columns, and in
``merge`` mode upsert on the primary key (last row of a batch wins). Writes
go into an open transaction that ``flush`` commits.
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


def check_mode(target_id: str, mode: str) -> None:
    """Streaming embedded targets write ``append`` or ``merge``; anything else fails at build."""
    if mode not in ("append", "merge"):
        raise ConnectorError(
            f"mode '{mode}' on a streaming {target_id} target is not implemented yet (use append or merge)"
        )
