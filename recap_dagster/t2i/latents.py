"""The latent cache: every decodable image of a shard encoded once by the base model's VAE.

All caption variants train from these files; none of them decodes an image or runs the
VAE. One safetensors file per shard (no pickle): ``mean`` and ``std`` of the VAE posterior
(unscaled, float32, ``(N, C, h, w)``), with the sample keys and the encoding settings in
its metadata. Files sit under ``t2i_latents/<vae version>/`` so that a new base model
never reads the latents of another VAE.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from recap_dagster.corpus.dataset import (
    ShardBatch,
    ShardBatches,
    completed_shards,
    shard_batch_loader,
)
from recap_dagster.storage.fingerprint import model_fingerprint
from recap_dagster.storage.root import Storage
from recap_dagster.training.cpu_share import CpuShare
from recap_dagster.training.devices import dtype_name
from recap_dagster.training.per_device import DeviceShare, Emit, run_per_device

LATENTS_DIR = "t2i_latents"
FORMAT_VERSION = "1"
# Bump when a change here changes the latents written for the same images and VAE.
CODE_VERSION = "1"


def training_resolution(base_model: str) -> int:
    """The UNet's training resolution in pixels (its latent size times the VAE's
    downsampling), from the two configs alone."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet_config = UNet2DConditionModel.load_config(base_model, subfolder="unet")
    vae_config = AutoencoderKL.load_config(base_model, subfolder="vae")
    return int(unet_config["sample_size"]) * 2 ** (len(vae_config["block_out_channels"]) - 1)


def load_vae(base_model: str, device: torch.device):
    """The base pipeline's VAE on ``device``, the training resolution and the VAE's version."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(base_model, subfolder="vae").to(device)
    return vae, training_resolution(base_model), latent_vae_version(base_model)


def latent_vae_version(base_model: str) -> str:
    """The version of a base pipeline's VAE: the latents' folder and version prefix."""
    return model_fingerprint(Path(base_model) / "vae")


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """As diffusers' text-to-image trainer: shorter side to ``resolution`` (bilinear), then
    a center crop. No flips: they would swap 'left' and 'right' in the captions."""
    image = image.convert("RGB")
    width, height = image.size
    scale = resolution / min(width, height)
    if (width, height) != (resolution, resolution):
        size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR)
        left = (image.width - resolution) // 2
        top = (image.height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    return image


def pixels(images: list[Image.Image], resolution: int) -> torch.Tensor:
    """(N, 3, R, R) in [-1, 1]."""
    arrays = [np.asarray(resize_center_crop(i, resolution), dtype=np.float32) for i in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


@torch.no_grad()
def encode(vae, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of a pixel batch, float32 on the CPU."""
    param = next(vae.parameters())
    dist = vae.encode(batch.to(param.device, param.dtype)).latent_dist
    return dist.mean.float().cpu(), dist.std.float().cpu()


@dataclass
class LatentShard:
    keys: list[str]
    mean: torch.Tensor
    std: torch.Tensor
    meta: dict[str, str] = field(default_factory=dict)


@dataclass
class CacheStats:
    rows: int = 0  # images encoded
    skipped: int = 0  # rows without a decodable image
    bytes_written: int = 0
    seconds: float = 0.0
    shards_written: list[str] = field(default_factory=list)
    shards_kept: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def merge_parallel(self, other: CacheStats) -> None:
        """Add the counts of a process that ran beside this one (the time is the longer)."""
        self.rows += other.rows
        self.skipped += other.skipped
        self.bytes_written += other.bytes_written
        self.seconds = max(self.seconds, other.seconds)
        self.shards_written = sorted(self.shards_written + other.shards_written)
        self.shards_kept = sorted(self.shards_kept + other.shards_kept)


STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def storage_dtype(name: str) -> torch.dtype:
    if name not in STORAGE_DTYPES:
        raise ValueError(f"latent dtype must be one of {sorted(STORAGE_DTYPES)}, got {name!r}")
    return STORAGE_DTYPES[name]


def latent_file(shard: str) -> str:
    return f"{shard}.safetensors"


def write_latent_shard(storage: Storage, vae_version: str, shard: str, data: LatentShard) -> int:
    """Write one shard's latents atomically; returns the bytes written."""
    meta = {**data.meta, "keys": json.dumps(data.keys), "format": FORMAT_VERSION}
    blob = save_safetensors({"mean": data.mean.contiguous(), "std": data.std.contiguous()}, meta)
    storage.write_bytes(blob, LATENTS_DIR, vae_version, latent_file(shard))
    return len(blob)


