"""Blocking checks block on every path: a shard group whose delivered images fail to decode
above the limit never reaches the latent cache or training, whoever launched the reader,
until the user excludes it by name."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import pytest
import yaml
from browser import REPO, dagster_dev
from recorded import schedule_tick
from test_recaption_assets import RECAPTION_CONFIG, _dead_url_shard, base_captioner  # noqa: F401

from recap_dagster.assets.captioner import CHECKPOINT_PARTS, read_checkpoint_version
from recap_dagster.assets.latents import t2i_latents
from recap_dagster.assets.recaption import RECAPTION_GATE, recaptioned_shards
from recap_dagster.assets.training_corpus import training_corpus
from recap_dagster.definitions import JOBS
from recap_dagster.miniworld.definitions import ASSET_CHECKS, ASSETS
from recap_dagster.miniworld.pipeline import PipelineSummary, run_backfill
from recap_dagster.miniworld.resources import (
    MiniworldResource,
    MiniworldWorldResource,
    miniworld_sources,
)
from recap_dagster.orchestration.automation import recaption_job
from recap_dagster.orchestration.gates import held_groups
from recap_dagster.orchestration.launcher import DagsterGraphQL
from recap_dagster.orchestration.partitions import shard_group_partitions
from recap_dagster.orchestration.pool_watchdog import GPU_POOL
from recap_dagster.orchestration.versions import DATA_VERSION_TAG
from recap_dagster.resources import ComputeResource, ModelsResource, StorageResource
from recap_dagster.storage.fingerprint import model_fingerprint

GOOD, BAD = "00000-00099", "00100-00199"  # shard 00000: all decode; 00100: 1 of 12 does not


@pytest.fixture
def world(miniworld_paths, base_captioner, base_t2i, tmp_path: Path):  # noqa: F811
    """Two groups of real img2dataset-style shards (40% dead URLs each), a captioner
    checkpoint and a base model recorded in a fresh instance."""
    shards = tmp_path / "laion"
    _dead_url_shard(shards, 0, undecodable=0)
    _dead_url_shard(shards, 100, undecodable=1)  # 8.3% of delivered images > 5%
    resources = {
        "sources": miniworld_sources(str(miniworld_paths.root), shards_root=str(shards)),
        "storage": StorageResource(root=str(tmp_path / "storage")),
        "models": ModelsResource(base_captioner=base_captioner, base_t2i=base_t2i),
        "compute": ComputeResource(),
        "world": MiniworldWorldResource(),
        "miniworld": MiniworldResource(root=str(miniworld_paths.root)),
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
    }
    with resources["storage"].get().atomic_dir(*CHECKPOINT_PARTS) as staging:
        shutil.copytree(base_captioner, staging, dirs_exist_ok=True)
    version = read_checkpoint_version(resources["storage"].get().uri(*CHECKPOINT_PARTS))
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(shard_group_partitions.name, [GOOD, BAD])
        for key, data_version in (
            ("captioner_checkpoint", version),
            ("base_t2i_model", model_fingerprint(base_t2i)),
        ):
            instance.report_runless_asset_event(
                dg.AssetMaterialization(key, tags={DATA_VERSION_TAG: data_version})
            )
        defs = dg.Definitions(
            assets=ASSETS, asset_checks=ASSET_CHECKS, jobs=JOBS, resources=resources
        )
        yield instance, defs


def _materialize(instance, defs, selection, partition=None, config=None):
    return dg.materialize(
        [*ASSETS, *ASSET_CHECKS],
        selection=selection,
        partition_key=partition,
        instance=instance,
        resources=defs.resources,
        run_config=config or {},
        raise_on_error=False,
    )


def _failure(result: dg.ExecuteInProcessResult) -> str:
    """The failed step's error, down its causes."""
    event = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    error, messages = event.step_failure_data.error, []
    while error is not None:
        messages.append(error.message)
        error = error.cause
    return "\n".join(messages)


def test_a_failed_group_is_held_back_from_latents_and_training(world) -> None:
    instance, defs = world
    for group in (GOOD, BAD):
        _materialize(instance, defs, [recaptioned_shards.key], group, RECAPTION_CONFIG)
    # Each group has its own verdict (partitioned checks): the UI shows them per partition.
    held = held_groups(instance, RECAPTION_GATE, [GOOD, BAD])
    assert [(h.group, h.check) for h in held] == [(BAD, "recaptioned_failure_fraction")]
    assert held[0].reason.startswith("failed: 00100: 1 of 12 delivered images undecodable")

    # A reader launched on its own (the UI's Materialize, a backfill's run) is refused, and
    # the error names the check, the group and the shard.
    result = _materialize(instance, defs, [t2i_latents.key], BAD)
    assert not result.success
    message = _failure(result)
    assert "recaptioned_failure_fraction" in message and BAD in message
    assert "00100: 1 of 12 delivered images undecodable (8.33%)" in message
    assert _materialize(instance, defs, [t2i_latents.key], GOOD).success

    # Training refuses the corpus while a group is held back ...
    result = _materialize(instance, defs, [training_corpus.key])
    assert not result.success and "recaptioned_failure_fraction" in _failure(result)
    assert "exclude_groups" in _failure(result)
    # ... and trains on the rest only when the user names the group.
    exclude = {"ops": {"training_corpus": {"config": {"exclude_groups": [BAD]}}}}
    result = _materialize(instance, defs, [training_corpus.key], config=exclude)
    assert result.success
    meta = result.asset_materializations_for_node("training_corpus")[0].metadata
    assert (meta["groups"].value, meta["shards"].value) == (1, 1)
    assert meta["excluded_groups"].value == [BAD]
    bad_name = {"ops": {"training_corpus": {"config": {"exclude_groups": ["99900-99999"]}}}}
    assert "unknown shard groups" in _failure(
        _materialize(instance, defs, [training_corpus.key], config=bad_name)
    )


