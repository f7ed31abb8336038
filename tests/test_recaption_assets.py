"""RECAP steps 1-2 through a real Dagster instance: fine-tune, recaption, lineage, automation."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import dagster as dg
import psutil
import pyarrow.parquet as pq
import pytest
from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
from dagster._core.definitions.assets.graph.asset_graph import AssetGraph
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._time import get_current_datetime
from PIL import Image
from recorded import schedule_tick

from recap_dagster.assets.captioner import CHECKPOINT_PARTS, captioner_checkpoint
from recap_dagster.assets.corpus import laion_shards
from recap_dagster.assets.human_captions import human_captions, human_captions_checks
from recap_dagster.assets.recaption import recaptioned_shards, recaptioned_shards_checks
from recap_dagster.captioner.recaption import SCHEMA
from recap_dagster.corpus.listing import sample_key
from recap_dagster.miniworld.captions import vocabulary_texts
from recap_dagster.miniworld.resources import (
    MiniworldWorldResource,
    miniworld_sources,
)
from recap_dagster.miniworld.shard_writer import ShardRecord, write_shard
from recap_dagster.miniworld.tiny_captioner import build_tiny_captioner
from recap_dagster.orchestration.automation import (
    groups_needing_recaption,
    laion_shard_sensor,
)
from recap_dagster.orchestration.partitions import shard_group_partitions
from recap_dagster.resources import (
    ComputeResource,
    ModelsResource,
    StorageResource,
)


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (36, 36), (seed * 40 % 256, 90, 200)).save(buffer, format="JPEG")
    return buffer.getvalue()


GROUP = "00000-00099"  # the shard group of every test shard here
ASSETS = [laion_shards, human_captions, captioner_checkpoint, recaptioned_shards]
CHECKS = [*human_captions_checks, recaptioned_shards_checks]


@pytest.fixture(scope="module")
def base_captioner(tmp_path_factory: pytest.TempPathFactory) -> str:
    directory = tmp_path_factory.mktemp("base_captioner")
    words = sorted({w for text in vocabulary_texts() for w in text.lower().split()})
    build_tiny_captioner("git", directory, words=words, hidden_size=32, max_text_tokens=64)
    return str(directory)


def _resources(miniworld_paths, base_captioner: str, storage_root: Path, clip: str = "") -> dict:
    return {
        "sources": miniworld_sources(str(miniworld_paths.root)),
        "storage": StorageResource(root=str(storage_root)),
        "models": ModelsResource(base_captioner=base_captioner, clip=clip),
        "compute": ComputeResource(),
        "world": MiniworldWorldResource(),
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
    }


def _finetune_config(seed: int) -> dict:
    step = {"steps": 4, "batch_size": 8, "learning_rate": 1e-3, "seed": seed}
    step |= {"eval_batch_size": 8, "max_new_tokens": 12, "sample_rows": 2}
    return {"ops": {"captioner_checkpoint": {"config": step}}}


RECAPTION_CONFIG = {
    "ops": {
        "recaptioned_shards": {
            "config": {"batch_size": 8, "max_new_tokens_short": 12, "max_new_tokens_long": 12}
        }
    }
}


def get_stale_status_resolver(instance: dg.DagsterInstance, assets) -> CachingStaleStatusResolver:
    """The resolver behind the UI's "stale" badges, over our asset graph."""
    graph = AssetGraph.from_assets([dg.AssetsDefinition(specs=[laion_shards]), *assets[1:]])
    view = AssetGraphView(
        temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
        instance=instance,
        asset_graph=graph,
    )
    return CachingStaleStatusResolver(instance=instance, asset_graph=graph, loading_context=view)


def _materialize(instance, resources, selection, **kwargs) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [*ASSETS, *CHECKS], instance=instance, resources=resources, selection=selection, **kwargs
    )


