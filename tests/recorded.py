"""Recaptions a test wrote itself, recorded in the instance as the asset records them, and
checked by the real per-group checks (the gate reads those results)."""

from __future__ import annotations

from collections.abc import Iterable

import dagster as dg

from recap_dagster.assets.captioner import captioner_checkpoint
from recap_dagster.assets.recaption import RECAPTION_GATE, recaptioned_shards
from recap_dagster.definitions import JOBS
from recap_dagster.miniworld.definitions import ASSET_CHECKS, ASSETS
from recap_dagster.orchestration.automation import (
    recaption_backfill_schedule,
    shard_group_checks_job,
)
from recap_dagster.orchestration.versions import DATA_VERSION_TAG


def record_recaptions(
    instance: dg.DagsterInstance,
    resources: dict,
    groups: Iterable[str],
    captioner_version: str = "ground-truth",
) -> dict[str, dg.AssetCheckEvaluation]:
    """Record a captioner and each group's recaptions (files already written), then run the
    groups' recaption checks for real. Returns each group's failure-fraction evaluation."""
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            captioner_checkpoint.key, tags={DATA_VERSION_TAG: captioner_version}
        )
    )
    defs = dg.Definitions(assets=ASSETS, asset_checks=ASSET_CHECKS, jobs=JOBS, resources=resources)
    job = defs.resolve_job_def(shard_group_checks_job.name).get_subset(
        asset_check_selection=set(RECAPTION_GATE)
        | {k for c in ASSET_CHECKS for k in c.check_keys if k.asset_key == recaptioned_shards.key}
    )
    evaluations = {}
    for group in groups:
        instance.report_runless_asset_event(
            dg.AssetMaterialization(
                recaptioned_shards.key,
                partition=group,
                # As the asset names it: the captioner's version first.
                tags={DATA_VERSION_TAG: f"{captioner_version}.{group}"},
            )
        )
        # A check-only subset has no partitions definition to validate a key against.
        result = job.execute_in_process(
            instance=instance, tags={"dagster/partition": group}, raise_on_error=False
        )
        for evaluation in result.get_asset_check_evaluations():
            if evaluation.check_name == "recaptioned_failure_fraction":
                evaluations[group] = evaluation
    return evaluations


def schedule_tick(instance: dg.DagsterInstance):
    """One tick of the backfill schedule, its context closed after (the context opens its
    own handle on the instance, which must not outlive the test)."""
    with dg.build_schedule_context(instance=instance) as context:
        return recaption_backfill_schedule(context)
