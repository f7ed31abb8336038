"""The text-to-image model: Stable Diffusion's architecture at miniworld size.

A :class:`~diffusers.StableDiffusionPipeline` built from the real component classes
(``UNet2DConditionModel``, ``CLIPTextModel``, ``AutoencoderKL``, a diffusers noise scheduler)
and the miniworld's CLIP-style tokenizer, so that the rest of the project loads a miniworld
checkpoint exactly like a real SD 1.x / 2.x one.

Why a 2x-downsampling VAE (16x16x8 latents at 32 px) by default, measured on the 2-core CPU
(one thread, shared machine; sizing runs of the earlier in-memory trainer):

- UNet (32, 64, 64) + 2-layer CLIP, fwd+bwd at batch 64: 5.2 s/step on 32x32 (one-block
  VAE, scale factor 1) vs 1.5 s/step on 16x16 latents. 4x fewer positions is 3.5x more
  steps per CPU-minute, and at this budget steps are what the model is short of.
- The price is a VAE that must actually be trained: a 16x16x4 latent after 200 steps
  reconstructed shapes too blurrily for the evaluator (object accuracy of reconstructions
  0.34-0.45). With 8 latent channels (as many numbers as pixels), channels (16, 32) and
  400 steps at lr 4e-3 (76 s) reconstructions score object 0.985 / position 0.978, which
  caps nothing the text-to-image model reaches.
- Cross-attention at every UNet level is cheap at 16x16 (256 tokens) and keeps the
  finest level, where positions are decided, text-conditioned.

A one-block VAE (``vae_block_out_channels=(c,)``) remains available: it reconstructs almost
perfectly after a few dozen steps and is what the test-size ``QUICK_PROFILE`` uses.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from recap_dagster.storage.fs import replace_dir

CONFIG_FILE = "recap_t2i.json"  # our build config, saved next to model_index.json


@dataclass(frozen=True)
class TinyT2IConfig:
    """Sizes of a miniworld SD. Defaults are the miniworld profile's."""

    resolution: int = 32
    # UNet. One entry per resolution level; cross-attention where ``unet_cross_attention``.
    unet_block_out_channels: tuple[int, ...] = (32, 64, 64)
    unet_cross_attention: tuple[bool, ...] = (True, True, True)
    unet_layers_per_block: int = 1
    # Attention heads per level (diffusers' legacy name); one int for every level.
    unet_attention_head_dim: int | tuple[int, ...] = 8
    unet_norm_num_groups: int = 8
    # Text encoder (CLIP). Its width is the UNet's cross-attention dim.
    text_hidden_size: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate_size: int = 512
    # VAE: one block = scale factor 1; two = 2x downsampling.
    vae_block_out_channels: tuple[int, ...] = (16, 32)
    vae_latent_channels: int = 8
    vae_norm_num_groups: int = 8
    # Noise schedule / objective. Training uses DDPM with these betas; sampling the saved
    # scheduler (``sampler``) with the same betas.
    prediction_type: str = "epsilon"  # or "v_prediction"
    num_train_timesteps: int = 1000
    # SD's own schedule. Not the cosine one: its terminal SNR is ~0, and with epsilon
    # prediction every sampler's first x0 estimate divides by sqrt(alpha_bar) ~ 0, which
    # blew measured samples up into noise although the denoiser itself was good.
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    sampler: str = "dpmsolver"  # "dpmsolver" | "ddim" | "euler" | "pndm"

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TinyT2IConfig:
        kwargs = {}
        for f in fields(cls):
            if f.name in data:
                value = data[f.name]
                kwargs[f.name] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)

    def digest(self) -> str:
        """A short hash of the config (cache keys)."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_scale_factor


def _scheduler(config: TinyT2IConfig):
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
    )

    common = {
        "num_train_timesteps": config.num_train_timesteps,
        "beta_schedule": config.beta_schedule,
        "beta_start": config.beta_start,
        "beta_end": config.beta_end,
        "prediction_type": config.prediction_type,
        # SD's value; only "leading" spacing uses it, but the pipeline warns about others.
        "steps_offset": 1,
    }
    if config.sampler == "dpmsolver":
        return DPMSolverMultistepScheduler(**common)
    if config.sampler == "ddim":
        # No clipping: latents are not bounded to [-1, 1].
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False)
    if config.sampler == "euler":
        return EulerDiscreteScheduler(**common)
    if config.sampler == "pndm":
        return PNDMScheduler(**common, skip_prk_steps=True)
    raise ValueError(f"unknown sampler {config.sampler!r}")


def build_text_encoder(config: TinyT2IConfig, tokenizer) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_hidden_size,
        intermediate_size=config.text_intermediate_size,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=config.text_hidden_size,
    )
    return CLIPTextModel(text_config)


def build_unet(config: TinyT2IConfig) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    n = len(config.unet_block_out_channels)
    if len(config.unet_cross_attention) != n:
        raise ValueError("unet_cross_attention needs one entry per UNet level")
    down = tuple(
        "CrossAttnDownBlock2D" if attn else "DownBlock2D" for attn in config.unet_cross_attention
    )
    up = tuple(
        "CrossAttnUpBlock2D" if attn else "UpBlock2D"
        for attn in reversed(config.unet_cross_attention)
    )
    return UNet2DConditionModel(
        sample_size=config.latent_size,
        in_channels=config.vae_latent_channels,
        out_channels=config.vae_latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=config.unet_block_out_channels,
        layers_per_block=config.unet_layers_per_block,
        cross_attention_dim=config.text_hidden_size,
        attention_head_dim=config.unet_attention_head_dim,
        norm_num_groups=config.unet_norm_num_groups,
    )


def build_vae(config: TinyT2IConfig) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    n = len(config.vae_block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=config.vae_block_out_channels,
        layers_per_block=1,
        latent_channels=config.vae_latent_channels,
        norm_num_groups=config.vae_norm_num_groups,
        sample_size=config.resolution,
        # Self-attention over 1024 positions costs more than the rest of this VAE together
        # and adds nothing for flat shapes.
        mid_block_add_attention=False,
    )


def build_pipeline(tokenizer_dir: str | os.PathLike, config: TinyT2IConfig, seed: int = 0):
    """A randomly initialised miniworld SD (``StableDiffusionPipeline``), deterministic in
    ``seed``. The VAE is untrained too: see :func:`recap_dagster.t2i.train.fit_vae`."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    text_encoder = build_text_encoder(config, tokenizer)
    unet = build_unet(config)
    vae = build_vae(config)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.recap_t2i_config = config  # type: ignore[attr-defined]
    return pipe


