"""The miniworld's code location: the RECAP graph fed by the miniworld's own inputs.

``workspace.yaml`` loads this module. Everything lives under ``$RECAP_WORKDIR``
(``settings.py``); asset config defaults come from the run-config file named by
``RECAP_RUN_CONFIG`` (the main job writes its profile's to
``$RECAP_WORKDIR/run_config.yaml``; ``./dev ui`` serves that file, writing the default
profile's first when there is none).
"""

import dagster as dg

from recap_dagster import settings
from recap_dagster.assets.corpus import laion_shards
from recap_dagster.definitions import (
    ASSET_CHECKS,
    RECAP_ASSETS,
    common_resources,
    recap_definitions,
)
from recap_dagster.miniworld.assets import MINIWORLD_ASSETS
from recap_dagster.miniworld.resources import (
    MiniworldResource,
    MiniworldWorldResource,
    miniworld_sources,
)
from recap_dagster.resources import ModelsResource, StorageResource

#: The corpus spec, downstream of the generator in lineage.
MINIWORLD_LAION_SHARDS = laion_shards.replace_attributes(deps=["miniworld_corpus"])
ASSETS = [*MINIWORLD_ASSETS, MINIWORLD_LAION_SHARDS, *RECAP_ASSETS]


def default_resources() -> dict:
    """Resources for the local default: the miniworld under $RECAP_WORKDIR."""
    return {
        **common_resources(),
        "miniworld": MiniworldResource(root=str(settings.miniworld_dir())),
        "world": MiniworldWorldResource(),
        "sources": miniworld_sources(str(settings.miniworld_dir()), settings.shards_root()),
        "storage": StorageResource(root=settings.storage_root()),
        "models": ModelsResource(
            base_captioner=str(settings.models_dir() / "base_captioner"),
            base_t2i=str(settings.models_dir() / "base_t2i"),
            # Built by the clip_model asset (miniworld group) before the graph runs.
            clip=str(settings.models_dir() / "clip"),
        ),
    }


# One process per run: on a few CPU cores a subprocess per step (and per check) costs more
# in imports than its steps take; the gpu pool serializes the heavy steps anyway.
defs = recap_definitions(
    MINIWORLD_ASSETS,
    default_resources(),
    corpus=MINIWORLD_LAION_SHARDS,
    executor=dg.in_process_executor,
)

__all__ = ["ASSETS", "ASSET_CHECKS", "default_resources", "defs"]
