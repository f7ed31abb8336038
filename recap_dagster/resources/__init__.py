"""Dagster resources: thin configurable wrappers around the plain-Python core."""

from recap_dagster.resources.data import DataSourcesResource
from recap_dagster.resources.storage import StorageResource

__all__ = ["DataSourcesResource", "StorageResource"]
