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
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from recap_dagster.corpus.listing import list_shards
from recap_dagster.corpus.reading import iter_shard
from recap_dagster.miniworld.t2i_profiles import T2IProfile, get_profile
from recap_dagster.storage.root import Storage
from recap_dagster.t2i.latents import cache_latents, encode, load_vae, pixels
from recap_dagster.t2i.model import build_pipeline, load_pipeline, read_saved_meta, save_pipeline
from recap_dagster.t2i.stream import CaptionSource
from recap_dagster.t2i.train import FINAL, TrainJob, train, training_stream

log = logging.getLogger(__name__)


def _miniworld_hash(miniworld_dir: str) -> str:
    manifest = json.loads((Path(miniworld_dir) / "manifest.json").read_text(encoding="utf-8"))
    return str(manifest["content_sha256"])


def base_cache_key(miniworld_dir: str, profile: T2IProfile) -> str:
    return f"{profile.base_digest()}-{_miniworld_hash(miniworld_dir)[:16]}"


def fit_vae(
    vae,
    images,
    *,
    steps: int,
    resolution: int,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    kl_weight: float = 1e-6,
    seed: int = 0,
) -> list[float]:
    """Train a (tiny) AutoencoderKL to reconstruct ``images`` and set its ``scaling_factor``
    so that scaled latents have unit variance (SD's 0.18215 was chosen the same way).

    Needed because the miniworld has no pretrained VAE; SD's own is reused as is.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae.to(device).train()
    data = pixels(list(images), resolution)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=learning_rate, total_steps=max(1, steps), pct_start=0.1
    )
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(data), (batch_size,), generator=gen)
        x = data[idx].to(device)
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen).to(device)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + kl_weight * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    vae.eval()
    mean, _ = encode(vae, data[: min(len(data), 1024)])
    vae.register_to_config(scaling_factor=float(1.0 / mean.std().clamp_min(1e-6)))
    return losses


def build_miniworld_base(
    miniworld_dir: str,
    out_dir: str,
    profile: str | T2IProfile = "miniworld",
    between_steps: Callable[[], None] | None = None,
) -> str:
    """Pretrain (or reuse) the base model on the corpus's alt text; returns ``out_dir``.
    ``between_steps``: the trainer's hook (the CPU share's rebalancer).

    The VAE is fitted first; then the corpus is encoded into a latent cache and the UNet
    and text encoder are trained on its alt text by the same trainer as RECAP's fine-tunes.
    """
    prof = get_profile(profile)
    key = base_cache_key(miniworld_dir, prof)
    meta = read_saved_meta(out_dir)
    if meta is not None and meta.get("cache_key") == key:
        return out_dir
    root = Path(miniworld_dir)
    corpus = str(root / "laion")
    started = time.perf_counter()
    # Resumable: the pipeline with its fitted VAE, the latents and the training state stay
    # in the work folder until the base is saved.
    work = Path(str(out_dir) + ".work")
    init = work / "init"
    init_meta = read_saved_meta(init)
    if init_meta is None or init_meta.get("cache_key") != key:
        shutil.rmtree(work, ignore_errors=True)
        pipe = build_pipeline(root / "tokenizer", prof.model, seed=prof.seed)
        vae_losses = fit_vae(
            pipe.vae,
            [r.image for r in iter_corpus(corpus, prof.corpus_limit)],
            steps=prof.vae_steps,
            resolution=prof.model.resolution,
            batch_size=prof.vae_batch_size,
            learning_rate=prof.vae_learning_rate,
            seed=prof.seed,
        )
        init_meta = {
            "cache_key": key,
            "vae_final_loss": vae_losses[-1] if vae_losses else None,
            "vae_seconds": round(time.perf_counter() - started, 1),
        }
        save_pipeline(pipe, init, extra=init_meta)
    # The latents come from the saved VAE, the one the trained base will carry.
    vae, resolution, vae_version = load_vae(str(init), torch.device("cpu"))
    store = Storage(str(work))
    shards = [info.key for info in list_shards(corpus) if info.complete]
    cache_latents(vae, vae_version, store, corpus, shards, resolution=resolution)
    config = replace(prof.base, snapshot_every=0)
    job = TrainJob(
        base_model=str(init),
        base_version=key,
        storage_root=str(work),
        state_parts=("state",),
        snapshot_parts=("snapshots",),
        data=training_stream(
            config,
            base_model=str(init),
            latents_root=str(work),
            vae_version=vae_version,
            shards=shards,
            captions=CaptionSource(root=corpus, columns=("caption",), ok_status="success"),
        ),
        config=config,
        num_workers=0,
    )
    result = train(job, between_steps=between_steps)
    trained = load_pipeline(str(work / "snapshots" / FINAL), device="cpu")
    save_pipeline(
        trained,
        out_dir,
        extra={
            "cache_key": key,
            "profile": prof.name,
            "trained_on": "alttext",
            "vae_final_loss": init_meta["vae_final_loss"],
            "vae_seconds": init_meta["vae_seconds"],
            "train_steps": prof.base.steps,
            "train_final_loss": result.losses[-1] if result.losses else None,
            "seconds": round(time.perf_counter() - started, 1),
        },
    )
    shutil.rmtree(work, ignore_errors=True)
    return out_dir


def iter_corpus(corpus_root: str, limit: int | None = None) -> Iterator:
    """Decoded, usable records of every shard under ``corpus_root``, in shard order (for
    fitting the miniworld's VAE)."""
    seen = 0
    for info in list_shards(corpus_root):
        for record in iter_shard(corpus_root, info.key):
            if record.image is None:
                continue
            yield record
            seen += 1
            if limit is not None and seen >= limit:
                return
