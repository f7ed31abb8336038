"""Fine-tune a Stable Diffusion pipeline on cached latents and captions — RECAP step 3.

A standalone command, like diffusers' training scripts, usable without Dagster::

    torchrun --standalone --nproc_per_node N -m recap_dagster.t2i.train --job job.json

(``accelerate launch`` works too). The job file (:class:`TrainJob`) names the base
pipeline, the latent cache, the caption tables and where the training state and the
snapshots go under the storage root (local folder or ``s3://``). ``sd_checkpoints``
launches it through Dagster Pipes; under Pipes, process 0 sends its log lines, loss and
progress to the Dagster run.

The paper trains UNet and CLIP text encoder together (lr 1e-5, batch 512, prompt dropout
0.14, RECAP Mix = short or long per sample). One run has one LR schedule over all its
steps; the diffusers snapshots behind the metric-versus-steps curves are written from
inside it. Training state (models, optimizer, LR schedule, EMA, RNG, data position) is
checkpointed under the storage root, so a run killed anywhere resumes on another machine
and ends with the weights an uninterrupted run would have.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from recap_dagster.storage.fingerprint import VERSION_FILE, weights_fingerprint
from recap_dagster.storage.root import Storage
from recap_dagster.t2i import runs
from recap_dagster.t2i.stream import CaptionSource, DataPosition, LatentStream, StreamSpec
from recap_dagster.training.cpu_share import CpuShare, Rebalancer
from recap_dagster.training.substrate import (
    Checkpoints,
    check_lr_scheduler,
    check_mixed_precision,
    from_main_process,
    lr_schedule,
    make_accelerator,
    seed_everything,
    setting,
)

log = logging.getLogger(__name__)

SNAPSHOTS_FILE = "snapshots.json"
OPTIMIZERS = ("adamw", "adamw_fused", "adamw_8bit")
#: Settings a run may change between its attempts and still resume its state.
RESUMABLE_ACROSS = (
    "steps",
    "micro_batch_size",
    "gradient_checkpointing",
    "ema_offload",
    "checkpoint_every",
    "keep_checkpoints",
    "snapshot_every",
)
#: A UNet over this many parameters is real-size: gradient checkpointing on by default.
CHECKPOINTING_AUTO_PARAMETERS = 100_000_000
# Bump when a change here changes the weights trained from the same data and settings:
# Dagster then shows every fine-tune as stale (sd_checkpoints' code_version).
CODE_VERSION = "1"
FINAL = "final"


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning settings: the one definition (``sd_checkpoints``' Dagster config is
    derived from it). Defaults are the paper's recipe where it states them (SD v1.4:
    lr 1e-5, batch 512, prompt dropout 0.14, UNet and text encoder trained)."""

    steps: int = setting(1000, "Optimizer steps of the whole run.")
    learning_rate: float = setting(1e-5, "Peak AdamW learning rate.")
    batch_size: int = setting(
        512, "Effective batch: micro_batch_size x processes x gradient accumulation."
    )
    micro_batch_size: int = setting(
        0,
        "Images per process and forward pass. 0: the largest power of two that divides the "
        "per-process batch and fits the GPU by the estimate of t2i/memory.py (64 on CPU).",
    )
    gradient_checkpointing: bool | None = setting(
        None,
        "Recompute activations in the backward pass (UNet and the trained text encoder): "
        "about 30% slower, a fraction of the activation memory. None: on when the UNet has "
        "over 100 M parameters (every real SD), off for the miniworld's.",
    )
    optimizer: str = setting(
        "adamw",
        "adamw (torch, foreach), adamw_fused (torch's fused kernel, CUDA and CPU) or "
        "adamw_8bit (bitsandbytes' AdamW8bit: 2 bytes of state per parameter instead of 8).",
    )
    prompt_dropout: float = setting(
        0.14, "Probability of training on the empty prompt (for classifier-free guidance)."
    )
    train_unet: bool = setting(True, "Train the UNet.")
    train_text_encoder: bool = setting(True, "Train the CLIP text encoder.")
    text_encoder_lr_scale: float = setting(1.0, "Text encoder lr = learning_rate x this.")
    use_ema: bool = setting(
        False, "Keep an EMA of the weights (on the main process only); snapshots hold it."
    )
    ema_decay: float = setting(0.9999, "EMA decay (diffusers' EMAModel).")
    ema_offload: bool = setting(
        False,
        "Keep the EMA in CPU memory, moved to the GPU for each update (diffusers' "
        "--offload_ema): saves a fp32 copy of the weights on the GPU.",
    )
    lr_scheduler: str = setting(
        "constant_with_warmup",
        "LR schedule over the whole run after the warmup: constant, constant_with_warmup, "
        "linear, cosine, cosine_with_min_lr.",
    )
    lr_warmup_steps: int = setting(0, "Linear warmup steps.")
    adam_weight_decay: float = setting(1e-2, "AdamW weight decay.")
    max_grad_norm: float = setting(1.0, "Gradient norm clipping (0: off).")
    snr_gamma: float | None = setting(
        None, "Min-SNR loss weighting gamma (Hang et al. 2023); None: plain MSE, as the paper."
    )
    noise_offset: float = setting(0.0, "Offset noise strength (0: off).")
    # A briefly trained tiny VAE keeps a posterior std about as large as the latents'
    # spread (its decoder learns to ignore it), so sampling hands the UNet half-noise
    # targets: measured eps-loss 0.55 and pure-noise samples. SD's VAE has a tiny std.
    sample_latents: bool = setting(
        False, "Train on a sample of the VAE posterior (SD's trainer) instead of its mean."
    )
    window_shards: int = setting(4, "Shards the data stream mixes at a time (memory bound).")
    checkpoint_every: int = setting(
        100, "Optimizer steps between resumable training states (under the storage root)."
    )
    keep_checkpoints: int = setting(2, "Resumable states kept.")
    snapshot_every: int = setting(
        250, "Optimizer steps between diffusers snapshots for the metric curves (0: final)."
    )
    seed: int = setting(0, "Seed of the data order, captions, dropout, noise and timesteps.")

    def __post_init__(self) -> None:
        check_lr_scheduler(self.lr_scheduler)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.steps < 1 or self.micro_batch_size < 0:
            raise ValueError("steps must be >= 1 and micro_batch_size >= 0 (0: automatic)")
        if not (self.train_unet or self.train_text_encoder):
            raise ValueError("nothing to train: train_unet and train_text_encoder are off")

    def accumulation_steps(self, processes: int, micro_batch_size: int | None = None) -> int:
        per_step = (micro_batch_size or self.micro_batch_size) * processes
        if not per_step or self.batch_size % per_step:
            raise ValueError(
                f"batch_size {self.batch_size} must be a multiple of micro_batch_size x "
                f"processes = {per_step}"
            )
        return self.batch_size // per_step

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed from. Not the run's length (a run
        can be extended), nor what only changes how the same batches are computed (the
        micro-batch, checkpointing, EMA placement: a run that ran out of memory resumes
        with smaller micro-batches), nor the cadence of its saves."""
        data = asdict(self)
        for key in RESUMABLE_ACROSS:
            data.pop(key)
        return data


def milestones(steps: int, every: int) -> list[int]:
    """Snapshot steps: every ``every`` steps, always ending at ``steps``."""
    points = list(range(every, steps, every)) if every > 0 else []
    return [*points, steps]


@dataclass(frozen=True)
class TrainJob:
    """One training run: what the standalone command reads from its job file."""

    base_model: str  # diffusers pipeline directory to fine-tune
    base_version: str  # fingerprint of its weights (a new base starts a new run)
    storage_root: str  # where the state and the snapshots go (local or s3://)
    state_parts: tuple[str, ...]  # resumable training state under the root
    snapshot_parts: tuple[str, ...]  # diffusers snapshots under the root
    data: StreamSpec
    config: TrainConfig = field(default_factory=TrainConfig)
    mixed_precision: str = "no"
    num_workers: int = 1  # DataLoader workers per process (data order does not depend on it)
    snapshot_meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_mixed_precision(self.mixed_precision)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainJob:
        data = json.loads(text)
        return cls(
            **{
                **data,
                "state_parts": tuple(data["state_parts"]),
                "snapshot_parts": tuple(data["snapshot_parts"]),
                "data": StreamSpec.from_dict(data["data"]),
                "config": TrainConfig(**data["config"]),
            }
        )

    def settings_key(self) -> str:
        """What two runs must share for one to continue the other's state, whatever their
        shard lists (see :mod:`recap_dagster.t2i.runs`)."""
        # Not the base model's path: it differs between machines; its weights' version
        # identifies it.
        data = self.data.to_dict()
        data.pop("shards")
        payload = {
            "base_version": self.base_version,
            "data": data,
            "config": self.config.fingerprint(),
            "mixed_precision": self.mixed_precision,
        }
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def fingerprint(self) -> str:
        """The run's identity (its state folder): settings and shard list. A checkpoint of
        another run is never resumed from."""
        blob = json.dumps([self.settings_key(), list(self.data.shards)]).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def run_parts(self) -> tuple[str, ...]:
        """The run's state folder under the storage root."""
        return (*self.state_parts, self.fingerprint())


