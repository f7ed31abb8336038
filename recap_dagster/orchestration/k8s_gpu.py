"""The Kubernetes pod request of a GPU step, as an op tag (``dagster-k8s/config``).

Every GPU asset (pool ``gpu``) carries it: dagster-k8s's ``k8s_job_executor`` reads it to
give the step's pod its GPUs and a toleration for the GPU node pool's taint; the local
executors ignore it. Environment, read when the code location loads:

- ``RECAP_K8S_GPUS_PER_STEP`` (default 1): GPUs each GPU step's pod requests (recaptioning
  and the latent cache run one process on each, ``processes: 0``);
- ``RECAP_K8S_TRAINING_GPUS`` (default: GPUs per step): GPUs of the ``sd_checkpoints``
  pod, where the trainer runs one process per GPU (``processes: 0``, the default);
- ``RECAP_K8S_GPU_NODE_SELECTOR`` (optional, ``key=value[,key=value]``): node labels of
  the GPU node pool, e.g. ``cloud.google.com/gke-accelerator=nvidia-l4``;
- ``RECAP_K8S_GPU_TOLERATION`` (default ``nvidia.com/gpu``): taint key GPU nodes carry.
"""

from __future__ import annotations

import os
from typing import Any

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


def training_gpus() -> int:
    """GPUs of the text-to-image training pod (``RECAP_K8S_TRAINING_GPUS``)."""
    default = os.environ.get("RECAP_K8S_GPUS_PER_STEP", "1")
    return int(os.environ.get("RECAP_K8S_TRAINING_GPUS", default))


def gpu_op_tags(*, training: bool = False) -> dict[str, Any]:
    """Op tags of a GPU step: its pod's GPU request (``training``: the trainer's pod)."""
    return {K8S_CONFIG_TAG: gpu_k8s_config(training_gpus() if training else None)}
