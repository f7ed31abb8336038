"""Sensors, schedules and jobs."""

import json

import dagster as dg

from recap_dagster import settings
from recap_dagster.assets.latents import t2i_latents
from recap_dagster.assets.recaption import RECAPTION_GATE, recaptioned_shards
from recap_dagster.corpus.discovery import (
    GroupObservation,
    defer_shards,
    discover_new_shards,
    observe_groups,
)
from recap_dagster.corpus.shard_groups import group_of
from recap_dagster.orchestration.gates import held_groups
from recap_dagster.orchestration.in_flight import partitions_in_flight
from recap_dagster.orchestration.partitions import shard_group_partitions
from recap_dagster.orchestration.pool_watchdog import GPU_POOL, sweep_pool
from recap_dagster.orchestration.versions import DATA_VERSION_TAG
from recap_dagster.resources import DataSourcesResource

CAPTIONER_KEY = dg.AssetKey("captioner_checkpoint")
RECAPTIONED_KEY = dg.AssetKey("recaptioned_shards")
LAION_SHARDS_KEY = dg.AssetKey("laion_shards")
BASE_T2I_KEY = dg.AssetKey("base_t2i_model")
# A tick requests at most this many runs (one group of up to 100 shards each); later ticks
# take the rest, and groups that queued or running runs or backfills in progress will write
# are not requested twice. A backfill from the UI submits everything at once.
MAX_RUNS_PER_TICK = 500

recaption_job = dg.define_asset_job(
    "recaption_shards_job",
    # One run per group: recaptions, their blocking checks, then the latents (skipped by
    # Dagster in the run, and refused by the gate in any run, when a blocking check failed).
    selection=dg.AssetSelection.assets(recaptioned_shards, t2i_latents),
    partitions_def=shard_group_partitions,
    description="Recaption a group of LAION shards with the current captioner checkpoint, "
    "check it, and cache its latents with the current base model's VAE.",
    # Run retries re-run a run whose worker died (lost machine, preempted pod). Step
    # failures are left alone: transient ones were retried by the step's RetryPolicy, bad
    # data fails the same way again.
    tags={"dagster/max_retries": "2", "dagster/retry_on_asset_or_op_failure": "false"},
)


GROUP_CHECKED = dg.AssetSelection.checks_for_assets(recaptioned_shards, t2i_latents)
# The checks as jobs of the code location: the UI and `dg launch` run them as CI does
# (`recap-dagster check` executes these two).
asset_checks_job = dg.define_asset_job(
    "recap_asset_checks",
    selection=dg.AssetSelection.all_asset_checks() - GROUP_CHECKED,
    description="Every asset check that is not per shard group (human captions, the report).",
)
shard_group_checks_job = dg.define_asset_job(
    "shard_group_checks",
    selection=GROUP_CHECKED,
    partitions_def=shard_group_partitions,
    description="The checks of one shard group's recaptions and latents; launch a partition "
    "to check a group again (e.g. after fixing its shards).",
)
CHECK_JOBS = {False: asset_checks_job, True: shard_group_checks_job}  # by partitioned-ness


def captioner_version(instance: dg.DagsterInstance) -> str | None:
    """Data version of the latest captioner_checkpoint materialization, if any."""
    event = instance.get_latest_materialization_event(CAPTIONER_KEY)
    if event is None or event.asset_materialization is None:
        return None
    return event.asset_materialization.tags.get(DATA_VERSION_TAG)


def current_version_since(instance: dg.DagsterInstance, key: dg.AssetKey) -> int | None:
    """Storage id of the first event (materialization, else observation) of ``key``'s
    current data version (None: none yet): outputs made after it used that version. Walks
    back only over events that kept the same version."""
    version, since, cursor = None, None, None
    fetch = instance.fetch_materializations
    if instance.get_latest_materialization_event(key) is None:
        fetch = instance.fetch_observations  # an observed input (production)
    while True:
        page = fetch(key, limit=100, cursor=cursor)
        for record in page.records:
            event = record.asset_materialization or record.event_log_entry.asset_observation
            tag = event.tags.get(DATA_VERSION_TAG) if event is not None else None
            if since is not None and tag != version:
                return since
            version, since = tag, record.storage_id
        if not page.has_more:
            return since
        cursor = page.cursor


def groups_in_flight(instance: dg.DagsterInstance) -> set[str]:
    """Groups whose recaptions or latents queued or running runs of any job (ours, a UI
    launch, a backfill's) or backfills in progress will write."""
    jobs = {recaption_job.name}
    return partitions_in_flight(
        instance, RECAPTIONED_KEY, shard_group_partitions, jobs
    ) | partitions_in_flight(instance, t2i_latents.key, shard_group_partitions, jobs)


def groups_needing_recaption(instance: dg.DagsterInstance, groups: list[str]) -> list[str]:
    """Groups with no recaption by the current captioner (never recaptioned, or by an older
    one). One grouped query over the materializations since the current captioner's: the
    work does not grow with older history."""
    return _not_made_since(instance, CAPTIONER_KEY, RECAPTIONED_KEY, groups)


