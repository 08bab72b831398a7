"""S3 object store: new-object source and file target, configuration-only today."""

from __future__ import annotations

from sluice.connectors.descriptor import Connector
from sluice.connectors.object_store_s3.spec import ObjectStoreS3Source, ObjectStoreS3Target

CONNECTOR = Connector(
    name="object_store_s3",
    extra="aws",
    sources=(ObjectStoreS3Source,),
    targets=(ObjectStoreS3Target,),
)
