"""Run profiles: the seed option changes only the fine-tunes' training seed."""

from __future__ import annotations

from recap_dagster.profiles import PROFILES


def test_with_seed_changes_only_the_fine_tune_seeds() -> None:
    profile = PROFILES["default"]
    seeded = profile.with_seed(7)
    assert seeded.captioner_finetune.seed == 7 and seeded.t2i.finetune.seed == 7
    assert seeded.captioner_run_config()["ops"]["captioner_checkpoint"]["config"]["seed"] == 7
    assert seeded.t2i_run_config()["ops"]["sd_checkpoints"]["config"]["seed"] == 7
    # The cached bases and the miniworld are the same models whatever the seed.
    assert seeded.t2i.base_digest() == profile.t2i.base_digest()
    assert seeded.base_captioner.key() == profile.base_captioner.key()
    assert seeded.miniworld == profile.miniworld
    assert profile.with_seed(0) == profile