def test_sensor_and_schedule_runs_stop_at_the_failed_check(world) -> None:
    """The sensor's and the schedule's runs are runs of recaption_shards_job: recaptions,
    their checks, then latents. In the bad group's run the latents never start; the
    schedule then leaves the group alone instead of failing it again every hour."""
    instance, defs = world
    job = defs.resolve_job_def(recaption_job.name)
    good = job.execute_in_process(
        instance=instance, partition_key=GOOD, run_config=RECAPTION_CONFIG
    )
    assert good.success
    assert good.asset_materializations_for_node("t2i_latents")
    bad = job.execute_in_process(
        instance=instance, partition_key=BAD, run_config=RECAPTION_CONFIG, raise_on_error=False
    )
    assert not bad.success
    assert not bad.asset_materializations_for_node("t2i_latents")
    assert instance.get_materialized_partitions(t2i_latents.key) == {GOOD}
    checks = {c.check_name: c.passed for c in bad.get_asset_check_evaluations()}
    assert checks["recaptioned_failure_fraction"] is False

    skipped = schedule_tick(instance)
    assert isinstance(skipped, dg.SkipReason)
    assert "1 held back by checks" in skipped.skip_message


@pytest.mark.slow
def test_a_ui_backfill_ends_failed_naming_check_group_and_shard(
    miniworld_paths,
    base_captioner,  # noqa: F811
    base_t2i,
    random_clip: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The UI's "Materialize all" (GraphQL launchPartitionBackfill, run by dagster dev's
    daemon), followed as the main job follows it: it ends failed, and what the main job
    prints names the check, the group and the shard."""
    shards, models, work = tmp_path / "laion", tmp_path / "models", tmp_path / "work"
    _dead_url_shard(shards, 0, undecodable=0)
    _dead_url_shard(shards, 100, undecodable=1)
    models.mkdir()
    (models / "base_captioner").symlink_to(base_captioner)
    (models / "base_t2i").symlink_to(base_t2i)
    (models / "clip").symlink_to(random_clip)  # the miniworld's models.clip
    storage = StorageResource(root=str(work / "storage")).get()
    with storage.atomic_dir(*CHECKPOINT_PARTS) as staging:
        shutil.copytree(base_captioner, staging, dirs_exist_ok=True)
    home = work / "dagster_home"
    home.mkdir(parents=True)
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    run_config = tmp_path / "run_config.yaml"
    run_config.write_text(yaml.safe_dump(RECAPTION_CONFIG))
    env = {
        "RECAP_WORKDIR": str(work),
        "RECAP_MINIWORLD_DIR": str(miniworld_paths.root),
        "RECAP_MODELS_DIR": str(models),
        "RECAP_SHARDS_ROOT": str(shards),
        "RECAP_RUN_CONFIG": str(run_config),
    }
    monkeypatch.setenv("DAGSTER_HOME", str(home))  # the instance's storage lives there
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions(shard_group_partitions.name, [GOOD, BAD])
        instance.event_log_storage.initialize_concurrency_limit_to_default(GPU_POOL)
        version = read_checkpoint_version(storage.uri(*CHECKPOINT_PARTS))
        for key, data_version in (
            ("captioner_checkpoint", version),
            ("base_t2i_model", model_fingerprint(base_t2i)),
        ):
            instance.report_runless_asset_event(
                dg.AssetMaterialization(key, tags={DATA_VERSION_TAG: data_version})
            )
    summary = PipelineSummary("test")
    with dagster_dev(home, env, tmp_path / "dagster_dev.log", ["-w", "workspace.yaml"]) as url:
        client = DagsterGraphQL(url)
        client.wait_for_location()
        keys = ["recaptioned_shards", "t2i_latents", "training_corpus"]
        succeeded = run_backfill(client, summary, "RECAP (materialize all)", keys)
    text = summary.render()
    assert not succeeded and "FAILED" in text.splitlines()[0], text
    assert f"check recaptioned_failure_fraction [{BAD}]" in text, text
    assert "00100: 1 of 12 delivered images undecodable (8.33%)" in text, text
    assert "training_corpus" in text  # never built on the failed group
