"""Named size/schedule presets for the miniworld text-to-image model.

``MINIWORLD_PROFILE`` is the starting point measured with ``benchmarks/t2i_profile.py``. It
does NOT yet show the RECAP effect: at 300 base + 200 fine-tune steps (batch 32) both
variants stayed near the floor (object accuracy ~0.22). It needs more steps than one
contended CPU budget gave; see the t2i report. ``QUICK_PROFILE`` exercises the same code
paths in seconds for tests.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace

from recap_dagster.t2i.model import TinyT2IConfig
from recap_dagster.t2i.train import TrainConfig


@dataclass(frozen=True)
class SampleConfig:
    guidance_scale: float = 5.0
    num_inference_steps: int = 20
    batch_size: int = 64


@dataclass(frozen=True)
class T2IProfile:
    """Everything needed to pretrain a base and fine-tune caption variants on the miniworld."""

    name: str
    model: TinyT2IConfig = field(default_factory=TinyT2IConfig)
    vae_steps: int = 300
    vae_batch_size: int = 32
    vae_learning_rate: float = 2e-3
    base: TrainConfig = field(default_factory=TrainConfig)  # on alt text
    finetune: TrainConfig = field(default_factory=TrainConfig)  # per caption variant
    sample: SampleConfig = field(default_factory=SampleConfig)
    corpus_limit: int | None = None  # use at most this many corpus images
    seed: int = 0

    def base_digest(self) -> str:
        """Hash of what determines the base model (not the fine-tune or sampling)."""
        data = {
            "model": self.model.to_dict(),
            "vae": [self.vae_steps, self.vae_batch_size, self.vae_learning_rate],
            "base": asdict(self.base),
            "corpus_limit": self.corpus_limit,
            "seed": self.seed,
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


MINIWORLD_PROFILE = T2IProfile(
    name="miniworld",
    model=TinyT2IConfig(),
    vae_steps=400,
    vae_batch_size=16,
    vae_learning_rate=4e-3,
    base=TrainConfig(
        steps=500, learning_rate=1e-3, batch_size=32, micro_batch_size=32,
        lr_warmup_steps=20, checkpoint_every=100,
    ),
    finetune=TrainConfig(
        steps=300, learning_rate=5e-4, batch_size=32, micro_batch_size=32,
        lr_warmup_steps=10, checkpoint_every=100,
    ),
    sample=SampleConfig(guidance_scale=5.0, num_inference_steps=20, batch_size=100),
)  # fmt: skip

QUICK_PROFILE = T2IProfile(
    name="quick",
    model=TinyT2IConfig(
        unet_block_out_channels=(16, 32),
        unet_cross_attention=(False, True),
        unet_attention_head_dim=8,
        text_hidden_size=32,
        text_layers=1,
        text_heads=2,
        text_intermediate_size=64,
        vae_block_out_channels=(8,),
        vae_norm_num_groups=4,
    ),
    vae_steps=5,
    vae_batch_size=8,
    base=TrainConfig(steps=3, learning_rate=1e-3, batch_size=8, micro_batch_size=8),
    finetune=TrainConfig(steps=3, learning_rate=1e-3, batch_size=8, micro_batch_size=8),
    sample=SampleConfig(guidance_scale=3.0, num_inference_steps=3, batch_size=16),
    corpus_limit=32,
)

PROFILES: dict[str, T2IProfile] = {p.name: p for p in (MINIWORLD_PROFILE, QUICK_PROFILE)}


def get_profile(profile: str | T2IProfile) -> T2IProfile:
    return PROFILES[profile] if isinstance(profile, str) else profile


__all__ = ["MINIWORLD_PROFILE", "PROFILES", "QUICK_PROFILE", "SampleConfig", "T2IProfile",
           "get_profile", "replace"]  # fmt: skip
