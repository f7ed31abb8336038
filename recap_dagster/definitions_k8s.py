"""Definitions for the Kubernetes scale-out profile (deploy/k8s/).

The same assets, checks, job, sensor and schedule as ``recap_dagster.definitions`` (the
local default, which stays as it is), with two differences:

- every step runs in its own Kubernetes pod (``k8s_job_executor`` from dagster-k8s);
- the GPU assets (those in the ``gpu`` pool) carry a ``dagster-k8s/config`` op tag that
  requests ``nvidia.com/gpu`` and tolerates the GPU node pool's taint, so only their pods
  land on GPU nodes.

Serve it with ``dagster code-server start -m recap_dagster.definitions_k8s`` (the Helm
chart's ``dagster-user-deployments``: ``dagsterApiGrpcArgs: ["-m",
"recap_dagster.definitions_k8s"]``). Environment, read when the module loads:

- ``RECAP_K8S_GPUS_PER_STEP`` (default 1): GPUs each GPU step's pod requests;
- ``RECAP_K8S_TRAINING_GPUS`` (default: GPUs per step): GPUs of the ``sd_checkpoints``
  pod, where the trainer runs one process per GPU (``processes: 0``, the default);
- ``RECAP_K8S_GPU_NODE_SELECTOR`` (optional, ``key=value[,key=value]``): node labels of
  the GPU node pool, e.g. ``cloud.google.com/gke-accelerator=nvidia-l4``;
- ``RECAP_K8S_GPU_TOLERATION`` (default ``nvidia.com/gpu``): taint key GPU nodes carry.

Per-run overrides (e.g. 4 GPUs for one ``sd_checkpoints`` run) go in the run config:
``execution: config: per_step_k8s_config: {sd_checkpoints: {container_config: ...}}``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import dagster as dg
from dagster._core.definitions.op_definition import OpDefinition
from dagster_k8s import k8s_job_executor

from recap_dagster.automation import (
    gpu_pool_watchdog,
    laion_shard_sensor,
    recaption_backfill_schedule,
    recaption_job,
)
from recap_dagster.definitions import ASSET_CHECKS, ASSETS, default_resources
from recap_dagster.pool_watchdog import GPU_POOL

K8S_CONFIG_TAG = "dagster-k8s/config"
GPU_RESOURCE = "nvidia.com/gpu"


def _node_selector(spec: str) -> dict[str, str]:
    """``"a=b,c=d"`` -> ``{"a": "b", "c": "d"}``; empty -> ``{}``."""
    selector = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"RECAP_K8S_GPU_NODE_SELECTOR: expected key=value, got {item!r}")
        selector[key.strip()] = value.strip()
    return selector


def gpu_k8s_config(
    gpus: int | None = None, node_selector: str | None = None, toleration: str | None = None
) -> dict[str, Any]:
    """The ``dagster-k8s/config`` value of a GPU step (defaults from the environment)."""
    gpus = int(os.environ.get("RECAP_K8S_GPUS_PER_STEP", "1")) if gpus is None else gpus
    if gpus < 1:
        raise ValueError(f"GPUs per step must be at least 1, got {gpus}")
    if node_selector is None:
        node_selector = os.environ.get("RECAP_K8S_GPU_NODE_SELECTOR", "")
    if toleration is None:
        toleration = os.environ.get("RECAP_K8S_GPU_TOLERATION", GPU_RESOURCE)
    # Extended resources such as GPUs must have request == limit; Kubernetes fills the
    # request from the limit, so the limit alone is enough.
    pod_spec: dict[str, Any] = {
        "tolerations": [{"key": toleration, "operator": "Exists", "effect": "NoSchedule"}]
    }
    selector = _node_selector(node_selector)
    if selector:
        pod_spec["node_selector"] = selector
    return {
        "container_config": {"resources": {"limits": {GPU_RESOURCE: str(gpus)}}},
        "pod_spec_config": pod_spec,
    }


def with_op_tags(assets_def: dg.AssetsDefinition, tags: Mapping[str, Any]) -> dg.AssetsDefinition:
    """A copy of ``assets_def`` whose op carries ``tags`` as well (everything else kept).

    Dagster has no public way to add op tags to an existing asset; this mirrors
    ``OpDefinition.with_replaced_properties`` and ``AssetsDefinition.with_attributes``
    (tests/test_k8s_profile.py checks that nothing else changes).
    """
    op = assets_def.op
    tagged = OpDefinition.dagster_internal_init(
        name=op.name,
        ins={d.name: dg.In.from_definition(d) for d in op.input_defs},
        outs={d.name: dg.Out.from_definition(d) for d in op.output_defs},
        compute_fn=op.compute_fn,
        config_schema=op.config_schema,
        description=op.description,
        tags={**op.tags, **tags},
        required_resource_keys=op.required_resource_keys,
        code_version=op.version,
        retry_policy=op.retry_policy,
        version=None,
        pool=op.pool,
    )
    return dg.AssetsDefinition.dagster_internal_init(
        **{**assets_def.get_attributes_dict(), "node_def": tagged}
    )


def training_gpus() -> int:
    """GPUs of the text-to-image training pod (``RECAP_K8S_TRAINING_GPUS``)."""
    default = os.environ.get("RECAP_K8S_GPUS_PER_STEP", "1")
    return int(os.environ.get("RECAP_K8S_TRAINING_GPUS", default))


def k8s_assets(
    gpu_config: Mapping[str, Any] | None = None,
    training_config: Mapping[str, Any] | None = None,
) -> list:
    """The default assets, GPU ones (pool ``gpu``) tagged with their pod's GPU request;
    ``sd_checkpoints`` (N training processes, one per GPU) with ``training_config``'s."""
    config = gpu_config if gpu_config is not None else gpu_k8s_config()
    training = training_config if training_config is not None else gpu_k8s_config(training_gpus())

    def tagged(a: Any) -> Any:
        if not (isinstance(a, dg.AssetsDefinition) and a.is_executable and a.op.pool == GPU_POOL):
            return a
        pod = training if a.key == dg.AssetKey("sd_checkpoints") else config
        return with_op_tags(a, {K8S_CONFIG_TAG: pod})

    return [tagged(a) for a in ASSETS]


defs = dg.Definitions(
    assets=k8s_assets(),
    asset_checks=ASSET_CHECKS,
    jobs=[recaption_job],
    sensors=[laion_shard_sensor, gpu_pool_watchdog],
    schedules=[recaption_backfill_schedule],
    resources=default_resources(),
    executor=k8s_job_executor,
)