def _recaption(instance, resources, group: str, **kwargs) -> dg.ExecuteInProcessResult:
    """Materialize one group of ``recaptioned_shards`` (and its checks)."""
    selection = dg.AssetSelection.assets(recaptioned_shards)
    return _materialize(
        instance, resources, selection, run_config=RECAPTION_CONFIG, partition_key=group, **kwargs
    )


def test_captioner_and_recaptioning_lineage(
    miniworld_paths, base_captioner, random_clip: str, tmp_path
) -> None:
    resources = _resources(miniworld_paths, base_captioner, tmp_path / "storage", random_clip)
    storage = resources["storage"].get()
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(shard_group_partitions.name, [GROUP])
        result = _materialize(
            instance,
            resources,
            ["human_captions", "captioner_checkpoint"],
            run_config=_finetune_config(seed=0),
        )
        assert result.success
        metadata = result.asset_materializations_for_node("captioner_checkpoint")[0].metadata
        assert "data:image/png;base64" in metadata["loss_curve"].value
        assert "| long | positions |" in metadata["heldout_quality"].value
        assert "data:image/png;base64" in metadata["samples"].value
        assert storage.dir_complete("checkpoints", "captioner")
        first_version = metadata["version"].value

        # A group of two shards in one run: one model load, one parquet per shard.
        result = _recaption(instance, resources, GROUP)
        assert result.success
        checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
        assert set(checks) == {spec.name for spec in recaptioned_shards_checks.check_specs}
        assert set(checks) >= {
            "recaptioned_degeneration",
            "recaptioned_short_differs_from_long",
            "recaptioned_cap_hit_rate",
            "recaptioned_unique_captions",
            "recaptioned_style_leakage",
        }
        blocking = {name for name, c in checks.items() if c.severity == dg.AssetCheckSeverity.ERROR}
        assert {"recaptioned_degeneration", "recaptioned_short_differs_from_long"} <= blocking
        assert all(checks[name].passed for name in blocking), [
            checks[name].description for name in blocking
        ]
        # A 4-step fine-tune of a random captioner runs to the cap with one caption for
        # every image: the warnings say so, naming rows.
        for name in ("recaptioned_cap_hit_rate", "recaptioned_unique_captions"):
            assert not checks[name].passed and "0000000" in checks[name].description
        metadata = result.asset_materializations_for_node("recaptioned_shards")[0].metadata
        assert metadata["long_clip_tokens_max"].value <= 77
        # A sample of each shard scored with the (random, tiny) CLIP, stored, judged, shown.
        agreement = metadata["image_text_agreement"].value.records
        assert [r.data["shard"] for r in agreement] == ["00000", "00001", "all"]
        assert metadata["gain_recap_short"].value == pytest.approx(
            metadata["clip_recap_short"].value - metadata["clip_alt_text"].value
        )
        assert metadata["examples"].value.count("data:image/png;base64,") == 9
        assert storage.exists("recaption_agreement", "00001.parquet")
        clip_check = checks["recaptioned_clip_vs_alt_text"]
        assert clip_check.severity == dg.AssetCheckSeverity.WARN
        assert f"{agreement[-1].data['n']} scored rows" in clip_check.description
        assert 0 <= metadata["short_cap_hit_rate"].value <= 1
        for shard in ("00000", "00001"):
            table = pq.read_table(tmp_path / "storage" / "recaptioned" / f"{shard}.parquet")
            assert table.schema.equals(SCHEMA)
            assert table.num_rows == 24
            rows = table.to_pylist()
            assert {r["captioner_version"] for r in rows} == {first_version}
            ok = [r for r in rows if r["status"] == "ok"]
            assert all(r["recap_short"] and r["recap_long"] for r in ok)
            for bad in (r for r in rows if r["status"] != "ok"):
                assert bad["error"] and bad["recap_short"] is None
        assert groups_needing_recaption(instance, [GROUP]) == []

        resolver = get_stale_status_resolver(instance, ASSETS)
        key = recaptioned_shards.key
        assert resolver.get_status(key, GROUP) == StaleStatus.FRESH

        # New weights -> every recaptioned shard is stale, through the instance.
        result = _materialize(
            instance, resources, ["captioner_checkpoint"], run_config=_finetune_config(seed=1)
        )
        assert result.success
        second = result.asset_materializations_for_node("captioner_checkpoint")[0].metadata
        assert second["version"].value != first_version
        resolver = get_stale_status_resolver(instance, ASSETS)
        assert resolver.get_status(key, GROUP) == StaleStatus.STALE
        assert groups_needing_recaption(instance, [GROUP]) == [GROUP]

        # Same weights again (same seed) -> same data version -> shards are not made stale.
        _materialize(instance, resources, ["captioner_checkpoint"], run_config=_finetune_config(1))
        third = instance.get_latest_materialization_event(captioner_checkpoint.key)
        assert third.asset_materialization.tags["dagster/data_version"] == second["version"].value

        # The schedule backfills the stale group (both shards) in one run.
        requests = schedule_tick(instance)
        assert [r.partition_key for r in requests] == [GROUP]
        result = _recaption(instance, resources, requests[0].partition_key)
        assert result.success
        resolver = get_stale_status_resolver(instance, ASSETS)
        assert resolver.get_status(key, GROUP) == StaleStatus.FRESH
        assert isinstance(schedule_tick(instance), dg.SkipReason)


