"""RECAP step 3 and the evaluation: one text-to-image checkpoint per caption variant,
metric reports per variant, and the side-by-side RECAP report."""

import json
import time
from pathlib import Path

import dagster as dg
from pydantic import Field

from recap_dagster import report as report_core
from recap_dagster import settings
from recap_dagster.assets.recaption import OUTPUT_DIR as RECAPTIONED_DIR
from recap_dagster.assets.recaption import recaptioned_shards
from recap_dagster.fingerprint import VERSION_FILE, weights_fingerprint
from recap_dagster.metrics import evaluate_generations
from recap_dagster.miniworld.generate import read_eval_prompts
from recap_dagster.partitions import caption_variants_partitions, shard_group_partitions
from recap_dagster.plots import image_grid, line_plot, markdown_image, markdown_table
from recap_dagster.pool_watchdog import GPU_POOL
from recap_dagster.resources import (
    ComputeResource,
    DataSourcesResource,
    ModelsResource,
    StorageResource,
)
from recap_dagster.retries import TRANSIENT_RETRY_POLICY, retry_only_transient
from recap_dagster.shard_groups import shards_of_groups
from recap_dagster.shards import iter_shard
from recap_dagster.storage import Storage
from recap_dagster.t2i.model import load_pipeline, save_pipeline
from recap_dagster.t2i.sample import generate
from recap_dagster.t2i.train import TrainConfig, train
from recap_dagster.training_data import recaptioned_examples

SD_DIR = ("checkpoints", "sd")
SNAPSHOTS_FILE = "snapshots.json"
SAMPLE_SEED = 1234


class SDFineTuneConfig(dg.Config):
    """RECAP step 3. Defaults are the paper's recipe (SD v1.4: lr 1e-5, batch 512,
    prompt dropout 0.14, UNet and text encoder trained); the miniworld profile overrides."""

    steps: int = Field(default=1000, description="Optimizer steps.")
    learning_rate: float = Field(default=1e-5, description="AdamW learning rate.")
    batch_size: int = Field(default=512, description="Effective batch (images per step).")
    micro_batch_size: int = Field(
        default=64, description="Images per forward pass; batch_size/micro = accumulation."
    )
    prompt_dropout: float = Field(
        default=0.14, description="Probability of training on the empty prompt (for CFG)."
    )
    train_unet: bool = Field(default=True, description="Train the UNet.")
    train_text_encoder: bool = Field(default=True, description="Train the CLIP text encoder.")
    use_ema: bool = Field(default=False, description="Keep an EMA of the weights and save it.")
    ema_decay: float = Field(default=0.9999, description="EMA decay.")
    lr_warmup_steps: int = Field(default=0, description="Linear warmup steps.")
    lr_scheduler: str = Field(
        default="constant_with_warmup",
        description="Learning-rate schedule after the warmup, any diffusers.optimization name "
        "(constant_with_warmup, linear, cosine, ...; decays over `steps`).",
    )
    snr_gamma: float | None = Field(
        default=None,
        description="Min-SNR loss weighting gamma (Hang et al. 2023; diffusers' --snr_gamma); "
        "None: plain MSE, as the paper.",
    )
    checkpoint_every: int = Field(
        default=100, description="Save a resumable training state every N steps."
    )
    snapshot_every: int = Field(
        default=250,
        description="Save a diffusers snapshot every N steps (metric_reports evaluates each).",
    )
    max_examples: int = Field(default=0, description="Use at most this many images (0: all).")
    seed: int = Field(default=0, description="Seed for data order, noise and dropout.")
    sample_prompts: int = Field(default=16, description="Prompts in the sample grid.")

    def train_config(self, steps: int, mixed_precision: str) -> TrainConfig:
        return TrainConfig(
            steps=steps,
            learning_rate=self.learning_rate,
            batch_size=self.batch_size,
            micro_batch_size=self.micro_batch_size,
            prompt_dropout=self.prompt_dropout,
            train_unet=self.train_unet,
            train_text_encoder=self.train_text_encoder,
            mixed_precision=mixed_precision,
            use_ema=self.use_ema,
            ema_decay=self.ema_decay,
            lr_warmup_steps=self.lr_warmup_steps,
            lr_scheduler=self.lr_scheduler,
            snr_gamma=self.snr_gamma,
            checkpoint_every=self.checkpoint_every,
            seed=self.seed,
        )


