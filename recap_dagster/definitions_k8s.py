"""Definitions for the Kubernetes scale-out profile (deploy/k8s/).

The same assets, checks, job, sensor and schedule as ``recap_dagster.definitions`` (the
local default, which stays as it is), with every step in its own Kubernetes pod
(``k8s_job_executor`` from dagster-k8s). The GPU assets (pool ``gpu``) already carry a
``dagster-k8s/config`` op tag (``recap_dagster/k8s_gpu.py``) that requests
``nvidia.com/gpu`` and tolerates the GPU node pool's taint, so only their pods land on GPU
nodes; the local executors ignore it.

Serve it with ``dagster code-server start -m recap_dagster.definitions_k8s`` (the Helm
chart's ``dagster-user-deployments``: ``dagsterApiGrpcArgs: ["-m",
"recap_dagster.definitions_k8s"]``). The GPU settings come from the environment (see
``recap_dagster.k8s_gpu``). Per-run overrides (e.g. 4 GPUs for one ``sd_checkpoints``
run) go in the run config:
``execution: config: per_step_k8s_config: {sd_checkpoints: {container_config: ...}}``.
"""

from __future__ import annotations

import dagster as dg
from dagster_k8s import k8s_job_executor

from recap_dagster.automation import (
    gpu_pool_watchdog,
    laion_shard_sensor,
    recaption_backfill_schedule,
    recaption_job,
)
from recap_dagster.definitions import ASSET_CHECKS, ASSETS, default_resources

defs = dg.Definitions(
    assets=ASSETS,
    asset_checks=ASSET_CHECKS,
    jobs=[recaption_job],
    sensors=[laion_shard_sensor, gpu_pool_watchdog],
    schedules=[recaption_backfill_schedule],
    resources=default_resources(),
    executor=k8s_job_executor,
)
