"""Partitions of an asset that queued or running work will write, whoever launched it.

Runs of any job count (the schedule's, the sensor's, an asset backfill's ``__ASSET_JOB``
runs, a UI launch), whether they carry one partition or a partition range, and so do the
partitions of an asset backfill still in progress that it has not submitted as runs yet:
a backfill launched from the UI submits its runs over several daemon ticks, so between
ticks its remaining partitions exist only in the backfill.

Everything goes through the instance's public methods; the backfill and run objects are
read by attribute, never imported from private Dagster modules.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import dagster as dg

IN_FLIGHT_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]
PARTITION_TAG = "dagster/partition"
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
# BulkActionStatus.REQUESTED: the backfill is in progress (its enum is not public API, so
# compare its value).
BACKFILL_IN_PROGRESS = "REQUESTED"
# Bounds on one call's work: the newest MAX_RUNS in-flight runs and the newest MAX_BACKFILLS
# backfills (of any status: the status filter needs a private class), read in pages.
MAX_RUNS = 10_000
MAX_BACKFILLS = 1_000
BACKFILL_PAGE = 100


def partitions_in_flight(
    instance: dg.DagsterInstance,
    asset_key: dg.AssetKey,
    partitions_def: dg.DynamicPartitionsDefinition,
    job_names: Collection[str] = (),
) -> set[str]:
    """Partitions of ``asset_key`` that a queued or running run of any job, or a backfill
    in progress, will materialize.

    ``partitions_def`` (the asset's) resolves partition ranges. A run or job backfill of
    one of ``job_names`` that names no assets counts as targeting ``asset_key`` (the
    schedule's and sensor's job: its runs may be recorded without an execution plan, and
    a job backfill records no assets at all); other runs without an asset selection are
    read from their execution plan.
    """
    runs = _runs_in_flight(instance, asset_key, partitions_def, job_names)
    return runs | _backfills_in_flight(instance, asset_key, job_names)


def _runs_in_flight(
    instance: dg.DagsterInstance,
    asset_key: dg.AssetKey,
    partitions_def: dg.DynamicPartitionsDefinition,
    job_names: Collection[str],
) -> set[str]:
    """Partitions of ``asset_key`` that queued or running runs will write."""
    records = instance.get_run_records(dg.RunsFilter(statuses=IN_FLIGHT_STATUSES), limit=MAX_RUNS)
    plans: dict[str, bool] = {}  # execution plan snapshot id -> materializes asset_key
    keys: list[str] | None = None  # the dynamic partitions, read once for all ranges
    found: set[str] = set()
    for record in records:
        run = record.dagster_run
        if not _run_targets(instance, run, asset_key, job_names, plans):
            continue
        tags = run.tags
        if PARTITION_TAG in tags:
            found.add(tags[PARTITION_TAG])
        elif tags.get(RANGE_START_TAG) and tags.get(RANGE_END_TAG):
            if keys is None:
                keys = list(partitions_def.get_partition_keys(dynamic_partitions_store=instance))
            found |= _key_range(keys, tags[RANGE_START_TAG], tags[RANGE_END_TAG])
    return found


def _run_targets(
    instance: dg.DagsterInstance,
    run: dg.DagsterRun,
    asset_key: dg.AssetKey,
    job_names: Collection[str],
    plans: dict[str, bool],
) -> bool:
    """Whether ``run`` materializes ``asset_key``."""
    if run.asset_selection is not None:  # backfill and UI runs: the assets they execute
        return asset_key in run.asset_selection
    if run.job_name in job_names:
        return True
    # A whole asset job (a schedule's or sensor's run request names no assets): its
    # execution plan says which assets its steps output. Runs of one job share a snapshot.
    snapshot_id = run.execution_plan_snapshot_id
    if snapshot_id is None:
        return False
    if snapshot_id not in plans:
        plan = instance.get_execution_plan_snapshot(snapshot_id)
        plans[snapshot_id] = plan is not None and asset_key in _plan_assets(plan)
    return plans[snapshot_id]


def _plan_assets(plan) -> set[dg.AssetKey]:
    """Assets output by the steps an execution plan snapshot executes."""
    executed = set(plan.step_keys_to_execute or ())
    return {
        output.properties.asset_key
        for step in plan.steps
        if not executed or step.key in executed
        for output in step.outputs
        if output.properties is not None and output.properties.asset_key is not None
    }


def _key_range(keys: Sequence[str], start: str, end: str) -> set[str]:
    """The partitions from ``start`` to ``end`` in the definition's order (both ends
    when one was deleted since: the run still writes them)."""
    if start in keys and end in keys:
        return set(keys[keys.index(start) : keys.index(end) + 1])
    return {start, end}


def _backfills_in_flight(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey, job_names: Collection[str]
) -> set[str]:
    """Partitions of ``asset_key`` that backfills in progress have yet to finish."""
    found: set[str] = set()
    cursor = None
    for _ in range(MAX_BACKFILLS // BACKFILL_PAGE):
        page = instance.get_backfills(cursor=cursor, limit=BACKFILL_PAGE)
        for backfill in page:
            if backfill.status.value == BACKFILL_IN_PROGRESS:
                found |= _backfill_remaining(instance, backfill, asset_key, job_names)
        if len(page) < BACKFILL_PAGE:
            break
        cursor = page[-1].backfill_id
    return found


def _backfill_remaining(
    instance: dg.DagsterInstance, backfill, asset_key: dg.AssetKey, job_names: Collection[str]
) -> set[str]:
    """Partitions of ``asset_key`` that ``backfill`` targets and has not yet materialized
    or given up on (failed, or downstream of a failure)."""
    data = backfill.asset_backfill_data
    if data is not None:
        remaining = data.get_targeted_partitions_without_materialization_status()
        subset = remaining.partitions_subsets_by_asset_key.get(asset_key)
        if subset is None:
            return set()
        # Key-range subsets of dynamic partitions resolve against the instance.
        with dg.partition_loading_context(dynamic_partitions_store=instance):
            return set(subset.get_partition_keys())
    # Older asset backfills stored their data serialized against the asset graph, which
    # only a code location can read: left out (Dagster 1.13 stores it readable).
    if backfill.is_asset_backfill:
        return set()
    # A job backfill: its partitions after the last one it submitted as a run (the
    # submitted ones are runs, counted above while they are in flight).
    targets = backfill.job_name in job_names or asset_key in (backfill.asset_selection or ())
    names = list(backfill.partition_names or ()) if targets else []
    last = backfill.last_submitted_partition_name
    return set(names[names.index(last) + 1 :] if last in names else names)
