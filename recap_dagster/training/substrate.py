"""The training substrate every trainer shares: accelerator setup, seeding, LR schedules,
and checkpoints that live under the storage root (local folder or ``s3://``).

The text-to-image trainer, the captioner fine-tune and the miniworld's base-captioner
pretraining all build on these pieces, so a setting means the same thing in each and a
resumed run of any of them restores the same state (models, optimizer, LR scheduler, EMA,
RNG, plus the trainer's own metadata such as its data position).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from recap_dagster.storage.root import Storage

log = logging.getLogger(__name__)

#: ``transformers.get_scheduler`` names the trainers accept (all need only warmup + length).
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_min_lr")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
CHECKPOINT_PREFIX = "checkpoint-"
COLLECTIVE_TIMEOUT_S = 3 * 3600
META_FILE = "recap_train.json"  # inside a checkpoint: step, fingerprint, data position, losses


def setting(default: Any, description: str) -> Any:
    """A trainer setting: a dataclass field with the description the Dagster launchpad shows
    (each asset's config is derived from its trainer's settings dataclass)."""
    return field(default=default, metadata={"description": description})


def check_lr_scheduler(name: str) -> str:
    if name not in LR_SCHEDULERS:
        raise ValueError(f"lr_scheduler must be one of {LR_SCHEDULERS}, got {name!r}")
    return name


def check_mixed_precision(name: str) -> str:
    if name not in MIXED_PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISIONS}, got {name!r}")
    return name


def make_accelerator(mixed_precision: str = "no", gradient_accumulation_steps: int = 1):
    """An ``accelerate.Accelerator`` for this process (one of N under torchrun / accelerate
    launch: the process group comes from the environment, gloo on CPU, NCCL on GPUs).

    accelerate keeps one process-wide state that refuses a second Accelerator with another
    mixed precision (one process may train several models in turn, e.g. in tests); that
    part is reset, the process group is kept.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import InitProcessGroupKwargs

    check_mixed_precision(mixed_precision)
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        # Without a GPU, accelerate joins torchrun's process group only when told it is on
        # CPU (gloo); with GPUs it picks NCCL by itself.
        cpu=not torch.cuda.is_available(),
        # Process 0 alone publishes checkpoints and snapshots (GBs to S3 for SD) while the
        # others wait at a barrier: NCCL's default 10 minutes is too short for that.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))],
    )


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) the same way in every trainer."""
    from accelerate.utils import set_seed

    set_seed(seed)


def lr_schedule(
    name: str, optimizer, *, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
):
    """The LR schedule of a whole run: warmup, then ``name`` over ``total_steps`` optimizer
    steps. Step it once per optimizer step (not per micro-batch, not per process)."""
    from transformers import get_scheduler

    check_lr_scheduler(name)
    kwargs = {"min_lr_rate": min_lr_ratio} if name == "cosine_with_min_lr" else None
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup_steps,
        num_training_steps=max(1, total_steps),
        scheduler_specific_kwargs=kwargs,
    )


@dataclass(frozen=True)
class Checkpoint:
    step: int
    meta: dict[str, Any]


class Checkpoints:
    """Resumable training states under ``storage`` at ``parts`` (``checkpoint-<step>``).

    A state is written locally by ``accelerator.save_state`` (every process writes its
    part, e.g. its RNG state), then published under the storage root in one step: renamed
    into place locally, or uploaded with a ``_SUCCESS`` marker last on S3. A run killed
    while saving leaves the previous checkpoint as the latest complete one. Checkpoints of
    another configuration (``fingerprint``) are never resumed from.
    """

    def __init__(self, storage: Storage, *parts: str, fingerprint: str, keep: int = 2):
        self.storage = storage
        self.parts = parts
        self.fingerprint = fingerprint
        self.keep = keep

    def steps(self) -> list[int]:
        found = []
        for name in self.storage.listdir(*self.parts):
            match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", name)
            if match and self.storage.dir_complete(*self.parts, name):
                found.append(int(match.group(1)))
        return sorted(found)

    def _meta(self, step: int) -> dict[str, Any]:
        name = f"{CHECKPOINT_PREFIX}{step}"
        return json.loads(self.storage.read_text(*self.parts, name, META_FILE))

    def latest(self, up_to: int | None = None) -> Checkpoint | None:
        """The newest complete checkpoint of this configuration (at most ``up_to``)."""
        for step in reversed(self.steps()):
            if up_to is not None and step > up_to:
                continue
            meta = self._meta(step)
            if meta.get("fingerprint") == self.fingerprint:
                return Checkpoint(step, meta)
            log.warning("ignoring %s: another run configuration", self._name(step))
        return None

    def _name(self, step: int) -> str:
        return self.storage.uri(*self.parts, f"{CHECKPOINT_PREFIX}{step}")

    def save(self, accelerator, step: int, meta: dict[str, Any]) -> str:
        """Save the accelerator's registered state plus ``meta``; every process calls it.

        Each machine (node) writes its processes' parts (e.g. their RNG states) to its own
        local folder and adds them to the one checkpoint under the storage root; process 0
        clears a half-written leftover first and marks the checkpoint complete last.
        """
        name = f"{CHECKPOINT_PREFIX}{step}"
        with _shared_local_dir(accelerator, f"save-{name}") as local:
            accelerator.save_state(local, safe_serialization=True)
            if accelerator.is_main_process:
                payload = {**meta, "step": step, "fingerprint": self.fingerprint}
                with open(os.path.join(local, META_FILE), "w", encoding="utf-8") as handle:
                    json.dump(payload, handle)
                self.storage.begin_shared_dir(*self.parts, name)
            accelerator.wait_for_everyone()
            if accelerator.is_local_main_process:
                self.storage.add_to_shared_dir(local, *self.parts, name)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                self.storage.finish_shared_dir(*self.parts, name)
                for old in self.steps()[: -self.keep] if self.keep > 0 else []:
                    self.storage.remove_dir(*self.parts, f"{CHECKPOINT_PREFIX}{old}")
            accelerator.wait_for_everyone()
        return self._name(step)

    def load(self, accelerator, checkpoint: Checkpoint) -> None:
        """Restore ``checkpoint`` into the accelerator's registered objects (every process).

        Each machine's local process 0 fetches it (from S3: one download per machine, not
        one per process) and the machine's other processes read its copy.
        """
        name = f"{CHECKPOINT_PREFIX}{checkpoint.step}"
        with contextlib.ExitStack() as stack:
            local = ""
            if accelerator.is_local_main_process:
                local = stack.enter_context(self.storage.local_dir(*self.parts, name))
            accelerator.load_state(from_node_main_process(accelerator, local))
            accelerator.wait_for_everyone()
        log.info("resumed from %s", self._name(checkpoint.step))


def from_main_process(accelerator, value: Any) -> Any:
    """``value`` as process 0 has it, in every process (a collective: all must call it)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    holder = [value]
    broadcast_object_list(holder)
    return holder[0]


def from_node_main_process(accelerator, value: Any) -> Any:
    """``value`` as this machine's local process 0 has it, in each process of the machine
    (a collective: all processes of all machines must call it).

    torchrun numbers a machine's processes consecutively, so that of its local process 0
    is ``process_index - local_process_index``; every process shares its value and keeps
    its own machine's (a path is a few bytes: no per-machine process groups needed).
    """
    if accelerator.num_processes == 1:
        return value
    import torch.distributed as dist

    gathered: list[Any] = [None] * accelerator.num_processes
    dist.all_gather_object(gathered, value)
    return gathered[accelerator.process_index - accelerator.local_process_index]


@contextmanager
def _shared_local_dir(accelerator, name: str) -> Iterator[str]:
    """A local folder the processes of each machine agree on: its local process 0 makes
    it on the machine's own disk (several machines do not share one ``/tmp``)."""
    made = tempfile.mkdtemp(prefix=f"recap-{name}-") if accelerator.is_local_main_process else ""
    local = from_node_main_process(accelerator, made)
    try:
        yield local
    finally:
        accelerator.wait_for_everyone()
        if accelerator.is_local_main_process:
            shutil.rmtree(local, ignore_errors=True)
