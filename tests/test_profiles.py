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


def test_trainer_settings_are_defined_once() -> None:
    """Each asset's config is its trainer's settings dataclass: every setting is on the
    launchpad with the dataclass's default and description, and each profile's run config
    is data for exactly those settings."""
    from dataclasses import fields

    import dagster as dg

    from recap_dagster.assets.captioner import CaptionerFineTuneConfig
    from recap_dagster.assets.t2i import SDFineTuneConfig
    from recap_dagster.captioner import FineTuneConfig
    from recap_dagster.definitions import defs
    from recap_dagster.t2i.train import TrainConfig

    for settings, config, decided_by_resources in (
        (TrainConfig, SDFineTuneConfig, set()),
        (FineTuneConfig, CaptionerFineTuneConfig, {"mixed_precision"}),
    ):
        launchpad = config.model_fields
        for f in fields(settings):
            if f.name in decided_by_resources:
                assert f.name not in launchpad
                continue
            assert launchpad[f.name].default == f.default, f.name
            assert launchpad[f.name].description == f.metadata["description"], f.name
    for profile in PROFILES.values():
        for run_config in (profile.captioner_run_config(), profile.t2i_run_config()):
            job = defs.resolve_implicit_global_asset_job_def()
            ops = {name: op for name, op in run_config["ops"].items()}
            assert dg.validate_run_config(job, {"ops": ops}) is not None
