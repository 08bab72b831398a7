"""Local files (``object_store_local``): a new-files source; the file target is
configuration-only today."""

from __future__ import annotations

from sluice.connectors.descriptor import Capabilities, Connector
from sluice.connectors.files.spec import ObjectStoreLocalSource, ObjectStoreLocalTarget

CONNECTOR = Connector(
    name="files",
    extra="all",
    sources=(ObjectStoreLocalSource,),
    targets=(ObjectStoreLocalTarget,),
    # Positions are the files done so far: a reopened source resumes after them.
    capabilities=Capabilities(seekable=True),
    source="sluice.connectors.files.source:build_source",
)
