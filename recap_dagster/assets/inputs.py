"""The inputs RECAP starts from, as observed external assets (production).

Their versions are content fingerprints, so a new base model or a changed human-caption
set makes everything downstream stale in the UI (Dagster compares each materialization's
recorded input versions with the latest observation). ``laion_shards`` (corpus.py) is the
corpus input; its partitions are registered by the sensor. A world that builds its own
inputs (the miniworld) defines materializable assets with these same keys instead.
"""

import dagster as dg

from recap_dagster.corpus.human_captions import human_captions_version
from recap_dagster.resources import DataSourcesResource, ModelsResource
from recap_dagster.storage.fingerprint import content_fingerprint, model_fingerprint
from recap_dagster.t2i.model import local_model_dir

INPUTS_GROUP = "inputs"


@dg.observable_source_asset(
    group_name=INPUTS_GROUP,
    description="The human-caption set (JSONL of key, image, short, long; images beside it) "
    "at the data sources' human_captions_path. Version: a hash of the file and its images.",
)
def human_caption_file(sources: DataSourcesResource) -> dg.DataVersion:
    return dg.DataVersion(human_captions_version(sources.human_captions_path))


@dg.observable_source_asset(
    group_name=INPUTS_GROUP,
    description="The evaluation prompts with their ground truth (GenEval's "
    "evaluation_metadata.jsonl, or the world's own format) at the data sources' "
    "eval_prompts_path. Version: a hash of the file.",
)
def eval_prompt_file(sources: DataSourcesResource) -> dg.DataVersion:
    return dg.DataVersion(content_fingerprint(sources.eval_prompts_path))


@dg.observable_source_asset(
    group_name=INPUTS_GROUP,
    description="The CLIP tokenizer that counts caption tokens against the text encoder's "
    "77-token limit (the data sources' tokenizer_path). Version: a hash of its files.",
)
def caption_tokenizer(sources: DataSourcesResource) -> dg.DataVersion:
    return dg.DataVersion(content_fingerprint(sources.tokenizer_path))


@dg.observable_source_asset(
    group_name=INPUTS_GROUP,
    description="The pretrained captioner RECAP fine-tunes (BLIP, GIT, PaliGemma, ...: the "
    "models resource's base_captioner). Version: a fingerprint of its weights (sizes, "
    "safetensors headers and samples of every tensor; a full hash on request).",
)
def base_captioner_model(models: ModelsResource) -> dg.DataVersion:
    return dg.DataVersion(
        model_fingerprint(local_model_dir(models.base_captioner), full=models.full_weights_hash)
    )


@dg.observable_source_asset(
    group_name=INPUTS_GROUP,
    description="The base text-to-image pipeline RECAP fine-tunes (Stable Diffusion layout: "
    "the models resource's base_t2i). Version: a fingerprint of its weights (as "
    "base_captioner_model's), so a new base model makes the latent cache and the fine-tunes "
    "stale.",
)
def base_t2i_model(models: ModelsResource) -> dg.DataVersion:
    return dg.DataVersion(
        model_fingerprint(local_model_dir(models.base_t2i), full=models.full_weights_hash)
    )


INPUT_ASSETS = [
    human_caption_file,
    eval_prompt_file,
    caption_tokenizer,
    base_captioner_model,
    base_t2i_model,
]
#: What every world must provide, under these keys (observed here, built by the miniworld).
INPUT_KEYS = [asset.key for asset in INPUT_ASSETS]

#: Observes the production inputs (cheap: no weights file is read whole).
observe_inputs_job = dg.define_asset_job(
    "observe_inputs",
    selection=dg.AssetSelection.keys(*INPUT_KEYS),
    description="Observe every production input: a changed file or model makes what was "
    "built from it stale.",
)
observe_inputs_schedule = dg.ScheduleDefinition(
    job=observe_inputs_job,
    cron_schedule="*/15 * * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Observes the production inputs every 15 minutes.",
)
