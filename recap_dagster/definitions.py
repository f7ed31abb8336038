"""The one Definitions object the workspace loads."""

import dagster as dg

from recap_dagster import settings
from recap_dagster.assets.corpus import laion_shards
from recap_dagster.assets.human_captions import human_captions, human_captions_checks
from recap_dagster.automation import laion_shard_sensor
from recap_dagster.resources import DataSourcesResource, StorageResource


def default_resources() -> dict:
    """Resources for the local default: the miniworld under $RECAP_WORKDIR."""
    return {
        "sources": DataSourcesResource.for_miniworld(
            str(settings.miniworld_dir()), shards_root=settings.shards_root()
        ),
        "storage": StorageResource(root=settings.storage_root()),
    }


defs = dg.Definitions(
    assets=[laion_shards, human_captions],
    asset_checks=human_captions_checks,
    sensors=[laion_shard_sensor],
    resources=default_resources(),
)
