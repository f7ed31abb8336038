"""Fine-tune a Stable Diffusion pipeline on (image, captions) pairs — RECAP step 3.

The paper trains UNet and CLIP text encoder together (lr 1e-5, batch 512, prompt dropout
0.14 for classifier-free guidance). :func:`train` does that with accelerate (device
placement, gradient accumulation, mixed precision), optional EMA and resumable, atomic
checkpoints. Each sample carries one or more captions and every draw picks one uniformly
(RECAP Mix: ``captions=(short, long)``); with probability ``prompt_dropout`` the caption is
replaced by the empty prompt, which is what the pipeline uses as its unconditional input.

Determinism: every random choice of step ``s`` (samples, captions, dropout, noise,
timesteps) comes from generators seeded by ``(seed, s)``. A resumed run therefore replays
exactly the draws an uninterrupted run would have made, on top of the restored model,
optimizer, LR schedule and EMA state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
_META = "recap_train.json"  # inside a checkpoint: step, fingerprint, losses


@dataclass(frozen=True)
class TrainingExample:
    """One training image and the captions to choose from (uniformly, per draw)."""

    image: Image.Image
    captions: tuple[str, ...]


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning settings. Defaults are the paper's where it states them."""

    steps: int = 100
    learning_rate: float = 1e-5
    batch_size: int = 512  # effective batch: micro_batch_size x accumulation
    micro_batch_size: int = 64
    prompt_dropout: float = 0.14
    train_unet: bool = True
    train_text_encoder: bool = True
    text_encoder_lr_scale: float = 1.0
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"
    use_ema: bool = False
    ema_decay: float = 0.999
    lr_scheduler: str = "constant_with_warmup"  # any diffusers.optimization name
    lr_warmup_steps: int = 0
    adam_weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    snr_gamma: float | None = None  # Min-SNR loss weighting (Hang et al. 2023); None: off
    noise_offset: float = 0.0
    # Train on the VAE posterior mean (False) or a sample from it (True, SD's trainer). A
    # briefly trained tiny VAE keeps a posterior std about as large as the latents' spread
    # (its decoder learns to ignore it), so sampling hands the UNet half-noise targets:
    # measured eps-loss 0.55 and pure-noise samples. SD's VAE has a tiny std, so for it
    # the two are the same.
    sample_latents: bool = False
    checkpoint_every: int = 0  # optimizer steps; 0: only at the end
    keep_checkpoints: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        # Checked here, not at the first optimizer step of a long run.
        from diffusers.optimization import SchedulerType

        known = [s.value for s in SchedulerType]
        if self.lr_scheduler not in known:
            raise ValueError(f"lr_scheduler must be one of {known}, got {self.lr_scheduler!r}")

    @property
    def accumulation_steps(self) -> int:
        if self.batch_size % self.micro_batch_size:
            raise ValueError("batch_size must be a multiple of micro_batch_size")
        return self.batch_size // self.micro_batch_size

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed from (not the length or cadence)."""
        data = asdict(self)
        for key in ("steps", "checkpoint_every", "keep_checkpoints"):
            data.pop(key)
        return data


@dataclass
class TrainResult:
    losses: list[float]  # one per optimizer step, from step 1 (including resumed ones)
    steps_done: int
    resumed_from: int | None  # checkpoint step resumed from, None for a fresh start
    pipeline: Any = field(repr=False, default=None)


# ------------------------------------------------------------------------------ captions


def select_caption(captions: Sequence[str], rng: random.Random, dropout: float) -> str:
    """One draw: the empty prompt with probability ``dropout``, else a uniform caption."""
    if rng.random() < dropout:
        return ""
    return captions[rng.randrange(len(captions))]


def _step_seed(seed: int, step: int, salt: str) -> int:
    digest = hashlib.blake2b(f"{seed}/{step}/{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << 63) - 1)


# --------------------------------------------------------------------------------- data


def images_to_tensor(images: Sequence[Image.Image], resolution: int) -> torch.Tensor:
    """(N, 3, R, R) in [-1, 1]. No flips: they would swap 'left' and 'right'."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if image.size != (resolution, resolution):
            image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(image, dtype=np.float32))
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return pixels / 127.5 - 1.0


