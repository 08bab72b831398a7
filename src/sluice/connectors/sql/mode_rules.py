"""The config cross-rules of ``mode`` on a SQL or Delta target (checked by
``flow validate``, each problem at its key; the semantics are in
:mod:`sluice.connectors.sql.modes`)."""

from __future__ import annotations

from typing import Any

from sluice.connectors.descriptor import Add

SCD2_KEYS = ("compare_columns", "event_timestamp_column", "ttl_seconds")


def mode_rules(at: str, target: dict[str, Any], add: Add) -> None:
    """``scd2`` needs ``[target.table] primary_key``; its keys need ``scd2``."""
    mode = target.get("mode", "append")
    table = target.get("table")
    key = table.get("primary_key") if isinstance(table, dict) else None
    if mode == "scd2" and not key:
        add(
            (
                f"{at}.table.primary_key",
                'missing: mode = "scd2" needs primary_key (the business key its versions share)',
            )
        )
    for name in SCD2_KEYS:
        if name in target and mode != "scd2":
            add((f"{at}.{name}", f'only with mode = "scd2" (mode is "{mode}")'))
