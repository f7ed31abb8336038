"""The miniworld's base captioner: RECAP step 1's starting point, pretrained locally.

The miniworld analog of a web-pretrained captioner (PaLI) is a tiny model of one supported
family (see :data:`BaseCaptionerConfig.family`), built with
:mod:`recap_dagster.miniworld.tiny_captioner` and pretrained here on
``captioner_pretrain/pretrain.parquet`` (images disjoint from the corpus and from both
human-caption sets) on a task mixture (:mod:`recap_dagster.miniworld.pretrain_tasks`), then
saved with :meth:`Captioner.save_pretrained` so the pipeline loads it through the same
``from_pretrained`` path as a real checkpoint. Asked with the RECAP prefixes, the base falls
back to what it knows best, terse text
(:func:`~recap_dagster.captioner.quality.evaluate_captioner` measures it); the fine-tune on
the human captions is what teaches the two RECAP styles, reusing the grounding learnt under
``"detect:"``.

Building is deterministic (seeded init, seeded data order, no dropout) and cached: the
output folder holds :data:`MANIFEST_FILE` with the config, a hash of the pretraining data
and :data:`BASE_CAPTIONER_VERSION`; a folder with the same key is returned at once. The
model is written to a temporary sibling folder and renamed into place, so a killed build
never leaves a folder that looks complete.

The ``captioner_checkpoint`` entry of ``profiles/default.yaml`` is the RECAP step-1 profile
for this tiny model (the paper's recipe, 300 steps at lr 4e-5, is for a pretrained
billion-parameter model); how the recipes of both were chosen, with the figures, is in the
README ("The miniworld's base captioner").
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from recap_dagster.captioner.model import STYLE_PREFIXES
from recap_dagster.miniworld.captions import (
    long_caption,
    short_caption,
    terse_caption,
    vocabulary_texts,
)
from recap_dagster.miniworld.generate import MiniworldPaths, item_seed
from recap_dagster.miniworld.pretrain_tasks import (
    DETECT_FORMATS,
    PRETRAIN_PREFIXES,
    TEXT_PROMPT,
    PretrainItem,
    detection_text,
    load_pretrain,
    text_sample,
    vqa_pair,
)
from recap_dagster.miniworld.scenes import Scene, sample_scene
from recap_dagster.storage.fingerprint import config_key
from recap_dagster.storage.fs import replace_dir
from recap_dagster.storage.root import Storage
from recap_dagster.training.substrate import (
    Checkpoints,
    lr_schedule,
    make_accelerator,
    seed_everything,
)

# Bump when the same config and data would give a different model (code change).
BASE_CAPTIONER_VERSION = 2  # 2: the shared training substrate (accelerate, LR schedule)
MANIFEST_FILE = "base_captioner.json"


def pretrain_prefixes(config: BaseCaptionerConfig) -> dict[str, str]:
    """Style name -> prompt of every pretraining task: ``caption`` (then ``caption_1``, ...
    for further caption prompts) and ``detect``."""
    prefixes = {
        "caption" if i == 0 else f"caption_{i}": prompt
        for i, prompt in enumerate(config.caption_prompts)
    }
    prefixes["detect"] = PRETRAIN_PREFIXES["detect"]
    return prefixes


@dataclass(frozen=True)
class BaseCaptionerConfig:
    """Architecture and pretraining recipe of the base captioner (defaults: the miniworld's).

    ``detect_fraction`` of each batch is the grounding task (``detect_format``, see
    :func:`detection_text`), ``vqa_fraction`` questions (:func:`vqa_pair`),
    ``text_fraction`` text-only sentences (:func:`text_sample`), the rest terse captioning,
    its prompt drawn uniformly from ``caption_prompts``.
    ``max_images`` uses only the first rows of the pretraining set (None: all of them).
    ``position_init="sincos"`` starts the vision tower's patch position embeddings from a
    2-D sine-cosine table times ``position_scale`` ("default": the family's own init).
    The learning rate warms up linearly for ``warmup_steps`` then decays (cosine) to
    ``min_lr_ratio`` of its peak.

    ``steps=2500``: where the ``detect:`` grounding of the held-out images stops improving.
    """

    family: str = "blip"
    image_size: int = 36
    patch_size: int = 12
    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int | None = None
    vision_hidden_size: int | None = None
    vision_layers: int | None = None
    max_text_tokens: int = 96
    steps: int = 2500
    batch_size: int = 64
    learning_rate: float = 2e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    detect_fraction: float = 0.4
    vqa_fraction: float = 0.3
    text_fraction: float = 0.2
    detect_format: str = "canonical"
    caption_prompts: tuple[str, ...] = ("caption:", "alt text:", "")
    position_init: str = "sincos"
    position_scale: float = 0.5
    max_images: int | None = None
    vocabulary_scenes: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError("steps must be >= 0 and batch_size >= 1")
        fractions = (self.detect_fraction, self.vqa_fraction, self.text_fraction)
        if min(fractions) < 0 or sum(fractions) > 1:
            raise ValueError(
                "detect_fraction, vqa_fraction and text_fraction must be >= 0, at most 1 together"
            )
        if self.detect_format not in DETECT_FORMATS:
            raise ValueError(f"detect_format must be one of {DETECT_FORMATS}")
        if not self.caption_prompts:
            raise ValueError("caption_prompts must not be empty")
        if set(pretrain_prefixes(self).values()) & set(STYLE_PREFIXES.values()):
            raise ValueError("pretraining prompts must differ from the RECAP style prefixes")

    def key(self) -> str:
        """A stable hash of the config (part of the cache key)."""
        return config_key(asdict(self))


#: Seconds-long variant for the test suite: same code paths, a toy model and recipe.
QUICK_BASE_CAPTIONER = BaseCaptionerConfig(
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    steps=200,  # the least at which it answers its own pretraining tasks
    batch_size=16,
    learning_rate=3e-3,
    warmup_steps=3,
    max_images=256,
    vocabulary_scenes=200,
)


def captioner_words(config: BaseCaptionerConfig, extra: Sequence[str] = ()) -> list[str]:
    """Every word of the miniworld's language, to be whole tokens of the captioner.

    The generator's phrase lists plus short, long and terse captions of
    ``config.vocabulary_scenes`` fresh scenes (a domain of their own, so no image set is
    involved), the detection listing's cell names and the pretraining prefixes.
    """
    # The generator's templates ("{L} on {B}.") hold placeholders, not words.
    texts = [t for t in vocabulary_texts() if "{" not in t]
    for index in range(config.vocabulary_scenes):
        rng = random.Random(item_seed(config.seed, "captioner_vocabulary", index))
        scene = sample_scene(rng)
        texts += [short_caption(scene, rng), long_caption(scene, rng), terse_caption(scene, rng)]
        texts += [detection_text(scene, fmt) for fmt in DETECT_FORMATS]
        texts += list(vqa_pair(scene, rng))
    texts += [*pretrain_prefixes(config).values(), TEXT_PROMPT, *extra]
    return texts


# --------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------


def sincos_positions(grid: int, dim: int):
    """A ``(grid*grid, dim)`` 2-D sine-cosine table (MAE/ViT style): half the channels
    encode the row, half the column, each as sines and cosines of a few frequencies;
    centred over positions, unit RMS."""
    import torch

    quarter = dim // 4
    # Periods from ~2 cells to ~20: on a 3x3..8x8 grid every position differs from the rest.
    freqs = torch.linspace(0.3, 3.0, quarter, dtype=torch.float64)
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    parts = []
    for axis in (rows.reshape(-1), cols.reshape(-1)):
        angles = axis[:, None] * freqs[None, :]
        parts += [torch.sin(angles), torch.cos(angles)]
    table = torch.cat(parts, dim=1)
    # Centred and scaled to unit RMS: the part shared by every position says nothing about
    # where a patch is, and on a small grid it would dominate (low frequencies).
    table = table - table.mean(dim=0, keepdim=True)
    table = table / table.pow(2).mean().sqrt().clamp_min(1e-12)
    pad = dim - table.shape[1]
    if pad:
        table = torch.cat([table, torch.zeros(table.shape[0], pad, dtype=table.dtype)], dim=1)
    return table.float()


def init_vision_positions(model: Any, grid: int, scale: float) -> int:
    """Overwrite the patch position embeddings of every vision tower in ``model`` with
    :func:`sincos_positions` times ``scale``; a class-token position is left as it is.

    Why: a randomly initialised tower starts with near-zero (std 0.02) position
    embeddings, far below the patch content, and in a few hundred steps it never learns
    *where* things are; a geometric start makes "top"/"left" readable from step one.
    Returns how many towers were changed.
    """
    import torch
    from torch import nn

    changed = 0
    for module in model.modules():
        if not type(module).__name__.endswith("VisionEmbeddings"):
            continue
        table = getattr(module, "position_embedding", None)
        weight = table.weight if isinstance(table, nn.Embedding) else table
        if not isinstance(weight, torch.Tensor):
            continue
        rows = weight.view(-1, weight.shape[-1])
        first = rows.shape[0] - grid * grid  # 1 with a class token (BLIP, GIT), 0 (SigLIP)
        if first not in (0, 1):
            continue
        with torch.no_grad():
            rows[first:] = scale * sincos_positions(grid, rows.shape[1]).to(rows)
        changed += 1
    return changed


def _paths(miniworld: str | os.PathLike[str] | MiniworldPaths) -> MiniworldPaths:
    return miniworld if isinstance(miniworld, MiniworldPaths) else MiniworldPaths.under(miniworld)


def _file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cache_key(config: BaseCaptionerConfig, data_sha256: str) -> dict[str, Any]:
    return {
        "version": BASE_CAPTIONER_VERSION,
        "config_sha256": config.key(),
        "pretrain_sha256": data_sha256,
    }


def read_base_manifest(directory: str | os.PathLike[str]) -> dict | None:
    """The manifest of a complete base captioner under ``directory``, or None."""
    try:
        return json.loads((Path(directory) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None


def _task_batches(n_items: int, config: BaseCaptionerConfig):
    """Endless (item index, style) batches over reshuffled copies of the set (seeded)."""
    rng = random.Random(item_seed(config.seed, "captioner_pretrain_order", 0))
    caption_styles = [s for s in pretrain_prefixes(config) if s != "detect"]
    pool: list[int] = []
    n_detect = round(config.detect_fraction * config.batch_size)
    while True:
        while len(pool) < config.batch_size:
            order = list(range(n_items))
            rng.shuffle(order)
            pool += order
        indices, pool = pool[: config.batch_size], pool[config.batch_size :]
        n_vqa = round(config.vqa_fraction * config.batch_size)
        n_text = round(config.text_fraction * config.batch_size)
        styles = ["detect"] * n_detect + ["vqa"] * n_vqa + ["text"] * n_text
        n_caption = config.batch_size - len(styles)
        styles += [rng.choice(caption_styles) for _ in range(n_caption)]
        rng.shuffle(styles)
        yield list(zip(indices, styles, strict=True))


def _blank_images(config: BaseCaptionerConfig, size: int, count: int = 32) -> list[Image.Image]:
    """Backgrounds without shapes: the 'image' of the text-only examples."""
    from recap_dagster.miniworld.scenes import render, sample_background

    rng = random.Random(item_seed(config.seed, "captioner_blank", 0))
    return [
        render(Scene(objects=(), background=sample_background(rng)), size, rng.getrandbits(32))
        for _ in range(count)
    ]


def pretrain(
    captioner: Any,
    items: Sequence[PretrainItem],
    config: BaseCaptionerConfig,
    *,
    on_step: Callable[[int, float], None] | None = None,
    checkpoints: Checkpoints | None = None,
    checkpoint_every: int = 0,
) -> list[float]:
    """Pretrain ``captioner`` in place on the caption/detect mixture; the loss of every step.

    On the shared training substrate (accelerator, seeding, LR schedule, checkpoints): with
    ``checkpoints`` the state is saved every ``checkpoint_every`` steps and a new call
    resumes from the latest one.
    """
    import torch

    if not items:
        raise ValueError("pretraining needs at least one item")
    seed_everything(config.seed)
    accelerator = make_accelerator()
    optimizer = torch.optim.AdamW(
        captioner.model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    model, optimizer = accelerator.prepare(captioner.model, optimizer)
    scheduler = lr_schedule(
        "cosine_with_min_lr",
        optimizer,
        warmup_steps=config.warmup_steps,
        total_steps=config.steps,
        min_lr_ratio=config.min_lr_ratio,
    )
    accelerator.register_for_checkpointing(scheduler)
    batches = _task_batches(len(items), config)
    prefixes = pretrain_prefixes(config)
    questions = random.Random(item_seed(config.seed, "captioner_pretrain_vqa", 0))
    blanks = _blank_images(config, items[0].image.size[0])
    losses: list[float] = []
    start_step = 0
    latest = checkpoints.latest(config.steps) if checkpoints is not None else None
    if latest is not None:
        checkpoints.load(accelerator, latest)
        start_step, losses = latest.step, list(latest.meta["losses"])
        questions.setstate(_rng_state(latest.meta["questions_rng"]))
        for _ in range(start_step):  # the data order resumes where it stopped
            next(batches)
    model.train()
    try:
        for step in range(start_step + 1, config.steps + 1):
            pairs = next(batches)
            prompts, targets, images = [], [], []
            for i, style in pairs:
                image = items[i].image
                if style == "vqa":
                    prompt, target = vqa_pair(items[i].scene, questions)
                elif style == "text":
                    prompt, target = TEXT_PROMPT, text_sample(questions)
                    image = blanks[i % len(blanks)]
                else:
                    prompt, target = prefixes[style], items[i].target(style)
                prompts.append(prompt)
                targets.append(target)
                images.append(image)
            loss = model(**captioner.training_batch(images, prompts, targets)).loss
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"non-finite loss {value} at step {step}")
            losses.append(value)
            if on_step is not None:
                on_step(step, value)
            if checkpoints is not None and checkpoint_every and step % checkpoint_every == 0:
                meta = {"losses": losses, "questions_rng": json.dumps(questions.getstate())}
                checkpoints.save(accelerator, step, meta)
    finally:
        captioner.model = accelerator.unwrap_model(model)
        captioner.model.eval()
        accelerator.free_memory()
    return losses


def _rng_state(text: str) -> tuple:
    version, internal, gauss = json.loads(text)
    return version, tuple(internal), gauss


def build_base_captioner(
    miniworld: str | os.PathLike[str] | MiniworldPaths,
    out_dir: str | os.PathLike[str],
    config: BaseCaptionerConfig = BaseCaptionerConfig(),  # noqa: B008 - frozen dataclass
    *,
    device: str | None = None,
    force: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> str:
    """Build (or reuse) the base captioner from a generated miniworld; returns ``out_dir``.

    ``miniworld`` is the miniworld's folder or its :class:`MiniworldPaths`. The result is a
    standard checkpoint folder (safetensors + processor + ``recap_captioner.json`` with the
    RECAP style prefixes) plus :data:`MANIFEST_FILE`. Uses CUDA when present unless
    ``device`` says otherwise.
    """
    paths = _paths(miniworld)
    out = Path(out_dir)
    data_sha = _file_sha256(paths.captioner_pretrain)
    key = _cache_key(config, data_sha)
    manifest = read_base_manifest(out)
    if not force and manifest is not None and manifest.get("key") == key:
        return str(out)

    # Imported here: a cache hit should not pay for torch/transformers imports.
    import torch

    from recap_dagster.captioner.model import resolve_device
    from recap_dagster.miniworld.tiny_captioner import build_tiny_captioner

    start, cpu_start = time.perf_counter(), time.process_time()
    items = load_pretrain(paths.captioner_pretrain, config.max_images, config.detect_format)
    prefixes = {**STYLE_PREFIXES, **pretrain_prefixes(config)}
    captioner = build_tiny_captioner(
        config.family,
        None,
        words=captioner_words(config),
        prefixes=prefixes,
        image_size=config.image_size,
        patch_size=config.patch_size,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        vision_hidden_size=config.vision_hidden_size,
        vision_layers=config.vision_layers,
        max_text_tokens=config.max_text_tokens,
        seed=config.seed,
    )
    if config.position_init == "sincos":
        grid = config.image_size // config.patch_size
        init_vision_positions(captioner.model, grid, config.position_scale)
    elif config.position_init != "default":
        raise ValueError(f"unknown position_init {config.position_init!r}")
    # No dropout while pretraining: the build stays deterministic, and the fine-tune sets
    # its own rate (FineTuneConfig.dropout) anyway.
    captioner.set_dropout(0.0)
    captioner.model.to(resolve_device(device))
    # Resumable: a killed build goes on from its last checkpoint (same config and data).
    work = Storage(f"{out}.work")
    checkpoints = Checkpoints(work, fingerprint=json.dumps(key, sort_keys=True), keep=1)
    losses = pretrain(
        captioner, items, config, on_step=on_step, checkpoints=checkpoints, checkpoint_every=250
    )
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start

    # The checkpoint carries the RECAP styles only, like a real base model configured for
    # the pipeline; the pretraining prefixes are in the manifest (pass them as
    # ``prefixes=`` to ``from_pretrained`` to probe the pretraining tasks).
    captioner.prefixes = dict(STYLE_PREFIXES)
    captioner.model.to("cpu")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        captioner.save_pretrained(staging)
        manifest = {
            "key": key,
            "config": asdict(config),
            "family": captioner.family,
            "parameters": captioner.num_parameters(),
            "pretrain_images": len(items),
            "pretrain_prefixes": pretrain_prefixes(config),
            "style_prefixes": dict(STYLE_PREFIXES),
            "vocabulary": len(captioner.processor.tokenizer),
            "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
            "first_loss": losses[0] if losses else None,
            "seconds": round(seconds, 2),
            "cpu_seconds": round(cpu_seconds, 2),
            "device": str(resolve_device(device)),
            "torch_threads": torch.get_num_threads(),
        }
        (staging / MANIFEST_FILE).write_text(
            json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(f"{out}.work", ignore_errors=True)
    return str(out)
