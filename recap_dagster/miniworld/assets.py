"""The miniworld's inputs as materializable assets (group ``miniworld``).

They carry the keys of the production inputs (``recap_dagster.assets.inputs``) and the
same content versions, so the RECAP graph downstream is the same in both worlds; only
here it starts from a generator and two pretraining runs instead of observed files.
"""

from collections.abc import Iterator

import dagster as dg
from pydantic import Field

from recap_dagster.assets.run_config import (
    config_from_settings,
    settings_from_config,
    with_run_defaults,
)
from recap_dagster.corpus.human_captions import human_captions_version
from recap_dagster.miniworld.base_captioner import (
    QUICK_BASE_CAPTIONER,
    BaseCaptionerConfig,
    build_base_captioner,
)
from recap_dagster.miniworld.clip import (
    QUICK_CLIP,
    ClipConfig,
    build_miniworld_clip,
    read_clip_manifest,
)
from recap_dagster.miniworld.generate import MiniworldConfig, generate_miniworld, read_manifest
from recap_dagster.miniworld.resources import MiniworldResource
from recap_dagster.miniworld.t2i_base import build_miniworld_base
from recap_dagster.miniworld.t2i_profiles import MINIWORLD_PROFILE, QUICK_PROFILE
from recap_dagster.resources import ComputeResource, DataSourcesResource, ModelsResource
from recap_dagster.storage.fingerprint import content_fingerprint, model_fingerprint

MINIWORLD_GROUP = "miniworld"
BASE_CAPTIONER_RECIPES = {"default": BaseCaptionerConfig(), "quick": QUICK_BASE_CAPTIONER}
BASE_T2I_RECIPES = {"default": MINIWORLD_PROFILE, "quick": QUICK_PROFILE}
CLIP_RECIPES = {"default": ClipConfig(), "quick": QUICK_CLIP}


MiniworldCorpusConfig = config_from_settings(
    MiniworldConfig,
    "MiniworldCorpusConfig",
    "The miniworld's sizes (MiniworldConfig); equal settings give byte-identical data.",
    op="miniworld_corpus",
)


class _RecipeConfig(dg.Config):
    recipe: str = Field(
        default="default",
        description="Pretraining recipe: default (the documented miniworld base) or quick "
        "(tiny, for tests). The build is cached by recipe and data.",
    )


BaseCaptionerRecipe = with_run_defaults(_RecipeConfig, "base_captioner_model")
BaseT2IRecipe = with_run_defaults(_RecipeConfig, "base_t2i_model")
ClipRecipe = with_run_defaults(_RecipeConfig, "clip_model")


def _recipe(recipes: dict, name: str):
    if name not in recipes:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(recipes)}")
    return recipes[name]


@dg.multi_asset(
    name="miniworld_corpus",
    specs=[
        dg.AssetSpec(
            "miniworld_corpus",
            group_name=MINIWORLD_GROUP,
            kinds={"webdataset"},
            description="Synthetic LAION-style shards (img2dataset layout, alt text, a few "
            "broken images) and the base captioner's pretraining set.",
        ),
        dg.AssetSpec(
            "human_caption_file",
            group_name=MINIWORLD_GROUP,
            kinds={"json"},
            description="~100 human-captioned images (short and long), plus a held-out set "
            "with ground-truth scenes.",
        ),
        dg.AssetSpec(
            "eval_prompt_file",
            group_name=MINIWORLD_GROUP,
            kinds={"json"},
            description="Held-out evaluation prompts with ground truth (objects, counts, "
            "colours, positions).",
        ),
        dg.AssetSpec(
            "caption_tokenizer",
            group_name=MINIWORLD_GROUP,
            description="A CLIP BPE tokenizer trained on the miniworld's text.",
        ),
    ],
    can_subset=False,
    description="Generate the miniworld (cached by its settings).",
)
def miniworld_corpus(
    context: dg.AssetExecutionContext,
    config: MiniworldCorpusConfig,
    miniworld: MiniworldResource,
    sources: DataSourcesResource,
) -> Iterator[dg.MaterializeResult]:
    paths = generate_miniworld(miniworld.root, settings_from_config(MiniworldConfig, config))
    wanted = {
        "human_captions_path": paths.human_captions,
        "eval_prompts_path": paths.eval_prompts,
        "validation_prompts_path": paths.validation_prompts,
        "tokenizer_path": paths.tokenizer,
    }
    for name, path in wanted.items():
        if getattr(sources, name) != path:
            raise ValueError(
                f"sources.{name} is {getattr(sources, name)}, the miniworld wrote {path}"
            )
    manifest = read_manifest(paths.root)
    if manifest is None:
        raise RuntimeError(f"the miniworld under {paths.root} has no manifest after generation")
    context.log.info(f"miniworld at {paths.root}: {manifest.get('counts')}")
    yield dg.MaterializeResult(
        asset_key="miniworld_corpus",
        metadata={
            "dagster/uri": dg.MetadataValue.path(paths.corpus),
            "counts": dg.MetadataValue.json(manifest.get("counts", {})),
        },
        data_version=dg.DataVersion(manifest["content_sha256"][:16]),
    )
    yield dg.MaterializeResult(
        asset_key="human_caption_file",
        metadata={"dagster/uri": dg.MetadataValue.path(paths.human_captions)},
        data_version=dg.DataVersion(human_captions_version(paths.human_captions)),
    )
    yield dg.MaterializeResult(
        asset_key="eval_prompt_file",
        metadata={"dagster/uri": dg.MetadataValue.path(paths.eval_prompts)},
        data_version=dg.DataVersion(content_fingerprint(paths.eval_prompts)),
    )
    yield dg.MaterializeResult(
        asset_key="caption_tokenizer",
        metadata={"dagster/uri": dg.MetadataValue.path(paths.tokenizer)},
        data_version=dg.DataVersion(content_fingerprint(paths.tokenizer)),
    )


