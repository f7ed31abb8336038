"""Run every asset check of the project against a Dagster instance (``recap-dagster check``).

Executes the code location's check jobs in process against the instance
(``recap_asset_checks``; ``shard_group_checks`` on the latest materialized group), so the
results show in the UI as runs of those jobs; prints one row per check and returns
the exit status CI wants: 1 when a blocking (ERROR-severity) check failed or errored,
0 otherwise. Warnings are printed but never fail; checks whose asset was never
materialized are reported as skipped, since there is nothing to check yet.
"""

from __future__ import annotations

import argparse
import importlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from recap_dagster.orchestration.automation import CHECK_JOBS

SKIPPED = "skipped: not materialized"


@dataclass(frozen=True)
class CheckOutcome:
    """One check's row in the report."""

    name: str
    asset: str
    status: str  # "passed", "FAILED", "ERROR: ...", or SKIPPED
    severity: str  # ERROR or WARN
    description: str

    @property
    def blocks(self) -> bool:
        """Whether this outcome fails the command: an ERROR-severity failure or crash."""
        return self.severity == "ERROR" and self.status not in ("passed", SKIPPED)


@dataclass(frozen=True)
class ChecksReport:
    outcomes: list[CheckOutcome]
    run_id: str | None

    @property
    def exit_code(self) -> int:
        return 1 if any(o.blocks for o in self.outcomes) else 0

    def render(self) -> str:
        headers = ("check", "asset", "result", "severity", "description")
        rows = [(o.name, o.asset, o.status, o.severity, o.description) for o in self.outcomes]
        widths = [
            max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
            for i, h in enumerate(headers[:-1])
        ]

        def line(cells: Sequence[str]) -> str:
            padded = [c.ljust(w) for c, w in zip(cells[:-1], widths, strict=True)]
            return "  ".join([*padded, cells[-1]]).rstrip()

        lines = [line(headers), line(["-" * w for w in widths] + ["-" * 11])]
        lines += [line(r) for r in rows]
        blocking = [o.name for o in self.outcomes if o.blocks]
        warned = [
            o.name for o in self.outcomes if not o.blocks and o.status not in ("passed", SKIPPED)
        ]
        ran = sum(o.status != SKIPPED for o in self.outcomes)
        lines.append("")
        lines.append(
            f"{ran} of {len(self.outcomes)} checks ran"
            + (f" (run {self.run_id})" if self.run_id else "")
            + f"; {len(blocking)} blocking failure(s), {len(warned)} warning(s)"
        )
        if blocking:
            lines.append(f"FAILED (blocking): {', '.join(blocking)}")
        if warned:
            lines.append(f"warnings (not failing): {', '.join(warned)}")
        return "\n".join(lines)


def _selected(key: dg.AssetCheckKey, select: Sequence[str] | None) -> bool:
    """``--select`` names checks or assets; a check matches its own name or its asset."""
    if not select:
        return True
    return key.name in select or key.asset_key.to_user_string() in select


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


def _root_cause(error) -> str:
    """The innermost error's message: Dagster wraps what the check raised."""
    if error is None:
        return "step failed"
    while error.cause is not None:
        error = error.cause
    return _one_line(error.message)


def _latest_partition(instance: dg.DagsterInstance, asset_key: dg.AssetKey) -> str | None:
    event = instance.get_latest_materialization_event(asset_key)
    return event.asset_materialization.partition if event and event.asset_materialization else None


def _execute(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    keys: Sequence[dg.AssetCheckKey],
    partition: str | None,
    evaluations: dict[dg.AssetCheckKey, dg.AssetCheckEvaluation],
    errors: dict[dg.AssetCheckKey, str],
) -> str:
    """Run ``keys`` (one partition, or none) in one run of the code location's check job;
    record results and crashes."""
    job_def = defs.resolve_job_def(CHECK_JOBS[partition is not None].name)
    # A multi-check runs whole: select every check of a node that any key names.
    nodes = [c for c in defs.asset_checks or [] if set(c.check_keys) & set(keys)]
    wanted = {key for checks_def in nodes for key in checks_def.check_keys}
    job_def = job_def.get_subset(asset_check_selection=wanted)
    # The table below is the report; Dagster's per-step DEBUG log would bury it.
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    # The partition as a run tag: a check-only subset has no partitions definition to
    # validate a partition key against.
    result = job_def.execute_in_process(
        run_config=quiet,
        instance=instance,
        raise_on_error=False,
        tags={"dagster/partition": partition} if partition else None,
    )
    for evaluation in result.get_asset_check_evaluations():
        evaluations[evaluation.asset_check_key] = evaluation
    # A check that raised has no evaluation: map its failed step back to its key.
    # A blocking check that *failed* also fails its step; its evaluation wins below.
    node_keys = {
        checks_def.node_def.name: checks_def.check_keys for checks_def in defs.asset_checks or []
    }
    for event in result.all_events:
        if event.event_type_value != "STEP_FAILURE":
            continue
        message = _root_cause(event.step_failure_data.error)
        for key in node_keys.get(event.step_key or "", []):
            errors[key] = message
    return result.run_id