def test_backfill_schedule_skips_groups_in_flight_and_caps_a_tick(monkeypatch) -> None:
    import uuid

    from recap_dagster.orchestration import automation

    groups = [f"{i * 100:05d}-{i * 100 + 99:05d}" for i in range(40)]
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(shard_group_partitions.name, groups)
        captioner = dg.AssetMaterialization(
            captioner_checkpoint.key, tags={"dagster/data_version": "v1"}
        )
        instance.report_runless_asset_event(captioner)
        for group in groups[:8]:  # recaptioned by the current captioner
            instance.report_runless_asset_event(
                dg.AssetMaterialization(recaptioned_shards.key, partition=group)
            )
        running = dg.DagsterRun(
            job_name="recaption_shards_job",
            run_id=str(uuid.uuid4()),
            status=dg.DagsterRunStatus.STARTED,
            tags={"dagster/partition": groups[8]},
        )
        instance.add_run(running)
        requests = schedule_tick(instance)
        assert [r.partition_key for r in requests] == groups[9:]
        monkeypatch.setattr(automation, "MAX_RUNS_PER_TICK", 2)
        assert [r.partition_key for r in schedule_tick(instance)] == groups[9:11]
        # A new captioner: every group needs it again.
        captioner = dg.AssetMaterialization(
            captioner_checkpoint.key, tags={"dagster/data_version": "v2"}
        )
        instance.report_runless_asset_event(captioner)
        assert groups_needing_recaption(instance, groups) == groups


def _dead_url_shard(root: Path, shard: int, undecodable: int) -> None:
    """A shard of 20 rows as img2dataset writes it from real LAION: 40% of the URLs failed
    (6 downloads, 2 resizes), plus ``undecodable`` delivered images that do not decode."""
    records = []
    for i in range(20):
        key, alt = sample_key(shard, i), f"alt {i}"
        if i < 8:  # img2dataset's own statuses and messages
            status, error = (
                ("failed_to_download", "HTTP Error 404: Not Found")
                if i < 6
                else ("failed_to_resize", "image too large")
            )
            records.append(
                ShardRecord(key, None, alt, f"https://x/{i}", {}, None, None, status, error)
            )
        else:
            data = _jpeg(i) if i - 8 >= undecodable else b"<html>captcha</html>"
            records.append(ShardRecord(key, data, alt, f"https://ok/{i}", {}))
    write_shard(str(root), shard, records)


