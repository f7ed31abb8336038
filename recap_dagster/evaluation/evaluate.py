"""Evaluating one caption variant's text-to-image checkpoints (plain Python, no Dagster).

The ``metric_reports`` asset's work, for one variant's fine-tune with one training seed:
read the real reference images FID compares against, generate K images per evaluation
prompt from every snapshot, have the world grade them, and write the metric report (JSON),
every graded image of the final snapshot (parquet: the comparison across seeds pairs
them), per-category sample grids and the final images (for the human evaluation) under
the storage root.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import torch
from PIL import Image

from recap_dagster.corpus.reading import iter_shard
from recap_dagster.evaluation import report as report_core
from recap_dagster.evaluation.human import save_generated_images
from recap_dagster.evaluation.metrics import MetricReport, as_jpeg, evaluate_generations
from recap_dagster.evaluation.world import EvalPrompt, World
from recap_dagster.storage.root import Storage
from recap_dagster.t2i.model import load_pipeline
from recap_dagster.t2i.sample import generate
from recap_dagster.t2i.train import SNAPSHOTS_FILE
from recap_dagster.training.substrate import setting

REPORT_DIR = ("reports", "metrics")
TEST, VALIDATION = "test", "validation"
#: Typed columns of the graded rows (the rest are the world's metrics, floats or null).
ROW_KEYS = ("variant", "seed", "prompt_index", "image", "image_seed", "prompt", "category")


def _report_dir(variant: str, prompt_set: str) -> tuple[str, ...]:
    # Validation reports apart: the RECAP report reads the test ones only.
    return (*REPORT_DIR, variant) if prompt_set == TEST else (*REPORT_DIR, prompt_set, variant)


def report_parts(variant: str, seed: int, prompt_set: str = TEST) -> tuple[str, ...]:
    """Where the metric report (JSON) of a variant's fine-tune with ``seed`` lies."""
    return (*_report_dir(variant, prompt_set), f"seed-{seed}.json")


def rows_parts(variant: str, seed: int, prompt_set: str = TEST) -> tuple[str, ...]:
    """Where its graded rows (parquet, one per generated image) lie, beside the report."""
    return (*_report_dir(variant, prompt_set), f"seed-{seed}.rows.parquet")


def read_prompts(
    world: World, prompt_set: str, test_path: str, validation_path: str
) -> list[EvalPrompt]:
    """The evaluation prompts of ``prompt_set``: the test prompts (the report's) or the
    validation prompts (to tune on), which must share no prompt with the test ones."""
    if prompt_set == TEST:
        return world.read_eval_prompts(test_path)
    if prompt_set != VALIDATION:
        raise ValueError(f"prompt_set must be {TEST!r} or {VALIDATION!r}, not {prompt_set!r}")
    if not validation_path:
        raise ValueError("no validation prompts: set sources.validation_prompts_path")
    validation = world.read_eval_prompts(validation_path)
    shared = {p.prompt for p in validation} & {p.prompt for p in world.read_eval_prompts(test_path)}
    if shared:
        raise ValueError(
            f"{len(shared)} validation prompt(s) are test prompts too (e.g. "
            f"{sorted(shared)[0]!r}): tuning on them would leak into the report"
        )
    return validation


def image_seed(prompt: str, image: int) -> int:
    """The noise seed of the ``image``-th image of ``prompt``: its own per (prompt, image),
    the same for every variant and training seed, so their images pair."""
    digest = hashlib.sha256(f"{prompt}\0{image}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


@dataclass
class EvalSettings:
    """How a variant is evaluated (the ``metric_reports`` asset's config)."""

    guidance_scale: float = setting(5.0, "Classifier-free guidance scale.")
    num_inference_steps: int = setting(20, "Denoising steps per image.")
    images_per_prompt: int = setting(
        1,
        "Images per prompt; each (prompt, image) has its own noise seed, shared by every "
        "variant and training seed.",
    )
    batch_size: int = setting(
        100, "Images per pipeline call (the VAE decodes them one at a time: sliced)."
    )
    reference_images: int = setting(1000, "Real corpus images FID and KID compare against.")
    prompt_set: str = setting(
        TEST,
        "test: the held-out prompts the RECAP report is on; validation: the disjoint set to "
        "tune settings on (reports under reports/metrics/validation/, never in the report).",
    )
    jpeg_quality: int = setting(
        95,
        "Generated images are JPEG-encoded at this quality before they are graded and "
        "compared, like the corpus's real images (0: kept lossless).",
    )
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
        "Final images saved as PNG (the first N prompt x image pairs) for the human "
        "evaluation's rating task; 0: none.",
    )


@dataclass
class VariantEvaluation:
    """What evaluating a fine-tune produced: the final checkpoint's report, the metric curve
    over snapshots, the per-category sample grids (PNG) and where the JSON report and the
    graded rows lie."""

    report: MetricReport
    curve: list[dict]
    grids: dict[str, bytes]
    report_parts: tuple[str, ...]
    rows_parts: tuple[str, ...]
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


