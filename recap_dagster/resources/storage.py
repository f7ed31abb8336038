"""Storage resource: maps outputs to paths under a local or ``s3://`` root."""

import dagster as dg
from pydantic import Field

from recap_dagster.storage.root import Storage


class StorageResource(dg.ConfigurableResource):
    """Where outputs (parquet shards, checkpoints, reports) are written.

    Credentials for S3 come from the environment only (AWS_ACCESS_KEY_ID, ...,
    AWS_ENDPOINT_URL for non-AWS servers); they never appear in config.
    """

    root: str = Field(
        description="Local folder or s3://bucket/prefix under which every output is written.",
    )

    def get(self) -> Storage:
        return Storage(self.root)
