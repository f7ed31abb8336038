"""Compute resource: which device, dtype and mixed precision the ML steps use."""

import dagster as dg
import torch
from pydantic import Field

from recap_dagster.orchestration.pool_watchdog import record_worker
from recap_dagster.training import devices


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
    cpu_threads: int = Field(default=0, description="torch CPU threads (0 keeps torch's default).")

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # Every GPU step uses this resource: tag its run with this machine, so that the
        # gpu pool's watchdog can tell when the run's worker has died holding a slot.
        if context.instance is not None and context.run is not None:
            record_worker(context.instance, context.run.run_id)

    def torch_device(self) -> torch.device:
        if self.cpu_threads > 0:
            torch.set_num_threads(self.cpu_threads)
        return devices.resolve_device(self.device)

    def torch_dtype(self) -> torch.dtype:
        return devices.resolve_dtype(self.dtype, self.torch_device())

    def training_precision(self) -> str:
        return devices.resolve_mixed_precision(self.mixed_precision, self.torch_device())
