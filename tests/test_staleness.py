"""Staleness at LAION scale: a new captioner or base model makes the fine-tunes stale at 150
shard groups as at 5.

Dagster stops comparing data versions across an edge with 100 or more upstream partitions,
so the trainer reads the groups through ``training_corpus``, whose version is derived from
the groups'. The 150 groups' recaptions, latents and check results are recorded in a real
SQLite instance as their runs record them (running 300 recaptioning and encoding runs would
test nothing more); ``training_corpus`` and the schedule run for real, and the UI shows the
stale fine-tune (test-artifacts/ui/staleness_150_groups_sd_checkpoints.png).
"""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import dagster as dg
import pytest
from browser import REPO, chromium_page, dagster_webserver_for, screenshot
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)
from dagster._core.events import DagsterEvent, StepMaterializationData
from dagster._core.events.log import EventLogEntry
from recorded import schedule_tick
from test_recaption_assets import get_stale_status_resolver

from recap_dagster.assets.captioner import captioner_checkpoint
from recap_dagster.assets.inputs import INPUT_ASSETS, base_t2i_model
from recap_dagster.assets.latents import LATENTS_GATE, t2i_latents
from recap_dagster.assets.recaption import RECAPTION_GATE, recaptioned_shards
from recap_dagster.assets.t2i import sd_checkpoints
from recap_dagster.assets.training_corpus import training_corpus
from recap_dagster.corpus.shard_groups import SHARDS_PER_GROUP
from recap_dagster.definitions import ASSET_CHECKS, RECAP_ASSETS
from recap_dagster.miniworld.resources import (
    MiniworldResource,
    MiniworldWorldResource,
    miniworld_sources,
)
from recap_dagster.orchestration.partitions import shard_group_partitions, variant_seed_key
from recap_dagster.orchestration.versions import DATA_VERSION_TAG
from recap_dagster.resources import ComputeResource, ModelsResource, StorageResource
from recap_dagster.t2i.latents import LATENTS_DIR, latent_vae_version
from recap_dagster.t2i.manifest import read_manifest

GROUPS = 150
STALE_SCREENSHOT = "staleness_150_groups_sd_checkpoints"
# What the production definitions read from the environment when the UI loads them.
PRODUCTION_ENV = (
    "RECAP_SHARDS_ROOT",
    "RECAP_HUMAN_CAPTIONS",
    "RECAP_EVAL_PROMPTS",
    "RECAP_TOKENIZER",
    "RECAP_BASE_CAPTIONER",
    "RECAP_BASE_T2I",
    "RECAP_STORAGE_ROOT",
)
STALE = "STALE"
MIX_SEED_0 = str(variant_seed_key("recap_mix", 0))


def _corpus(root: Path, storage: Path, vae: str) -> list[str]:
    """One shard per group: source files as img2dataset names them, and recaption and
    latent files under the storage root (the manifest lists names; it reads no content)."""
    groups = []
    for index in range(GROUPS):
        shard = f"{index * SHARDS_PER_GROUP:05d}"
        groups.append(f"{shard}-{index * SHARDS_PER_GROUP + SHARDS_PER_GROUP - 1:05d}")
        for name in (root / f"{shard}.tar", root / f"{shard}_stats.json"):
            name.parent.mkdir(parents=True, exist_ok=True)
            name.write_text("{}")
        for name in (
            storage / "recaptioned" / f"{shard}.parquet",
            storage / LATENTS_DIR / vae / f"{shard}.safetensors",
        ):
            name.parent.mkdir(parents=True, exist_ok=True)
            name.write_bytes(b"")
    return groups


def _store(instance: dg.DagsterInstance, run_id: str, event_type, payload) -> None:
    """An event as a run of the recaptioning job writes it to the event log."""
    event = DagsterEvent(
        event_type_value=event_type.value,
        job_name="recaption_shards_job",
        event_specific_data=payload,
    )
    instance.store_event(
        EventLogEntry(
            error_info=None,
            level="INFO",
            user_message="",
            run_id=run_id,
            timestamp=time.time(),
            dagster_event=event,
        )
    )


