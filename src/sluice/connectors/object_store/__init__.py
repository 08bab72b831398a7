"""Object stores (local folders and S3): a new-files source streaming each file
in bounded batches; the file targets are configuration-only today."""

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
    # Positions are per file (byte / record offset): a reopened source resumes mid-file.
    capabilities=Capabilities(seekable=True),
    source="sluice.connectors.object_store.source:build_source",
)
