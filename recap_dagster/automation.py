"""Sensors, schedules and jobs."""

import json

import dagster as dg

from recap_dagster.assets.recaption import (
    RANGE_END_TAG,
    RANGE_START_TAG,
    SHARDS_PER_RUN,
    recaptioned_shards,
)
from recap_dagster.discovery import discover_new_shards
from recap_dagster.partitions import laion_shards_partitions
from recap_dagster.pool_watchdog import GPU_POOL, sweep_pool
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
# A tick requests at most this many runs (8 shards each): at LAION-2B's 230,000 shards a
# single tick would otherwise submit ~29,000 runs. Later ticks take the rest; runs still
# queued or running are not requested twice. A UI backfill submits everything at once.
MAX_RUNS_PER_TICK = 500
MAX_IN_FLIGHT = 10_000

recaption_job = dg.define_asset_job(
    "recaption_shards_job",
    selection=dg.AssetSelection.assets(recaptioned_shards),
    partitions_def=laion_shards_partitions,
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


def current_captioner_since(instance: dg.DagsterInstance) -> tuple[str, int] | None:
    """(data version, storage id of its first materialization) of the current captioner:
    shards recaptioned after that event used it. Walks back only over re-materializations
    that kept the same weights."""
    version, since, cursor = None, None, None
    while True:
        page = instance.fetch_materializations(CAPTIONER_KEY, limit=100, cursor=cursor)
        for record in page.records:
            tag = record.asset_materialization.tags.get(DATA_VERSION_TAG)
            if since is not None and tag != version:
                return version, since
            version, since = tag, record.storage_id
        if not page.has_more:
            return None if since is None else (version, since)
        cursor = page.cursor


def shards_in_flight(instance: dg.DagsterInstance, all_shards: list[str]) -> set[str]:
    """Shards that a queued or running recaptioning run will write."""
    position = {key: i for i, key in enumerate(all_shards)}
    busy: set[str] = set()
    for record in instance.get_run_records(
        dg.RunsFilter(job_name=recaption_job.name, statuses=IN_FLIGHT), limit=MAX_IN_FLIGHT
    ):
        tags = record.dagster_run.tags
        start, end = tags.get(RANGE_START_TAG), tags.get(RANGE_END_TAG)
        if start in position and end in position:
            busy.update(all_shards[position[start] : position[end] + 1])
        elif tags.get(PARTITION_TAG):
            busy.add(tags[PARTITION_TAG])
    return busy


def shards_needing_recaption(instance: dg.DagsterInstance, all_shards: list[str]) -> list[str]:
    """Registered shards with no recaption by the current captioner (never recaptioned, or
    by an older one). One grouped query over the materializations since the current
    captioner's: the work does not grow with older history."""
    current = current_captioner_since(instance)
    if current is None:
        return []
    _, since = current
    fresh = instance.get_materialized_partitions(RECAPTIONED_KEY, after_cursor=since)
    return [key for key in all_shards if key not in fresh]


def ranged_run_requests(
    shards: list[str], all_shards: list[str], tags: dict, run_key_prefix: str | None = None
) -> list[dg.RunRequest]:
    """One run per group of up to SHARDS_PER_RUN consecutive shards (one model load each);
    with ``run_key_prefix``, each run's key is the prefix plus its first and last shard."""
    position = {key: i for i, key in enumerate(all_shards)}
    ordered = sorted(shards, key=position.__getitem__)
    groups: list[list[str]] = []
    for key in ordered:
        if (
            groups
            and position[key] == position[groups[-1][-1]] + 1
            and len(groups[-1]) < SHARDS_PER_RUN
        ):
            groups[-1].append(key)
        else:
            groups.append([key])
    return [
        dg.RunRequest(
            run_key=f"{run_key_prefix}{group[0]}-{group[-1]}" if run_key_prefix else None,
            tags={**tags, RANGE_START_TAG: group[0], RANGE_END_TAG: group[-1]},
        )
        for group in groups
    ]


def new_shard_run_requests(
    instance: dg.DagsterInstance, new_keys: list[str]
) -> list[dg.RunRequest]:
    """Recaptioning runs for shards the sensor registers in this tick: ranges of up to
    SHARDS_PER_RUN (one model load each). Keys appended together in sorted order are
    consecutive partitions, so any run of them is a valid partition range; a key that was
    registered before (elsewhere in the partition order) gets a run of its own."""
    name = laion_shards_partitions.name
    known = {key for key in new_keys if instance.has_dynamic_partition(name, key)}
    fresh = [key for key in new_keys if key not in known]
    ranged = ranged_run_requests(fresh, fresh, {"recap/sensor": "new-shards"}, "recaption-")
    alone = [dg.RunRequest(partition_key=key, run_key=f"recaption-{key}") for key in sorted(known)]
    return ranged + alone


@dg.sensor(
    job=recaption_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Lists the LAION source root, adds each newly completed shard as a partition "
    "and, once a captioner checkpoint exists, requests their recaptioning in ranged runs "
    "(several shards per run, one model load per run).",
)
def laion_shard_sensor(
    context: dg.SensorEvaluationContext, sources: DataSourcesResource
) -> dg.SensorResult:
    new_keys, cursor = discover_new_shards(sources.shards_root, context.cursor)
    if not new_keys:
        return dg.SensorResult(
            skip_reason=f"no new shards under {sources.shards_root}", cursor=cursor
        )
    context.log.info(f"{len(new_keys)} new shard(s): {new_keys[:5]}...")
    run_requests = []
    if captioner_version(context.instance) is not None:
        run_requests = new_shard_run_requests(context.instance, new_keys)
    else:
        context.log.info("no captioner_checkpoint yet: the backfill schedule will recaption later")
    return dg.SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[laion_shards_partitions.build_add_request(new_keys)],
        cursor=cursor,
    )


@dg.schedule(
    job=recaption_job,
    cron_schedule="0 * * * *",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Hourly backfill of every shard that is missing or was recaptioned by an older "
    "captioner checkpoint, several shards per run.",
)
def recaption_backfill_schedule(context: dg.ScheduleEvaluationContext):
    if captioner_version(context.instance) is None:
        return dg.SkipReason("no captioner_checkpoint materialized yet")
    all_shards = context.instance.get_dynamic_partitions(laion_shards_partitions.name)
    todo = shards_needing_recaption(context.instance, all_shards)
    if not todo:
        return dg.SkipReason("every shard is recaptioned with the current captioner")
    busy = shards_in_flight(context.instance, all_shards)
    waiting = [key for key in todo if key not in busy]
    if not waiting:
        return dg.SkipReason(f"all {len(todo)} shard(s) to recaption are in queued or running runs")
    requests = ranged_run_requests(waiting, all_shards, {"recap/backfill": "missing-or-stale"})
    context.log.info(
        f"{len(todo)} shard(s) not recaptioned by the current captioner, {len(busy)} in "
        f"flight; requesting {min(len(requests), MAX_RUNS_PER_TICK)} of {len(requests)} runs"
    )
    return requests[:MAX_RUNS_PER_TICK]


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
