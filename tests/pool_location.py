"""A code location for the pool watchdog's ``dagster dev`` test: one GPU-pool asset that
holds the GPU for a configured time, its job, and the project's ``gpu_pool_watchdog``."""

import time

import dagster as dg
from pydantic import Field

from recap_dagster.orchestration.automation import gpu_pool_watchdog
from recap_dagster.orchestration.pool_watchdog import GPU_POOL
from recap_dagster.resources import ComputeResource


class HoldConfig(dg.Config):
    seconds: float = Field(default=0.0, description="How long the step holds the GPU.")


@dg.asset(pool=GPU_POOL)
def gpu_step(context: dg.AssetExecutionContext, config: HoldConfig, compute: ComputeResource):
    context.log.info(f"holding the GPU for {config.seconds} s")
    time.sleep(config.seconds)


gpu_job = dg.define_asset_job("gpu_job", selection=[gpu_step])

defs = dg.Definitions(
    assets=[gpu_step],
    jobs=[gpu_job],
    sensors=[gpu_pool_watchdog],
    resources={"compute": ComputeResource()},
)