def training_stream(
    config: TrainConfig,
    *,
    base_model: str,
    latents_root: str,
    vae_version: str,
    shards: list[str],
    captions: CaptionSource,
) -> StreamSpec:
    """The data stream of a run with ``config`` over ``shards`` of the latent cache."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.load_config(base_model, subfolder="scheduler")
    return StreamSpec(
        latents_root=latents_root,
        vae_version=vae_version,
        shards=tuple(shards),
        captions=captions,
        seed=config.seed,
        prompt_dropout=config.prompt_dropout,
        window_shards=config.window_shards,
        num_train_timesteps=int(scheduler["num_train_timesteps"]),
        noise_offset=config.noise_offset,
        read_std=config.sample_latents,
    )


@dataclass
class TrainResult:
    losses: list[float]  # one per optimizer step, from step 1 (including resumed ones)
    snapshots: list[dict[str, Any]]  # {"step", "name", "version"} in step order
    resumed_from: int | None  # checkpoint step resumed from, None for a fresh start
    extended_from: int | None = None  # the step a finished run was extended from
    micro_batch_size: int = 0  # as resolved (the setting may be 0: automatic)
    processes: int = 1
    seconds: float = 0.0
    first_step_seconds: float = 0.0  # from the call to the end of the first optimizer step
    first_step_at: float = 0.0  # wall clock (time.time()) at the end of the first step
    steady_samples_per_second: float = 0.0  # after the first step (no start-up)
    samples: int = 0  # samples trained on by this call (all processes)
    #: Prompts of this call's batches (all processes) longer than the text encoder's context,
    #: cut by the tokenizer: recaptions arrive trimmed, so more than 0 needs a look.
    truncated_prompts: int = 0


ProgressFn = Callable[[int, int, float, float], None]  # step, steps, loss, samples/s


def _loss(pred: torch.Tensor, target: torch.Tensor, timesteps, scheduler, config) -> torch.Tensor:
    """Mean squared error, optionally Min-SNR weighted per sample (diffusers' formula)."""
    if config.snr_gamma is None:
        return F.mse_loss(pred.float(), target.float())
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=config.snr_gamma)
    weight = (
        clipped / (snr + 1)
        if scheduler.config.prediction_type == "v_prediction"
        else (clipped / snr)
    )
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weight).mean()