def _record_group_runs(
    instance: dg.DagsterInstance, groups: list[str], captioner: str, vae: str
) -> None:
    """Each group's run: its recaptions and latents (data versions naming the model first),
    and their blocking checks passed on those materializations."""
    for group in groups:
        run_id = str(uuid.uuid4())
        for key, version, gate in (
            (recaptioned_shards.key, captioner, RECAPTION_GATE),
            (t2i_latents.key, vae, LATENTS_GATE),
        ):
            made = dg.AssetMaterialization(
                key, partition=group, tags={DATA_VERSION_TAG: f"{version}.{group}"}
            )
            _store(
                instance,
                run_id,
                dg.DagsterEventType.ASSET_MATERIALIZATION,
                StepMaterializationData(made),
            )
            target = AssetCheckEvaluationTargetMaterializationData(
                storage_id=instance.get_latest_storage_id_by_partition(
                    key, dg.DagsterEventType.ASSET_MATERIALIZATION, {group}
                )[group],
                run_id=run_id,
                timestamp=time.time(),
            )
            for check in gate:
                evaluation = dg.AssetCheckEvaluation(
                    key,
                    check.name,
                    passed=True,
                    target_materialization_data=target,
                    partition=group,
                )
                _store(instance, run_id, dg.DagsterEventType.ASSET_CHECK_EVALUATION, evaluation)


def _record_fine_tune(instance: dg.DagsterInstance, corpus_version: str) -> None:
    """An sd_checkpoints materialization with the provenance Dagster records for it (the
    input versions it read); training itself is tested in test_t2i_assets."""
    record = instance.get_latest_data_version_record(training_corpus.key)
    base = instance.get_latest_data_version_record(base_t2i_model.key)
    tags = {
        DATA_VERSION_TAG: f"sd-{corpus_version}",
        "dagster/code_version": sd_checkpoints.code_versions_by_key[sd_checkpoints.key],
        "dagster/input_data_version/training_corpus": corpus_version,
        "dagster/input_event_pointer/training_corpus": str(record.storage_id),
        "dagster/input_data_version/base_t2i_model": base.event_log_entry.asset_observation.tags[
            DATA_VERSION_TAG
        ],
        "dagster/input_event_pointer/base_t2i_model": str(base.storage_id),
    }
    prompts = instance.get_latest_data_version_record(dg.AssetKey("eval_prompt_file"))
    tags["dagster/input_data_version/eval_prompt_file"] = "prompts-v1"
    tags["dagster/input_event_pointer/eval_prompt_file"] = str(prompts.storage_id)
    instance.report_runless_asset_event(
        dg.AssetMaterialization(sd_checkpoints.key, partition=MIX_SEED_0, tags=tags)
    )


def _screenshot_stale_checkpoint(home: Path, tmp_path: Path) -> None:
    """What the UI shows for the stale fine-tune: the production definitions served on the
    instance, sd_checkpoints' page in headless Chromium."""
    env = {name: str(tmp_path / name.lower()) for name in PRODUCTION_ENV}
    log = tmp_path / "webserver.log"
    args = ["-m", "recap_dagster.definitions"]
    with (
        dagster_webserver_for(home, env, log, args) as url,
        chromium_page(tmp_path / "chromium") as page,
    ):
        # The partition's page: "Unsynced (1)"; clicked, it names the cause.
        page.goto(f"{url}/assets/sd_checkpoints?view=partitions&partition={quote(MIX_SEED_0)}")
        badge = page.get_by_text("Unsynced (1)").first
        badge.wait_for(timeout=120_000)
        badge.click()
        page.get_by_text("training_corpus").first.wait_for(timeout=30_000)
        screenshot(page, STALE_SCREENSHOT)


TICKS: list[str] = []  # the schedule's tick times, for the figures


def _schedule_tick(instance: dg.DagsterInstance) -> list[str]:
    """The groups one tick of the backfill schedule requests (its time kept in TICKS)."""
    started = time.perf_counter()
    requests = schedule_tick(instance)
    TICKS.append(f"{time.perf_counter() - started:.2f} s")
    return sorted(r.partition_key for r in requests)


