"""Dagster resources: thin configurable wrappers around the plain-Python core."""

from recap_dagster.resources.compute import ComputeResource
from recap_dagster.resources.data import DataSourcesResource
from recap_dagster.resources.models import ModelsResource
from recap_dagster.resources.storage import StorageResource

__all__ = ["ComputeResource", "DataSourcesResource", "ModelsResource", "StorageResource"]