def use_gradient_checkpointing(config: TrainConfig, unet: torch.nn.Module) -> bool:
    """The setting, or when unset: on for real-size UNets (over 100 M parameters)."""
    if config.gradient_checkpointing is not None:
        return config.gradient_checkpointing
    return sum(p.numel() for p in unet.parameters()) > CHECKPOINTING_AUTO_PARAMETERS


#: The automatic micro-batch on a CPU (no device memory to size it by).
CPU_MICRO_BATCH = 64


def resolve_micro_batch(
    config: TrainConfig,
    processes: int,
    unet,
    text_encoder,
    device: torch.device,
    mixed_precision: str = "no",
) -> int:
    """``micro_batch_size``, or when 0 the largest power of two that divides the
    per-process batch and fits this GPU's free memory by :mod:`recap_dagster.t2i.memory`'s
    estimate (at most 64 on a CPU)."""
    if config.micro_batch_size:
        return config.micro_batch_size
    per_process = config.batch_size // processes
    if per_process < 1 or config.batch_size % processes:
        raise ValueError(
            f"batch_size {config.batch_size} does not split over {processes} processes"
        )
    limit = CPU_MICRO_BATCH
    if device.type == "cuda":
        from recap_dagster.t2i.memory import largest_micro_batch_for

        limit = largest_micro_batch_for(
            config, unet, text_encoder, processes, device, mixed_precision=mixed_precision
        )
        if limit < 1:
            raise RuntimeError(
                "even a micro-batch of 1 does not fit this GPU by the estimate: turn on "
                "gradient_checkpointing, use adamw_8bit, ema_offload or bf16 (see "
                "benchmarks/t2i_memory.py)"
            )
    size = 1
    while size * 2 <= min(limit, per_process) and per_process % (size * 2) == 0:
        size *= 2
    return size


