"""Compute resource: which device, dtype and mixed precision the ML steps use."""

import contextlib
from collections.abc import Callable

import dagster as dg
import torch
from pydantic import Field, PrivateAttr

from recap_dagster.orchestration.pool_watchdog import pool_slots, record_worker
from recap_dagster.training import devices
from recap_dagster.training.cpu_share import CpuShare, Rebalancer

#: torch's own thread count in this process (its cores, or OMP_NUM_THREADS), before any
#: step changes it.
DEFAULT_THREADS = torch.get_num_threads()


class ComputeResource(dg.ConfigurableResource):
    """Device settings shared by every ML asset. Defaults use CUDA when present."""

    device: str = Field(
        default="auto", description="auto (CUDA when present, else CPU), cpu, cuda, cuda:N."
    )
    dtype: str = Field(
        default="auto",
        description="Inference dtype: auto (bf16 on capable GPUs, fp32 on CPU), float32, "
        "bfloat16, float16.",
    )
    mixed_precision: str = Field(
        default="auto",
        description="Training precision for accelerate: auto (bf16 on capable GPUs, none on "
        "CPU), no, fp16, bf16.",
    )
    cpu_threads: int = Field(
        default=0,
        ge=0,
        description="torch CPU threads per step (0: torch's default divided among the gpu "
        "pool's slots, so that steps side by side on a CPU share its cores; a training "
        "step then takes back the cores of steps that ended on its machine while it runs. "
        "Set it to pin a step's threads).",
    )
    _pool_slots: int = PrivateAttr(default=1)
    _share: CpuShare | None = PrivateAttr(default=None)
    _held: contextlib.ExitStack = PrivateAttr(default_factory=contextlib.ExitStack)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # Every GPU step uses this resource: tag its run with this machine, so that the
        # gpu pool's watchdog can tell when the run's worker has died holding a slot.
        if context.instance is not None:
            if context.run is not None:
                record_worker(context.instance, context.run.run_id)
            self._pool_slots = pool_slots(context.instance)
        # A CPU step counts among the steps sharing this machine's cores while it runs.
        if self.cpu_threads == 0 and devices.resolve_device(self.device).type == "cpu":
            self._share = CpuShare(cores=DEFAULT_THREADS, slots=self._pool_slots)
            self._held.enter_context(self._share.holding())

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self._held.close()

    def threads(self) -> int:
        """CPU threads of one step: ``cpu_threads``, else an equal share of the cores for
        each step the gpu pool lets run at once."""
        if self.cpu_threads > 0:
            return self.cpu_threads
        return CpuShare(cores=DEFAULT_THREADS, slots=self._pool_slots).starting_threads()

    def cpu_share(self) -> CpuShare | None:
        """This step's share of the machine's cores while it runs on the CPU (None with
        ``cpu_threads`` set, or on a GPU)."""
        return self._share

    def rebalancer(self) -> Callable[[], None]:
        """For a loop to call between its pieces of work (training steps, sampling steps):
        the step's threads follow the steps running on this machine (a no-op without a
        :meth:`cpu_share`)."""
        return Rebalancer(self._share) if self._share is not None else lambda: None

    def launch_env(self, processes: int) -> dict[str, str]:
        """The environment of a launch of ``processes`` processes that run this step (the
        trainer through Pipes): they split its threads, and follow the running steps."""
        if self._share is not None:
            return self._share.to_env(processes)
        pinned = CpuShare(cores=self.threads(), slots=1, processes=processes)
        return {"OMP_NUM_THREADS": str(pinned.starting_threads())}

    def torch_device(self) -> torch.device:
        device = devices.resolve_device(self.device)
        # On a GPU the CPU threads only feed it: left to torch unless set explicitly.
        if device.type == "cpu" or self.cpu_threads > 0:
            torch.set_num_threads(self.threads())
        return device

    def torch_dtype(self) -> torch.dtype:
        return devices.resolve_dtype(self.dtype, self.torch_device())

    def training_precision(self) -> str:
        return devices.resolve_mixed_precision(self.mixed_precision, self.torch_device())
