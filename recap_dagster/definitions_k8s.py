"""Definitions for the Kubernetes scale-out profile (deploy/k8s/).

The same assets, checks, job, sensor and schedule as ``recap_dagster.definitions`` (the
production graph: observed inputs, locations from the environment), with every step in
its own Kubernetes pod (``k8s_job_executor`` from dagster-k8s). The GPU assets (pool
``gpu``) already carry a
``dagster-k8s/config`` op tag (``recap_dagster/orchestration/k8s_gpu.py``) that requests
``nvidia.com/gpu`` and tolerates the GPU node pool's taint, so only their pods land on GPU
nodes; the local executors ignore it.

Serve it with ``dagster code-server start -m recap_dagster.definitions_k8s`` (the Helm
chart's ``dagster-user-deployments``: ``dagsterApiGrpcArgs: ["-m",
"recap_dagster.definitions_k8s"]``). The GPU settings come from the environment (see
``recap_dagster.orchestration.k8s_gpu``). Per-run overrides (e.g. 4 GPUs for one ``sd_checkpoints``
run) go in the run config:
``execution: config: per_step_k8s_config: {sd_checkpoints: {container_config: ...}}``.
"""

from __future__ import annotations

from dagster_k8s import k8s_job_executor

from recap_dagster.assets.inputs import INPUT_ASSETS
from recap_dagster.definitions import production_resources, recap_definitions

defs = recap_definitions(
    INPUT_ASSETS, production_resources(), executor=k8s_job_executor, observe_inputs=True
)
