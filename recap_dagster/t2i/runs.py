"""Fine-tuning runs under the storage root: each run keeps the shard manifest it started
with, a launch continues the run it belongs to, and no state is deleted unless asked.

A run's state lives in ``<state parts>/<run id>/`` (the run id is the job's fingerprint:
base weights, settings and shard list). Beside its checkpoints it holds ``job.json``, the
job it started with (its manifest: the exact shards), and ``status.json`` once it reached
its last step. The recaptioning sensor keeps adding shards while a run trains, so a retry
after a preemption must not rebuild the shard list: :func:`choose_run` sends it back to the
unfinished run with the same settings, on that run's own shards; the launch after it has
finished starts a new run on the current manifest. The same run with more ``steps``
extends it. Nothing here imports Dagster.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from recap_dagster.storage.root import Storage
from recap_dagster.training.substrate import Checkpoints

if TYPE_CHECKING:
    from recap_dagster.t2i.train import TrainJob

JOB_FILE = "job.json"
STATUS_FILE = "status.json"


@dataclass(frozen=True)
class RunState:
    """What the storage root holds of one run."""

    run_id: str
    settings_key: str
    shards: int
    started_at: float
    checkpoints: list[int]
    finished_step: int | None  # the step it last finished at (None: never finished)

    @property
    def finished(self) -> bool:
        return self.finished_step is not None and (
            not self.checkpoints or self.checkpoints[-1] <= self.finished_step
        )

    def row(self) -> dict[str, Any]:
        """A metadata-table row."""
        return {
            "run_id": self.run_id,
            "shards": self.shards,
            "started": time.strftime("%Y-%m-%d %H:%M", time.gmtime(self.started_at)),
            "latest_checkpoint": self.checkpoints[-1] if self.checkpoints else 0,
            "finished_step": self.finished_step or 0,
        }


def record_start(store: Storage, run_parts: tuple[str, ...], job: TrainJob) -> None:
    """Store the job a run starts with (its first attempt's; later attempts keep it)."""
    if not store.exists(*run_parts, JOB_FILE):
        payload = {"started_at": time.time(), "settings_key": job.settings_key()}
        store.write_text(
            json.dumps({**payload, "job": json.loads(job.to_json())}), *run_parts, JOB_FILE
        )


def record_finish(store: Storage, run_parts: tuple[str, ...], step: int) -> None:
    store.write_text(
        json.dumps({"finished_step": step, "at": time.time()}), *run_parts, STATUS_FILE
    )


def list_runs(store: Storage, *parent: str) -> list[RunState]:
    """The runs under ``parent``, oldest first. A folder with checkpoints but no job file
    (a state from before run manifests) is listed with no settings: never continued."""
    runs = []
    for name in store.listdir(*parent):
        steps = Checkpoints(store, *parent, name, fingerprint=name).steps()
        if not store.exists(*parent, name, JOB_FILE):
            if steps:
                runs.append(RunState(name, "", 0, 0.0, steps, None))
            continue
        started = json.loads(store.read_text(*parent, name, JOB_FILE))
        status = (
            json.loads(store.read_text(*parent, name, STATUS_FILE))
            if store.exists(*parent, name, STATUS_FILE)
            else {}
        )
        runs.append(
            RunState(
                run_id=name,
                settings_key=started["settings_key"],
                shards=len(started["job"]["data"]["shards"]),
                started_at=float(started["started_at"]),
                checkpoints=steps,
                finished_step=status.get("finished_step"),
            )
        )
    return sorted(runs, key=lambda r: r.started_at)


@dataclass(frozen=True)
class RunChoice:
    job: TrainJob  # the job to launch
    action: str  # "new", "continue" (an unfinished run), "extend" or "repeat" (finished)
    message: str
    others: list[RunState]  # the other runs kept under the same parent


def choose_run(store: Storage, job: TrainJob, *, new_run: bool = False) -> RunChoice:
    """The job to launch for ``job`` (built on the current manifest).

    An unfinished run with the same settings continues on the shards it started with, with
    ``job``'s steps (unless ``new_run``); otherwise ``job`` itself runs: a new run, or the
    finished run on the same shards again (more steps extend it).
    """
    parent = tuple(job.state_parts)
    runs = list_runs(store, *parent)
    chosen = job
    unfinished = [r for r in runs if r.settings_key == job.settings_key() and not r.finished]
    if unfinished and not new_run and unfinished[-1].run_id != job.fingerprint():
        run = unfinished[-1]
        stored = json.loads(store.read_text(*parent, run.run_id, JOB_FILE))["job"]
        shards = tuple(stored["data"]["shards"])
        chosen = replace(job, data=replace(job.data, shards=shards))
        new = len(set(job.data.shards) - set(shards))
        action = "continue"
        message = (
            f"continuing the unfinished run {run.run_id} on the {len(shards)} shard(s) it "
            f"started with (from step {run.checkpoints[-1] if run.checkpoints else 0}); "
            f"{new} shard(s) recaptioned since wait for the next run"
        )
    else:
        same = next((r for r in runs if r.run_id == job.fingerprint()), None)
        steps = job.config.steps
        if same is None:
            action, message = (
                "new",
                f"a new run {job.fingerprint()} on {len(job.data.shards)} shard(s)",
            )
        elif not same.finished:
            action = "continue"
            message = f"continuing the unfinished run {same.run_id}"
        elif same.finished_step is not None and steps > same.finished_step:
            action = "extend"
            message = (
                f"extending the finished run {same.run_id} from {same.finished_step} to "
                f"{steps} steps (the LR schedule is re-spanned over {steps})"
            )
        elif same.finished_step is not None and steps < same.finished_step:
            raise ValueError(
                f"run {same.run_id} already finished at {same.finished_step} steps; {steps} "
                "would train it over from an older state: its snapshots hold the earlier "
                "steps (or ask for a new run)"
            )
        else:
            action = "repeat"
            message = f"the run {same.run_id} already reached {same.finished_step} steps"
    others = [r for r in runs if r.run_id != chosen.fingerprint()]
    return RunChoice(chosen, action, message, others)


def remove_runs(store: Storage, job: TrainJob, run_ids: list[str]) -> list[str]:
    """Delete the states of ``run_ids`` under ``job``'s state parent (never ``job``'s own
    run); returns those removed. The only way a run's state goes, besides its own older
    checkpoints."""
    parent = tuple(job.state_parts)
    known = {r.run_id for r in list_runs(store, *parent)}
    unknown = sorted(set(run_ids) - known)
    if unknown:
        raise ValueError(f"no run {unknown} under {store.uri(*parent)}; runs: {sorted(known)}")
    if job.fingerprint() in run_ids:
        raise ValueError(f"run {job.fingerprint()} is the one this launch trains: not removed")
    for run_id in run_ids:
        store.remove_dir(*parent, run_id)
    return sorted(run_ids)