@dg.asset(
    deps=["miniworld_corpus"],
    group_name=MINIWORLD_GROUP,
    kinds={"pytorch"},
    description="The terse base captioner (BLIP architecture) pretrained on the miniworld, "
    "standing in for a public checkpoint (cached by recipe and data).",
)
def base_captioner_model(
    context: dg.AssetExecutionContext,
    config: BaseCaptionerRecipe,
    miniworld: MiniworldResource,
    models: ModelsResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    recipe = _recipe(BASE_CAPTIONER_RECIPES, config.recipe)
    rebalance = compute.rebalancer()

    def on_step(step: int, loss: float) -> None:
        rebalance()  # alone on the machine, it takes the cores the base T2I run gave back
        # Step 1 too: the main job's estimate counts it by its steps from the start.
        if step == 1 or step % 100 == 0 or step == recipe.steps:
            context.log.info(f"base captioner step {step}/{recipe.steps}, loss {loss:.3f}")

    out = build_base_captioner(
        miniworld.root,
        models.base_captioner,
        recipe,
        device=str(compute.torch_device()),
        on_step=on_step,
    )
    return dg.MaterializeResult(
        metadata={"dagster/uri": dg.MetadataValue.path(out), "recipe": config.recipe},
        # The same version function as production's observation of a real base model.
        data_version=dg.DataVersion(model_fingerprint(out)),
    )


@dg.asset(
    deps=["miniworld_corpus", "caption_tokenizer"],
    group_name=MINIWORLD_GROUP,
    kinds={"pytorch", "diffusers"},
    description="The base text-to-image model (Stable Diffusion layout, tiny) pretrained on "
    "the corpus's alt text by RECAP's own trainer, standing in for a public checkpoint "
    "(cached by recipe and data).",
)
def base_t2i_model(
    context: dg.AssetExecutionContext,
    config: BaseT2IRecipe,
    miniworld: MiniworldResource,
    models: ModelsResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    recipe = _recipe(BASE_T2I_RECIPES, config.recipe)
    # Its share of the CPU threads (beside the base captioner in the main job); the trainer
    # picks its device itself.
    compute.torch_device()
    context.log.info(f"building the base text-to-image model ({config.recipe}) if not cached")
    out = build_miniworld_base(
        miniworld.root, models.base_t2i, recipe, between_steps=compute.rebalancer()
    )
    return dg.MaterializeResult(
        metadata={"dagster/uri": dg.MetadataValue.path(out), "recipe": config.recipe},
        # The same version function as production's observation of a real base model.
        data_version=dg.DataVersion(model_fingerprint(out)),
    )


@dg.asset(
    deps=["miniworld_corpus", "caption_tokenizer"],
    group_name=MINIWORLD_GROUP,
    kinds={"pytorch", "transformers"},
    description="A tiny CLIP (transformers CLIPModel) trained contrastively on the "
    "miniworld's images and their true descriptions: the models resource's clip, which "
    "scores image-text agreement (CLIP score) in the reports (cached by recipe and data).",
)
def clip_model(
    context: dg.AssetExecutionContext,
    config: ClipRecipe,
    miniworld: MiniworldResource,
    models: ModelsResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    if not models.clip:
        raise ValueError("models.clip is empty: the miniworld's CLIP needs a folder to go to")
    recipe = _recipe(CLIP_RECIPES, config.recipe)
    rebalance = compute.rebalancer()

    def on_step(step: int, loss: float) -> None:
        rebalance()
        if step == 1 or step % 100 == 0 or step == recipe.steps:
            context.log.info(f"CLIP step {step}/{recipe.steps}, loss {loss:.3f}")

    out = build_miniworld_clip(
        miniworld.root, models.clip, recipe, device=str(compute.torch_device()), on_step=on_step
    )
    built = read_clip_manifest(out) or {}
    return dg.MaterializeResult(
        metadata={
            "dagster/uri": dg.MetadataValue.path(out),
            "recipe": config.recipe,
            "parameters": built.get("parameters", 0),
            "final_loss": built.get("final_loss", float("nan")),
            # True short caption vs another image's, on the held-out human-captioned images.
            "heldout_retrieval_accuracy": built.get("heldout_retrieval_accuracy", float("nan")),
            "train_seconds": built.get("seconds", 0.0),
        },
        data_version=dg.DataVersion(model_fingerprint(out)),
    )


MINIWORLD_ASSETS = [miniworld_corpus, base_captioner_model, base_t2i_model, clip_model]
#: The miniworld's models in runs side by side once it is generated: the base captioner
#: takes about as long as the other two together.
MODEL_RUNS = (["base_captioner_model"], ["base_t2i_model", "clip_model"])
