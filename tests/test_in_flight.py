"""partitions_in_flight: the shard groups queued or running work will write, whoever
launched it: runs of any job (one partition or a range), and an asset backfill launched
through the UI's GraphQL that has not submitted its runs yet."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset
from dagster._core.remote_origin import RegisteredCodeLocationOrigin, RemoteRepositoryOrigin
from recorded import schedule_tick

from recap_dagster.corpus.discovery import DiscoveryCursor
from recap_dagster.miniworld.shard_writer import ShardRecord, write_shard
from recap_dagster.orchestration import in_flight
from recap_dagster.orchestration.automation import laion_shard_sensor
from recap_dagster.orchestration.in_flight import partitions_in_flight
from recap_dagster.orchestration.launcher import DagsterGraphQL, LaunchError, serve
from recap_dagster.orchestration.partitions import shard_group_partitions
from recap_dagster.resources import DataSourcesResource

GROUPS = [f"{i * 100:05d}-{i * 100 + 99:05d}" for i in range(10)]
RECAPTIONED = dg.AssetKey("recaptioned_shards")
LATENTS = dg.AssetKey("t2i_latents")


@dg.asset(partitions_def=shard_group_partitions)
def recaptioned_shards() -> None:
    """Stands in for the real asset: only its key and partitions matter here."""


@dg.asset(partitions_def=shard_group_partitions, deps=[recaptioned_shards])
def t2i_latents() -> None:
    """Another asset on the same partitions."""


DEFS = dg.Definitions(
    assets=[recaptioned_shards, t2i_latents],
    jobs=[
        dg.define_asset_job("whole_job", selection=[recaptioned_shards, t2i_latents]),
        dg.define_asset_job("latents_job", selection=[t2i_latents]),
    ],
)


def _origin(job_name: str):
    """Where the run queue would launch a job from: a queued run must name it."""
    repository = RemoteRepositoryOrigin(RegisteredCodeLocationOrigin("tests"), "__repository__")
    return repository.get_job_origin(job_name)


def _add_run(
    instance: dg.DagsterInstance,
    status: dg.DagsterRunStatus,
    tags: dict[str, str],
    assets: set[dg.AssetKey] | None,
    job_name: str = "__ASSET_JOB",
) -> None:
    """A run as an asset backfill or a UI launch records it (no execution plan)."""
    run = dg.DagsterRun(
        job_name=job_name,
        run_id=str(uuid.uuid4()),
        status=status,
        tags=tags,
        asset_selection=frozenset(assets) if assets is not None else None,
        remote_job_origin=_origin(job_name),
    )
    instance.add_run(run)


def _one(group: str) -> dict[str, str]:
    return {"dagster/partition": group}


def _range(start: str, end: str) -> dict[str, str]:
    return {
        "dagster/asset_partition_range_start": start,
        "dagster/asset_partition_range_end": end,
    }


def test_runs_of_any_job_single_or_ranged_count_while_in_flight() -> None:
    status = dg.DagsterRunStatus
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(shard_group_partitions.name, GROUPS)
        assert partitions_in_flight(instance, RECAPTIONED, shard_group_partitions) == set()
        # A backfill's run of one group (another job name than the schedule's).
        _add_run(instance, status.QUEUED, _one(GROUPS[0]), {RECAPTIONED, LATENTS})
        # A ranged run (a single-run backfill policy): every group from start to end.
        _add_run(instance, status.STARTED, _range(GROUPS[2], GROUPS[4]), {RECAPTIONED})
        # Done: not in flight any more.
        _add_run(instance, status.SUCCESS, _one(GROUPS[5]), {RECAPTIONED})
        _add_run(instance, status.FAILURE, _range(GROUPS[5], GROUPS[6]), {RECAPTIONED})
        # Running, but another asset of the same partitions.
        _add_run(instance, status.NOT_STARTED, _one(GROUPS[7]), {LATENTS})
        # The schedule's own job, recorded without an asset selection nor a plan: counted
        # only when its job is named.
        _add_run(instance, status.STARTING, _one(GROUPS[8]), None, "recaption_shards_job")
        expected = {GROUPS[0], GROUPS[2], GROUPS[3], GROUPS[4]}
        assert partitions_in_flight(instance, RECAPTIONED, shard_group_partitions) == expected
        assert partitions_in_flight(
            instance, RECAPTIONED, shard_group_partitions, job_names={"recaption_shards_job"}
        ) == expected | {GROUPS[8]}
        assert partitions_in_flight(instance, LATENTS, shard_group_partitions) == {
            GROUPS[0], GROUPS[7]
        }  # fmt: skip


def test_whole_asset_job_runs_are_read_from_their_execution_plan() -> None:
    """A sensor's or schedule's run request names no assets: the run's execution plan
    says which assets it writes."""
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(shard_group_partitions.name, GROUPS)
        for job, group in (("whole_job", GROUPS[1]), ("latents_job", GROUPS[2])):
            run = instance.create_run_for_job(
                DEFS.resolve_job_def(job),
                tags=_one(group),
                status=dg.DagsterRunStatus.QUEUED,
                remote_job_origin=_origin(job),
            )
            assert run.asset_selection is None and run.execution_plan_snapshot_id
        assert partitions_in_flight(instance, RECAPTIONED, shard_group_partitions) == {GROUPS[1]}
        assert partitions_in_flight(instance, LATENTS, shard_group_partitions) == {
            GROUPS[1], GROUPS[2]
        }  # fmt: skip


DEFINITIONS_FILE = """
import dagster as dg