@torch.no_grad()
def encode_latents(
    vae, pixels: torch.Tensor, device: torch.device, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image, unscaled, on the CPU. The VAE is frozen, so
    this is done once and each step samples ``mean + std * noise`` (as SD's trainer does)."""
    means, stds = [], []
    dtype = next(vae.parameters()).dtype
    for start in range(0, len(pixels), batch_size):
        batch = pixels[start : start + batch_size].to(device, dtype)
        dist = vae.encode(batch).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def fit_vae(
    vae,
    images: Sequence[Image.Image],
    *,
    steps: int,
    resolution: int,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    kl_weight: float = 1e-6,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> list[float]:
    """Train a (tiny) AutoencoderKL to reconstruct ``images`` and set its ``scaling_factor``
    so that scaled latents have unit variance (SD's 0.18215 was chosen the same way).

    Needed because the miniworld has no pretrained VAE; SD's own is reused as is.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vae.to(device).train()
    pixels = images_to_tensor(images, resolution)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=learning_rate, total_steps=max(1, steps), pct_start=0.1
    )
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(pixels), (batch_size,), generator=gen)
        x = pixels[idx].to(device)
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
    mean, _ = encode_latents(vae, pixels[: min(len(pixels), 1024)], device)
    vae.register_to_config(scaling_factor=float(1.0 / mean.std().clamp_min(1e-6)))
    return losses


# --------------------------------------------------------------------------- checkpoints


def _checkpoints(work_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed into place), oldest first."""
    found = []
    if work_dir.is_dir():
        for entry in work_dir.iterdir():
            match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", entry.name)
            if match and (entry / _META).exists():
                found.append((int(match.group(1)), entry))
    return sorted(found)


def _fingerprint_digest(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _reset_accelerate_state() -> None:
    """accelerate keeps process-wide state that refuses a second Accelerator with another
    mixed precision or accumulation; one process may train several models in turn."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    if PartialState().num_processes == 1:
        AcceleratorState._reset_state()
        GradientState._reset_state()


def _save_checkpoint(
    accelerator, work_dir: Path, step: int, meta: dict[str, Any], keep: int
) -> Path:
    """save_state into a temp dir, then rename: a killed run never leaves a half one."""
    work_dir.mkdir(parents=True, exist_ok=True)
    final = work_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{CHECKPOINT_PREFIX}{step}-", dir=work_dir))
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        (tmp / _META).write_text(json.dumps(meta), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in _checkpoints(work_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _clean_work_dir(work_dir: Path, fingerprint: str) -> None:
    """Drop leftovers of killed saves and checkpoints of a different run configuration."""
    if not work_dir.is_dir():
        return
    for entry in work_dir.iterdir():
        if entry.name.startswith(f".tmp-{CHECKPOINT_PREFIX}"):
            shutil.rmtree(entry, ignore_errors=True)
    for step, path in _checkpoints(work_dir):
        meta = json.loads((path / _META).read_text(encoding="utf-8"))
        if meta.get("fingerprint") != fingerprint:
            log.warning("removing checkpoint %s of a different run configuration", path)
            shutil.rmtree(path, ignore_errors=True)
        del step


# ------------------------------------------------------------------------------ training


def _as_pipeline(pipe_or_dir):
    if isinstance(pipe_or_dir, str | os.PathLike):
        from recap_dagster.t2i.model import load_pipeline

        return load_pipeline(pipe_or_dir, device="cpu")
    return pipe_or_dir


def train(
    pipe_or_dir,
    examples: Sequence[TrainingExample],
    config: TrainConfig,
    work_dir: str | os.PathLike,
    *,
    on_step: Callable[[int, float], None] | None = None,
    on_checkpoint: Callable[[int, str], None] | None = None,
) -> TrainResult:
    """Fine-tune UNet and/or text encoder of a pipeline for ``config.steps`` optimizer steps.

    The pipeline (or the one loaded from a directory) is updated in place and returned in
    the result, with EMA weights copied in when ``use_ema``. Checkpoints go to
    ``work_dir/checkpoint-<step>``; calling again with the same ``work_dir`` resumes from
    the latest one made with the same configuration and data.
    """
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel, compute_snr

    if not examples:
        raise ValueError("no training examples")
    if not (config.train_unet or config.train_text_encoder):
        raise ValueError("nothing to train")
    pipe = _as_pipeline(pipe_or_dir)
    work = Path(work_dir)
    accum = config.accumulation_steps
    _reset_accelerate_state()
    accelerator = Accelerator(
        gradient_accumulation_steps=accum, mixed_precision=config.mixed_precision
    )
    device = accelerator.device
    unet, text_encoder, vae, tokenizer = pipe.unet, pipe.text_encoder, pipe.vae, pipe.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    # Sampling schedulers may store a prediction type; training must use the same.
    prediction_type = noise_scheduler.config.prediction_type
    resolution = unet.config.sample_size * (2 ** (len(vae.config.block_out_channels) - 1))

    torch.manual_seed(config.seed)
    # Latents once: the VAE is frozen. Fingerprint covers the data, so a resume never mixes
    # two datasets.
    vae.to(device).eval().requires_grad_(False)
    pixels = images_to_tensor([e.image for e in examples], resolution)
    lat_mean, lat_std = encode_latents(vae, pixels, device)
    del pixels
    scaling = float(vae.config.scaling_factor)
    data_hash = hashlib.sha256(lat_mean.numpy().tobytes())
    for e in examples:
        data_hash.update("\x1f".join(e.captions).encode() + b"\x1e")
    fingerprint = _fingerprint_digest(
        {"config": config.fingerprint(), "data": data_hash.hexdigest()}
    )
    _clean_work_dir(work, fingerprint)

    # Token ids per distinct caption (captions repeat across steps).
    token_cache: dict[str, torch.Tensor] = {}

    def token_ids(texts: list[str]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in token_cache]
        if missing:
            ids = tokenizer(
                missing,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            token_cache.update(zip(missing, ids, strict=True))
        return torch.stack([token_cache[t] for t in texts])

    unet.requires_grad_(config.train_unet)
    text_encoder.requires_grad_(config.train_text_encoder)
    unet.train(config.train_unet)
    text_encoder.train(config.train_text_encoder)
    params: list[dict[str, Any]] = []
    if config.train_unet:
        params.append({"params": list(unet.parameters()), "lr": config.learning_rate})
    if config.train_text_encoder:
        params.append(
            {
                "params": list(text_encoder.parameters()),
                "lr": config.learning_rate * config.text_encoder_lr_scale,
            }
        )
    optimizer = torch.optim.AdamW(params, weight_decay=config.adam_weight_decay)
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        # accelerate's prepared scheduler advances once per synced (optimizer) step.
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=max(1, config.steps),
    )
    unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(
        unet, text_encoder, optimizer, lr_scheduler
    )
    emas: list[tuple[Any, Any]] = []
    if config.use_ema:
        for model, trained in (
            (unet, config.train_unet),
            (text_encoder, config.train_text_encoder),
        ):
            if trained:
                base = accelerator.unwrap_model(model)
                ema = EMAModel(base.parameters(), decay=config.ema_decay)
                ema.to(device)
                accelerator.register_for_checkpointing(ema)
                emas.append((ema, model))

    losses: list[float] = []
    start = 0
    resumed_from = None
    existing = [(s, p) for s, p in _checkpoints(work) if s <= config.steps]
    if existing:
        start, path = existing[-1]
        accelerator.load_state(str(path))
        meta = json.loads((path / _META).read_text(encoding="utf-8"))
        losses = list(meta.get("losses", []))[:start]
        resumed_from = start
        log.info("resuming from %s", path)

    def save(step: int) -> None:
        meta = {"step": step, "fingerprint": fingerprint, "losses": losses}
        path = _save_checkpoint(accelerator, work, step, meta, config.keep_checkpoints)
        if on_checkpoint is not None:
            on_checkpoint(step, str(path))

    n = len(examples)
    for step in range(start + 1, config.steps + 1):
        rng = random.Random(_step_seed(config.seed, step, "captions"))
        gen = torch.Generator().manual_seed(_step_seed(config.seed, step, "noise"))
        step_loss = 0.0
        for _ in range(accum):
            with accelerator.accumulate(unet, text_encoder):
                idx = torch.randint(0, n, (config.micro_batch_size,), generator=gen)
                texts = [
                    select_caption(examples[i].captions, rng, config.prompt_dropout)
                    for i in idx.tolist()
                ]
                ids = token_ids(texts).to(device)
                mean, std = lat_mean[idx], lat_std[idx]
                eps = torch.randn(mean.shape, generator=gen)  # drawn always: same RNG stream
                latents = (mean + std * eps if config.sample_latents else mean) * scaling
                noise = torch.randn(latents.shape, generator=gen)
                if config.noise_offset:
                    noise += config.noise_offset * torch.randn(
                        (latents.shape[0], latents.shape[1], 1, 1), generator=gen
                    )
                timesteps = torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=gen
                )
                latents, noise, timesteps = (
                    latents.to(device),
                    noise.to(device),
                    timesteps.to(device),
                )
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                if prediction_type == "epsilon":
                    target = noise
                elif prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                else:
                    raise ValueError(f"unsupported prediction type {prediction_type!r}")
                with accelerator.autocast():
                    if config.train_text_encoder:
                        hidden = text_encoder(ids, return_dict=False)[0]
                    else:
                        with torch.no_grad():
                            hidden = text_encoder(ids, return_dict=False)[0]
                    pred = unet(noisy, timesteps, hidden, return_dict=False)[0]
                if config.snr_gamma is None:
                    loss = F.mse_loss(pred.float(), target.float())
                else:
                    snr = compute_snr(noise_scheduler, timesteps)
                    weight = torch.clamp(snr, max=config.snr_gamma) / snr
                    if prediction_type == "v_prediction":
                        weight = torch.clamp(snr, max=config.snr_gamma) / (snr + 1)
                    per = F.mse_loss(pred.float(), target.float(), reduction="none")
                    loss = (per.mean(dim=(1, 2, 3)) * weight).mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    trained = [p for g in params for p in g["params"]]
                    accelerator.clip_grad_norm_(trained, config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step_loss += float(loss.detach()) / accum
        for ema, model in emas:
            ema.step(accelerator.unwrap_model(model).parameters())
        losses.append(step_loss)
        if on_step is not None:
            on_step(step, step_loss)
        if config.checkpoint_every and step % config.checkpoint_every == 0:
            save(step)
    if config.steps > start and not (
        config.checkpoint_every and config.steps % config.checkpoint_every == 0
    ):
        save(config.steps)

    unet = accelerator.unwrap_model(unet)
    text_encoder = accelerator.unwrap_model(text_encoder)
    for ema, model in emas:
        ema.copy_to(accelerator.unwrap_model(model).parameters())
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    pipe.unet, pipe.text_encoder = unet, text_encoder
    accelerator.free_memory()
    if not math.isfinite(losses[-1] if losses else 0.0):
        raise FloatingPointError("training diverged (non-finite loss)")
    return TrainResult(
        losses=losses, steps_done=config.steps, resumed_from=resumed_from, pipeline=pipe
    )
