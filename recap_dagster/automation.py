"""Sensors, schedules and jobs."""

import json

import dagster as dg

from recap_dagster.assets.recaption import SHARDS_PER_RUN, recaptioned_shards
from recap_dagster.discovery import discover_new_shards
from recap_dagster.partitions import laion_shards_partitions
from recap_dagster.pool_watchdog import GPU_POOL, sweep_pool
from recap_dagster.resources import DataSourcesResource

CAPTIONER_KEY = dg.AssetKey("captioner_checkpoint")
RECAPTIONED_KEY = dg.AssetKey("recaptioned_shards")
DATA_VERSION_TAG = "dagster/data_version"
CAPTIONER_INPUT_TAG = "dagster/input_data_version/captioner_checkpoint"
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"

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


def shards_needing_recaption(instance: dg.DagsterInstance) -> tuple[list[str], list[str]]:
    """(missing, stale) shard keys: never recaptioned, or recaptioned by an older captioner."""
    shards = instance.get_dynamic_partitions(laion_shards_partitions.name)
    current = captioner_version(instance)
    latest: dict[str, str | None] = {}
    cursor = None
    while True:
        result = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=RECAPTIONED_KEY),
            limit=1000,
            cursor=cursor,
            ascending=False,
        )
        for record in result.records:
            materialization = record.asset_materialization
            if record.partition_key and record.partition_key not in latest and materialization:
                latest[record.partition_key] = materialization.tags.get(CAPTIONER_INPUT_TAG)
        if not result.has_more:
            break
        cursor = result.cursor
    missing = [s for s in shards if s not in latest]
    stale = [s for s in shards if s in latest and current is not None and latest[s] != current]
    return missing, stale


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
    missing, stale = shards_needing_recaption(context.instance)
    if not missing and not stale:
        return dg.SkipReason("every shard is recaptioned with the current captioner")
    all_shards = context.instance.get_dynamic_partitions(laion_shards_partitions.name)
    tags = {"recap/backfill": "missing-or-stale"}
    return ranged_run_requests(missing + stale, all_shards, tags)


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
