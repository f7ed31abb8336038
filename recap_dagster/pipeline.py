"""The main job: generate the miniworld, build the base models, materialize the asset graph.

Runs go through the local Dagster instance under ``$DAGSTER_HOME``, so everything the
main job did is visible afterwards in ``dagster dev`` (runs, lineage, metadata, checks).
Recaptioning runs once per shard group, as the sensor and the backfill schedule request it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import dagster as dg

from recap_dagster import settings
from recap_dagster.assets.inputs import INPUT_ASSETS
from recap_dagster.definitions import ASSET_CHECKS, ASSETS, default_resources
from recap_dagster.miniworld.base_captioner import build_base_captioner
from recap_dagster.miniworld.generate import generate_miniworld
from recap_dagster.miniworld.t2i_base import build_miniworld_base
from recap_dagster.partitions import CAPTION_VARIANTS, shard_group_partitions
from recap_dagster.pool_watchdog import WORKER_TAG, this_host, watching_pool
from recap_dagster.profiles import PROFILES
from recap_dagster.shard_groups import groups_of
from recap_dagster.shards import list_shards


@dataclass
class PipelineSummary:
    profile: str
    lines: list[str] = field(default_factory=list)
    succeeded: bool = True
    report: str = ""
    report_uri: str = ""
    verdict: str = ""

    def add(self, step: str, seconds: float, detail: str) -> None:
        self.lines.append(f"{step:<26} {seconds:8.1f} s  {detail}")

    def render(self) -> str:
        status = "succeeded" if self.succeeded else "FAILED"
        lines = [f"recap-dagster pipeline ({self.profile}) {status}", *self.lines]
        if self.report:
            lines += ["", f"RECAP report: {self.report_uri}", "", self.report, "", self.verdict]
        return "\n".join(lines)


def register_shard_groups(instance: dg.DagsterInstance, shards_root: str) -> list[str]:
    """Add the group of every complete shard under ``shards_root`` as a partition."""
    groups = groups_of(info.key for info in list_shards(shards_root) if info.complete)
    known = set(instance.get_dynamic_partitions(shard_group_partitions.name))
    new = [group for group in groups if group not in known]
    if new:
        instance.add_dynamic_partitions(shard_group_partitions.name, new)
    return groups


def _say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


def _materialize(
    instance: dg.DagsterInstance, selection: list[str], tags: dict | None = None, **kwargs
) -> dg.ExecuteInProcessResult:
    """Materialize ``selection`` (and its checks) with the project's resources, while the
    gpu pool's watchdog frees slots that dead runs hold and says who holds the pool."""
    with watching_pool(instance, _say):
        return dg.materialize(
            [*ASSETS, *ASSET_CHECKS],
            selection=selection,
            instance=instance,
            resources=default_resources(),
            raise_on_error=False,
            tags={**(tags or {}), WORKER_TAG: this_host()},
            **kwargs,
        )


def _report(summary: PipelineSummary, step: str, start: float, result) -> None:
    checks = result.get_asset_check_evaluations()
    failed = [c.check_name for c in checks if not c.passed and c.severity.value == "ERROR"]
    summary.succeeded &= result.success and not failed
    detail = f"run {result.run_id[:8]}, {sum(c.passed for c in checks)}/{len(checks)} checks passed"
    summary.add(
        step, time.perf_counter() - start, detail + (f"; FAILED: {failed}" if failed else "")
    )


def run_pipeline(profile_name: str = "default", seed: int = 0) -> PipelineSummary:
    """Run the main job; ``seed`` is the training seed of the captioner and text-to-image
    fine-tunes (the miniworld and the cached base models do not depend on it)."""
    profile = PROFILES[profile_name].with_seed(seed)
    summary = PipelineSummary(f"{profile_name}, seed {seed}")
    home = settings.ensure_dagster_home()
    resources = default_resources()

    start = time.perf_counter()
    paths = generate_miniworld(str(settings.miniworld_dir()), profile.miniworld)
    summary.add("miniworld", time.perf_counter() - start, str(paths.root))

    start = time.perf_counter()
    base = build_base_captioner(paths, resources["models"].base_captioner, profile.base_captioner)
    summary.add("base captioner (cached)", time.perf_counter() - start, base)

    start = time.perf_counter()
    base_t2i = build_miniworld_base(str(paths.root), resources["models"].base_t2i, profile.t2i)
    summary.add("base text-to-image (cached)", time.perf_counter() - start, base_t2i)

    instance = dg.DagsterInstance.get()
    groups = register_shard_groups(instance, resources["sources"].shards_root)
    summary.add("laion_shard_groups", 0.0, f"{len(groups)} partition(s), instance {home}")

    start = time.perf_counter()  # their versions: what the materializations build on
    result = _materialize(instance, [a.key.to_user_string() for a in INPUT_ASSETS])
    _report(summary, "inputs (observed)", start, result)
    start = time.perf_counter()
    result = _materialize(
        instance,
        ["human_captions", "captioner_checkpoint"],
        run_config=profile.captioner_run_config(),
    )
    _report(summary, "captioner_checkpoint", start, result)
    if not summary.succeeded:
        return summary

    for group in groups:  # one run per group of shards: one model load each
        start = time.perf_counter()
        result = _materialize(
            instance,
            ["recaptioned_shards"],
            partition_key=group,
            run_config=profile.recaption_run_config(),
            tags={"recap/backfill": "main-job"},
        )
        _report(summary, f"recaptioned_shards {group}", start, result)
    if not summary.succeeded:
        return summary

    for group in groups:  # the base model's latents, once for every variant
        start = time.perf_counter()
        result = _materialize(instance, ["t2i_latents"], partition_key=group)
        _report(summary, f"t2i_latents {group}", start, result)
    if not summary.succeeded:
        return summary

    for variant in CAPTION_VARIANTS:
        start = time.perf_counter()
        result = _materialize(
            instance,
            ["sd_checkpoints", "metric_reports"],
            partition_key=variant,
            run_config=profile.t2i_run_config(),
        )
        _report(summary, f"sd + metrics {variant}", start, result)
        if not result.success:
            return summary

    start = time.perf_counter()
    result = _materialize(instance, ["recap_report"])
    _report(summary, "recap_report", start, result)
    if result.success:
        metadata = result.asset_materializations_for_node("recap_report")[0].metadata
        summary.report = metadata["table"].value
        summary.report_uri = metadata["dagster/uri"].value
        summary.verdict = next(c.description for c in result.get_asset_check_evaluations())
    return summary
