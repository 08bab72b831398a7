"""SQLite: the embedded default target (append / truncate / merge / scd2), CDC apply, lookups."""

from __future__ import annotations

from sluice.connectors.descriptor import Capabilities, Connector
from sluice.connectors.sql.mode_rules import mode_rules
from sluice.connectors.sqlite.spec import SQLiteLookup, SQLiteTarget

CONNECTOR = Connector(
    name="sqlite",
    extra="all",
    targets=(SQLiteTarget,),
    lookups=(SQLiteLookup,),
    capabilities=Capabilities(
        table=True,
        merge=True,
        cdc=True,
        transactional_positions=True,
        lookup=True,
    ),
    target_rules=(mode_rules,),
    target="sluice.connectors.sqlite.target:build_target",
    cdc_target="sluice.connectors.sqlite.cdc:SQLiteCdcTarget",
    lookup="sluice.connectors.sqlite.lookup:load",
)
