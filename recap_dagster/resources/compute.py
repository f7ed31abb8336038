"""Compute resource: which device, dtype and mixed precision the ML steps use."""

import dagster as dg
import torch
from pydantic import Field, PrivateAttr

from recap_dagster.orchestration.pool_watchdog import pool_slots, record_worker
from recap_dagster.training import devices

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
        "pool's slots, so that steps side by side on a CPU share its cores; every step "
        "with this resource takes that share, pooled or not: set it where a step runs alone "
        "on its machine, e.g. a Kubernetes pod).",
    )
    _pool_slots: int = PrivateAttr(default=1)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # Every GPU step uses this resource: tag its run with this machine, so that the
        # gpu pool's watchdog can tell when the run's worker has died holding a slot.
        if context.instance is not None:
            if context.run is not None:
                record_worker(context.instance, context.run.run_id)
            self._pool_slots = pool_slots(context.instance)

    def threads(self) -> int:
        """CPU threads of one step: ``cpu_threads``, else an equal share of the cores for
        each step the gpu pool lets run at once."""
        if self.cpu_threads > 0:
            return self.cpu_threads
        return max(1, DEFAULT_THREADS // self._pool_slots)

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
