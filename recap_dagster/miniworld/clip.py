"""The miniworld's CLIP: a tiny transformers ``CLIPModel`` trained contrastively on the
miniworld's images and their true descriptions, so CLIP score means something there.

A public CLIP has never seen shapes on a grid described in the miniworld's language; this
one is trained on images rendered by the miniworld's own generator (a seed domain of their
own, so disjoint from the corpus, the human-caption sets and the pretraining set) paired
with what the miniworld knows is in them: a short caption, each sentence of a long caption
and a terse caption of the image's scene (:mod:`recap_dagster.miniworld.captions`).
Alt text is never a positive: it is what CLIP score is meant to catch out.

Building is deterministic (seeded) and cached like the base models: ``out_dir`` holding
:data:`MANIFEST_FILE` with the same key (config, miniworld content hash,
:data:`CLIP_VERSION`) is returned at once; the model is saved with ``save_pretrained``
(``CLIPModel`` + ``CLIPProcessor`` with the miniworld's CLIP tokenizer) into a staging
folder and renamed into place. The manifest records the held-out retrieval accuracy: how
often the true short caption of a held-out human-captioned image scores above another
image's.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from recap_dagster.evaluation.agreement import sentences
from recap_dagster.miniworld.captions import long_caption, short_caption, terse_caption
from recap_dagster.miniworld.generate import (
    MiniworldConfig,
    MiniworldPaths,
    item_seed,
    read_jsonl,
    read_manifest,
)
from recap_dagster.miniworld.scenes import Scene, render, sample_scene
from recap_dagster.storage.fingerprint import config_key
from recap_dagster.storage.fs import replace_dir

# Bump when the same config and data would give a different model (code change).
CLIP_VERSION = 1
MANIFEST_FILE = "miniworld_clip.json"


@dataclass(frozen=True)
class ClipConfig:
    """Architecture and contrastive training recipe of the miniworld's CLIP.

    ``images`` fresh scenes are rendered at the miniworld's image size, each with
    ``texts_per_image`` drawings of its descriptions; every step draws ``batch_size``
    images and one of each image's descriptions (InfoNCE over the batch, CLIP's own loss).
    """

    hidden_size: int = 96
    num_layers: int = 2
    num_heads: int = 4
    projection_dim: int = 96
    patch_size: int = 8
    images: int = 4000
    texts_per_image: int = 2
    steps: int = 800
    batch_size: int = 128
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    seed: int = 0

    def key(self) -> str:
        """A stable hash of the config (part of the cache key)."""
        return config_key(asdict(self))


#: Seconds on two CPU cores: the test suite's and the quick profile's.
QUICK_CLIP = ClipConfig(
    hidden_size=64,
    num_layers=2,
    num_heads=2,
    projection_dim=64,
    images=512,
    steps=150,  # 0.94 retrieval accuracy on 64 fresh scenes (chance: 0.5)
    batch_size=64,
    learning_rate=2e-3,
    warmup_steps=20,
)


def descriptions(scene: Scene, rng: random.Random, draws: int) -> list[str]:
    """True descriptions of ``scene``: per draw a short caption, the sentences of a long
    caption and a terse caption (the texts CLIP will be asked to score)."""
    texts: list[str] = []
    for _ in range(draws):
        texts.append(short_caption(scene, rng))
        texts += sentences(long_caption(scene, rng))
        texts.append(terse_caption(scene, rng))
    return texts


def _training_set(
    config: ClipConfig, miniworld: MiniworldConfig
) -> tuple[list[Any], list[list[str]]]:
    images, texts = [], []
    for index in range(config.images):
        rng = random.Random(item_seed(miniworld.seed + config.seed, "clip", index))
        scene = sample_scene(rng)
        images.append(render(scene, size=miniworld.image_size, seed=rng.getrandbits(32)))
        texts.append(descriptions(scene, rng, config.texts_per_image))
    return images, texts


def build_clip(tokenizer_dir: str, image_size: int, config: ClipConfig) -> tuple[Any, Any]:
    """A randomly initialised ``CLIPModel`` for the miniworld's tokenizer and image size,
    and its ``CLIPProcessor``."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizerFast,
    )

    tokenizer = CLIPTokenizerFast.from_pretrained(tokenizer_dir)
    common = {
        "hidden_size": config.hidden_size,
        "intermediate_size": 4 * config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
    }
    clip_config = CLIPConfig(
        text_config={
            **common,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": tokenizer.model_max_length,
            "bos_token_id": tokenizer.bos_token_id,
            # Pooling at the end token, found by its id (not by argmax over ids).
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**common, "image_size": image_size, "patch_size": config.patch_size},
        projection_dim=config.projection_dim,
    )
    torch.manual_seed(config.seed)
    model = CLIPModel(clip_config)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def train_clip(
    model: Any,
    processor: Any,
    images: list[Any],
    texts: list[list[str]],
    config: ClipConfig,
    *,
    device: str | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``model`` in place with CLIP's contrastive loss; the loss of every step."""
    import torch

    from recap_dagster.training.substrate import lr_schedule, seed_everything

    seed_everything(config.seed)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(target).train()
    # Every image is preprocessed once: the same pixels every time it is drawn.
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    scheduler = lr_schedule(
        "cosine", optimizer, warmup_steps=config.warmup_steps, total_steps=config.steps
    )
    rng = random.Random(item_seed(config.seed, "clip_order", 0))
    order: list[int] = []
    losses: list[float] = []
    for step in range(1, config.steps + 1):
        while len(order) < config.batch_size:
            fresh = list(range(len(images)))
            rng.shuffle(fresh)
            order += fresh
        batch, order = order[: config.batch_size], order[config.batch_size :]
        tokens = processor.tokenizer(
            [rng.choice(texts[i]) for i in batch],
            padding=True,
            truncation=True,
            return_tensors="pt",
        )
        out = model(
            input_ids=tokens["input_ids"].to(target),
            attention_mask=tokens["attention_mask"].to(target),
            pixel_values=pixels[batch].to(target),
            return_loss=True,
        )
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():  # CLIP clamps its temperature at 100
            model.logit_scale.clamp_(0, math.log(100))
        value = float(out.loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"non-finite loss {value} at step {step}")
        losses.append(value)
        if on_step is not None:
            on_step(step, value)
    model.eval()
    return losses


def retrieval_accuracy(scorer: Any, images: list[Any], truths: list[str], seed: int = 0) -> float:
    """How often an image's true text scores above another image's text (0.5: chance).

    Each image is paired with the text of a different image with another text, drawn
    with ``seed``; ``scorer`` is a :class:`~recap_dagster.evaluation.agreement.ClipScorer`.
    """
    rng = random.Random(seed)
    wrong = []
    for i in range(len(images)):
        others = [j for j in range(len(images)) if j != i and truths[j] != truths[i]]
        wrong.append(truths[rng.choice(others)])
    right = scorer.score_pairs(images, truths)
    other = scorer.score_pairs(images, wrong)
    return sum(r > o for r, o in zip(right, other, strict=True)) / max(1, len(images))


def read_clip_manifest(directory: str | os.PathLike[str]) -> dict | None:
    """The manifest of a complete miniworld CLIP under ``directory``, or None."""
    try:
        return json.loads((Path(directory) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None


def _heldout(paths: MiniworldPaths) -> tuple[list[Any], list[str]]:
    from PIL import Image

    root = Path(paths.human_captions_heldout).parent
    images, shorts = [], []
    for row in read_jsonl(paths.human_captions_heldout):
        with Image.open(root / row["image"]) as image:
            images.append(image.convert("RGB"))
        shorts.append(row["short"])
    return images, shorts


def build_miniworld_clip(
    miniworld_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: ClipConfig = ClipConfig(),  # noqa: B008 - frozen dataclass
    *,
    device: str | None = None,
    force: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> str:
    """Build (or reuse) the miniworld's CLIP; returns ``out_dir`` (see the module docstring)."""
    paths = MiniworldPaths.under(miniworld_dir)
    manifest = read_manifest(paths.root)
    if manifest is None:
        raise FileNotFoundError(f"no generated miniworld under {paths.root}")
    key = {
        "version": CLIP_VERSION,
        "config_sha256": config.key(),
        "miniworld_sha256": manifest["content_sha256"],
    }
    out = Path(out_dir)
    existing = read_clip_manifest(out)
    if not force and existing is not None and existing.get("key") == key:
        return str(out)

    from recap_dagster.evaluation.agreement import ClipScorer

    start = time.perf_counter()
    world = MiniworldConfig.from_dict(manifest["config"])
    images, texts = _training_set(config, world)
    model, processor = build_clip(paths.tokenizer, world.image_size, config)
    losses = train_clip(model, processor, images, texts, config, device=device, on_step=on_step)
    seconds = time.perf_counter() - start
    model.to("cpu")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        heldout_images, heldout_texts = _heldout(paths)
        accuracy = retrieval_accuracy(
            ClipScorer(str(staging), device="cpu"), heldout_images, heldout_texts
        )
        record = {
            "key": key,
            "config": asdict(config),
            "parameters": sum(p.numel() for p in model.parameters()),
            "first_loss": losses[0] if losses else None,
            "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
            "heldout_retrieval_accuracy": accuracy,
            "heldout_images": len(heldout_images),
            "seconds": round(seconds, 2),
        }
        (staging / MANIFEST_FILE).write_text(
            json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(out)
