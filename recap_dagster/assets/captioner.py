"""``captioner_checkpoint``: RECAP step 1, the captioner fine-tuned on human captions."""

import time
from pathlib import Path

import dagster as dg
import torch
from pydantic import Field

from recap_dagster.assets.human_captions import OUTPUT_PARTS as HUMAN_CAPTIONS_PARTS
from recap_dagster.assets.human_captions import human_captions
from recap_dagster.assets.inputs import base_captioner_model
from recap_dagster.assets.metadata import typed_table
from recap_dagster.assets.run_config import config_from_settings, settings_from_config
from recap_dagster.captioner import Captioner, CaptionExample, FineTuneConfig, fine_tune
from recap_dagster.captioner.quality import (
    evaluate_captioner,
    load_captioned,
    quality_table,
    sample_table,
)
from recap_dagster.captioner.reference import (
    COLUMN_NOTES,
    judge_captioner,
    judge_references,
    load_heldout,
    reference_rows,
)
from recap_dagster.corpus.decoding import decode_image
from recap_dagster.evaluation.agreement import ClipScorer
from recap_dagster.evaluation.plots import line_plot, markdown_image
from recap_dagster.orchestration.k8s_gpu import gpu_op_tags
from recap_dagster.orchestration.pool_watchdog import GPU_POOL
from recap_dagster.orchestration.retries import TRANSIENT_RETRY_POLICY, retry_only_transient
from recap_dagster.resources import (
    ComputeResource,
    DataSourcesResource,
    ModelsResource,
    StorageResource,
    WorldResource,
)
from recap_dagster.storage.fingerprint import VERSION_FILE, weights_fingerprint

CHECKPOINT_PARTS = ("checkpoints", "captioner")


CaptionerFineTuneConfig = config_from_settings(
    FineTuneConfig,
    "CaptionerFineTuneConfig",
    "RECAP step 1: the fine-tune's settings (FineTuneConfig; defaults: the paper's recipe, "
    "PaLI, section 4) plus the held-out evaluation's.",
    op="captioner_checkpoint",
    exclude=("mixed_precision",),  # the compute resource decides
    eval_batch_size=(int, Field(default=64, description="Batch size for held-out captioning.")),
    max_new_tokens=(int, Field(default=77, description="Caption length limit when evaluating.")),
    sample_rows=(int, Field(default=8, description="Held-out images shown in the sample table.")),
    base_revision=(
        str | None,
        Field(
            default=None,
            description="Hub revision (branch, tag or commit) of the base captioner when it "
            "is a hub id; None: the default branch. Recorded with the checkpoint.",
        ),
    ),
    attn_implementation=(
        str | None,
        Field(
            default=None,
            description="Attention kernel for transformers: eager, sdpa or "
            "flash_attention_2; None: transformers' default. Recorded with the checkpoint.",
        ),
    ),
)


def _examples(table) -> list[CaptionExample]:
    examples = []
    for row in table.select(["key", "image", "short", "long"]).to_pylist():
        decoded = decode_image(row["image"])
        if decoded.image is None:  # the blocking checks stop this upstream; belt and braces
            raise ValueError(f"human caption {row['key']}: {decoded.error}")
        examples.append(CaptionExample(row["key"], decoded.image, row["short"], row["long"]))
    return examples


