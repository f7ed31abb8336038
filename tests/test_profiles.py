"""Run config: each trainer setting is defined once; a profile is run-config data; the
launchpad's defaults are the profile's values, the ones the main job runs with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import dagster as dg
import pytest
import torch
import yaml

from recap_dagster.miniworld.run_configs import (
    PROFILES,
    PROFILES_DIR,
    profile_run_config,
    profile_seeds,
    profile_side_by_side,
)
from recap_dagster.orchestration.pool_watchdog import GPU_POOL
from recap_dagster.resources import ComputeResource
from recap_dagster.resources import compute as compute_module
from recap_dagster.training import cpu_share

OPS_WITH_CONFIG = (
    "miniworld_corpus",
    "base_captioner_model",
    "base_t2i_model",
    "clip_model",
    "captioner_checkpoint",
    "recaptioned_shards",
    "recaptioned_shards_checks",
    "t2i_latents",
    "sd_checkpoints",
    "metric_reports",
)


def test_seed_changes_only_the_captioner_seed() -> None:
    """The text-to-image fine-tunes' seeds are their partitions' (RECAP_TRAINING_SEEDS)."""
    base, seeded = profile_run_config("default", 0), profile_run_config("default", 7)
    assert "seed" not in base["ops"]["sd_checkpoints"]["config"]
    for op in ("captioner_checkpoint",):
        assert seeded["ops"][op]["config"].pop("seed") == 7
        assert base["ops"][op]["config"].pop("seed") == 0
    assert seeded == base  # the miniworld and the base recipes do not depend on the seed


def test_trainer_settings_are_defined_once() -> None:
    """Each asset's config is its trainer's settings dataclass: every setting is on the
    launchpad with the dataclass's default (no run-config file here: the paper's recipe)
    and description."""
    from recap_dagster.assets.captioner import CaptionerFineTuneConfig
    from recap_dagster.assets.t2i import SDFineTuneConfig
    from recap_dagster.captioner import FineTuneConfig
    from recap_dagster.t2i.train import TrainConfig

    assert not os.environ.get("RECAP_RUN_CONFIG")
    for settings, config, decided_by_resources in (
        (TrainConfig, SDFineTuneConfig, {"seed"}),  # the partition's
        (FineTuneConfig, CaptionerFineTuneConfig, {"mixed_precision"}),
    ):
        launchpad = config.model_fields
        for f in fields(settings):
            if f.name in decided_by_resources:
                assert f.name not in launchpad
                continue
            assert launchpad[f.name].default == f.default, f.name
            assert launchpad[f.name].description == f.metadata["description"], f.name


@pytest.mark.parametrize("profile", PROFILES)
def test_profiles_are_valid_run_config(profile: str) -> None:
    from recap_dagster.miniworld.definitions import defs

    job = defs.resolve_implicit_global_asset_job_def()
    run_config = profile_run_config(profile, seed=3)
    assert set(run_config["ops"]) <= set(OPS_WITH_CONFIG)
    assert dg.validate_run_config(job, run_config) is not None


_LAUNCHPAD_DEFAULTS = """
import json
from recap_dagster.miniworld.definitions import defs
job = defs.resolve_implicit_global_asset_job_def()
ops = job.run_config_schema.config_type.fields["ops"].config_type.fields
print(json.dumps({
    name: {key: field.default_value for key, field in ops[name].config_type.fields["config"]
           .config_type.fields.items() if field.default_provided}
    for name in %r
}))
"""


@pytest.mark.parametrize("profile", PROFILES)
def test_launchpad_defaults_are_the_profile(profile: str, tmp_path: Path) -> None:
    """What the UI's launchpad pre-fills (the config schema's defaults) is the profile's
    run config, the same the main job writes to RECAP_RUN_CONFIG and launches with."""
    run_config = tmp_path / "run_config.yaml"
    run_config.write_text(yaml.safe_dump(profile_run_config(profile, seed=5)))
    env = {**os.environ, "RECAP_RUN_CONFIG": str(run_config), "RECAP_WORKDIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", _LAUNCHPAD_DEFAULTS % (OPS_WITH_CONFIG,)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    defaults = json.loads(result.stdout.strip().splitlines()[-1])
    for op, values in profile_run_config(profile, seed=5)["ops"].items():
        for key, value in values["config"].items():
            assert defaults[op][key] == value, (op, key)


def test_a_typo_in_the_run_config_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("ops:\n  sd_checkpoints:\n    config:\n      stepz: 3\n")
    env = {**os.environ, "RECAP_RUN_CONFIG": str(bad)}
    result = subprocess.run(
        [sys.executable, "-c", "import recap_dagster.assets.t2i"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and "has no setting ['stepz']" in result.stderr


def test_profile_files_are_listed() -> None:
    assert set(PROFILES) == {"confirm", "default", "quick"}
    assert all((PROFILES_DIR / f"{p}.yaml").is_file() for p in PROFILES)


def test_confirm_is_the_default_recipe_with_five_seeds_of_every_variant() -> None:
    from recap_dagster.t2i.training_data import VARIANTS

    assert profile_run_config("confirm", seed=2) == profile_run_config("default", seed=2)
    assert profile_seeds("confirm") == {v: [0, 1, 2, 3, 4] for v in VARIANTS}
    default = profile_seeds("default")
    assert len(default["alttext"]) >= 3 and len(default["recap_mix"]) >= 3
    # confirm extends default's main job: its seeds replace default's, the rest is kept.
    assert profile_side_by_side("confirm") == profile_side_by_side("default") == 2


def test_steps_side_by_side_share_the_cores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a CPU each step of the gpu pool starts with an equal share of torch's threads:
    two slots, half each. A training step's rebalancer then takes every core while no
    other step runs on the machine, and half again when one does."""
    # Four cores' worth, whatever this machine has: on one core halving would go unseen.
    monkeypatch.setattr(compute_module, "DEFAULT_THREADS", 4)
    steps = tmp_path / "steps"
    monkeypatch.setenv(cpu_share.FOLDER_ENV, str(steps))
    monkeypatch.setattr(cpu_share, "REBALANCE_EVERY_S", 0.0)
    threads = {}

    @dg.asset(pool=GPU_POOL)
    def step(compute: ComputeResource) -> None:
        compute.torch_device()
        threads["step"], threads["torch"] = compute.threads(), torch.get_num_threads()
        threads["env"] = compute.launch_env(processes=2)["OMP_NUM_THREADS"]
        rebalance = compute.rebalancer()
        rebalance()
        threads["alone"] = torch.get_num_threads()
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        try:
            (steps / str(other.pid)).touch()
            rebalance()
            threads["beside_another"] = torch.get_num_threads()
        finally:
            other.kill()
            other.wait()

    before = torch.get_num_threads()
    try:
        with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
            for slots, expected in ((1, 4), (2, 2), (8, 1)):
                instance.event_log_storage.set_concurrency_slots(GPU_POOL, slots)
                resources = {"compute": ComputeResource(device="cpu")}
                assert dg.materialize([step], instance=instance, resources=resources).success
                beside = 4 if slots == 1 else 2  # never more steps than the pool's slots
                assert threads == {"step": expected, "torch": expected,
                                   "env": str(max(1, expected // 2)),
                                   "alone": 4, "beside_another": beside}  # fmt: skip
                assert not (steps / str(os.getpid())).exists()  # the step's file went with it
            resources = {"compute": ComputeResource(device="cpu", cpu_threads=3)}
            assert dg.materialize([step], instance=instance, resources=resources).success
            # Pinned threads stand, alone or not.
            assert threads == {"step": 3, "torch": 3, "env": "1", "alone": 3,
                               "beside_another": 3}  # fmt: skip
    finally:
        torch.set_num_threads(before)
