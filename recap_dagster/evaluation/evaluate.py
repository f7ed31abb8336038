"""Evaluating one caption variant's text-to-image checkpoints (plain Python, no Dagster).

The ``metric_reports`` asset's work: read the real reference images FID compares against,
generate images for the world's evaluation prompts from every snapshot of the variant,
have the world grade them, and write the variant's metric report (JSON), its per-category
sample grids and its final images (for the human evaluation) under the storage root.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from PIL import Image

from recap_dagster.corpus.reading import iter_shard
from recap_dagster.evaluation import report as report_core
from recap_dagster.evaluation.human import save_generated_images
from recap_dagster.evaluation.metrics import MetricReport, evaluate_generations
from recap_dagster.evaluation.world import EvalPrompt, World
from recap_dagster.storage.root import Storage
from recap_dagster.t2i.model import load_pipeline
from recap_dagster.t2i.sample import generate
from recap_dagster.t2i.train import SNAPSHOTS_FILE
from recap_dagster.training.substrate import setting

REPORT_DIR = ("reports", "metrics")


@dataclass
class EvalSettings:
    """How a variant is evaluated (the ``metric_reports`` asset's config)."""

    guidance_scale: float = setting(5.0, "Classifier-free guidance scale.")
    num_inference_steps: int = setting(20, "Denoising steps per image.")
    seeds_per_prompt: int = setting(1, "Images per prompt (fixed seeds).")
    batch_size: int = setting(
        100, "Images per pipeline call (the VAE decodes them one at a time: sliced)."
    )
    reference_images: int = setting(1000, "Real corpus images FID compares against.")
    evaluate_snapshots: bool = setting(
        True, "Also evaluate intermediate snapshots (metric vs steps)."
    )
    inception_weights: str = setting(
        "",
        "Path to torch-fidelity's Inception weights for standard FID; empty: an offline "
        "random-conv extractor (compare variants with each other only).",
    )
    rating_images: int = setting(
        400,
        "Final images saved as PNG (the first N prompt x seed pairs) for the human "
        "evaluation's rating task; 0: none.",
    )


@dataclass
class VariantEvaluation:
    """What evaluating a variant produced: the final checkpoint's report, the metric curve
    over snapshots, the per-category sample grids (PNG) and where the JSON report lies."""

    report: MetricReport
    curve: list[dict]
    grids: dict[str, bytes]
    report_parts: tuple[str, ...]
    payload: dict = field(default_factory=dict)


def reference_images(shards_root: str, shards: Sequence[str], limit: int) -> list[Image.Image]:
    """Up to ``limit`` decodable images of ``shards``, in order."""
    images: list[Image.Image] = []
    for shard in shards:
        for record in iter_shard(shards_root, shard):
            if record.image is not None:
                images.append(record.image)
                if len(images) >= limit:
                    return images
    return images


def evaluate_variant(
    store: Storage,
    variant: str,
    *,
    checkpoint_parts: Sequence[str],
    world: World,
    prompts: Sequence[EvalPrompt],
    shards_root: str,
    shards: Sequence[str],
    device: str,
    dtype: torch.dtype | None = None,
    settings: EvalSettings,
    clip_model: str | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> VariantEvaluation:
    """Generate and grade images of every snapshot under ``checkpoint_parts/variant``
    (only the last with ``evaluate_snapshots`` off) and write the variant's report.
    ``clip_model`` (a CLIP-family directory or hub id; None: not scored) adds CLIP score."""
    snapshots = json.loads(store.read_text(*checkpoint_parts, variant, SNAPSHOTS_FILE))
    if not settings.evaluate_snapshots:
        snapshots = snapshots[-1:]
    repeated = [p for p in prompts for _ in range(settings.seeds_per_prompt)]
    seeds = [i % settings.seeds_per_prompt for i in range(len(repeated))]
    reference = reference_images(shards_root, shards, settings.reference_images)
    curve: list[dict] = []
    final: MetricReport | None = None
    final_images: list[Image.Image] = []
    for snapshot in snapshots:
        with store.local_dir(*checkpoint_parts, variant, snapshot["name"]) as local:
            pipe = load_pipeline(local, device=device, dtype=dtype)
        images = generate(
            pipe,
            [p.prompt for p in repeated],
            seeds,
            guidance_scale=settings.guidance_scale,
            num_inference_steps=settings.num_inference_steps,
            batch_size=settings.batch_size,
        )
        final = evaluate_generations(
            images,
            repeated,
            reference,
            world=world,
            inception_weights=settings.inception_weights or None,
            clip_model=clip_model or None,
            device=device,
        )
        curve.append({"step": snapshot["step"], **final.overall})
        log(f"{variant} step {snapshot['step']}: {final.overall}")
        final_images = images
    if final is None:
        raise ValueError(f"{variant} has no snapshot to evaluate")
    grids = report_core.category_grids(final_images, repeated)
    for category, png in grids.items():
        store.write_bytes(png, *REPORT_DIR, f"{variant}_{category}.png")
    # Same prompts and seeds for every variant: the human evaluation pairs these images.
    save_generated_images(
        store,
        variant,
        final_images,
        repeated,
        [i // settings.seeds_per_prompt for i in range(len(repeated))],
        seeds,
        checkpoint_version=snapshots[-1]["version"],
        limit=settings.rating_images,
    )
    payload = {
        "variant": variant,
        "world": world.name,
        "overall": final.overall,
        "per_category": final.per_category,
        "curve": curve,
        "settings": asdict(settings),
        "clip_model": clip_model or None,
        "checkpoint_version": snapshots[-1]["version"],
    }
    parts = (*REPORT_DIR, f"{variant}.json")
    store.write_text(json.dumps(payload, indent=2), *parts)
    return VariantEvaluation(final, curve, grids, parts, payload)