@pytest.mark.parametrize("undecodable", [0, 2])
def test_dead_urls_are_counted_apart_from_decoding_failures(
    miniworld_paths, base_captioner, tmp_path: Path, undecodable: int
) -> None:
    """40% dead URLs pass the blocking failure check; undecodable delivered images over
    the limit (2 of 12 here, 17% > 5%) fail it."""
    shards = tmp_path / "laion"
    _dead_url_shard(shards, 0, undecodable)
    resources = _resources(miniworld_paths, base_captioner, tmp_path / "storage")
    resources["sources"] = miniworld_sources(str(miniworld_paths.root), shards_root=str(shards))
    with resources["storage"].get().atomic_dir(*CHECKPOINT_PARTS) as staging:
        shutil.copytree(base_captioner, staging, dirs_exist_ok=True)  # a captioner checkpoint
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(shard_group_partitions.name, [GROUP])
        result = _recaption(instance, resources, GROUP, raise_on_error=False)
    metadata = result.asset_materializations_for_node("recaptioned_shards")[0].metadata
    assert metadata["dagster/row_count"].value == 20
    assert metadata["delivered"].value == 12 and metadata["not_delivered"].value == 8
    assert metadata["not_delivered_by_status"].value == {
        "failed_to_download": 6,
        "failed_to_resize": 2,
    }
    assert metadata["undecodable"].value == undecodable
    assert metadata["images_per_second"].value > 0 and metadata["shards_kept"].value == []
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks["recaptioned_failure_fraction"].passed == (undecodable == 0)
    if undecodable:
        assert "2 of 12 delivered images undecodable (16.67%), 8 rows not delivered" in (
            checks["recaptioned_failure_fraction"].description
        )
    assert checks["recaptioned_schema_and_rows"].passed  # every source row has its row
    table = pq.read_table(tmp_path / "storage" / "recaptioned" / "00000.parquet")
    dead = [r for r in table.to_pylist() if not r["delivered"]]
    assert [(r["status"], r["error"]) for r in dead[:1]] == [
        ("failed_to_download", "HTTP Error 404: Not Found")
    ]
    assert all(r["recap_short"] is None for r in dead) and len(dead) == 8


def test_sensor_requests_recaptioning_of_new_shards(miniworld_paths, tmp_path: Path) -> None:
    sources = miniworld_sources(str(miniworld_paths.root))
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(instance=instance, resources={"sources": sources})
        before = laion_shard_sensor(context)
        assert before.run_requests == []  # no captioner yet: partitions only
        assert [k for r in before.dynamic_partitions_requests for k in r.partition_keys] == [GROUP]
        instance.report_runless_asset_event(
            dg.AssetMaterialization(
                asset_key=captioner_checkpoint.key, tags={"dagster/data_version": "v1"}
            )
        )
        fresh = dg.build_sensor_context(instance=instance, resources={"sources": sources})
        after = laion_shard_sensor(fresh)
        # One run for the group of both new shards: one model load.
        [request] = after.run_requests
        assert request.partition_key == GROUP
        assert request.run_key == f"recaption-{GROUP}-upto-00001"


def test_missing_base_captioner_is_a_clear_error(miniworld_paths, tmp_path: Path) -> None:
    resources = _resources(miniworld_paths, str(tmp_path / "nowhere"), tmp_path / "storage")
    with dg.instance_for_test() as instance:
        result = _materialize(
            instance,
            resources,
            ["human_captions", "captioner_checkpoint"],
            run_config=_finetune_config(0),
            raise_on_error=False,
        )
    assert not result.success
    failure = next(
        e for e in result.all_events if e.event_type_value == "STEP_FAILURE"
    ).step_failure_data.error
    assert "nowhere" in failure.message or "nowhere" in str(failure.cause)


# -- a recaptioning run killed part-way ----------------------------------------------------

KILL_SHARDS = ["00000", "00001", "00002", "00003"]
IMAGES_PER_KILL_SHARD = 100