def make_optimizer(config: TrainConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """AdamW as the setting names it (all three take the same parameter groups)."""
    kwargs = {"weight_decay": config.adam_weight_decay}
    if config.optimizer == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ImportError(
                "optimizer adamw_8bit needs bitsandbytes: pip install bitsandbytes"
            ) from error
        return bnb.optim.AdamW8bit(groups, **kwargs)
    fused = config.optimizer == "adamw_fused"
    return torch.optim.AdamW(groups, fused=fused or None, foreach=None if fused else True, **kwargs)


def _archive_final(accelerator, job: TrainJob, entry: dict[str, Any]) -> dict[str, Any]:
    """Before a finished run is extended, keep its final snapshot as ``step-N`` (the
    extension writes ``final`` again); returns the renamed entry."""
    name = f"step-{entry['step']:06d}"
    if accelerator.is_main_process:
        store = Storage(job.storage_root)
        if not store.dir_complete(*job.snapshot_parts, name):
            with (
                store.local_dir(*job.snapshot_parts, FINAL) as final,
                store.atomic_dir(*job.snapshot_parts, name) as staging,
            ):
                shutil.copytree(final, staging, dirs_exist_ok=True)
    accelerator.wait_for_everyone()
    return {**entry, "name": name}


def train(
    job: TrainJob,
    *,
    on_progress: ProgressFn | None = None,
    on_snapshot: Callable[[dict[str, Any]], None] | None = None,
    between_steps: Callable[[], None] | None = None,
) -> TrainResult:
    """Run (or resume) ``job`` in this process, one of N when launched by torchrun.
    ``between_steps`` is called on every process before each step (the CPU share's
    rebalancer)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    from recap_dagster.t2i.model import load_pipeline, set_gradient_checkpointing

    config = job.config
    started = time.perf_counter()
    seed_everything(config.seed)
    accelerator = make_accelerator(job.mixed_precision)
    processes, rank = accelerator.num_processes, accelerator.process_index
    device = accelerator.device
    store = Storage(job.storage_root)
    fingerprint = job.fingerprint()
    checkpoints = Checkpoints(
        store, *job.run_parts, fingerprint=fingerprint, keep=config.keep_checkpoints
    )
    if accelerator.is_main_process:
        runs.record_start(store, job.run_parts, job)

    pipe = load_pipeline(job.base_model, device="cpu")
    unet, text_encoder, tokenizer = pipe.unet, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"unsupported prediction type {prediction_type!r}")
    scaling = float(pipe.vae.config.scaling_factor)
    unet.requires_grad_(config.train_unet).train(config.train_unet)
    text_encoder.requires_grad_(config.train_text_encoder).train(config.train_text_encoder)
    if use_gradient_checkpointing(config, unet):
        for model, trained in (
            (unet, config.train_unet),
            (text_encoder, config.train_text_encoder),
        ):
            if trained:
                set_gradient_checkpointing(model, True)
    micro_batch = resolve_micro_batch(
        config, processes, unet, text_encoder, device, job.mixed_precision
    )
    # Known only once the process group is up; accelerate then skips the optimizer step
    # and the gradient sync on all but the last micro-batch of each step.
    accum = config.accumulation_steps(processes, micro_batch)
    accelerator.gradient_accumulation_steps = accum
    groups: list[dict[str, Any]] = []
    if config.train_unet:
        groups.append({"params": list(unet.parameters()), "lr": config.learning_rate})
    if config.train_text_encoder:
        lr = config.learning_rate * config.text_encoder_lr_scale
        groups.append({"params": list(text_encoder.parameters()), "lr": lr})
    trained = [p for g in groups for p in g["params"]]
    optimizer = make_optimizer(config, groups)
    # Stepped by hand once per optimizer step over the whole run (accelerate's wrapper
    # would step it once per process). Its length is the run's current ``steps``: a run
    # extended to more steps re-spans it (LambdaLR saves its step, not its length).
    scheduler = lr_schedule(
        config.lr_scheduler,
        optimizer,
        warmup_steps=config.lr_warmup_steps,
        total_steps=config.steps,
    )
    accelerator.register_for_checkpointing(scheduler)
    unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
    # The EMA lives on the main process only (it alone writes snapshots): registered last,
    # so the other processes' custom-state indices are the same without it.
    emas: list[tuple[Any, Any]] = []
    ema_device = torch.device("cpu") if config.ema_offload else device
    if config.use_ema and accelerator.is_main_process:
        for model, on in ((unet, config.train_unet), (text_encoder, config.train_text_encoder)):
            if on:
                parameters = accelerator.unwrap_model(model).parameters()
                ema = EMAModel(parameters, decay=config.ema_decay, foreach=True)
                ema.to(ema_device)
                accelerator.register_for_checkpointing(ema)
                emas.append((ema, model))

    losses: list[float] = []
    snapshots: list[dict[str, Any]] = []
    position = DataPosition()
    start_step, resumed_from = 0, None
    extended_from = None
    latest = checkpoints.latest(up_to=config.steps)
    if latest is not None:
        checkpoints.load(accelerator, latest)
        # accelerate restores its micro-step counter, counted with the accumulation of the
        # run that saved it; states are saved between optimizer steps, so the next
        # micro-batch starts a step whatever the process count now is.
        accelerator.step = 0
        # The optimizer's restored LR is the saved schedule's; take this run's (the same
        # unless the run was extended to more steps: then the schedule re-spans).
        scheduler.last_epoch -= 1
        scheduler.step()
        for ema, _ in emas:  # accelerate restores custom state on the CPU
            ema.to(ema_device)
        start_step = resumed_from = latest.step
        losses = list(latest.meta["losses"])
        snapshots = list(latest.meta["snapshots"])
        position = DataPosition(*latest.meta["position"])
        if snapshots and snapshots[-1]["name"] == FINAL and config.steps > latest.step:
            extended_from = latest.step
            snapshots[-1] = _archive_final(accelerator, job, snapshots[-1])
            log.info(
                "extending the run from %d to %d steps; the %s schedule now spans %d steps",
                latest.step,
                config.steps,
                config.lr_scheduler,
                config.steps,
            )

    stream = LatentStream(
        job.data,
        tokenizer,
        micro_batch_size=micro_batch,
        rank=rank,
        world_size=processes,
        start=position,
    )
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=job.num_workers,
        persistent_workers=False,
        prefetch_factor=4 if job.num_workers else None,
    )
    batches = iter(loader)
    snapshot_steps = set(milestones(config.steps, config.snapshot_every))

    def state_meta() -> dict[str, Any]:
        return {"losses": losses, "snapshots": snapshots, "position": position.as_list()}

    first_step_seconds = first_step_at = 0.0
    window_start, window_samples = time.perf_counter(), 0
    samples = 0
    truncated = torch.zeros((), dtype=torch.long, device=device)
    for step in range(start_step + 1, config.steps + 1):
        if between_steps is not None:
            between_steps()
        step_loss = torch.zeros((), device=device)
        for _ in range(accum):
            batch = next(batches)
            with accelerator.accumulate(unet, text_encoder):
                mean = batch["mean"].to(device)
                latents = mean + batch["std"].to(device) * batch["eps"].to(device)
                latents = (latents if config.sample_latents else mean) * scaling
                noise = batch["noise"].to(device)
                timesteps = batch["timesteps"].to(device)
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                target = (
                    noise
                    if prediction_type == "epsilon"
                    else noise_scheduler.get_velocity(latents, noise, timesteps)
                )
                ids = batch["input_ids"].to(device)
                with accelerator.autocast():
                    context = (
                        contextlib.nullcontext() if config.train_text_encoder else torch.no_grad()
                    )
                    with context:
                        hidden = text_encoder(ids, return_dict=False)[0]
                    pred = unet(noisy, timesteps, hidden, return_dict=False)[0]
                loss = _loss(pred, target, timesteps, noise_scheduler, config)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(trained, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach() / accum
            position = DataPosition(*batch["position"].tolist())
            truncated += batch["truncated"].to(device)
        scheduler.step()
        for ema, model in emas:
            if config.ema_offload:  # as diffusers' --offload_ema: updated on the device
                ema.to(device, non_blocking=True)
            ema.step(accelerator.unwrap_model(model).parameters())
            if config.ema_offload:
                ema.to(ema_device, non_blocking=True)
        # The global batch's loss: the mean over processes of each one's mean.
        value = float(accelerator.reduce(step_loss, reduction="mean"))
        if not math.isfinite(value):
            raise FloatingPointError(f"training diverged: loss {value} at step {step}")
        losses.append(value)
        samples += config.batch_size
        window_samples += config.batch_size
        if step == start_step + 1:
            first_step_seconds = time.perf_counter() - started
            first_step_at = time.time()
        # Each machine's local process 0: the one under Dagster Pipes may have any rank.
        if on_progress is not None and accelerator.is_local_main_process:
            elapsed = time.perf_counter() - window_start
            on_progress(step, config.steps, value, window_samples / max(elapsed, 1e-9))
        if step in snapshot_steps:
            snapshot = _save_snapshot(accelerator, pipe, unet, text_encoder, emas, job, step)
            snapshots.append(snapshot)
            if on_snapshot is not None and accelerator.is_local_main_process:
                on_snapshot(snapshot)
        cadence = config.checkpoint_every and step % config.checkpoint_every == 0
        if step in snapshot_steps or cadence:
            checkpoints.save(accelerator, step, state_meta())
    steady = 0.0
    if samples > config.batch_size and first_step_at:
        steady = (samples - config.batch_size) / max(time.time() - first_step_at, 1e-9)
    if accelerator.is_main_process:
        store.write_text(json.dumps(snapshots, indent=2), *job.snapshot_parts, SNAPSHOTS_FILE)
        runs.record_finish(store, job.run_parts, config.steps)
    truncated_prompts = int(accelerator.reduce(truncated, reduction="sum"))
    accelerator.wait_for_everyone()
    # Free the DDP wrappers while the process group is still registered. Freed after
    # destroy_process_group, a DDP Reducer holds the gloo group's last reference, and
    # its destructor runs with the GIL held and joins gloo's worker thread. That thread
    # may still be freeing the last collective's tensors, which needs the GIL: the
    # process hung at the end in 1 run of 7 with 2 CPU processes (torch 2.13).
    del unet, text_encoder, emas
    accelerator.free_memory()
    gc.collect()  # a wrapper in a reference cycle is freed only by the collector
    accelerator.end_training()
    return TrainResult(
        losses=losses,
        snapshots=snapshots,
        resumed_from=resumed_from,
        extended_from=extended_from,
        micro_batch_size=micro_batch,
        processes=processes,
        seconds=time.perf_counter() - started,
        first_step_seconds=first_step_seconds,
        first_step_at=first_step_at,
        steady_samples_per_second=steady,
        samples=samples,
        truncated_prompts=truncated_prompts,
    )


def _save_snapshot(accelerator, pipe, unet, text_encoder, emas, job: TrainJob, step: int) -> dict:
    """A diffusers pipeline of the weights at ``step`` (EMA weights when kept), written
    atomically under the storage root by process 0. Training goes on from the raw weights."""
    from recap_dagster.t2i.model import save_pipeline

    name = FINAL if step == job.config.steps else f"step-{step:06d}"
    version = ""
    for ema, model in emas:
        ema.store(accelerator.unwrap_model(model).parameters())
        ema.copy_to(accelerator.unwrap_model(model).parameters())
    try:
        if accelerator.is_main_process:
            pipe.unet = accelerator.unwrap_model(unet)
            pipe.text_encoder = accelerator.unwrap_model(text_encoder)
            store = Storage(job.storage_root)
            with store.atomic_dir(*job.snapshot_parts, name) as staging:
                save_pipeline(pipe, staging, extra={**job.snapshot_meta, "step": step})
                version = weights_fingerprint(staging)
                Path(staging, VERSION_FILE).write_text(version + "\n")
    finally:
        for ema, model in emas:
            ema.restore(accelerator.unwrap_model(model).parameters())
    return {"step": step, "name": name, "version": from_main_process(accelerator, version)}


# ------------------------------------------------------------------------------ command


def _progress_line(step: int, steps: int, loss: float, rate: float, started: float) -> str:
    elapsed = time.perf_counter() - started
    eta = elapsed / max(step, 1) * (steps - step)
    return (
        f"step {step}/{steps} ({100 * step / steps:.0f}%) loss {loss:.4f} "
        f"{rate:.1f} samples/s, elapsed {elapsed:.0f} s, about {eta:.0f} s left"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", required=True, help="TrainJob JSON file")
    parser.add_argument("--log-every", type=int, default=0, help="steps between log lines")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    job = TrainJob.from_json(Path(args.job).read_text(encoding="utf-8"))
    every = args.log_every or max(1, job.config.steps // 20)
    rank = int(os.environ.get("RANK", "0"))
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    nodes = int(os.environ.get("WORLD_SIZE", "1")) // max(1, local_processes)
    # Several nodes: only the one Dagster launched has the Pipes context, and c10d need
    # not give it global rank 0, so its local process 0 reports (train() calls back there).
    use_pipes = os.environ.get("LOCAL_RANK", "0") == "0" and "DAGSTER_PIPES_CONTEXT" in os.environ
    with _pipes(use_pipes) as pipes:
        say = pipes.log.info if pipes is not None else log.info
        started = time.perf_counter()

        def progress(step: int, steps: int, loss: float, rate: float) -> None:
            # Step 1 too: the main job's estimate counts it by its steps from the start.
            if step == 1 or step % every == 0 or step == steps:
                say(_progress_line(step, steps, loss, rate, started))

        def snapshot(entry: dict[str, Any]) -> None:
            say(f"snapshot {entry['name']} (step {entry['step']}, version {entry['version']})")

        # Launched for a CPU step of a pool: its threads follow the steps on this machine.
        share = CpuShare.from_env()
        rebalance = Rebalancer(share) if share is not None else None
        result = train(job, on_progress=progress, on_snapshot=snapshot, between_steps=rebalance)
        summary = {
            "processes": result.processes,
            "nodes": nodes,
            "resumed_from_step": result.resumed_from if result.resumed_from is not None else -1,
            "extended_from_step": result.extended_from or 0,
            "micro_batch_size": result.micro_batch_size,
            "run_id": job.fingerprint(),
            "train_seconds": round(result.seconds, 1),
            "first_step_seconds": round(result.first_step_seconds, 2),
            "first_step_at": result.first_step_at,
            "steady_samples_per_second": round(result.steady_samples_per_second, 2),
            "samples_per_second": round(result.samples / max(result.seconds, 1e-9), 2),
            "final_loss": result.losses[-1] if result.losses else float("nan"),
            "truncated_prompts": result.truncated_prompts,
        }
        if rank == 0:
            Storage(job.storage_root).write_text(
                json.dumps({**summary, "losses": result.losses}),
                *job.state_parts,
                "last_run.json",
            )
        say(f"training finished: {json.dumps(summary)}")
    return 0


@contextlib.contextmanager
def _pipes(enabled: bool):
    if not enabled:
        yield None
        return
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes:
        yield pipes


def write_job(job: TrainJob, directory: str | None = None) -> str:
    """The job as a JSON file (for the command line); returns its path."""
    fd, path = tempfile.mkstemp(prefix="recap-train-", suffix=".json", dir=directory)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(job.to_json())
    return path


RDZV_PORT = 29400  # torchrun's default rendezvous port


def launch_command(
    job_file: str,
    processes: int,
    *,
    nodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str = "",
    rdzv_id: str = "recap-t2i",
    python: str = sys.executable,
) -> list[str]:
    """The command that runs a job with ``processes`` processes on each of ``nodes``
    machines (torchrun; gloo on CPU, NCCL on GPUs, one process per GPU).

    One machine rendezvouses with itself (``--standalone``). Several run this command
    once each, with their ``node_rank``, and meet at ``rdzv_endpoint`` (``host:port`` of
    one of them, which hosts the c10d store) under one ``rdzv_id`` per run. ``python``:
    the interpreter on the machine that runs it (this one's by default).
    """
    if nodes < 1 or not 0 <= node_rank < nodes:
        raise ValueError(f"node_rank {node_rank} is not one of {nodes} node(s)")
    if nodes == 1:
        rendezvous = ["--standalone"]
    else:
        if not rdzv_endpoint:
            raise ValueError("several nodes need a rendezvous endpoint (host:port)")
        rendezvous = [
            f"--nnodes={nodes}",
            f"--node-rank={node_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={rdzv_endpoint}",
            f"--rdzv-id={rdzv_id}",
        ]
    return [
        python,
        "-m",
        "torch.distributed.run",
        *rendezvous,
        f"--nproc_per_node={processes}",
        "-m",
        "recap_dagster.t2i.train",
        "--job",
        job_file,
    ]


if __name__ == "__main__":
    sys.exit(main())
