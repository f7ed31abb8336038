"""Kubernetes manifests of a multi-node training run (plain Python: no Dagster import).

A run on N nodes is N pods, one torchrun node each, ``gpus`` processes per pod:

- node 0 is the pod Dagster Pipes launches (``PipesK8sClient``: its logs carry the
  trainer's Pipes messages); ``node0_pod`` gives its metadata and spec. Its stable DNS name
  ``<name>-0.<name>`` (pod ``hostname`` + ``subdomain``) is the c10d rendezvous endpoint;
- nodes 1..N-1 are an indexed Job (``completionMode: Indexed``, parallelism = completions
  = N-1): node rank = ``JOB_COMPLETION_INDEX`` + 1;
- a headless Service ``<name>`` (no cluster IP, not-ready addresses published) gives every
  pod of the run a DNS record: the rendezvous endpoint, and the address of whichever node
  c10d makes rank 0 (the process group's master);
- a ConfigMap ``<name>-job`` holds the TrainJob file, mounted in every pod.

No pod is restarted by Kubernetes (``restartPolicy: Never``, ``backoffLimit: 0``): a lost
node breaks the collective, the run fails, Dagster's retry starts a new group and the
trainer resumes from its last checkpoint under the (S3) storage root.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Any

from recap_dagster.orchestration.k8s_gpu import GPU_RESOURCE, gpu_k8s_config
from recap_dagster.t2i.train import RDZV_PORT, launch_command

GROUP_LABEL = "recap/train-group"
JOB_MOUNT = "/etc/recap-train"
JOB_FILE = "job.json"
_NODE_RANK_ONE = "--node-rank=1"


def group_name(*parts: str, limit: int = 40) -> str:
    """A DNS label from ``parts`` (lowercase alphanumerics and '-'), short enough for the
    ``-job`` / ``-<index>`` suffixes Kubernetes and this module add."""
    name = re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")
    name = name[:limit].rstrip("-")
    if not name:
        raise ValueError(f"no DNS label in {parts!r}")
    return name


@dataclass(frozen=True)
class NodeGroup:
    """Where and how the N pods of one training run run."""

    name: str  # DNS label: the Service, the pods' subdomain, the Job's prefix
    namespace: str
    image: str
    nodes: int
    gpus: int  # GPUs per pod = torchrun processes per node
    port: int = RDZV_PORT
    service_account: str = "recap-dagster"
    env_config_maps: tuple[str, ...] = ("recap-dagster-env",)
    env_secrets: tuple[str, ...] = ("recap-dagster-aws",)
    env: dict[str, str] = field(default_factory=dict)
    node_selector: str | None = None  # "key=value,..." (default: the GPU steps' setting)

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"nodes must be at least 1, got {self.nodes}")
        if self.gpus < 1:
            raise ValueError(f"gpus per node must be at least 1, got {self.gpus}")
        if group_name(self.name) != self.name:
            raise ValueError(f"{self.name!r} is not a DNS label")

    @property
    def rendezvous_endpoint(self) -> str:
        """Node 0's pod, by the headless Service's DNS record (same namespace)."""
        return f"{self.name}-0.{self.name}:{self.port}"

    @property
    def labels(self) -> dict[str, str]:
        return {GROUP_LABEL: self.name, "app.kubernetes.io/part-of": "recap-dagster"}


def node_command(group: NodeGroup, node_rank: int | None) -> list[str]:
    """Node ``node_rank``'s torchrun command; ``None``: a worker of the indexed Job, whose
    rank the shell takes from ``JOB_COMPLETION_INDEX`` (+1: node 0 is the Pipes pod)."""
    command = launch_command(
        f"{JOB_MOUNT}/{JOB_FILE}",
        group.gpus,
        nodes=group.nodes,
        node_rank=1 if node_rank is None else node_rank,
        rdzv_endpoint=group.rendezvous_endpoint,
        rdzv_id=group.name,
        python="python",
    )
    if node_rank is not None:
        return command
    words = [
        '--node-rank="$((JOB_COMPLETION_INDEX + 1))"' if w == _NODE_RANK_ONE else shlex.quote(w)
        for w in command
    ]
    return ["sh", "-c", "exec " + " ".join(words)]


def _pod_spec(group: NodeGroup, command: list[str]) -> dict[str, Any]:
    gpu = gpu_k8s_config(group.gpus, node_selector=group.node_selector)
    spec = gpu["pod_spec_config"]
    env_from = [{"configMapRef": {"name": n}} for n in group.env_config_maps] + [
        {"secretRef": {"name": n}} for n in group.env_secrets
    ]
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "subdomain": group.name,
        "serviceAccountName": group.service_account,
        "tolerations": spec["tolerations"],
        "containers": [
            {
                "name": "trainer",
                "image": group.image,
                "command": command,
                "env": [{"name": k, "value": v} for k, v in sorted(group.env.items())],
                "envFrom": env_from,
                "ports": [{"name": "rendezvous", "containerPort": group.port}],
                "resources": {"limits": {GPU_RESOURCE: str(group.gpus)}},
                "volumeMounts": [
                    {"name": "job", "mountPath": JOB_MOUNT, "readOnly": True},
                    # NCCL and DataLoader workers share tensors through /dev/shm, which
                    # is 64 MiB in a container by default.
                    {"name": "shm", "mountPath": "/dev/shm"},
                ],
            }
        ],
        "volumes": [
            {"name": "job", "configMap": {"name": f"{group.name}-job"}},
            {"name": "shm", "emptyDir": {"medium": "Memory"}},
        ],
    }
    if spec.get("node_selector"):
        pod["nodeSelector"] = spec["node_selector"]
    return pod


def headless_service(group: NodeGroup) -> dict[str, Any]:
    """DNS records for the run's pods: ``<pod hostname>.<name>``."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": group.name, "namespace": group.namespace, "labels": group.labels},
        "spec": {
            "clusterIP": "None",
            "selector": {GROUP_LABEL: group.name},
            # Resolvable while starting: the rendezvous happens before any readiness.
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": group.port, "targetPort": group.port}],
        },
    }


