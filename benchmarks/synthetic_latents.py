"""A synthetic latent cache for the text-to-image benchmarks: random latents of a model's
shape and short captions, written as ``t2i_latents`` and the caption tables are, so any
number of shards is made in seconds; and the trainer job that reads them."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import torch

from recap_dagster.storage.root import Storage
from recap_dagster.t2i.latents import LatentShard, write_latent_shard
from recap_dagster.t2i.stream import CaptionSource
from recap_dagster.t2i.train import TrainConfig, TrainJob, training_stream

WORDS = ["red", "blue", "green", "circle", "square", "triangle", "two", "three", "left"]
VAE_VERSION = "v"


def write_cache(
    root: str | Path, shape: tuple[int, int, int], shards: int, per_shard: int
) -> list[str]:
    """``shards`` shards of ``per_shard`` random latents of ``shape`` (C, h, w) under the
    storage root ``root``, with their caption tables under ``captions/``; their names."""
    store = Storage(str(root))
    gen = torch.Generator().manual_seed(0)
    names = [f"{i:05d}" for i in range(shards)]
    for shard in names:
        keys = [f"{shard}{i:05d}" for i in range(per_shard)]
        mean = torch.randn((per_shard, *shape), generator=gen)
        latents = LatentShard(keys, mean, torch.ones_like(mean))
        write_latent_shard(store, VAE_VERSION, shard, latents)
        captions = [
            " ".join(WORDS[(i + j) % len(WORDS)] for j in range(4)) for i in range(per_shard)
        ]
        table = pa.table({"key": keys, "status": ["ok"] * per_shard, "caption": captions})
        store.write_parquet(table, "captions", f"{shard}.parquet")
    return names


def cache_job(
    model: str,
    store: str,
    shards: list[str],
    out: str,
    config: TrainConfig,
    *,
    base_version: str,
    mixed_precision: str = "no",
    num_workers: int = 1,
) -> TrainJob:
    """The trainer's job over ``shards`` of the synthetic cache at ``store``."""
    return TrainJob(
        base_model=model,
        base_version=base_version,
        storage_root=out,
        state_parts=("state",),
        snapshot_parts=("snapshots",),
        data=training_stream(
            config,
            base_model=model,
            latents_root=store,
            vae_version=VAE_VERSION,
            shards=shards,
            captions=CaptionSource(root=store, prefix=("captions",)),
        ),
        config=config,
        mixed_precision=mixed_precision,
        num_workers=num_workers,
    )