def read_latent_shard(storage: Storage, vae_version: str, shard: str) -> LatentShard:
    blob = storage.read_bytes(LATENTS_DIR, vae_version, latent_file(shard))
    tensors = load_safetensors(blob)
    meta = _metadata(blob)
    return LatentShard(json.loads(meta.pop("keys")), tensors["mean"], tensors["std"], meta)


def _metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (its JSON header)."""
    size = int.from_bytes(blob[:8], "little")
    return dict(json.loads(blob[8 : 8 + size]).get("__metadata__", {}))


class OpenLatentShard:
    """A shard's latent file opened for row reads: memory-mapped, so only the rows read
    are loaded and processes reading the same file share the page cache. Without
    ``read_std`` (the default training reads only the posterior mean) the file may hold
    ``mean`` alone, and rows come with a zero std."""

    def __init__(self, path: str, read_std: bool = True) -> None:
        from safetensors import safe_open

        self.path = path
        self._file = safe_open(path, framework="pt")
        self.keys: list[str] = json.loads(self._file.metadata()["keys"])
        self._mean = self._file.get_slice("mean")
        self._std = self._file.get_slice("std") if read_std else None

    def row(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of one sample, float32 whatever the cache's dtype."""
        mean = self._mean[index : index + 1][0].float()
        if self._std is None:
            return mean, torch.zeros_like(mean)
        return mean, self._std[index : index + 1][0].float()


def latent_keys(storage: Storage, vae_version: str, shard: str) -> list[str]:
    """The sample keys of a cached shard, read from its safetensors header alone (the
    latents of a 10,000-image shard at 512 px are 1.3 GB)."""
    parts = (LATENTS_DIR, vae_version, latent_file(shard))
    size = int.from_bytes(storage.read_bytes(*parts, start=0, end=8), "little")
    header = json.loads(storage.read_bytes(*parts, start=8, end=8 + size))
    return json.loads(header["__metadata__"]["keys"])


def compare_keys(cached: list[str], decodable: list[str]) -> tuple[bool, str]:
    """Whether a shard's cached latents cover exactly its decodable images, and how not."""
    missing = sorted(set(decodable) - set(cached))
    extra = sorted(set(cached) - set(decodable))
    if not missing and not extra and len(cached) == len(decodable):
        return True, f"{len(cached)} latents, one per decodable image"
    parts = [f"{len(cached)} latents for {len(decodable)} decodable images"]
    if missing:
        parts.append(f"{len(missing)} images without latents {missing[:3]}")
    if extra:
        parts.append(f"{len(extra)} latents of rows not decodable {extra[:3]}")
    if len(cached) != len(set(cached)):
        parts.append("duplicate keys")
    return False, ", ".join(parts)


def has_latent_shard(storage: Storage, vae_version: str, shard: str) -> bool:
    return storage.exists(LATENTS_DIR, vae_version, latent_file(shard))


#: A batch's posterior mean and std.
LatentPair = tuple[torch.Tensor, torch.Tensor]


@dataclass
class PixelBatch:
    """One DataLoader item: a shard's batch of decodable images as pixels, made in a worker."""

    batch: ShardBatch
    keys: list[str]
    pixels: torch.Tensor | None  # (N, 3, R, R) in [-1, 1]; None when nothing decoded
    skipped: int  # rows of the batch without a decodable image

    def pin_memory(self) -> PixelBatch:
        """Page-locked pixels (the DataLoader calls this with ``pin_memory``)."""
        pinned = None if self.pixels is None else self.pixels.pin_memory()
        return PixelBatch(self.batch, self.keys, pinned, self.skipped)


@dataclass(frozen=True)
class ToPixels:
    """DataLoader ``collate_fn``: resize, crop and scale a batch's decodable images."""

    resolution: int

    def __call__(self, batch: ShardBatch) -> PixelBatch:
        decodable = [r for r in batch.records if r.image is not None]
        images = pixels([r.image for r in decodable], self.resolution) if decodable else None
        skipped = len(batch.records) - len(decodable)
        # Only the pixels cross to the main process, not the decoded full-size images.
        batch = dataclasses.replace(batch, records=[])
        return PixelBatch(batch, [r.key for r in decodable], images, skipped)


