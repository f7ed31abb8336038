"""The one Definitions object the workspace loads."""

import dagster as dg
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from recap_dagster import settings
from recap_dagster.assets.captioner import captioner_checkpoint
from recap_dagster.assets.corpus import laion_shards
from recap_dagster.assets.human_captions import human_captions, human_captions_checks
from recap_dagster.assets.inputs import INPUT_ASSETS
from recap_dagster.assets.recaption import recaptioned_shards, recaptioned_shards_checks
from recap_dagster.assets.t2i import (
    metric_reports,
    recap_mix_beats_alttext,
    recap_report,
    sd_checkpoints,
    t2i_latents,
)
from recap_dagster.automation import (
    gpu_pool_watchdog,
    laion_shard_sensor,
    recaption_backfill_schedule,
    recaption_job,
)
from recap_dagster.miniworld.resources import MiniworldWorldResource
from recap_dagster.resources import (
    ComputeResource,
    DataSourcesResource,
    ModelsResource,
    StorageResource,
)

# Per-file progress bars from every save/load would drown the run logs.
transformers_logging.disable_progress_bar()
diffusers_logging.disable_progress_bar()


def default_resources() -> dict:
    """Resources for the local default: the miniworld under $RECAP_WORKDIR."""
    return {
        "sources": DataSourcesResource.for_miniworld(
            str(settings.miniworld_dir()), shards_root=settings.shards_root()
        ),
        "storage": StorageResource(root=settings.storage_root()),
        "models": ModelsResource(
            base_captioner=str(settings.models_dir() / "base_captioner"),
            base_t2i=str(settings.models_dir() / "base_t2i"),
        ),
        "compute": ComputeResource(),
        "world": MiniworldWorldResource(),
        # Runs the text-to-image trainer (torchrun) and relays its logs to the run.
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
    }


ASSETS = [
    *INPUT_ASSETS,
    laion_shards,
    human_captions,
    captioner_checkpoint,
    recaptioned_shards,
    t2i_latents,
    sd_checkpoints,
    metric_reports,
    recap_report,
]
ASSET_CHECKS = [*human_captions_checks, recaptioned_shards_checks, recap_mix_beats_alttext]

defs = dg.Definitions(
    assets=ASSETS,
    asset_checks=ASSET_CHECKS,
    jobs=[recaption_job],
    sensors=[laion_shard_sensor, gpu_pool_watchdog],
    schedules=[recaption_backfill_schedule],
    resources=default_resources(),
)