def milestones(steps: int, every: int) -> list[int]:
    """Snapshot steps: every ``every`` steps, always ending at ``steps``."""
    points = list(range(every, steps, every)) if every > 0 else []
    return [*points, steps]


def _work_dir(store: Storage, variant: str) -> str:
    """Resumable training state: under the storage root when local, else a local cache."""
    if store.local:
        return store.uri("sd_training", variant)
    return str(settings.workdir() / "sd_training" / variant)


def _eval_prompts(sources: DataSourcesResource):
    return read_eval_prompts(sources.eval_prompts_path)


@dg.asset(
    retry_policy=TRANSIENT_RETRY_POLICY,
    partitions_def=caption_variants_partitions,
    deps=[dg.AssetDep(recaptioned_shards, partition_mapping=dg.AllPartitionMapping())],
    pool=GPU_POOL,
    group_name="text_to_image",
    kinds={"pytorch", "diffusers"},
    tags={"recap/gpu": "1"},
    description="The base text-to-image model fine-tuned on every recaptioned shard with one "
    "caption variant (alttext, recap_short, recap_long, recap_mix = 50/50 per sample). "
    "Resumes from its last training state after an interruption.",
)
@retry_only_transient
def sd_checkpoints(
    context: dg.AssetExecutionContext,
    config: SDFineTuneConfig,
    models: ModelsResource,
    compute: ComputeResource,
    sources: DataSourcesResource,
    storage: StorageResource,
) -> dg.MaterializeResult:
    variant = context.partition_key
    store = storage.get()
    groups = context.instance.get_dynamic_partitions(shard_group_partitions.name)
    shards = [
        s
        for s in shards_of_groups(sources.shards_root, groups)
        if store.exists(RECAPTIONED_DIR, f"{s}.parquet")
    ]
    if not shards:
        raise ValueError("no recaptioned shards: materialize recaptioned_shards first")
    examples = recaptioned_examples(
        store, sources.shards_root, shards, variant, limit=config.max_examples or None
    )
    context.log.info(f"{variant}: {len(examples)} training images from {len(shards)} shard(s)")
    device = compute.torch_device()
    pipe = load_pipeline(models.base_t2i, device=device)
    work_dir = _work_dir(store, variant)
    precision = compute.training_precision()
    snapshots, losses, resumed_from = [], [], None
    start = time.perf_counter()
    for step in milestones(config.steps, config.snapshot_every):
        result = train(
            pipe,
            examples,
            config.train_config(step, precision),
            work_dir,
            on_step=lambda s, loss: (
                context.log.info(f"{variant} step {s}/{config.steps} loss {loss:.4f}")
                if s % max(1, config.steps // 10) == 0
                else None
            ),
        )
        pipe, losses = result.pipeline, result.losses
        if resumed_from is None:
            resumed_from = result.resumed_from
        name = "final" if step == config.steps else f"step-{step:06d}"
        with store.atomic_dir(*SD_DIR, variant, name) as staging:
            save_pipeline(pipe, staging, extra={"variant": variant, "step": step})
            version = weights_fingerprint(staging)
            Path(staging, VERSION_FILE).write_text(version + "\n")
        snapshots.append({"step": step, "name": name, "version": version})
    seconds = time.perf_counter() - start
    # Written last: the list of snapshots of this materialization, for metric_reports.
    store.write_text(json.dumps(snapshots, indent=2), *SD_DIR, variant, SNAPSHOTS_FILE)

    truths = _eval_prompts(sources)[: config.sample_prompts]
    samples = generate(pipe, [t.prompt for t in truths], [SAMPLE_SEED] * len(truths))
    grid = image_grid(samples, columns=8, cell=64)
    store.write_bytes(grid, "reports", f"sd_{variant}_samples.png")
    loss_png = line_plot(
        {variant: losses},
        title=f"fine-tuning loss ({variant})",
        xlabel="step",
        ylabel="loss",
        smooth=20,
    )
    store.write_bytes(loss_png, "reports", f"sd_{variant}_loss.png")
    final_version = snapshots[-1]["version"]
    return dg.MaterializeResult(
        metadata={
            "dagster/uri": dg.MetadataValue.path(store.uri(*SD_DIR, variant, "final")),
            "variant": variant,
            "version": final_version,
            "training_images": len(examples),
            "steps": config.steps,
            "resumed_from_step": resumed_from if resumed_from is not None else -1,
            "train_seconds": round(seconds, 1),
            "final_loss": float(losses[-1]) if losses else float("nan"),
            "snapshots": dg.MetadataValue.json(snapshots),
            "loss_curve": dg.MetadataValue.md(markdown_image(loss_png, "loss")),
            "samples": dg.MetadataValue.md(
                markdown_image(grid, "samples")
                + "\n\n"
                + markdown_table(["#", "prompt"], [[i, t.prompt] for i, t in enumerate(truths)])
            ),
        },
        data_version=dg.DataVersion(final_version),
    )


class MetricReportConfig(dg.Config):
    guidance_scale: float = Field(default=5.0, description="Classifier-free guidance scale.")
    num_inference_steps: int = Field(default=20, description="Denoising steps per image.")
    seeds_per_prompt: int = Field(default=1, description="Images per prompt (fixed seeds).")
    batch_size: int = Field(default=100, description="Images per pipeline call.")
    reference_images: int = Field(
        default=1000, description="Real corpus images FID compares against."
    )
    evaluate_snapshots: bool = Field(
        default=True, description="Also evaluate intermediate snapshots (metric vs steps)."
    )
    clip_model: str = Field(
        default="", description="CLIP model (local dir or hub id) for CLIP score; empty: skip."
    )
    inception_weights: str = Field(
        default="",
        description="Path to torch-fidelity's Inception weights for standard FID; empty: the "
        "miniworld's offline random-conv extractor.",
    )


def _reference_images(shards_root: str, shards: list[str], limit: int) -> list:
    images = []
    for shard in shards:
        for record in iter_shard(shards_root, shard):
            if record.image is not None:
                images.append(record.image)
                if len(images) >= limit:
                    return images
    return images


@dg.asset(
    retry_policy=TRANSIENT_RETRY_POLICY,
    partitions_def=caption_variants_partitions,
    deps=[sd_checkpoints],
    pool=GPU_POOL,
    group_name="evaluation",
    kinds={"pytorch", "torchmetrics"},
    tags={"recap/gpu": "1"},
    description="FID, CLIP score (when configured), object accuracy, counting error and "
    "position accuracy of one variant on held-out prompts, overall and per category, for "
    "the final checkpoint and every snapshot.",
)
@retry_only_transient
def metric_reports(
    context: dg.AssetExecutionContext,
    config: MetricReportConfig,
    compute: ComputeResource,
    sources: DataSourcesResource,
    storage: StorageResource,
) -> dg.MaterializeResult:
    variant = context.partition_key
    store = storage.get()
    snapshots = json.loads(store.read_text(*SD_DIR, variant, SNAPSHOTS_FILE))
    if not config.evaluate_snapshots:
        snapshots = snapshots[-1:]
    truths = [t for t in _eval_prompts(sources) for _ in range(config.seeds_per_prompt)]
    seeds = [i % config.seeds_per_prompt for i in range(len(truths))]
    groups = context.instance.get_dynamic_partitions(shard_group_partitions.name)
    shards = shards_of_groups(sources.shards_root, groups)
    reference = _reference_images(sources.shards_root, shards, config.reference_images)
    device = compute.torch_device()
    curve, final_report, final_images = [], None, []
    for snapshot in snapshots:
        with store.local_dir(*SD_DIR, variant, snapshot["name"]) as local:
            pipe = load_pipeline(local, device=device)
        images = generate(
            pipe,
            [t.prompt for t in truths],
            seeds,
            guidance_scale=config.guidance_scale,
            num_inference_steps=config.num_inference_steps,
            batch_size=config.batch_size,
        )
        report = evaluate_generations(
            images,
            truths,
            reference,
            inception_weights=config.inception_weights or None,
            clip_model=config.clip_model or None,
        )
        curve.append({"step": snapshot["step"], **report.overall})
        context.log.info(f"{variant} step {snapshot['step']}: {report.overall}")
        final_report, final_images = report, images
    assert final_report is not None
    grids = report_core.category_grids(final_images, truths)
    for category, png in grids.items():
        store.write_bytes(png, "reports", "metrics", f"{variant}_{category}.png")
    payload = {
        "variant": variant,
        "overall": final_report.overall,
        "per_category": final_report.per_category,
        "curve": curve,
        "settings": config.model_dump(),
        "checkpoint_version": snapshots[-1]["version"],
    }
    store.write_text(json.dumps(payload, indent=2), "reports", "metrics", f"{variant}.json")
    overall = final_report.overall
    return dg.MaterializeResult(
        metadata={
            "dagster/uri": dg.MetadataValue.path(
                store.uri("reports", "metrics", f"{variant}.json")
            ),
            **{k: v for k, v in overall.items() if isinstance(v, float | int)},
            "fid_features": overall["fid_features"],
            "metrics": dg.MetadataValue.md(report_core.category_table(final_report)),
            "per_prompt": dg.MetadataValue.md(
                markdown_table(
                    ["prompt", "category", "objects", "count err", "position", "detected"],
                    [
                        [
                            r["prompt"],
                            r["category"],
                            r["object_accuracy"],
                            r["count_error"],
                            r["position_accuracy"] if r["position_accuracy"] is not None else "-",
                            r["detected"],
                        ]
                        for r in final_report.rows[:60]
                    ],
                )
            ),
            "samples_by_category": dg.MetadataValue.md(
                "\n\n".join(f"**{c}**\n\n{markdown_image(png, c)}" for c, png in grids.items())
            ),
        }
    )


@dg.asset(
    retry_policy=TRANSIENT_RETRY_POLICY,
    deps=[metric_reports],
    group_name="evaluation",
    kinds={"markdown"},
    description="All variants side by side like the paper's Table 1 (with deltas against "
    "alttext) and metric-versus-steps curves like its Figure 5.",
)
@retry_only_transient
def recap_report(
    context: dg.AssetExecutionContext, storage: StorageResource
) -> dg.MaterializeResult:
    store = storage.get()
    reports = {
        variant: json.loads(store.read_text("reports", "metrics", f"{variant}.json"))
        for variant in caption_variants_partitions.get_partition_keys()
        if store.exists("reports", "metrics", f"{variant}.json")
    }
    if "alttext" not in reports:
        raise ValueError("recap_report needs the alttext metric report as its baseline")
    built = report_core.build_report(reports)
    store.write_text(built.markdown, "reports", "recap_report.md")
    store.write_text(json.dumps(built.table, indent=2), "reports", "recap_report.json")
    for name, png in built.figures.items():
        store.write_bytes(png, "reports", name)
    context.log.info("\n" + built.table_markdown)
    return dg.MaterializeResult(
        metadata={
            "dagster/uri": dg.MetadataValue.path(store.uri("reports", "recap_report.md")),
            "table": dg.MetadataValue.md(built.table_markdown),
            "figures": dg.MetadataValue.md(
                "\n\n".join(markdown_image(png, name) for name, png in built.figures.items())
            ),
            "variants": len(reports),
            **{f"mix_vs_alttext_{k}": v for k, v in built.mix_deltas.items()},
        }
    )


@dg.asset_check(
    asset=recap_report,
    description="Warns unless recap_mix beats alttext on object accuracy, counting error and "
    "position accuracy.",
)
def recap_mix_beats_alttext(storage: StorageResource) -> dg.AssetCheckResult:
    table = json.loads(storage.get().read_text("reports", "recap_report.json"))
    verdict = report_core.mix_beats_alttext(table)
    return dg.AssetCheckResult(
        passed=verdict.passed,
        severity=dg.AssetCheckSeverity.WARN,
        description=verdict.description,
        metadata=verdict.metadata,
    )