@pytest.mark.slow
def test_a_new_captioner_makes_the_fine_tunes_stale_at_150_groups(
    miniworld_paths, base_t2i, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shards, storage = tmp_path / "laion", tmp_path / "storage"
    vae = latent_vae_version(base_t2i)
    groups = _corpus(shards, storage, vae)
    resources = {
        "sources": miniworld_sources(str(miniworld_paths.root), shards_root=str(shards)),
        "storage": StorageResource(root=str(storage)),
        "models": ModelsResource(base_captioner="unused", base_t2i=base_t2i),
        "compute": ComputeResource(),
        "world": MiniworldWorldResource(),
        "miniworld": MiniworldResource(root=str(miniworld_paths.root)),
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
    }
    assets = [*INPUT_ASSETS, *RECAP_ASSETS, *ASSET_CHECKS]

    def corpus_version() -> str:
        result = dg.materialize(
            assets, selection=[training_corpus.key], instance=instance, resources=resources
        )
        meta = result.asset_materializations_for_node("training_corpus")[0].metadata
        assert (meta["groups"].value, meta["shards"].value) == (GROUPS, GROUPS)
        return read_manifest(resources["storage"].get()).version

    def status(key: dg.AssetKey, partition: str | None = None) -> str:
        resolver = get_stale_status_resolver(instance, [None, *assets[: -len(ASSET_CHECKS)]])
        return resolver.get_status(key, partition).value

    home = tmp_path / "dagster_home"  # a real SQLite instance, which the UI below serves
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions(shard_group_partitions.name, groups)
        for key, version in (("base_t2i_model", "base-v1"), ("eval_prompt_file", "prompts-v1")):
            instance.report_runless_asset_event(
                dg.AssetObservation(key, tags={DATA_VERSION_TAG: version})
            )
        for version in ("captioner-v1",):
            instance.report_runless_asset_event(
                dg.AssetMaterialization(captioner_checkpoint.key, tags={DATA_VERSION_TAG: version})
            )
        _record_group_runs(instance, groups, "captioner-v1", vae)
        first = corpus_version()
        _record_fine_tune(instance, first)
        assert status(sd_checkpoints.key, MIX_SEED_0) == "FRESH"
        assert status(training_corpus.key) == "FRESH"

        # A new captioner: the manifest is stale at once (a direct edge), and the schedule
        # asks for every group again in one tick.
        instance.report_runless_asset_event(
            dg.AssetMaterialization(captioner_checkpoint.key, tags={DATA_VERSION_TAG: "v2"})
        )
        assert status(training_corpus.key) == STALE
        # (Dagster marks an asset stale when an input has a new version, not when an input
        # is stale: the fine-tune turns stale when the manifest is made again, below.)
        assert _schedule_tick(instance) == groups

        # The groups recaptioned by it: a new manifest version, and the fine-tune is stale.
        _record_group_runs(instance, groups, "v2", vae)
        second = corpus_version()
        assert second != first
        assert status(sd_checkpoints.key, MIX_SEED_0) == STALE
        resolver = get_stale_status_resolver(instance, [None, *assets[: -len(ASSET_CHECKS)]])
        causes = resolver.get_stale_root_causes(sd_checkpoints.key, MIX_SEED_0)
        assert [c.key.asset_key for c in causes] == [training_corpus.key]
        _screenshot_stale_checkpoint(home, tmp_path)

        # A new base model (observed): the manifest is stale again.
        _record_fine_tune(instance, second)
        assert status(sd_checkpoints.key, MIX_SEED_0) == "FRESH"
        instance.report_runless_asset_event(
            dg.AssetObservation(base_t2i_model.key, tags={DATA_VERSION_TAG: "base-v2"})
        )
        assert status(training_corpus.key) == STALE
        assert status(sd_checkpoints.key, MIX_SEED_0) == STALE  # a direct input too
        assert _schedule_tick(instance) == groups  # latents of the new VAE for every group
        print(f"staleness at {GROUPS} groups: schedule ticks {TICKS}")
