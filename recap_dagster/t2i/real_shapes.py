"""Published Stable Diffusion component shapes (configs only, no weights), and a tiny set.

One place for the benchmarks (``fingerprint_sd.py``, ``t2i_memory.py``) and the memory
estimate's tests: keyword arguments of ``UNet2DConditionModel``, ``CLIPTextConfig`` and
``AutoencoderKL``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Stable Diffusion 1.5's published configs (runwayml/stable-diffusion-v1-5), shapes only.
SD15_UNET: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD15_TEXT_ENCODER: dict[str, Any] = dict(  # openai/clip-vit-large-patch14, text tower
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    vocab_size=49408,
    hidden_act="quick_gelu",
)
SD15_VAE: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
)

# Stable Diffusion 2.1 (stabilityai/stable-diffusion-2-1: 768 px, v-prediction). The UNet
# differs from 1.5 in its head dims, linear projections and 1024-wide cross-attention.
SD21_UNET: dict[str, Any] = {
    **SD15_UNET,
    "sample_size": 96,
    "attention_head_dim": (5, 10, 20, 20),
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
}
SD21_TEXT_ENCODER: dict[str, Any] = dict(  # OpenCLIP ViT-H/14 text tower (23 of its 24 layers)
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    vocab_size=49408,
    hidden_act="gelu",
)
SD21_VAE: dict[str, Any] = {**SD15_VAE, "sample_size": 768}

# A few-hundred-thousand-parameter model of the same classes: tests and ``--shape tiny``.
TINY_UNET: dict[str, Any] = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=8,
)
TINY_TEXT_ENCODER: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    vocab_size=49408,
    hidden_act="quick_gelu",
)
TINY_VAE: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(16, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)


@dataclass(frozen=True)
class SDShapes:
    """One Stable Diffusion's component configs."""

    name: str
    unet: dict[str, Any]
    text_encoder: dict[str, Any]
    vae: dict[str, Any]


SHAPES: dict[str, SDShapes] = {
    "sd15": SDShapes("SD 1.5", SD15_UNET, SD15_TEXT_ENCODER, SD15_VAE),
    "sd21": SDShapes("SD 2.1", SD21_UNET, SD21_TEXT_ENCODER, SD21_VAE),
    "tiny": SDShapes("tiny", TINY_UNET, TINY_TEXT_ENCODER, TINY_VAE),
}