def encode_shards(
    vae,
    shards_root: str,
    shards: list[str],
    resolution: int,
    batch_size: int = 64,
    num_workers: int = 0,
) -> Iterator[tuple[str, LatentShard, int]]:
    """(shard, its latents, its rows without an image) for each shard, as each completes.

    One DataLoader serves all the shards: workers decode, resize and crop the next batches
    (each reading only its shards) while the VAE encodes. Only latents are held, and only
    of the shards in progress (at most one per worker). Latents are in key order, the
    shard's own order, however the workers split it.
    """
    loader = shard_batch_loader(
        ShardBatches(shards_root, shards, batch_size),
        ToPixels(resolution),
        num_workers,
        pin_memory=next(vae.parameters()).device.type == "cuda",
    )

    def encoded() -> Iterator[tuple[ShardBatch, tuple[list[str], LatentPair | None, int]]]:
        """Each batch's keys, (mean, std) (None: no image in it) and rows skipped."""
        for item in loader:
            pair = None if item.pixels is None else encode(vae, item.pixels)
            yield item.batch, (item.keys, pair, item.skipped)

    for shard, parts in completed_shards(encoded()):
        keys = [key for part_keys, _, _ in parts for key in part_keys]
        if not keys:
            raise ValueError(f"shard {shard} has no decodable image")
        order = sorted(range(len(keys)), key=keys.__getitem__)
        pairs = [pair for _, pair, _ in parts if pair is not None]
        mean = torch.cat([m for m, _ in pairs])[order]
        std = torch.cat([s for _, s in pairs])[order]
        meta = {"shard": shard, "resolution": str(resolution)}
        skipped = sum(part_skipped for _, _, part_skipped in parts)
        yield shard, LatentShard([keys[i] for i in order], mean, std, meta), skipped


def cache_latents(
    vae,
    vae_version: str,
    storage: Storage,
    shards_root: str,
    shards: list[str],
    *,
    resolution: int,
    batch_size: int = 64,
    reuse_existing: bool = True,
    dtype: torch.dtype = torch.float32,
    num_workers: int = 0,
    on_shard: Callable[[str, int, int], None] | None = None,
) -> CacheStats:
    """Encode every shard of ``shards`` not yet cached for this VAE (all with
    ``reuse_existing=False``), stored as ``dtype`` (float16 halves the cache; the stream
    reads it back as float32); ``on_shard(shard, i, n)`` reports progress."""
    stats = CacheStats()
    start = time.perf_counter()
    vae.eval().requires_grad_(False)
    todo = []
    for shard in shards:
        if reuse_existing and has_latent_shard(storage, vae_version, shard):
            stats.shards_kept.append(shard)
        else:
            todo.append(shard)
    with torch.no_grad():
        for shard, data, skipped in encode_shards(
            vae, shards_root, todo, resolution, batch_size, num_workers
        ):
            data.mean, data.std = data.mean.to(dtype), data.std.to(dtype)
            data.meta["dtype"] = dtype_name(dtype)
            stats.bytes_written += write_latent_shard(storage, vae_version, shard, data)
            stats.rows += len(data.keys)
            stats.skipped += skipped
            stats.shards_written.append(shard)
            if on_shard is not None:
                on_shard(shard, len(stats.shards_written), len(todo))
    stats.seconds = time.perf_counter() - start
    return stats


@dataclass(frozen=True)
class LatentJob:
    """A shard group's latent cache, as each process runs its share of it."""

    base_model: str  # a local pipeline directory
    storage_root: str
    shards_root: str
    batch_size: int = 64
    dtype: str = "float32"  # as stored
    reuse_existing: bool = True
    num_workers: int = 0


def cache_share(job: LatentJob, share: DeviceShare, emit: Emit) -> CacheStats:
    """One process's part of a group: the VAE on its device, its shards encoded and written."""
    vae, resolution, vae_version = load_vae(job.base_model, torch.device(share.device))
    return cache_latents(
        vae,
        vae_version,
        Storage(job.storage_root),
        job.shards_root,
        list(share.shards),
        resolution=resolution,
        batch_size=job.batch_size,
        reuse_existing=job.reuse_existing,
        dtype=storage_dtype(job.dtype),
        num_workers=job.num_workers,
        on_shard=lambda shard, i, n: emit({"shard": shard, "done": i, "of": n, "rank": share.rank}),
    )


def cache_group(
    job: LatentJob,
    shards: list[str],
    devices: list[torch.device],
    on_event: Emit | None = None,
    cpu: CpuShare | None = None,
) -> CacheStats:
    """A group's latents cached by one process per device (:func:`run_per_device`, with the
    step's ``cpu`` share)."""
    storage_dtype(job.dtype)  # a bad name fails here, not in every process
    total = CacheStats()
    for stats in run_per_device(partial(cache_share, job), shards, devices, on_event, cpu):
        total.merge_parallel(stats)
    return total
