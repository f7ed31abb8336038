"""Sensors, schedules and jobs."""

import json

import dagster as dg

from recap_dagster.assets.recaption import recaptioned_shards
from recap_dagster.corpus.discovery import discover_new_shards
from recap_dagster.corpus.shard_groups import group_of
from recap_dagster.orchestration.partitions import shard_group_partitions
from recap_dagster.orchestration.pool_watchdog import GPU_POOL, sweep_pool
from recap_dagster.resources import DataSourcesResource

CAPTIONER_KEY = dg.AssetKey("captioner_checkpoint")
RECAPTIONED_KEY = dg.AssetKey("recaptioned_shards")
DATA_VERSION_TAG = "dagster/data_version"
CAPTIONER_INPUT_TAG = "dagster/input_data_version/captioner_checkpoint"
PARTITION_TAG = "dagster/partition"
IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]
# A tick requests at most this many runs (one group of up to 100 shards each); later ticks
# take the rest, and groups of queued or running runs are not requested twice. A backfill
# from the UI submits everything at once.
MAX_RUNS_PER_TICK = 500
MAX_IN_FLIGHT = 10_000

recaption_job = dg.define_asset_job(
    "recaption_shards_job",
    selection=dg.AssetSelection.assets(recaptioned_shards),
    partitions_def=shard_group_partitions,
    description="Recaption LAION shards with the current captioner checkpoint.",
    # Run retries re-run a run whose worker died (lost machine, preempted pod). Step
    # failures are left alone: transient ones were retried by the step's RetryPolicy, bad
    # data fails the same way again.
    tags={"dagster/max_retries": "2", "dagster/retry_on_asset_or_op_failure": "false"},
)


def captioner_version(instance: dg.DagsterInstance) -> str | None:
    """Data version of the latest captioner_checkpoint materialization, if any."""
    event = instance.get_latest_materialization_event(CAPTIONER_KEY)
    if event is None or event.asset_materialization is None:
        return None
    return event.asset_materialization.tags.get(DATA_VERSION_TAG)


def current_captioner_since(instance: dg.DagsterInstance) -> int | None:
    """Storage id of the current captioner's first materialization (None: none yet):
    shards recaptioned after that event used it. Walks back only over re-materializations
    that kept the same weights."""
    version, since, cursor = None, None, None
    while True:
        page = instance.fetch_materializations(CAPTIONER_KEY, limit=100, cursor=cursor)
        for record in page.records:
            tag = record.asset_materialization.tags.get(DATA_VERSION_TAG)
            if since is not None and tag != version:
                return since
            version, since = tag, record.storage_id
        if not page.has_more:
            return since
        cursor = page.cursor


def groups_in_flight(instance: dg.DagsterInstance) -> set[str]:
    """Groups that a queued or running recaptioning run will write."""
    records = instance.get_run_records(
        dg.RunsFilter(job_name=recaption_job.name, statuses=IN_FLIGHT), limit=MAX_IN_FLIGHT
    )
    return {
        r.dagster_run.tags[PARTITION_TAG] for r in records if PARTITION_TAG in r.dagster_run.tags
    }


def groups_needing_recaption(instance: dg.DagsterInstance, groups: list[str]) -> list[str]:
    """Groups with no recaption by the current captioner (never recaptioned, or by an older
    one). One grouped query over the materializations since the current captioner's: the
    work does not grow with older history."""
    since = current_captioner_since(instance)
    if since is None:
        return []
    fresh = instance.get_materialized_partitions(RECAPTIONED_KEY, after_cursor=since)
    return [group for group in groups if group not in fresh]


def new_shard_run_requests(
    instance: dg.DagsterInstance, new_shards: list[str]
) -> tuple[list[str], list[dg.RunRequest]]:
    """(groups to register, runs to request) for shards the sensor found in this tick: one
    run per group with new shards (one model load; its shards already done are kept)."""
    last = {group_of(shard): shard for shard in sorted(new_shards)}  # group -> its last new
    name = shard_group_partitions.name
    unknown = [group for group in last if not instance.has_dynamic_partition(name, group)]
    requests = [
        dg.RunRequest(partition_key=group, run_key=f"recaption-{group}-upto-{shard}")
        for group, shard in last.items()
    ]
    return unknown, requests


@dg.sensor(
    job=recaption_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Lists the LAION source root, adds the group of each newly completed shard as "
    "a partition and, once a captioner checkpoint exists, requests one recaptioning run per "
    "group with new shards (one model load per run).",
)
def laion_shard_sensor(
    context: dg.SensorEvaluationContext, sources: DataSourcesResource
) -> dg.SensorResult:
    new_shards, cursor = discover_new_shards(sources.shards_root, context.cursor)
    if not new_shards:
        return dg.SensorResult(
            skip_reason=f"no new shards under {sources.shards_root}", cursor=cursor
        )
    unknown, run_requests = new_shard_run_requests(context.instance, new_shards)
    context.log.info(
        f"{len(new_shards)} new shard(s) {new_shards[:3]}... in {len(run_requests)} group(s)"
    )
    if captioner_version(context.instance) is None:
        context.log.info("no captioner_checkpoint yet: the backfill schedule will recaption later")
        run_requests = []
    return dg.SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[shard_group_partitions.build_add_request(unknown)]
        if unknown
        else [],
        cursor=cursor,
    )


@dg.schedule(
    job=recaption_job,
    cron_schedule="0 * * * *",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Hourly backfill of every shard group that is missing or was recaptioned by an "
    "older captioner checkpoint, one run per group.",
)
def recaption_backfill_schedule(context: dg.ScheduleEvaluationContext):
    if captioner_version(context.instance) is None:
        return dg.SkipReason("no captioner_checkpoint materialized yet")
    groups = context.instance.get_dynamic_partitions(shard_group_partitions.name)
    todo = groups_needing_recaption(context.instance, groups)
    if not todo:
        return dg.SkipReason("every shard group is recaptioned with the current captioner")
    busy = groups_in_flight(context.instance)
    waiting = [group for group in todo if group not in busy]
    if not waiting:
        return dg.SkipReason(f"all {len(todo)} group(s) to recaption are in queued or running runs")
    context.log.info(
        f"{len(todo)} group(s) not recaptioned by the current captioner, {len(busy)} in "
        f"flight; requesting {min(len(waiting), MAX_RUNS_PER_TICK)} of {len(waiting)}"
    )
    tags = {"recap/backfill": "missing-or-stale"}
    return [dg.RunRequest(partition_key=group, tags=tags) for group in waiting[:MAX_RUNS_PER_TICK]]


@dg.sensor(
    minimum_interval_seconds=15,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Watches the gpu pool: frees the slots of runs that ended or whose worker died "
    "(SIGKILL, OOM, lost machine), marking such runs failed, and tells each waiting run which "
    "run holds the pool and since when.",
)
def gpu_pool_watchdog(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    told = json.loads(context.cursor) if context.cursor else {}
    sweep = sweep_pool(context.instance, GPU_POOL, told)
    for line in sweep.freed:
        context.log.warning(line)
    return dg.SensorResult(skip_reason=sweep.summary(), cursor=json.dumps(told, sort_keys=True))
