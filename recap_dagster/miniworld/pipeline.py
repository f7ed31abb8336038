"""The main job: the whole RECAP graph on the miniworld, launched through the instance.

It does what a user does in the UI, with the same run config (``RECAP_RUN_CONFIG``, the
profile's file): serve the workspace with ``dagster dev``, materialize the ``miniworld``
group (the inputs; unpartitioned, so one run as the group page's "Materialize all"
launches), let the ``laion_shard_sensor`` register the shard groups, then backfill every
asset ("Materialize all" on the global lineage). The backfill daemon runs everything in
dependency order (one recaptioning run per shard group, one training-and-evaluation run
per caption variant); this process reports where it is and prints the report at the end.
Everything it did stays visible in ``./dev ui`` afterwards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import torch
import yaml

from recap_dagster import settings
from recap_dagster.corpus.listing import list_shards
from recap_dagster.corpus.shard_groups import groups_of
from recap_dagster.evaluation.report import rows_markdown
from recap_dagster.miniworld.assets import MINIWORLD_GROUP, MODEL_RUNS
from recap_dagster.miniworld.definitions import ASSETS
from recap_dagster.miniworld.run_configs import (
    profile_run_config,
    profile_seeds,
    profile_side_by_side,
)
from recap_dagster.orchestration.launcher import (
    DagsterGraphQL,
    LaunchError,
    dagster_dev,
    follow_backfill,
    follow_runs,
    of_backfill,
    of_run,
)
from recap_dagster.orchestration.partitions import shard_group_partitions, variant_seed_key
from recap_dagster.orchestration.pool_watchdog import GPU_POOL

#: Relative cost of one partition of each asset in the miniworld's default profile
#: (measured wall times of a main job), for the estimate of the time left.
WORK_WEIGHTS = {
    "miniworld_corpus": 1.0,
    "base_captioner_model": 9.0,
    "base_t2i_model": 6.0,
    "captioner_checkpoint": 3.0,
    "recaptioned_shards": 2.0,
    "t2i_latents": 0.3,
    "training_corpus": 0.1,
    "sd_checkpoints": 10.0,
    "metric_reports": 1.5,
    "base_metric_report": 1.5,
    "human_eval_task": 0.1,
    "human_eval_report": 0.1,
}


def write_run_config(profile: str, seed: int) -> Path:
    """Write the run config the UI and the main job share: ``$RECAP_WORKDIR/run_config.yaml``."""
    path = settings.workdir() / "run_config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# profile {profile}, seed {seed} (written by recap-miniworld pipeline)\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(header + yaml.safe_dump(profile_run_config(profile, seed), sort_keys=False))
    tmp.replace(path)
    return path


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
        lines = [f"recap-miniworld pipeline ({self.profile}) {status}", *self.lines]
        if self.report:
            lines += ["", f"RECAP report: {self.report_uri}", "", self.report, "", self.verdict]
        return "\n".join(lines)


def _say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


def _keys(group: str | None = None, exclude_group: str | None = None) -> list[str]:
    keys = []
    for asset in ASSETS:
        if not isinstance(asset, dg.AssetsDefinition) or not asset.is_executable:
            continue
        for spec in asset.specs:
            if (group is None or spec.group_name == group) and spec.group_name != exclude_group:
                keys.append(spec.key.to_user_string())
    return keys


def _wait_for_shard_groups(instance: dg.DagsterInstance, timeout: float = 300) -> list[str]:
    """Every shard group of the corpus, once the laion_shard_sensor has registered them all
    (a tick during generation may have seen only some shards)."""
    expected = set(
        groups_of(info.key for info in list_shards(settings.shards_root()) if info.complete)
    )
    deadline = time.monotonic() + timeout
    while True:
        groups = instance.get_dynamic_partitions(shard_group_partitions.name)
        if expected <= set(groups):
            return sorted(expected)
        if time.monotonic() > deadline:
            missing = sorted(expected - set(groups))
            raise LaunchError(f"the laion_shard_sensor did not register {missing}; is it running?")
        time.sleep(2)


#: The assets partitioned by caption variant x training seed: the main job backfills the
#: profile's planned partitions of them (the backfill dialog's partition selection).
SEEDED_ASSETS = ("sd_checkpoints", "metric_reports")


def planned_partitions(seeds: dict[str, list[int]]) -> list[str]:
    """The variant x seed partition keys of a profile's seed plan."""
    return [str(variant_seed_key(v, s)) for v, values in seeds.items() for s in values]


def run_backfill(
    client: DagsterGraphQL,
    summary: PipelineSummary,
    step: str,
    keys: list[str],
    partitions: dict[str, list[str]] | None = None,
) -> bool:
    """Backfill every partition of ``keys`` (only the listed ones of those in
    ``partitions``), follow it to its end and record the outcome (with why each failed run
    failed) in ``summary``."""
    start = time.perf_counter()
    backfill_id = client.launch_backfill(
        keys, title=f"recap-miniworld: {step}", partitions=partitions
    )
    _say(f"{step}: backfill {backfill_id} of {len(keys)} assets launched")
    progress = follow_backfill(client, backfill_id, _say, weights=WORK_WEIGHTS)
    failed = [k for k, a in progress.assets.items() if a.failed]
    detail = f"backfill {backfill_id}: {progress.status}" + (
        f"; FAILED: {failed}" if failed else ""
    )
    if progress.error:
        detail += f"; {progress.error}"
    summary.add(step, time.perf_counter() - start, detail)
    if not progress.succeeded:
        for line in client.failures(of_backfill(backfill_id)):
            summary.lines.append(f"  failed: {line}")
    summary.succeeded &= progress.succeeded
    return progress.succeeded


