"""Delta Lake (local or S3): a source (each new version once), a table target
(append / truncate / merge / scd2, source positions in the Delta commit) and CDC apply."""

from __future__ import annotations

from typing import Any

from sluice.connectors.delta.spec import (
    DeltaLocalSource,
    DeltaLocalTarget,
    DeltaS3Source,
    DeltaS3Target,
)
from sluice.connectors.descriptor import Add, Capabilities, Connector
from sluice.connectors.sql.mode_rules import mode_rules


def _primary_key(target: dict[str, Any]) -> Any:
    table = target.get("table")
    return table.get("primary_key") if isinstance(table, dict) else None


def _merge_needs_key(at: str, target: dict[str, Any], add: Add) -> None:
    # Delta keeps no key metadata: merge matches on the key the file declares.
    if target.get("mode") == "merge" and not _primary_key(target):
        add(
            (
                f"{at}.table.primary_key",
                'missing: mode = "merge" on a delta target needs primary_key',
            )
        )


def _cdc_needs_key(at: str, target: dict[str, Any], add: Add) -> None:
    if not _primary_key(target):
        add(
            (
                f"{at}.table.primary_key",
                "missing: a delta target needs primary_key for [transform.cdc]",
            )
        )


CONNECTOR = Connector(
    name="delta",
    extra="delta",
    sources=(DeltaLocalSource, DeltaS3Source),
    targets=(DeltaLocalTarget, DeltaS3Target),
    capabilities=Capabilities(
        seekable=True, table=True, merge=True, cdc=True, transactional_positions=True
    ),
    source="sluice.connectors.delta.source:build_source",
    target="sluice.connectors.delta.target:build_target",
    cdc_target="sluice.connectors.delta.target:DeltaCdcTarget",
    target_rules=(_merge_needs_key, mode_rules),
    cdc_rules=(_cdc_needs_key,),
)
