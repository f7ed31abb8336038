"""Dagster resources: thin configurable wrappers around the plain-Python core."""

from recap_dagster.resources.compute import ComputeResource
from recap_dagster.resources.data import DataSourcesResource
from recap_dagster.resources.models import ModelsResource
from recap_dagster.resources.storage import StorageResource
from recap_dagster.resources.world import GenEvalWorldResource, WorldResource

__all__ = ["ComputeResource", "DataSourcesResource", "GenEvalWorldResource", "ModelsResource",
           "StorageResource", "WorldResource"]  # fmt: skip