def run_assets(
    client: DagsterGraphQL, summary: PipelineSummary, step: str, *key_sets: list[str]
) -> bool:
    """Materialize the unpartitioned assets of each of ``key_sets`` in a run of its own, the
    runs side by side; follow them to their end and record the outcome (with why a run
    failed) in ``summary``. A run that cannot be launched fails the step, but the runs
    launched before it are still followed to their end: they work on, and a next try
    finds their results."""
    start = time.perf_counter()
    run_ids: list[str] = []
    not_launched = ""
    for keys in key_sets:
        try:
            run_ids.append(client.launch_run(keys))
        except (LaunchError, OSError) as exc:
            not_launched = f"a run of {len(keys)} assets not launched: {exc}"
            _say(f"{step}: {not_launched}")
            break
        _say(f"{step}: run {run_ids[-1][:8]} of {len(keys)} assets launched")
    statuses = follow_runs(client, run_ids, _say)
    outcome = ", ".join(
        [f"run {run_id[:8]}: {status}" for run_id, status in statuses.items()]
        + ([not_launched] if not_launched else [])
    )
    summary.add(step, time.perf_counter() - start, outcome)
    failed = [run_id for run_id, status in statuses.items() if status != "SUCCESS"]
    succeeded = not (not_launched or failed)
    if failed:  # (no run ids would be no filter: every failed run of the instance)
        summary.lines.extend(f"  failed: {line}" for line in client.failures(of_run(*failed)))
    summary.succeeded &= succeeded
    return succeeded


def _read_report(
    instance: dg.DagsterInstance, client: DagsterGraphQL, summary: PipelineSummary
) -> None:
    event = instance.get_latest_materialization_event(dg.AssetKey("recap_report"))
    if event is None or event.asset_materialization is None:
        summary.succeeded = False
        return
    metadata = event.asset_materialization.metadata
    summary.report = rows_markdown([record.data for record in metadata["table"].records])
    summary.report_uri = metadata["dagster/uri"].value
    summary.verdict = "\n".join(
        f"check {name}: {status}. {description}"
        for name, status, description in client.check_results("recap_report")
    )


def _materialize_all(
    client: DagsterGraphQL,
    instance: dg.DagsterInstance,
    summary: PipelineSummary,
    seeds: dict[str, list[int]],
) -> None:
    """The miniworld, then its base models (runs side by side), then, once the sensor
    registered the shard groups, a backfill of everything else (the fine-tunes and their
    evaluations: the ``seeds`` plan's partitions); the report's table into ``summary``."""
    client.wait_for_location()
    models = [key for keys in MODEL_RUNS for key in keys]
    generator = [key for key in _keys(group=MINIWORLD_GROUP) if key not in models]
    if not (
        run_assets(client, summary, "miniworld", generator)
        and run_assets(client, summary, "miniworld base models", *MODEL_RUNS)
    ):
        return
    start = time.perf_counter()
    _say("waiting for the laion_shard_sensor to register the shard groups ...")
    groups = _wait_for_shard_groups(instance)
    summary.add("laion_shard_groups", time.perf_counter() - start, f"{len(groups)} group(s)")
    planned = planned_partitions(seeds)
    if run_backfill(
        client,
        summary,
        "RECAP (materialize all)",
        _keys(exclude_group=MINIWORLD_GROUP),
        partitions=dict.fromkeys(SEEDED_ASSETS, planned),
    ):
        _read_report(instance, client, summary)


def run_pipeline(profile: str = "default", seed: int = 0, port: int = 0) -> PipelineSummary:
    """Run the main job; ``seed`` is the training seed of the captioner fine-tune (the
    text-to-image fine-tunes use the profile's seed plan; the miniworld and the cached
    base models depend on neither)."""
    summary = PipelineSummary(f"{profile}, seed {seed}")
    seeds = profile_seeds(profile)
    home = settings.ensure_dagster_home()
    run_config = write_run_config(profile, seed)
    env = {
        "RECAP_WORKDIR": str(settings.workdir()),
        "DAGSTER_HOME": str(home),
        "RECAP_RUN_CONFIG": str(run_config),
        # The seed dimension of the fine-tunes' partitions: every seed the plan uses.
        "RECAP_TRAINING_SEEDS": ",".join(
            str(s) for s in sorted({s for values in seeds.values() for s in values})
        ),
        # The miniworld's shards are a local folder, cheap to list: the sensor looks every
        # 5 s (the sensor daemon's own loop) instead of every minute, so the shard groups
        # are registered seconds after the corpus is written.
        "RECAP_SENSOR_INTERVAL_SECONDS": "5",
    }
    instance = dg.DagsterInstance.get()
    # Create the gpu pool's slots now: Dagster creates them at the first claim, and two
    # runs of a backfill doing that at once can each get a slot. With CUDA a slot is a
    # GPU: the instance's own setting stands (its default, 1, where none is set). On a CPU
    # machine the profile sets it: steps share the cores (each gets its share of the
    # threads: two trainings side by side outpace one with every core).
    if torch.cuda.is_available():
        instance.event_log_storage.initialize_concurrency_limit_to_default(GPU_POOL)
    else:
        slots = profile_side_by_side(profile)
        instance.event_log_storage.set_concurrency_slots(GPU_POOL, slots)
    log = settings.workdir() / "dagster_dev.log"
    workspace = settings.PROJECT_ROOT / "workspace.yaml"
    with dagster_dev(workspace, env, log, port=port) as url:
        _say(f"Dagster UI at {url} (log {log}); run config {run_config}")
        _materialize_all(DagsterGraphQL(url), instance, summary, seeds)
        stopping = time.perf_counter()
        _say("stopping dagster dev ...")
    summary.add("stop dagster dev", time.perf_counter() - stopping, "webserver, daemon")
    return summary
