"""The RECAP graph and its production Definitions (inputs observed, locations from env).

``recap_definitions`` assembles the graph from whatever provides its inputs: here the
observed external inputs of ``assets/inputs.py``; the miniworld's code location
(``recap_dagster.miniworld.definitions``) passes its own materializable inputs instead.
"""

import os
from collections.abc import Sequence

import dagster as dg
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from recap_dagster.assets.captioner import captioner_checkpoint
from recap_dagster.assets.corpus import laion_shards
from recap_dagster.assets.human_captions import human_captions, human_captions_checks
from recap_dagster.assets.human_eval import (
    HUMAN_EVAL_SOURCES,
    human_eval_report,
    human_eval_task,
    observe_ratings_job,
    observe_ratings_schedule,
)
from recap_dagster.assets.inputs import (
    INPUT_ASSETS,
    observe_inputs_job,
    observe_inputs_schedule,
)
from recap_dagster.assets.latents import t2i_latents, t2i_latents_checks
from recap_dagster.assets.metadata import with_code_reference, with_owners
from recap_dagster.assets.recaption import recaptioned_shards, recaptioned_shards_checks
from recap_dagster.assets.t2i import (
    base_metric_report,
    metric_reports,
    recap_mix_beats_alttext,
    recap_report,
    sd_checkpoints,
)
from recap_dagster.assets.training_corpus import training_corpus
from recap_dagster.orchestration.automation import (
    asset_checks_job,
    gpu_pool_watchdog,
    laion_shard_sensor,
    recaption_backfill_schedule,
    recaption_job,
    shard_group_checks_job,
)
from recap_dagster.resources import (
    ComputeResource,
    DataSourcesResource,
    GenEvalWorldResource,
    ModelsResource,
    StorageResource,
)

# Per-file progress bars from every save/load would drown the run logs.
transformers_logging.disable_progress_bar()
diffusers_logging.disable_progress_bar()

#: The RECAP graph after its inputs (``laion_shards`` is declared, never materialized).
RECAP_ASSETS = [
    human_captions,
    captioner_checkpoint,
    recaptioned_shards,
    t2i_latents,
    training_corpus,
    sd_checkpoints,
    metric_reports,
    base_metric_report,
    human_eval_task,
    human_eval_report,
    recap_report,
]
JOBS = [recaption_job, asset_checks_job, shard_group_checks_job, observe_ratings_job]
ASSET_CHECKS = [
    *human_captions_checks,
    recaptioned_shards_checks,
    t2i_latents_checks,
    recap_mix_beats_alttext,
]


def common_resources() -> dict:
    """The resources every deployment configures the same way."""
    return {
        "compute": ComputeResource(),
        # Runs the text-to-image trainer (torchrun) and relays its logs to the run.
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
    }


def production_resources() -> dict:
    """Locations of real inputs and outputs, read from the environment at run time."""
    return {
        **common_resources(),
        "sources": DataSourcesResource(
            shards_root=dg.EnvVar("RECAP_SHARDS_ROOT"),
            human_captions_path=dg.EnvVar("RECAP_HUMAN_CAPTIONS"),
            # Held-out human captions judge step 1 (references); unset: not judged.
            human_captions_heldout_path=os.environ.get("RECAP_HUMAN_CAPTIONS_HELDOUT", ""),
            eval_prompts_path=dg.EnvVar("RECAP_EVAL_PROMPTS"),
            # Prompts to tune on (disjoint from the test prompts); unset: none.
            validation_prompts_path=os.environ.get("RECAP_VALIDATION_PROMPTS", ""),
            tokenizer_path=dg.EnvVar("RECAP_TOKENIZER"),
        ),
        "storage": StorageResource(root=dg.EnvVar("RECAP_STORAGE_ROOT")),
        # GenEval-style prompts; objects, counts and positions need a detector (OWL-ViT
        # directory in RECAP_DETECTOR), else only FID and CLIP score are reported.
        "world": GenEvalWorldResource(detector=os.environ.get("RECAP_DETECTOR", "")),
        "models": ModelsResource(
            base_captioner=dg.EnvVar("RECAP_BASE_CAPTIONER"),
            base_t2i=dg.EnvVar("RECAP_BASE_T2I"),
            # A CLIP-family model (directory or hub id) for CLIP scores; unset: not scored.
            clip=os.environ.get("RECAP_CLIP", ""),
        ),
    }


def recap_definitions(
    inputs: Sequence[dg.AssetsDefinition | dg.SourceAsset],
    resources: dict,
    *,
    corpus: dg.AssetSpec = laion_shards,
    executor: dg.ExecutorDefinition | None = None,
    observe_inputs: bool = False,
) -> dg.Definitions:
    """The RECAP graph fed by ``inputs`` (assets or observed sources with the keys of
    ``assets.inputs.INPUT_KEYS``) and ``corpus`` (the ``laion_shards`` spec);
    ``observe_inputs``: observe the (external) inputs on a schedule."""
    # Owners by group and links to the defining source on every asset page.
    # (Observed source assets take neither: they are SourceAssets, not specs.)
    owned = [corpus, *RECAP_ASSETS, *(i for i in inputs if isinstance(i, dg.AssetsDefinition))]
    # The raters' answers are observed in every deployment (they are people's, not built).
    sources = [*(i for i in inputs if not isinstance(i, dg.AssetsDefinition)), *HUMAN_EVAL_SOURCES]
    assets = [
        *sources,
        *(
            with_code_reference(a) if isinstance(a, dg.AssetsDefinition) else a
            for a in dg.map_asset_specs(with_owners, owned)
        ),
    ]
    return dg.Definitions(
        assets=assets,
        asset_checks=ASSET_CHECKS,
        jobs=[*JOBS, *([observe_inputs_job] if observe_inputs else [])],
        sensors=[laion_shard_sensor, gpu_pool_watchdog],
        schedules=[
            recaption_backfill_schedule,
            observe_ratings_schedule,
            *([observe_inputs_schedule] if observe_inputs else []),
        ],
        resources=resources,
        executor=executor,
    )


defs = recap_definitions(INPUT_ASSETS, production_resources(), observe_inputs=True)
