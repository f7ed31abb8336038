"""The main job: generate the miniworld and materialize the asset graph in a real instance.

Runs go through the local Dagster instance under ``$DAGSTER_HOME``, so everything the
main job did is visible afterwards in ``dagster dev`` (runs, lineage, metadata, checks).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import dagster as dg

from recap_dagster import settings
from recap_dagster.assets.human_captions import human_captions, human_captions_checks
from recap_dagster.definitions import default_resources
from recap_dagster.miniworld.generate import generate_miniworld
from recap_dagster.partitions import laion_shards_partitions
from recap_dagster.profiles import PROFILES
from recap_dagster.shards import list_shards


@dataclass
class PipelineSummary:
    profile: str
    lines: list[str] = field(default_factory=list)
    succeeded: bool = True

    def add(self, step: str, seconds: float, detail: str) -> None:
        self.lines.append(f"{step:<28} {seconds:8.1f} s  {detail}")

    def render(self) -> str:
        status = "succeeded" if self.succeeded else "FAILED"
        return "\n".join([f"recap-dagster pipeline ({self.profile}) {status}", *self.lines])


def register_shards(instance: dg.DagsterInstance, shards_root: str) -> list[str]:
    """Add every complete shard under ``shards_root`` as a ``laion_shards`` partition."""
    keys = [info.key for info in list_shards(shards_root) if info.complete]
    known = set(instance.get_dynamic_partitions(laion_shards_partitions.name))
    new = [k for k in keys if k not in known]
    if new:
        instance.add_dynamic_partitions(laion_shards_partitions.name, new)
    return keys


def run_pipeline(profile_name: str = "default") -> PipelineSummary:
    profile = PROFILES[profile_name]
    summary = PipelineSummary(profile_name)
    home = settings.ensure_dagster_home()

    start = time.perf_counter()
    paths = generate_miniworld(str(settings.miniworld_dir()), profile.miniworld)
    summary.add("miniworld", time.perf_counter() - start, str(paths.root))

    instance = dg.DagsterInstance.get()
    resources = default_resources()
    keys = register_shards(instance, resources["sources"].shards_root)
    summary.add("laion_shards partitions", 0.0, f"{len(keys)} shards in instance {home}")

    start = time.perf_counter()
    result = dg.materialize(
        [human_captions, *human_captions_checks],
        instance=instance,
        resources=resources,
        raise_on_error=False,
    )
    checks = result.get_asset_check_evaluations()
    failed = [c.check_name for c in checks if not c.passed]
    summary.succeeded &= result.success and not failed
    summary.add(
        "human_captions",
        time.perf_counter() - start,
        f"{sum(c.passed for c in checks)}/{len(checks)} checks passed"
        + (f"; failed: {failed}" if failed else ""),
    )
    return summary
