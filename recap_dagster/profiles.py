"""Named size profiles for the miniworld run: ``default`` (documented sizes) and ``quick``."""

from __future__ import annotations

from dataclasses import dataclass

from recap_dagster.miniworld.generate import MiniworldConfig


@dataclass(frozen=True)
class Profile:
    name: str
    miniworld: MiniworldConfig


PROFILES: dict[str, Profile] = {
    "default": Profile("default", MiniworldConfig()),
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
    ),
}