@dg.asset(
    retry_policy=TRANSIENT_RETRY_POLICY,
    deps=[human_captions, base_captioner_model],
    pool=GPU_POOL,
    op_tags=gpu_op_tags(),
    group_name="captioner",
    kinds={"pytorch", "transformers"},
    tags={"recap/gpu": "1"},
    description="The base captioner fine-tuned on the human captions (RECAP step 1), saved "
    "in transformers format (safetensors). Data version = fingerprint of the weights.",
)
@retry_only_transient
def captioner_checkpoint(
    context: dg.AssetExecutionContext,
    config: CaptionerFineTuneConfig,  # type: ignore[valid-type]
    models: ModelsResource,
    compute: ComputeResource,
    sources: DataSourcesResource,
    storage: StorageResource,
    world: WorldResource,
) -> dg.MaterializeResult:
    store = storage.get()
    examples = _examples(store.read_parquet(*HUMAN_CAPTIONS_PARTS))
    device = compute.torch_device()
    captioner = Captioner.from_pretrained(
        models.base_captioner,
        device=device,
        revision=config.base_revision,
        attn_implementation=config.attn_implementation,
    )
    context.log.info(
        f"fine-tuning {captioner.family} ({captioner.num_parameters():,} parameters, saved "
        f"in {captioner.load_options['loaded_dtype']}, trained with fp32 master weights) "
        f"from {models.base_captioner} on {len(examples)} human-captioned images, {device}"
    )
    heldout_path = sources.human_captions_heldout_path
    has_heldout = bool(heldout_path) and Path(heldout_path).is_file()
    # Real data has no held-out ground truth to grade against: then no quality table.
    heldout = load_captioned(heldout_path) if has_heldout else []
    grade = {
        "world": world.get(),
        "batch_size": config.eval_batch_size,
        "max_new_tokens": config.max_new_tokens,
    }
    before = evaluate_captioner(captioner, heldout, **grade) if heldout else None
    # The human captions of the held-out set are references wherever it exists (no ground
    # truth needed): the base and the fine-tune are judged against them, and against the
    # images when a CLIP model is configured.
    references = load_heldout(heldout_path) if has_heldout else []
    scorer = ClipScorer(models.clip, device=device) if models.clip and references else None
    judge = {
        "scorer": scorer,
        "batch_size": config.eval_batch_size,
        "max_new_tokens": config.max_new_tokens,
    }
    base_judged = judge_captioner(captioner, references, **judge) if references else None

    start = time.perf_counter()
    losses = fine_tune(
        captioner,
        examples,
        settings_from_config(FineTuneConfig, config, mixed_precision=compute.training_precision()),
        on_step=lambda step, loss: (
            context.log.info(f"step {step}/{config.steps} loss {loss:.4f}")
            # Step 1 too: the main job's estimate counts it by its steps from the start.
            if step == 1 or step % max(1, config.steps // 10) == 0
            else None
        ),
    )
    train_seconds = time.perf_counter() - start
    after = evaluate_captioner(captioner, heldout, **grade) if heldout else None
    tuned_judged = judge_captioner(captioner, references, **judge) if references else None

    samples = (
        sample_table(captioner, heldout[: config.sample_rows], config.max_new_tokens)
        if after is not None
        else None
    )

    with store.atomic_dir(*CHECKPOINT_PARTS) as staging:
        captioner.save_pretrained(staging, dtype=getattr(torch, config.saved_dtype))
        version = weights_fingerprint(staging)
        (Path(staging) / VERSION_FILE).write_text(version + "\n")
    uri = store.uri(*CHECKPOINT_PARTS)

    loss_png = line_plot(
        {"loss": losses}, title="captioner fine-tuning", xlabel="step", ylabel="loss", smooth=10
    )
    store.write_bytes(loss_png, "reports", "captioner_loss.png")
    metadata: dict = {
        "dagster/uri": dg.MetadataValue.path(uri),
        "version": version,
        "family": captioner.family,
        "parameters": captioner.num_parameters(),
        "base_model": models.base_captioner,
        "base_revision": config.base_revision or "default branch",
        "attn_implementation": config.attn_implementation or "transformers default",
        "base_dtype": captioner.load_options["loaded_dtype"],
        "saved_dtype": config.saved_dtype,
        "mirrored_copies": config.mirror,
        "final_loss": float(losses[-1]) if losses else float("nan"),
        "train_seconds": round(train_seconds, 1),
        "loss_curve": dg.MetadataValue.md(markdown_image(loss_png, "loss curve")),
        "prefixes": dg.MetadataValue.json(captioner.prefixes),
    }
    if before is not None and after is not None:
        metadata["heldout_quality"] = dg.MetadataValue.md(quality_table(before, after))
        for style in ("short", "long"):
            for metric in ("objects", "counts", "positions"):
                if after[style][metric] is not None:
                    metadata[f"{style}_{metric}_after"] = float(after[style][metric])
        metadata["samples"] = dg.MetadataValue.md(samples)
    if base_judged is not None and tuned_judged is not None:
        human = judge_references(references, scorer) if scorer is not None else None
        metadata["heldout_reference"] = typed_table(
            reference_rows(base_judged, tuned_judged, human), COLUMN_NOTES
        )
        metadata["heldout_reference_images"] = len(references)
        for style in ("short", "long"):
            for metric in ("bleu", "rouge_l", "chrf", "clip_score"):
                if tuned_judged[style][metric] is not None:
                    metadata[f"{style}_{metric}_fine_tuned"] = float(tuned_judged[style][metric])
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(version))


def read_checkpoint_version(local_dir: str) -> str:
    """The version recorded beside a checkpoint (recomputed when the file is missing)."""
    path = Path(local_dir) / VERSION_FILE
    return path.read_text().strip() if path.exists() else weights_fingerprint(local_dir)