def rows_table(rows: Sequence[dict]) -> pa.Table:
    """Graded rows as a table: the keys typed, every metric a float (null: not graded)."""
    metrics = [k for k in rows[0] if k not in ROW_KEYS and k != "detected"] if rows else []
    schema = pa.schema(
        [("variant", pa.string()), ("seed", pa.int64()), ("prompt_index", pa.int64()),
         ("image", pa.int64()), ("image_seed", pa.int64()), ("prompt", pa.string()),
         ("category", pa.string()), *((m, pa.float64()) for m in metrics),
         ("detected", pa.string())]
    )  # fmt: skip
    return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema)


def evaluate_variant(
    store: Storage,
    variant: str,
    seed: int,
    *,
    checkpoint_parts: Sequence[str] = (),
    base_model: tuple[str, str] | None = None,
    world: World,
    prompts: Sequence[EvalPrompt],
    shards_root: str,
    shards: Sequence[str],
    device: str,
    dtype: torch.dtype | None = None,
    settings: EvalSettings,
    clip_model: str | None = None,
    log: Callable[[str], None] = lambda message: None,
    between_steps: Callable[[], None] | None = None,
) -> VariantEvaluation:
    """Generate and grade images of every snapshot under ``checkpoint_parts`` (a variant's
    fine-tune with training seed ``seed``; only the last snapshot with
    ``evaluate_snapshots`` off), or of ``base_model`` (its local directory and version: the
    floor, step 0), and write its report and the final snapshot's graded rows.
    ``clip_model`` (a CLIP-family directory or hub id; None: not scored) adds CLIP score.
    ``between_steps`` runs between denoising steps (the CPU share's rebalancer)."""
    if base_model is not None:
        snapshots = [{"step": 0, "name": base_model[0], "version": base_model[1]}]
    else:
        snapshots = json.loads(store.read_text(*checkpoint_parts, SNAPSHOTS_FILE))
    if not settings.evaluate_snapshots:
        snapshots = snapshots[-1:]
    k = settings.images_per_prompt
    if k < 1:
        raise ValueError("images_per_prompt must be at least 1")
    repeated = [p for p in prompts for _ in range(k)]
    prompt_indices = [i // k for i in range(len(repeated))]
    images_of = [i % k for i in range(len(repeated))]
    seeds = [image_seed(p.prompt, n) for p, n in zip(repeated, images_of, strict=True)]
    reference = reference_images(shards_root, shards, settings.reference_images)
    curve: list[dict] = []
    final: MetricReport | None = None
    final_images: list[Image.Image] = []
    for snapshot in snapshots:
        if base_model is not None:
            pipe = load_pipeline(base_model[0], device=device, dtype=dtype)
        else:
            with store.local_dir(*checkpoint_parts, snapshot["name"]) as local:
                pipe = load_pipeline(local, device=device, dtype=dtype)
        images = generate(
            pipe,
            [p.prompt for p in repeated],
            seeds,
            guidance_scale=settings.guidance_scale,
            num_inference_steps=settings.num_inference_steps,
            batch_size=settings.batch_size,
            between_steps=between_steps,
        )
        images = as_jpeg(images, settings.jpeg_quality)
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
        log(f"{variant} seed {seed} step {snapshot['step']}: {final.overall}")
        final_images = images
    if final is None:
        raise ValueError(f"{variant} seed {seed} has no snapshot to evaluate")
    final.rows = [
        {"variant": variant, "seed": seed, "prompt_index": index, "image": n,
         "image_seed": image_seed_, **row}
        for row, index, n, image_seed_ in zip(
            final.rows, prompt_indices, images_of, seeds, strict=True
        )
    ]  # fmt: skip
    prompt_set = settings.prompt_set
    store.write_parquet(rows_table(final.rows), *rows_parts(variant, seed, prompt_set))
    grids = report_core.category_grids(final_images, repeated)
    for category, png in grids.items():
        store.write_bytes(png, *_report_dir(variant, prompt_set), f"seed-{seed}_{category}.png")
    if prompt_set == TEST and base_model is None:
        # Same prompts and noise seeds for every variant: the human evaluation pairs these.
        save_generated_images(
            store,
            variant,
            seed,
            final_images,
            repeated,
            prompt_indices,
            seeds,
            checkpoint_version=snapshots[-1]["version"],
            limit=settings.rating_images,
        )
    payload = {
        "variant": variant,
        "seed": seed,
        "prompt_set": prompt_set,
        "world": world.name,
        "overall": final.overall,
        "per_category": final.per_category,
        "curve": curve,
        "settings": asdict(settings),
        "clip_model": clip_model or None,
        "checkpoint_version": snapshots[-1]["version"],
        "rows": rows_parts(variant, seed, prompt_set)[-1],
    }
    parts = report_parts(variant, seed, prompt_set)
    # Written last: a report that exists has its rows beside it.
    store.write_text(json.dumps(payload, indent=2), *parts)
    return VariantEvaluation(
        final, curve, grids, parts, rows_parts(variant, seed, prompt_set), payload
    )