groups = dg.DynamicPartitionsDefinition(name="laion_shard_groups")


@dg.asset(partitions_def=groups)
def recaptioned_shards() -> None: ...


@dg.asset(partitions_def=groups, deps=[recaptioned_shards])
def t2i_latents() -> None: ...


job = dg.define_asset_job(
    "recaption_shards_job", selection=[recaptioned_shards, t2i_latents], partitions_def=groups
)
defs = dg.Definitions(assets=[recaptioned_shards, t2i_latents], jobs=[job])
"""
JOB = "recaption_shards_job"

_CANCEL = """
mutation Cancel($id: String!) {
  cancelPartitionBackfill(backfillId: $id) { __typename ... on PythonError { message } }
}
"""
_LAUNCH_JOB_BACKFILL = """
mutation Launch($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message }
  }
}
"""


def _launch_job_backfill(ui: DagsterGraphQL, job: str, partitions: list[str]) -> str:
    """The job's partitions page "Launch backfill": a job backfill, not an asset one."""
    selector = {
        "partitionSetName": f"{job}_partition_set",
        # A ``-f defs.py`` code location is named after its file.
        "repositorySelector": {
            "repositoryLocationName": "defs.py",
            "repositoryName": "__repository__",
        },
    }
    params = {"selector": selector, "partitionNames": partitions}
    answer = ui.query(_LAUNCH_JOB_BACKFILL, {"params": params})["launchPartitionBackfill"]
    assert answer["__typename"] == "LaunchBackfillSuccess", answer
    return answer["backfillId"]


def _wait_for(condition, what: str, timeout: float = 30) -> None:
    """Poll ``condition`` until it holds (the webserver writes in its own process)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not seen within {timeout:.0f} s")
        time.sleep(0.2)


def _assert_schedule_and_sensor_wait(
    instance: dg.DagsterInstance, shards: Path, groups: list[str]
) -> None:
    """Neither the backfill schedule nor the shard sensor requests a group the backfills
    will write; the sensor's new shards of such a group wait in its cursor."""
    instance.report_runless_asset_event(
        dg.AssetMaterialization("captioner_checkpoint", tags={"dagster/data_version": "v1"})
    )
    skipped = schedule_tick(instance)
    assert isinstance(skipped, dg.SkipReason), skipped
    assert "in queued or running runs" in str(skipped.skip_message)
    first = int(groups[0].split("-")[0])
    record = ShardRecord(
        f"{first:05d}0000",
        None,
        "alt",
        "https://x/0",
        {},
        None,
        None,
        "failed_to_download",
        "HTTP Error 404: Not Found",
    )
    write_shard(str(shards), first, [record])
    sources = DataSourcesResource(
        shards_root=str(shards), human_captions_path="unused", tokenizer_path="unused"
    )
    context = dg.build_sensor_context(instance=instance, resources={"sources": sources})
    result = laion_shard_sensor(context)
    assert result.run_requests == [] and result.skip_reason, result
    assert DiscoveryCursor.loads(result.cursor).pending == [f"{first:05d}"]


