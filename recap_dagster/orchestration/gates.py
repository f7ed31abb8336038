"""Blocking checks that hold across runs.

Dagster honours ``blocking`` only inside the run that evaluated the check, while a
backfill, the sensor and the schedule run each shard group in a run of its own, and the
trainer reads every group in yet another. So every step that reads a shard group asks the
instance first: did each blocking check of the group's latest materialization pass? A
group whose check failed, crashed, or never ran on that materialization is held back,
whoever launched the reader; the user lets the rest go on only by excluding the group by
name (``exclude_groups`` of ``training_corpus``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import dagster as dg

# Partition infos carry no severity: the gate reads only checks declared blocking, which
# report ERROR when they fail.
FAILED = "FAILED"
SUCCEEDED = "SUCCEEDED"


@dataclass(frozen=True)
class HeldGroup:
    """A shard group a reader must not use, and why."""

    group: str
    check: str
    reason: str

    def line(self) -> str:
        return f"{self.group}: {self.check} {self.reason}"


def held_groups(
    instance: dg.DagsterInstance,
    check_keys: Sequence[dg.AssetCheckKey],
    groups: Sequence[str],
    *,
    detail_limit: int = 20,
) -> list[HeldGroup]:
    """The groups among ``groups`` that some blocking check holds back: failed, or not
    evaluated (yet) against the group's latest materialization. One query per call
    (5,850 groups included); the failures' own descriptions (which shard, what fraction)
    are read for the first ``detail_limit`` of them."""
    wanted = set(groups)
    if not wanted or not check_keys:
        return []
    storage = instance.event_log_storage
    infos = {
        (info.check_key, info.partition_key): info
        for info in storage.get_asset_check_partition_info(list(check_keys))
        if info.partition_key in wanted
    }
    held: list[HeldGroup] = []
    details = 0
    for group in sorted(wanted):
        for key in check_keys:
            info = infos.get((key, group))
            if info is None:
                held.append(HeldGroup(group, key.name, "has not run on this group"))
                continue
            status = info.latest_execution_status.value
            if status not in (FAILED, SUCCEEDED):  # planned or running
                held.append(HeldGroup(group, key.name, "has not finished on this group"))
            elif not info.is_current:
                held.append(
                    HeldGroup(group, key.name, "has not run on the group's latest materialization")
                )
            elif status == FAILED:
                reason = "failed"
                if details < detail_limit:
                    details += 1
                    reason = "failed: " + _failure_description(
                        instance, key, group, info.latest_planned_run_id
                    )
                held.append(HeldGroup(group, key.name, reason))
    return held


def _failure_description(
    instance: dg.DagsterInstance, key: dg.AssetCheckKey, group: str, run_id: str | None
) -> str:
    """The failed evaluation's own description (which shard, what fraction), from its run."""
    if run_id:
        for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION):
            evaluation = entry.dagster_event.asset_check_evaluation_data
            if evaluation.asset_check_key == key and evaluation.partition in (group, None):
                return evaluation.description or "no description"
    return "no description"


def held_message(held: Sequence[HeldGroup], *, what: str, hint: str) -> str:
    """One error message for a reader that found held groups."""
    groups = sorted({h.group for h in held})
    lines = [h.line() for h in held[:10]]
    more = f"\n... and {len(held) - 10} more" if len(held) > 10 else ""
    return (
        f"{what}: blocking checks hold back {len(groups)} shard group(s) "
        f"({', '.join(groups[:10])}{', ...' if len(groups) > 10 else ''}):\n"
        + "\n".join(lines)
        + more
        + f"\n{hint}"
    )
