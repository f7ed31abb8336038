"""CPU steps side by side on one machine share its cores, and a step left alone takes back
the cores the others gave up.

A step starts with an equal share for every step its pool lets run at once (cores /
slots): steps that start together never oversubscribe the cores. While it runs, a step
that calls a :class:`Rebalancer` between its training steps re-divides the cores by the
steps that are running on this machine now: each holds a file named by its pid in one
folder of the machine's temp directory (:meth:`CpuShare.holding`). A dead step's file is
ignored and removed, so a killed step gives its cores back too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from recap_dagster.training.processes import process_alive

log = logging.getLogger(__name__)

#: Where a step's share travels to the processes it starts (the Pipes trainer).
SHARE_ENV = "RECAP_CPU_SHARE"
#: The folder of running steps' files (default: ``<tempdir>/recap-cpu-steps``).
FOLDER_ENV = "RECAP_CPU_STEPS_DIR"
#: Seconds between two looks at the folder (a listing and a pid check per step).
REBALANCE_EVERY_S = 5.0


def steps_folder() -> str:
    """This machine's folder of running CPU steps."""
    return os.environ.get(FOLDER_ENV) or os.path.join(tempfile.gettempdir(), "recap-cpu-steps")


def _holder_alive(entry: os.DirEntry) -> bool:
    """Is the step that wrote this file still running?"""
    if not entry.name.isdigit():
        return False
    try:
        return process_alive(int(entry.name), entry.stat().st_mtime)
    except FileNotFoundError:
        return False


@dataclass(frozen=True)
class CpuShare:
    """One step's share of this machine's ``cores`` (torch threads), among at most
    ``slots`` steps at once, split over the step's ``processes``."""

    cores: int
    slots: int
    processes: int = 1
    folder: str = ""

    def __post_init__(self) -> None:
        if min(self.cores, self.slots, self.processes) < 1:
            raise ValueError(f"cores, slots and processes must be >= 1: {self}")
        if not self.folder:
            object.__setattr__(self, "folder", steps_folder())

    def starting_threads(self) -> int:
        """Each process's threads when the step starts: as if every slot were taken."""
        return max(1, self.cores // self.slots // self.processes)

    def threads_now(self) -> int:
        """Each process's threads for the steps running on this machine now."""
        running = min(self.slots, max(1, self.running()))
        return max(1, self.cores // running // self.processes)

    def running(self) -> int:
        """Steps holding a file in the folder whose process is alive."""
        alive = 0
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.folder):
                if _holder_alive(entry):
                    alive += 1
                else:  # a killed step's file (or a stray): its cores are free
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(entry.path)
        return alive

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """This process counts as a running step while the block runs."""
        path = Path(self.folder, str(os.getpid()))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def split(self, processes: int) -> CpuShare:
        """This step's share, run by ``processes`` processes: each one's part of it."""
        return replace(self, processes=processes)

    def to_env(self, processes: int) -> dict[str, str]:
        """The environment that gives this share to a launch of ``processes`` processes."""
        share = self.split(processes)
        return {
            SHARE_ENV: json.dumps(asdict(share)),
            "OMP_NUM_THREADS": str(share.starting_threads()),
        }

    @classmethod
    def from_env(cls) -> CpuShare | None:
        text = os.environ.get(SHARE_ENV)
        return cls(**json.loads(text)) if text else None


class Rebalancer:
    """Call it between training steps (in the thread that computes: torch's thread count
    is the calling thread's): at most every ``every`` seconds (default
    :data:`REBALANCE_EVERY_S`) it sets torch's threads to
    the share's :meth:`CpuShare.threads_now`."""

    def __init__(self, share: CpuShare, every: float | None = None) -> None:
        self.share = share
        self.every = REBALANCE_EVERY_S if every is None else every
        self._last = float("-inf")

    def __call__(self) -> None:
        import torch

        now = time.monotonic()
        if now - self._last < self.every:
            return
        self._last = now
        try:
            threads = self.share.threads_now()
        except OSError as exc:  # the folder unreadable: keep the threads, never fail the step
            log.warning("CPU share not rebalanced: %s", exc)
            return
        before = torch.get_num_threads()
        if threads != before:
            torch.set_num_threads(threads)
            log.info("CPU threads %d -> %d (the steps on this machine changed)", before, threads)