def _kill_test_setup(root: Path, base_captioner: str) -> None:
    """Four shards of 100 images and a captioner checkpoint under ``root/storage``."""
    for index in range(len(KILL_SHARDS)):
        records = [
            ShardRecord(sample_key(index, i), _jpeg(i), f"alt {i}", f"https://ok/{i}", {})
            for i in range(IMAGES_PER_KILL_SHARD)
        ]
        write_shard(str(root / "laion"), index, records)
    with StorageResource(root=str(root / "storage")).get().atomic_dir(*CHECKPOINT_PARTS) as out:
        shutil.copytree(base_captioner, out, dirs_exist_ok=True)


def _recaption_all(
    root: Path, miniworld_root: str, processes: int = 1
) -> dg.ExecuteInProcessResult:
    """One run over the group of every shard by ``processes`` processes (the subprocess
    entry point runs this too)."""
    resources = {
        "sources": miniworld_sources(miniworld_root, str(root / "laion")),
        "storage": StorageResource(root=str(root / "storage")),
        "models": ModelsResource(base_captioner="unused: the checkpoint is in storage"),
        "compute": ComputeResource(),
        "world": MiniworldWorldResource(),
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
    }
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(shard_group_partitions.name, [GROUP])
        config = RECAPTION_CONFIG["ops"]["recaptioned_shards"]["config"]
        run_config = {"ops": {"recaptioned_shards": {"config": {**config, "processes": processes}}}}
        selection = dg.AssetSelection.assets(recaptioned_shards)
        return _materialize(
            instance, resources, selection, run_config=run_config, partition_key=GROUP
        )


def _outputs(root: Path) -> dict[str, list[dict]]:
    out = root / "storage" / "recaptioned"
    return {p.stem: pq.read_table(p).to_pylist() for p in sorted(out.glob("*.parquet"))}


@pytest.mark.slow
def test_killed_recaptioning_run_resumes_to_the_same_output(
    miniworld_paths, base_captioner, tmp_path: Path
) -> None:
    """SIGKILL a group's run of 2 processes (spawned, as on 2 GPUs) once its first shard is
    written: its processes die with it and no partial file is ever visible under a shard's
    name; run again: it keeps the finished shards, writes the rest, and the output equals
    an uninterrupted one-process run's."""
    import signal
    import subprocess
    import sys
    import time

    killed, whole = tmp_path / "killed", tmp_path / "whole"
    for root in (killed, whole):
        _kill_test_setup(root, base_captioner)
    worker = subprocess.Popen(
        [sys.executable, __file__, "recaption", str(killed), str(miniworld_paths.root), "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = killed / "storage" / "recaptioned"
    try:
        deadline = time.monotonic() + 180
        while not list(out.glob("*.parquet")):
            assert worker.poll() is None, worker.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no shard written"
            time.sleep(0.01)
        spawned = psutil.Process(worker.pid).children(recursive=True)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        _, alive = psutil.wait_procs(spawned, timeout=60)
        assert not alive, alive  # the run's processes died with it
    finally:
        if worker.poll() is None:
            worker.kill()
    finished = _outputs(killed)  # every visible shard file reads whole
    assert 1 <= len(finished) < len(KILL_SHARDS), sorted(finished)
    assert all(len(rows) == IMAGES_PER_KILL_SHARD for rows in finished.values())

    resumed = _recaption_all(killed, str(miniworld_paths.root), processes=2)
    assert resumed.success
    metadata = resumed.asset_materializations_for_node("recaptioned_shards")[0].metadata
    assert metadata["shards_kept"].value == sorted(finished)
    assert metadata["processes"].value == 2
    assert metadata["images_per_second"].value > 0  # of the shards it captioned, not kept ones
    assert "| kept |" in metadata["per_shard"].value
    assert _recaption_all(whole, str(miniworld_paths.root)).success
    assert _outputs(killed) == _outputs(whole)
    assert sorted(_outputs(whole)) == KILL_SHARDS


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["recaption"]:
        _recaption_all(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
