"""Load a ``[transform.lookups]`` table from SQLite (read-only)."""

from __future__ import annotations

import sqlite3

import pyarrow as pa

from sluice.connectors.sql.lookup import qualified
from sluice.connectors.sqlite.spec import SQLiteLookup
from sluice.errors import ConnectorError

_SQLITE_AFFINITY = (
    ("INT", pa.int64()),
    ("CHAR", pa.string()),
    ("CLOB", pa.string()),
    ("TEXT", pa.string()),
    ("BLOB", pa.binary()),
    ("REAL", pa.float64()),
    ("FLOA", pa.float64()),
    ("DOUB", pa.float64()),
)


def _sqlite_type(declared: str) -> pa.DataType | None:
    """The Arrow type of a declared SQLite column type (SQLite's affinity rules)."""
    upper = declared.upper()
    for needle, arrow in _SQLITE_AFFINITY:
        if needle in upper:
            return arrow
    return None


def load(spec: SQLiteLookup) -> pa.Table:
    """The whole table, typed by SQLite's affinity rules."""
    name = qualified(spec.schema, spec.table)
    conn = sqlite3.connect(f"file:{spec.path}?mode=ro", uri=True)
    try:
        cur = conn.execute(f"SELECT * FROM {name}")
        names = [d[0] for d in cur.description]
        rows = cur.fetchall()
        prefix = f"{qualified(None, spec.schema)}." if spec.schema else ""
        info = conn.execute(f"PRAGMA {prefix}table_info({qualified(None, spec.table)})").fetchall()
    except sqlite3.Error as exc:
        raise ConnectorError(f"sqlite lookup {spec.path} {name}: {exc}") from exc
    finally:
        conn.close()
    declared = {row[1]: row[2] or "" for row in info}
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in names]
    arrays = []
    for col_name, values in zip(names, columns, strict=True):
        arrow = _sqlite_type(declared.get(col_name, ""))
        try:
            arrays.append(pa.array(list(values), arrow))
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arrays.append(pa.array(list(values)))  # mixed affinity: let Arrow infer
    return pa.Table.from_arrays(arrays, names=names)
