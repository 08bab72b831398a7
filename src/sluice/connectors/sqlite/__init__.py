"""SQLite: the embedded default target (append / merge), CDC apply, lookups."""

from __future__ import annotations

from sluice.connectors.descriptor import Capabilities, Connector
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
    target="sluice.connectors.sqlite.target:build_target",
    cdc_target="sluice.connectors.sqlite.cdc:SQLiteCdcTarget",
    lookup="sluice.connectors.sqlite.lookup:load",
)