def _not_made_since(
    instance: dg.DagsterInstance, model: dg.AssetKey, output: dg.AssetKey, groups: list[str]
) -> list[str]:
    """Groups of ``output`` not materialized since ``model`` took its current version."""
    since = current_version_since(instance, model)
    if since is None:
        return []
    fresh = instance.get_materialized_partitions(output, after_cursor=since)
    return [group for group in groups if group not in fresh]


def groups_needing_latents(instance: dg.DagsterInstance, groups: list[str]) -> list[str]:
    """Groups without latents made since the base model took its current version (like
    ``groups_needing_recaption``: one grouped query, not all history)."""
    return _not_made_since(instance, BASE_T2I_KEY, t2i_latents.key, groups)


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
    minimum_interval_seconds=settings.sensor_interval(60),
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
    # Shards of a group that a run or backfill is writing now wait for it to end (a second
    # run would write the same group at the same time): the next ticks report them again.
    busy = groups_in_flight(context.instance)
    waiting = [shard for shard in new_shards if group_of(shard) in busy]
    if waiting:
        cursor = defer_shards(cursor, waiting)
        new_shards = [shard for shard in new_shards if group_of(shard) not in busy]
        context.log.info(f"{len(waiting)} new shard(s) wait for their group's run to end")
        if not new_shards:
            return dg.SensorResult(
                skip_reason=f"{len(waiting)} new shard(s) wait for their group's run", cursor=cursor
            )
    unknown, run_requests = new_shard_run_requests(context.instance, new_shards)
    context.log.info(
        f"{len(new_shards)} new shard(s) {new_shards[:3]}... in {len(run_requests)} group(s)"
    )
    known = {request.partition_key for request in run_requests} - set(unknown)
    observations = [
        _group_observation(group, seen)
        for group, seen in observe_groups(sources.shards_root, new_shards, known).items()
    ]
    if captioner_version(context.instance) is None:
        context.log.info("no captioner_checkpoint yet: the backfill schedule will recaption later")
        run_requests = []
    return dg.SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[shard_group_partitions.build_add_request(unknown)]
        if unknown
        else [],
        asset_events=observations,
        cursor=cursor,
    )


def _group_observation(group: str, seen: GroupObservation) -> dg.AssetObservation:
    """What the partition page of ``laion_shards`` shows for a group."""
    return dg.AssetObservation(
        asset_key=LAION_SHARDS_KEY,
        partition=group,
        metadata={
            "shards": len(seen.shards),
            "first_shard": seen.shards[0],
            "last_shard": seen.shards[-1],
            "dagster/row_count": seen.rows,
            "delivered": seen.delivered,
            "not_delivered": seen.rows - seen.delivered,
            "bytes": seen.bytes,
            "unreadable_stats": dg.MetadataValue.json(seen.unreadable_stats),
        },
    )


@dg.schedule(
    job=recaption_job,
    cron_schedule="0 * * * *",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Hourly backfill of every shard group that is missing, was recaptioned by an "
    "older captioner checkpoint or has no latents of the current base model, one run per "
    "group (groups held back by a failed blocking check wait for the user).",
)
def recaption_backfill_schedule(context: dg.ScheduleEvaluationContext):
    if captioner_version(context.instance) is None:
        return dg.SkipReason("no captioner_checkpoint materialized yet")
    instance = context.instance
    groups = instance.get_dynamic_partitions(shard_group_partitions.name)
    recaption = set(groups_needing_recaption(instance, groups))
    latents = set(groups_needing_latents(instance, groups)) - recaption
    # A group whose recaptions failed a blocking check waits for the user: running it
    # again every hour would fail the same way.
    held = {h.group for h in held_groups(instance, RECAPTION_GATE, sorted(latents))}
    todo = [group for group in groups if group in recaption or (group in latents - held)]
    if not todo:
        return dg.SkipReason(
            "every shard group is recaptioned with the current captioner and has latents of "
            "the current base model" + (f" ({len(held)} held back by checks)" if held else "")
        )
    busy = groups_in_flight(context.instance)
    waiting = [group for group in todo if group not in busy]
    if not waiting:
        return dg.SkipReason(f"all {len(todo)} group(s) to recaption are in queued or running runs")
    context.log.info(
        f"{len(recaption)} group(s) not recaptioned by the current captioner, "
        f"{len(latents - held)} without latents of the current base, {len(busy)} in flight, "
        f"{len(held)} held back by checks; requesting "
        f"{min(len(waiting), MAX_RUNS_PER_TICK)} of {len(waiting)}"
    )
    tags = {"recap/backfill": "missing-or-stale"}
    return [dg.RunRequest(partition_key=group, tags=tags) for group in waiting[:MAX_RUNS_PER_TICK]]


@dg.sensor(
    minimum_interval_seconds=settings.sensor_interval(15),
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