def job_config_map(group: NodeGroup, job_json: str) -> dict[str, Any]:
    """The TrainJob file every pod mounts at ``JOB_MOUNT`` (ConfigMaps hold up to 1 MiB)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": f"{group.name}-job",
            "namespace": group.namespace,
            "labels": group.labels,
        },
        "data": {JOB_FILE: job_json},
    }


def worker_job(group: NodeGroup) -> dict[str, Any]:
    """Nodes 1..N-1: an indexed Job whose pods are ``<name>-w-<index>.<name>``."""
    workers = group.nodes - 1
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": f"{group.name}-w",
            "namespace": group.namespace,
            "labels": group.labels,
        },
        "spec": {
            "completionMode": "Indexed",
            "completions": workers,
            "parallelism": workers,
            "backoffLimit": 0,  # a lost node fails the run: Dagster retries it as a whole
            "ttlSecondsAfterFinished": 86400,
            "template": {
                "metadata": {
                    "labels": group.labels,
                    "annotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"},
                },
                "spec": _pod_spec(group, node_command(group, None)),
            },
        },
    }


def node0_pod(group: NodeGroup) -> tuple[dict[str, Any], dict[str, Any]]:
    """Node 0's pod metadata and spec, for ``PipesK8sClient.run(base_pod_meta=...,
    base_pod_spec=...)``: Pipes adds its context to the environment and names the pod."""
    spec = _pod_spec(group, node_command(group, 0))
    spec["hostname"] = f"{group.name}-0"
    meta = {
        "labels": group.labels,
        "annotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"},
    }
    return meta, spec


def manifests(group: NodeGroup, job_json: str) -> list[dict[str, Any]]:
    """What to create before node 0's pod: the job file, the Service, the workers (none
    for one node, which rendezvouses with itself)."""
    made = [job_config_map(group, job_json), headless_service(group)]
    return [*made, worker_job(group)] if group.nodes > 1 else made


def create_group(api_client: Any, group: NodeGroup, job_json: str) -> None:
    """Create the job file, Service and worker Job (``kubernetes.client.ApiClient``); a
    leftover of an earlier attempt of the same run is deleted first."""
    from kubernetes import client

    delete_group(api_client, group)
    core, batch = client.CoreV1Api(api_client), client.BatchV1Api(api_client)
    create = {
        "ConfigMap": core.create_namespaced_config_map,
        "Service": core.create_namespaced_service,
        "Job": batch.create_namespaced_job,
    }
    for manifest in manifests(group, job_json):
        create[manifest["kind"]](group.namespace, manifest)


def delete_group(api_client: Any, group: NodeGroup) -> None:
    """Delete the worker Job (with its pods), the Service and the job file; missing is fine."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core, batch = client.CoreV1Api(api_client), client.BatchV1Api(api_client)
    calls = [
        lambda: batch.delete_namespaced_job(
            f"{group.name}-w", group.namespace, propagation_policy="Foreground"
        ),
        lambda: core.delete_namespaced_service(group.name, group.namespace),
        lambda: core.delete_namespaced_config_map(f"{group.name}-job", group.namespace),
    ]
    for call in calls:
        try:
            call()
        except ApiException as error:
            if error.status != 404:
                raise
