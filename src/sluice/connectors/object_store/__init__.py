"""Object stores (local folders and S3): a new-files source streaming each file
in bounded batches, and a file target committing each flush with a manifest
that holds the source positions."""

from __future__ import annotations

from sluice.connectors.descriptor import Capabilities, Connector
from sluice.connectors.object_store.spec import (
    ObjectStoreLocalSource,
    ObjectStoreLocalTarget,
    ObjectStoreS3Source,
    ObjectStoreS3Target,
)

CONNECTOR = Connector(
    name="object_store",
    extra="aws",
    sources=(ObjectStoreLocalSource, ObjectStoreS3Source),
    targets=(ObjectStoreLocalTarget, ObjectStoreS3Target),
    # Source: positions are per file (byte / record offset), a reopened source
    # resumes mid-file. Target: positions commit in the flush's manifest.
    capabilities=Capabilities(seekable=True, transactional_positions=True),
    source="sluice.connectors.object_store.source:build_source",
    target="sluice.connectors.object_store.target:build_target",
)
