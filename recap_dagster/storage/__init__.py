"""Storage: the storage root's validated paths and atomic writes (local or ``s3://``), fsspec
access, content and weights fingerprints. Plain Python, no Dagster."""