def test_ui_backfill_partitions_count_before_any_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Backfills launched from the UI (its GraphQL mutations) on the webserver alone: no
    daemon submits their runs, so their groups are in flight only as the backfills'."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    (tmp_path / "defs.py").write_text(DEFINITIONS_FILE)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    # One backfill a page: the older backfill is only found on the next page.
    monkeypatch.setattr(in_flight, "BACKFILL_PAGE", 1)
    groups = GROUPS[:4]
    with dg.DagsterInstance.get() as instance:

        def groups_in_flight(key: dg.AssetKey, job_names: set[str] | None = None) -> set[str]:
            return partitions_in_flight(instance, key, shard_group_partitions, job_names or set())

        instance.add_dynamic_partitions(shard_group_partitions.name, groups)
        log = tmp_path / "webserver.log"
        args = ["-f", str(tmp_path / "defs.py")]
        env = {"DAGSTER_HOME": str(home)}
        try:
            with serve("dagster-webserver", args, tmp_path, env, log) as url:
                ui = DagsterGraphQL(url)
                ui.wait_for_location(timeout=60)
                # Older: the job's backfill of two groups (both assets, by job name only).
                job_backfill = _launch_job_backfill(ui, JOB, groups[:2])
                # Newer: "Materialize all" on recaptioned_shards, an asset backfill.
                backfill_id = ui.launch_backfill([RECAPTIONED.to_user_string()], "recaption all")
                _wait_for(lambda: instance.get_backfill(backfill_id) is not None, "the backfill")
                assert instance.get_runs_count() == 0
                assert groups_in_flight(RECAPTIONED) == set(groups)
                assert groups_in_flight(LATENTS) == set()
                assert groups_in_flight(LATENTS, {JOB}) == set(groups[:2])
                _assert_schedule_and_sensor_wait(instance, tmp_path / "laion", groups)

                # What the daemon records as the backfills go: the asset backfill
                # materialized one group and failed one, the job backfill submitted its
                # first group as a run. None of them is the backfills' any more.
                backfill = instance.get_backfill(backfill_id)
                data = backfill.asset_backfill_data
                assert data is not None, "expected readable asset backfill data"

                def subset(group: str) -> AssetGraphSubset:
                    keys = shard_group_partitions.subset_with_partition_keys([group])
                    return AssetGraphSubset(partitions_subsets_by_asset_key={RECAPTIONED: keys})

                data = data._replace(
                    materialized_subset=subset(groups[0]),
                    failed_and_downstream_subset=subset(groups[1]),
                )
                instance.update_backfill(backfill._replace(asset_backfill_data=data))
                submitted = instance.get_backfill(job_backfill)._replace(
                    last_submitted_partition_name=groups[0]
                )
                instance.update_backfill(submitted)
                assert groups_in_flight(RECAPTIONED) == set(groups[2:])
                assert groups_in_flight(LATENTS, {JOB}) == {groups[1]}

                # The asset backfill canceled from the UI: nothing more will be submitted.
                answer = ui.query(_CANCEL, {"id": backfill_id})["cancelPartitionBackfill"]
                assert answer["__typename"] == "CancelBackfillSuccess", answer
                _wait_for(
                    lambda: instance.get_backfill(backfill_id).status.value != "REQUESTED",
                    "the cancellation",
                )
                assert groups_in_flight(RECAPTIONED) == set()
                assert groups_in_flight(RECAPTIONED, {JOB}) == {groups[1]}
        except LaunchError as err:
            pytest.fail(f"{err}:\n{log.read_text(errors='replace')[-4000:]}")
