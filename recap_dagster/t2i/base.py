"""The miniworld's "Stable Diffusion": a tiny SD pretrained on the corpus's ALT TEXT.

This is the analog of SD v1.4 pretrained on LAION alt text, the starting point that RECAP
fine-tunes. Building it is deterministic and cached: ``out_dir`` holding a complete save
whose recorded key matches (profile's base settings + the miniworld's content hash) is
returned as is. Pretraining checkpoints in ``<out_dir>.work`` make it resumable.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from recap_dagster.t2i.data import corpus_examples
from recap_dagster.t2i.model import build_pipeline, read_saved_meta, save_pipeline
from recap_dagster.t2i.profiles import T2IProfile, get_profile
from recap_dagster.t2i.train import fit_vae, train

log = logging.getLogger(__name__)


def _miniworld_hash(miniworld_dir: str) -> str:
    manifest = json.loads((Path(miniworld_dir) / "manifest.json").read_text(encoding="utf-8"))
    return str(manifest["content_sha256"])


def base_cache_key(miniworld_dir: str, profile: T2IProfile) -> str:
    return f"{profile.base_digest()}-{_miniworld_hash(miniworld_dir)[:16]}"


def build_miniworld_base(
    miniworld_dir: str, out_dir: str, profile: str | T2IProfile = "miniworld"
) -> str:
    """Pretrain (or reuse) the base model on the corpus's alt text; returns ``out_dir``."""
    prof = get_profile(profile)
    key = base_cache_key(miniworld_dir, prof)
    meta = read_saved_meta(out_dir)
    if meta is not None and meta.get("cache_key") == key:
        return out_dir
    root = Path(miniworld_dir)
    started = time.perf_counter()
    examples = corpus_examples(str(root / "laion"), "alttext", prof.corpus_limit)
    pipe = build_pipeline(root / "tokenizer", prof.model, seed=prof.seed)
    vae_losses = fit_vae(
        pipe.vae,
        [e.image for e in examples],
        steps=prof.vae_steps,
        resolution=prof.model.resolution,
        batch_size=prof.vae_batch_size,
        learning_rate=prof.vae_learning_rate,
        seed=prof.seed,
    )
    vae_seconds = time.perf_counter() - started
    work_dir = Path(str(out_dir) + ".work")
    result = train(pipe, examples, prof.base, work_dir)
    save_pipeline(
        result.pipeline,
        out_dir,
        extra={
            "cache_key": key,
            "profile": prof.name,
            "trained_on": "alttext",
            "examples": len(examples),
            "vae_final_loss": vae_losses[-1] if vae_losses else None,
            "vae_seconds": round(vae_seconds, 1),
            "train_steps": result.steps_done,
            "train_final_loss": result.losses[-1] if result.losses else None,
            "seconds": round(time.perf_counter() - started, 1),
        },
    )
    shutil.rmtree(work_dir, ignore_errors=True)
    return out_dir