def pipeline_config(pipe) -> TinyT2IConfig | None:
    """The :class:`TinyT2IConfig` a pipeline was built from (None for foreign pipelines)."""
    return getattr(pipe, "recap_t2i_config", None)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_pipeline(
    path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
):
    """Load a saved pipeline: ours or any SD 1.x / 2.x diffusers directory.

    The safety checker is never loaded (the miniworld has none and the evaluation must see
    raw samples). ``device`` defaults to CUDA when available.
    """
    from diffusers import StableDiffusionPipeline

    kwargs: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    pipe = StableDiffusionPipeline.from_pretrained(str(path), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    # Decode one image at a time, and in tiles above the VAE's own size: a batch of 100
    # SD images at 512 px would otherwise hold the whole batch's decoder activations.
    pipe.vae.enable_slicing()
    pipe.vae.enable_tiling()
    config_path = Path(path) / CONFIG_FILE
    if config_path.exists():
        data = json.loads(config_path.read_text(encoding="utf-8"))
        pipe.recap_t2i_config = TinyT2IConfig.from_dict(data)  # type: ignore[attr-defined]
    return pipe.to(torch.device(device) if device is not None else _default_device())


def local_model_dir(path_or_id: str) -> str:
    """A local directory of the model: ``path_or_id`` itself, or the hub snapshot of a model
    id (from the local hub cache when offline)."""
    if os.path.isdir(path_or_id):
        return str(Path(path_or_id).resolve())
    if not path_or_id:
        raise ValueError("no base model configured")
    from huggingface_hub import snapshot_download

    return snapshot_download(
        path_or_id, allow_patterns=list(HUB_PATTERNS), ignore_patterns=list(HUB_IGNORED)
    )


#: What a pipeline needs of a hub repository: the diffusers folders' configs, tokenizer and
#: full-precision safetensors, not the single-file checkpoints beside them (SD 1.5's repo
#: holds several of 4-7 GB), .bin duplicates, fp16/non-EMA variants or the safety checker.
HUB_PATTERNS = (
    "model_index.json",
    "*/*.json",
    "*/*.txt",
    "*/model.safetensors",
    "*/diffusion_pytorch_model.safetensors",
)
HUB_IGNORED = ("safety_checker/*",)


def save_pipeline(pipe, out_dir: str | os.PathLike, *, extra: dict[str, Any] | None = None) -> str:
    """Save atomically (temp dir + rename): ``out_dir`` is either absent or complete.

    ``extra`` is merged into ``recap_t2i.json`` (e.g. training provenance).
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        config = pipeline_config(pipe)
        meta: dict[str, Any] = config.to_dict() if config is not None else {}
        meta.update(extra or {})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(out)


def read_saved_meta(path: str | os.PathLike) -> dict[str, Any] | None:
    """``recap_t2i.json`` of a saved pipeline, or None when absent/incomplete."""
    root = Path(path)
    if not (root / "model_index.json").exists():
        return None
    try:
        return json.loads((root / CONFIG_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None


def set_gradient_checkpointing(model: torch.nn.Module, on: bool) -> None:
    """Non-reentrant gradient checkpointing on or off, for a diffusers model or a
    transformers one (transformers 5 renamed ``gradient_checkpointing_enable`` to
    ``activation_checkpointing_enable``; the old name warns)."""
    no_reentrant = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5
        if on:
            model.activation_checkpointing_enable(no_reentrant)
        else:
            model.activation_checkpointing_disable()
    elif hasattr(model, "enable_gradient_checkpointing"):  # diffusers
        if on:
            model.enable_gradient_checkpointing()
        else:
            model.disable_gradient_checkpointing()
    elif on:  # transformers < 5
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=no_reentrant)
    else:
        model.gradient_checkpointing_disable()


def gradient_checkpointing_on(model: torch.nn.Module) -> bool:
    """Whether ``model`` (diffusers or transformers) checkpoints its activations."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
