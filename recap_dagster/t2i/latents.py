"""The latent cache: every decodable image of a shard encoded once by the base model's VAE.

All caption variants train from these files; none of them decodes an image or runs the
VAE. One safetensors file per shard (no pickle): ``mean`` and ``std`` of the VAE posterior
(unscaled, float32, ``(N, C, h, w)``), with the sample keys and the encoding settings in
its metadata. Files sit under ``t2i_latents/<vae version>/`` so that a new base model
never reads the latents of another VAE.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from recap_dagster.corpus.reading import iter_shard
from recap_dagster.storage.fingerprint import model_fingerprint
from recap_dagster.storage.root import Storage

LATENTS_DIR = "t2i_latents"
FORMAT_VERSION = "1"
# Bump when a change here changes the latents written for the same images and VAE.
CODE_VERSION = "1"


def load_vae(base_model: str, device: torch.device):
    """The base pipeline's VAE on ``device``, the UNet's training resolution in pixels (its
    latent size times the VAE's downsampling) and the VAE's version."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    vae = AutoencoderKL.from_pretrained(base_model, subfolder="vae").to(device)
    unet_config = UNet2DConditionModel.load_config(base_model, subfolder="unet")
    resolution = int(unet_config["sample_size"]) * 2 ** (len(vae.config.block_out_channels) - 1)
    return vae, resolution, latent_vae_version(base_model)


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
    are loaded and processes reading the same file share the page cache."""

    def __init__(self, path: str) -> None:
        from safetensors import safe_open

        self.path = path
        self._file = safe_open(path, framework="pt")
        self.keys: list[str] = json.loads(self._file.metadata()["keys"])
        self._mean = self._file.get_slice("mean")
        self._std = self._file.get_slice("std")

    def row(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of one sample, float32 whatever the cache's dtype."""
        mean, std = self._mean[index : index + 1][0], self._std[index : index + 1][0]
        return mean.float(), std.float()


def local_latent_path(storage: Storage, vae_version: str, shard: str, cache_dir: str) -> str:
    """A local path of a shard's latent file: the file itself on local storage, else a copy
    in ``cache_dir`` (fetched once per machine; atomic, so concurrent readers are safe)."""
    if storage.local:
        return storage.uri(LATENTS_DIR, vae_version, latent_file(shard))
    local = str(Path(cache_dir) / vae_version / latent_file(shard))
    if not Path(local).exists():
        storage.download_file(local, LATENTS_DIR, vae_version, latent_file(shard))
    return local


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


def _decodable_batches(
    shards_root: str, shard: str, batch_size: int
) -> Iterator[tuple[list[str], list[Image.Image], int]]:
    """(keys, images, rows skipped) per batch of decodable images, streamed."""
    keys: list[str] = []
    images: list[Image.Image] = []
    skipped = 0
    for record in iter_shard(shards_root, shard):
        if record.image is None:
            skipped += 1
            continue
        keys.append(record.key)
        images.append(record.image)
        if len(images) == batch_size:
            yield keys, images, skipped
            keys, images, skipped = [], [], 0
    if images or skipped:
        yield keys, images, skipped


def encode_shard(
    vae, shards_root: str, shard: str, resolution: int, batch_size: int = 64
) -> tuple[LatentShard, int]:
    """The latents of every decodable image of ``shard`` and the count of rows without one.

    Streams the shard; only its latents (not its images) are held until written.
    """
    all_keys: list[str] = []
    means, stds = [], []
    skipped = 0
    for keys, images, missing in _decodable_batches(shards_root, shard, batch_size):
        skipped += missing
        if images:
            mean, std = encode(vae, pixels(images, resolution))
            all_keys += keys
            means.append(mean)
            stds.append(std)
    if not means:
        raise ValueError(f"shard {shard} has no decodable image")
    meta = {"shard": shard, "resolution": str(resolution)}
    return LatentShard(all_keys, torch.cat(means), torch.cat(stds), meta), skipped


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
    on_shard=None,
) -> CacheStats:
    """Encode every shard of ``shards`` not yet cached for this VAE (all with
    ``reuse_existing=False``), stored as ``dtype`` (float16 halves the cache; the stream
    reads it back as float32); ``on_shard(shard, i, n)`` reports progress."""
    stats = CacheStats()
    start = time.perf_counter()
    vae.eval().requires_grad_(False)
    for i, shard in enumerate(shards):
        if reuse_existing and has_latent_shard(storage, vae_version, shard):
            stats.shards_kept.append(shard)
            continue
        data, skipped = encode_shard(vae, shards_root, shard, resolution, batch_size)
        data.mean, data.std = data.mean.to(dtype), data.std.to(dtype)
        data.meta["dtype"] = str(dtype).removeprefix("torch.")
        stats.bytes_written += write_latent_shard(storage, vae_version, shard, data)
        stats.rows += len(data.keys)
        stats.skipped += skipped
        stats.shards_written.append(shard)
        if on_shard is not None:
            on_shard(shard, i + 1, len(shards))
    stats.seconds = time.perf_counter() - start
    return stats
