"""Named size profiles for the miniworld run: ``default`` (documented sizes) and ``quick``.

A profile fixes the miniworld's size, how the base models are pretrained and the run
config the main job passes to the assets. Asset config defaults stay the paper's recipe;
the miniworld overrides them here because its models are tiny (see each module's notes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from recap_dagster.captioner import FineTuneConfig
from recap_dagster.miniworld.base_captioner import (
    MINIWORLD_FINETUNE,
    QUICK_BASE_CAPTIONER,
    QUICK_FINETUNE,
    BaseCaptionerConfig,
)
from recap_dagster.miniworld.generate import MiniworldConfig
from recap_dagster.miniworld.t2i_profiles import MINIWORLD_PROFILE, QUICK_PROFILE, T2IProfile


@dataclass(frozen=True)
class Profile:
    name: str
    miniworld: MiniworldConfig
    base_captioner: BaseCaptionerConfig
    captioner_finetune: FineTuneConfig
    t2i: T2IProfile
    recaption_batch_size: int = 64
    metric_reference_images: int = 1000

    def with_seed(self, seed: int) -> Profile:
        """The same profile with another training seed for both fine-tunes (captioner and
        text-to-image). The miniworld and the base models stay fixed, like public checkpoints."""
        captioner = replace(self.captioner_finetune, seed=seed)
        t2i = replace(self.t2i, finetune=replace(self.t2i.finetune, seed=seed))
        return replace(self, captioner_finetune=captioner, t2i=t2i)

    def captioner_run_config(self) -> dict:
        # captioner_checkpoint's config is FineTuneConfig's fields (precision: the resource)
        config = asdict(self.captioner_finetune)
        del config["mixed_precision"]
        return {"ops": {"captioner_checkpoint": {"config": config}}}

    def t2i_run_config(self) -> dict:
        sd = asdict(self.t2i.finetune)  # sd_checkpoints' config is TrainConfig's fields
        sample = self.t2i.sample
        metrics = {
            "guidance_scale": sample.guidance_scale,
            "num_inference_steps": sample.num_inference_steps,
            "batch_size": sample.batch_size,
            "reference_images": self.metric_reference_images,
        }
        return {"ops": {"sd_checkpoints": {"config": sd}, "metric_reports": {"config": metrics}}}

    def recaption_run_config(self) -> dict:
        config = {"batch_size": self.recaption_batch_size}
        return {"ops": {"recaptioned_shards": {"config": config}}}


PROFILES: dict[str, Profile] = {
    "default": Profile(
        "default", MiniworldConfig(), BaseCaptionerConfig(), MINIWORLD_FINETUNE, MINIWORLD_PROFILE
    ),
    # Tiny sizes that exercise the same code paths in the test suite.
    "quick": Profile(
        "quick",
        MiniworldConfig(
            shards=2,
            images_per_shard=48,
            human_captions=100,
            human_heldout=16,
            pretrain_images=256,
            eval_prompts_per_category=4,
        ),
        QUICK_BASE_CAPTIONER,
        # 40 steps is the least at which the quick base learns to emit long captions at all.
        replace(QUICK_FINETUNE, steps=40, learning_rate=3e-3),
        QUICK_PROFILE,
        recaption_batch_size=16,
        metric_reference_images=64,
    ),
}