def run_checks(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    select: Sequence[str] | None = None,
) -> ChecksReport:
    """Execute the selected asset checks of ``defs`` (no assets) in ``instance``."""
    graph = defs.resolve_asset_graph()
    keys = sorted(
        (k for k in graph.asset_check_keys if _selected(k, select)),
        key=lambda k: (k.asset_key.to_user_string(), k.name),
    )
    if select and not keys:
        known = sorted({k.name for k in graph.asset_check_keys})
        raise ValueError(f"--select {list(select)} matches no asset check; known: {known}")

    # A check reads what its asset wrote: without a materialization it would only crash.
    materialized = {
        k for k in keys if instance.get_latest_materialization_event(k.asset_key) is not None
    }
    runnable = [k for k in keys if k in materialized]

    evaluations: dict[dg.AssetCheckKey, dg.AssetCheckEvaluation] = {}
    errors: dict[dg.AssetCheckKey, str] = {}
    run_ids = []
    # Unpartitioned checks in one run; a partitioned asset's checks on its latest
    # materialized partition (one shard group, not 5,850: every group's own run checked it).
    batches: dict[str | None, list[dg.AssetCheckKey]] = {}
    for key in runnable:
        partitioned = graph.get_check_spec(key).partitions_def is not None
        partition = _latest_partition(instance, key.asset_key) if partitioned else None
        batches.setdefault(partition, []).append(key)
    for partition, batch in batches.items():
        run_id = _execute(defs, instance, batch, partition, evaluations, errors)
        run_ids.append(run_id)
    run_id = ", ".join(run_ids) if run_ids else None

    outcomes = []
    for key in keys:
        spec = graph.get_check_spec(key)
        declared = "ERROR" if spec.blocking else "WARN"
        asset = key.asset_key.to_user_string()
        if key not in materialized:
            outcomes.append(
                CheckOutcome(key.name, asset, SKIPPED, declared, spec.description or "")
            )
        elif key in evaluations:
            evaluation = evaluations[key]
            outcomes.append(
                CheckOutcome(
                    key.name,
                    asset,
                    "passed" if evaluation.passed else "FAILED",
                    evaluation.severity.value,
                    _one_line(evaluation.description),
                )
            )
        else:
            reason = errors.get(key, "no result (the check did not run)")
            outcomes.append(CheckOutcome(key.name, asset, "ERROR", declared, reason))
    return ChecksReport(outcomes, run_id)


def _open_instance(home: str | None) -> dg.DagsterInstance:
    """The instance under ``home``, ``$DAGSTER_HOME``, or the project's default home."""
    from recap_dagster import settings

    path = Path(home or settings.dagster_home()).expanduser().resolve()
    if not path.is_dir():
        # An empty fresh instance would report every check as skipped and "pass" CI.
        raise FileNotFoundError(f"no Dagster instance at {path} (set --instance or DAGSTER_HOME)")
    os.environ["DAGSTER_HOME"] = str(path)
    return dg.DagsterInstance.get()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--instance",
        metavar="DAGSTER_HOME",
        help="the instance's home folder (default: $DAGSTER_HOME, else $RECAP_WORKDIR/"
        "dagster_home)",
    )
    parser.add_argument(
        "--definitions",
        metavar="MODULE",
        default="recap_dagster.definitions",
        help="the module whose `defs` hold the checks and their resources (default: the "
        "production definitions; the miniworld's: recap_dagster.miniworld.definitions)",
    )
    parser.add_argument(
        "--select",
        nargs="+",
        metavar="NAME",
        help="only these checks (by check name or asset key); default: every check",
    )


def main(args: argparse.Namespace) -> int:
    """Entry point behind ``recap-dagster check``."""
    try:
        instance = _open_instance(args.instance)
    except FileNotFoundError as err:
        print(f"recap-dagster check: {err}")
        return 2
    # Imported after DAGSTER_HOME is set: loading the definitions reads the environment.
    defs = importlib.import_module(args.definitions).defs

    with instance:
        try:
            report = run_checks(defs, instance, args.select)
        except ValueError as err:
            print(f"recap-dagster check: {err}")
            return 2
    print(report.render())
    return report.exit_code
