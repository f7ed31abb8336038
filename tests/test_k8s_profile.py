"""The Kubernetes scale-out profile: deploy/k8s/dagster.yaml and recap_dagster.definitions_k8s.

No cluster here, so the profile is checked in three ways:

- validated: the yaml against Dagster's instance schema and each configured class's own
  ``config_type()`` (K8sRunLauncher, QueuedRunCoordinator, S3ComputeLogManager, Postgres);
- built: the step Jobs of GPU and CPU assets, by dagster-k8s's own functions from the
  step tags of the real execution plan;
- run as far as a cluster's API: an instance loaded from the profile (real PostgreSQL,
  moto S3, a loopback stand-in for the Kubernetes API server that records what it gets)
  queues a run, the real queue daemon dequeues it and K8sRunLauncher posts its Job.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml
from dagster._config import process_config, resolve_to_config_type
from dagster._core.errors import DagsterInvalidConfigError
from dagster._core.execution.api import create_execution_plan
from dagster._core.instance.ref import InstanceRef
from dagster_k8s.container_context import K8sContainerContext
from dagster_k8s.job import (
    UserDefinedDagsterK8sConfig,
    construct_dagster_k8s_job,
    get_k8s_job_name,
    get_user_defined_k8s_config,
)
from pg_server import PostgresServer, postgres_server  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "deploy" / "k8s" / "dagster.yaml"
README = ROOT / "deploy" / "k8s" / "README.md"
GPU_ASSETS = {
    "captioner_checkpoint", "recaptioned_shards", "t2i_latents", "sd_checkpoints",
    "metric_reports", "base_metric_report",
}  # fmt: skip
IMAGE = "registry.example.com/recap-dagster:test"
PROFILE_ENV = {
    "DAGSTER_POSTGRES_URL": "postgresql+psycopg2://recap:secret@postgres:5432/dagster",
    "DAGSTER_K8S_NAMESPACE": "recap",
    "RECAP_LOGS_BUCKET": "recap-logs",
}


@pytest.fixture(autouse=True)
def production_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Where the production definitions' inputs and outputs are (read at run time)."""
    for name in (
        "RECAP_SHARDS_ROOT", "RECAP_HUMAN_CAPTIONS", "RECAP_EVAL_PROMPTS", "RECAP_TOKENIZER",
        "RECAP_STORAGE_ROOT", "RECAP_BASE_CAPTIONER", "RECAP_BASE_T2I",
    ):  # fmt: skip
        monkeypatch.setenv(name, str(tmp_path / name.lower()))


@pytest.fixture
def profile_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in PROFILE_ENV.items():
        monkeypatch.setenv(key, value)


def _class_data(ref: InstanceRef) -> dict[str, Any]:
    return {
        "storage": ref.storage_data,
        "run_launcher": ref.run_launcher_data,
        "run_coordinator": ref.run_coordinator_data,
        "compute_logs": ref.compute_logs_data,
        "scheduler": ref.scheduler_data,
    }


def _validate_class(data) -> Any:
    """Validate a configured class's config with its own config_type(), as rehydrate() does,
    without constructing it (K8sRunLauncher would load in-cluster credentials)."""
    import importlib

    klass = getattr(importlib.import_module(data.module_name), data.class_name)
    result = process_config(resolve_to_config_type(klass.config_type()), data.config_dict)
    if not result.success:
        raise DagsterInvalidConfigError(f"{data.class_name} config", result.errors, None)
    return klass, result.value


# -- the yaml -------------------------------------------------------------------------


def test_profile_validates_against_dagster_schemas(profile_env) -> None:
    # dagster_instance_config (inside from_dir) validates the top level: concurrency,
    # run_retries, run_monitoring, retention, ... and the class/config shape of each plugin.
    ref = InstanceRef.from_dir(str(PROFILE.parent))
    classes = {}
    for name, data in _class_data(ref).items():
        klass, value = _validate_class(data)
        classes[name] = (klass.__name__, value)
    assert classes["storage"][0] == "DagsterPostgresStorage"
    assert classes["storage"][1]["postgres_url"] == PROFILE_ENV["DAGSTER_POSTGRES_URL"]
    launcher = classes["run_launcher"]
    assert launcher[0] == "K8sRunLauncher"
    assert launcher[1]["job_namespace"] == "recap"
    assert launcher[1]["load_incluster_config"] is True
    assert classes["run_coordinator"][0] == "QueuedRunCoordinator"
    assert classes["compute_logs"][0] == "S3ComputeLogManager"
    assert classes["compute_logs"][1]["bucket"] == "recap-logs"
    settings = ref.settings
    assert settings["concurrency"]["pools"]["granularity"] == "op"
    assert settings["concurrency"]["runs"]["max_concurrent_runs"] > 0
    assert settings["run_retries"]["retry_on_asset_or_op_failure"] is False
    assert settings["run_monitoring"]["max_resume_run_attempts"] > 0
    # A preempted GPU pod's run, once marked failed, gives its gpu slots back (#32560).
    assert settings["run_monitoring"]["free_slots_after_run_end_seconds"] > 0
    # Every environment variable the profile reads is documented for the operator.
    documented = README.read_text()
    for variable in PROFILE_ENV:
        assert variable in documented, variable


def test_profile_validation_catches_mistakes(profile_env, tmp_path: Path, monkeypatch) -> None:
    """The checks above are real: a misspelt key or a missing variable fails them."""
    config = yaml.safe_load(PROFILE.read_text())
    broken = copy.deepcopy(config)
    broken["run_launcher"]["config"]["job_namespce"] = "typo"
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(broken))
    with pytest.raises(DagsterInvalidConfigError, match="job_namespce"):
        _validate_class(InstanceRef.from_dir(str(tmp_path)).run_launcher_data)

    broken = copy.deepcopy(config)
    broken["concurrency"]["pools"]["granularity"] = "step"
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(broken))
    with pytest.raises(DagsterInvalidConfigError, match="granularity"):
        InstanceRef.from_dir(str(tmp_path))

    monkeypatch.delenv("DAGSTER_POSTGRES_URL")
    with pytest.raises(DagsterInvalidConfigError):
        _validate_class(InstanceRef.from_dir(str(PROFILE.parent)).storage_data)


# -- the code location ----------------------------------------------------------------


def _assets_by_name(defs: dg.Definitions) -> dict[str, dg.AssetsDefinition]:
    graph = defs.resolve_asset_graph()
    return {
        key.to_user_string(): graph.get(key).assets_def
        for key in graph.get_all_asset_keys()
        if graph.get(key).is_executable
    }


def test_k8s_definitions_load_with_the_k8s_executor() -> None:
    from recap_dagster import definitions, definitions_k8s

    dg.Definitions.validate_loadable(definitions_k8s.defs)
    job = definitions_k8s.defs.resolve_job_def("recaption_shards_job")
    assert job.executor_def.name == "k8s"  # k8s_job_executor: one pod per step
    assert definitions.defs.resolve_job_def("recaption_shards_job").executor_def.name != "k8s"
    # The same graph as the local default: assets, checks, automation.
    local, k8s = definitions.defs.resolve_asset_graph(), definitions_k8s.defs.resolve_asset_graph()
    assert local.get_all_asset_keys() == k8s.get_all_asset_keys()
    assert local.asset_check_keys == k8s.asset_check_keys
    assert definitions_k8s.defs.resolve_sensor_def("laion_shard_sensor")
    assert definitions_k8s.defs.resolve_schedule_def("recaption_backfill_schedule")


def test_every_gpu_asset_requests_a_gpu() -> None:
    from recap_dagster import definitions, definitions_k8s

    local = _assets_by_name(definitions.defs)
    k8s = _assets_by_name(definitions_k8s.defs)
    assert {name for name, a in local.items() if a.op.pool == "gpu"} == GPU_ASSETS
    # the same asset definitions: only the executor differs
    assert {n: a.op.tags for n, a in k8s.items()} == {n: a.op.tags for n, a in local.items()}
    for name, assets_def in k8s.items():
        tag = assets_def.op.tags.get("dagster-k8s/config")
        if name not in GPU_ASSETS:
            assert tag is None, name
            continue
        # Parsed and validated the way the k8s executor reads a step's tags.
        config = get_user_defined_k8s_config({"dagster-k8s/config": tag})
        assert config.container_config["resources"]["limits"] == {"nvidia.com/gpu": "1"}, name
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
            config.pod_spec_config["tolerations"]
        )


def test_no_module_imports_dagster_private_api() -> None:
    package = ROOT / "recap_dagster"
    offenders = [
        str(path.relative_to(ROOT))
        for path in package.rglob("*.py")
        if "dagster._" in path.read_text(encoding="utf-8")
    ]
    assert offenders == []


def test_gpu_config_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from recap_dagster.orchestration.k8s_gpu import gpu_k8s_config

    monkeypatch.setenv("RECAP_K8S_GPUS_PER_STEP", "8")
    monkeypatch.setenv(
        "RECAP_K8S_GPU_NODE_SELECTOR", "cloud.google.com/gke-accelerator=nvidia-h100-80gb"
    )
    config = gpu_k8s_config()
    assert config["container_config"]["resources"]["limits"] == {"nvidia.com/gpu": "8"}
    assert config["pod_spec_config"]["node_selector"] == {
        "cloud.google.com/gke-accelerator": "nvidia-h100-80gb"
    }
    with pytest.raises(ValueError, match="key=value"):
        gpu_k8s_config(node_selector="gpu-pool")
    # The trainer's pod gets its own GPU count: one training process per GPU.
    from recap_dagster.orchestration.k8s_gpu import gpu_op_tags

    monkeypatch.setenv("RECAP_K8S_GPUS_PER_STEP", "1")
    monkeypatch.setenv("RECAP_K8S_TRAINING_GPUS", "8")
    training = gpu_op_tags(training=True)["dagster-k8s/config"]
    assert training["container_config"]["resources"]["limits"] == {"nvidia.com/gpu": "8"}
    assert gpu_op_tags()["dagster-k8s/config"]["container_config"]["resources"]["limits"] == {
        "nvidia.com/gpu": "1"
    }
    with pytest.raises(ValueError, match="at least 1"):
        gpu_k8s_config(gpus=0)


def _step_job(run: Any, launcher: Any, step: Any) -> dict:
    """The step Job the k8s executor submits (K8sStepHandler.launch_step's construction)."""
    context = K8sContainerContext.create_for_run(run, launcher, include_run_tags=False)
    context = context.merge(
        K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(step.tags))
    )
    job_config = context.get_k8s_job_config(IMAGE, launcher)
    job = construct_dagster_k8s_job(
        job_config=job_config,
        args=["dagster", "api", "execute_step"],
        job_name=get_k8s_job_name(run.run_id, step.key),
        user_defined_k8s_config=context.run_k8s_config,
        component="step_worker",
    )
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(job)


def test_step_jobs_put_gpu_steps_on_gpu_nodes(profile_env, fake_kubernetes, tmp_path) -> None:
    from dagster_k8s import K8sRunLauncher

    from recap_dagster import definitions_k8s

    klass, config = _validate_class(InstanceRef.from_dir(str(PROFILE.parent)).run_launcher_data)
    assert klass is K8sRunLauncher
    # The profile's launcher; only how it reaches the cluster differs (no service account).
    launcher = K8sRunLauncher(
        **{**config, "load_incluster_config": False, "kubeconfig_file": str(fake_kubernetes[0])}
    )
    job = definitions_k8s.defs.resolve_implicit_global_asset_job_def()
    keys = [dg.AssetKey("human_captions"), dg.AssetKey("captioner_checkpoint")]
    plan = create_execution_plan(job.get_subset(asset_selection=set(keys)))
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        run = instance.create_run_for_job(job.get_subset(asset_selection=set(keys)))
    manifests = {s.key: _step_job(run, launcher, s) for s in plan.get_all_steps_in_topo_order()}

    gpu_job = manifests["captioner_checkpoint"]
    gpu_pod = gpu_job["spec"]["template"]["spec"]
    # Exactly the GPU: nothing of the run pod's config may cap a GPU step's memory.
    assert gpu_pod["containers"][0]["resources"] == {"limits": {"nvidia.com/gpu": "1"}}
    assert gpu_job["spec"]["backoffLimit"] == 0  # Dagster, not Kubernetes, retries steps
    assert gpu_pod["tolerations"] == [
        {"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}
    ]
    # Step pods inherit the profile's image pull policy, service account and env sources.
    assert gpu_pod["serviceAccountName"] == "recap-dagster"
    env_from = gpu_pod["containers"][0]["envFrom"]
    assert {"configMapRef": {"name": "recap-dagster-env"}} in env_from
    assert {"secretRef": {"name": "recap-dagster-postgres"}} in env_from

    cpu_pod = manifests["human_captions"]["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in json.dumps(cpu_pod)
    assert not cpu_pod.get("tolerations")


def test_per_step_override_in_run_config_validates() -> None:
    """Operators raise one step's GPUs at launch (e.g. 8 for a multi-GPU fine-tune)."""
    from recap_dagster import definitions_k8s

    job = definitions_k8s.defs.resolve_implicit_global_asset_job_def()
    eight = {"container_config": {"resources": {"limits": {"nvidia.com/gpu": "8"}}}}
    run_config = {
        "execution": {
            "config": {"per_step_k8s_config": {"sd_checkpoints": eight}, "max_concurrent": 4}
        }
    }
    resolved = dg.validate_run_config(job, run_config)["execution"]["k8s"]
    assert resolved["max_concurrent"] == 4
    override = resolved["per_step_k8s_config"]["sd_checkpoints"]
    assert override["container_config"] == eight["container_config"]
    assert "enabled" in resolved["retries"]  # step retries (RetryPolicy) are on by default
    assert (
        UserDefinedDagsterK8sConfig.from_dict(eight).container_config == eight["container_config"]
    )
    with pytest.raises(DagsterInvalidConfigError):
        dg.validate_run_config(job, {"execution": {"config": {"per_step_k8s_conf": {}}}})


# -- as far as the Kubernetes API ----------------------------------------------------------


class _FakeKubernetesApi(BaseHTTPRequestHandler):
    """Accepts Job creations like the API server would and records them."""

    created: list[tuple[str, dict]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.created.append((self.path, body))
        self._reply(201, {**body, "status": {}})

    def do_GET(self) -> None:  # noqa: N802
        self._reply(404, {"kind": "Status", "code": 404, "reason": "NotFound"})

    def do_DELETE(self) -> None:  # noqa: N802 (nothing exists: a clean namespace)
        self.created.append((f"DELETE {self.path}", {}))
        self._reply(404, {"kind": "Status", "code": 404, "reason": "NotFound"})

    def _reply(self, code: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_kubernetes(tmp_path: Path) -> Iterator[tuple[Path, list]]:
    """A loopback API endpoint and a kubeconfig pointing at it."""
    _FakeKubernetesApi.created = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeKubernetesApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "t", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}
                ],
                "users": [{"name": "t", "user": {"token": "test"}}],
                "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t"}}],
                "current-context": "t",
            }
        )
    )
    try:
        yield kubeconfig, _FakeKubernetesApi.created
    finally:
        server.shutdown()
        server.server_close()


def test_queued_run_is_launched_as_a_kubernetes_job(
    postgres_server: PostgresServer,  # noqa: F811
    s3_env: str,
    fake_kubernetes,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dagster._core.remote_origin import InProcessCodeLocationOrigin
    from dagster._core.test_utils import InProcessTestWorkspaceLoadTarget
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import (
        QueuedRunCoordinatorDaemon,
    )

    kubeconfig, created = fake_kubernetes
    database = postgres_server.create_database("recap_k8s")
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", postgres_server.url(database, driver="psycopg2"))
    monkeypatch.setenv("DAGSTER_K8S_NAMESPACE", "recap")
    monkeypatch.setenv("RECAP_LOGS_BUCKET", s3_env.removeprefix("s3://"))
    monkeypatch.setenv("RECAP_WORKDIR", str(tmp_path / "recap"))
    # The shipped profile, except the two keys that say how to reach the cluster: there is
    # no in-cluster service account here, so a kubeconfig points at the stand-in.
    config = yaml.safe_load(PROFILE.read_text())
    config["run_launcher"]["config"]["load_incluster_config"] = False
    config["run_launcher"]["config"]["kubeconfig_file"] = str(kubeconfig)
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("DAGSTER_HOME", str(home))

    origin = InProcessCodeLocationOrigin(
        LoadableTargetOrigin(
            executable_path=sys.executable,
            module_name="recap_dagster.definitions_k8s",
            working_directory=str(ROOT),
        ),
        container_image=IMAGE,
    )
    with (
        dg.DagsterInstance.get() as instance,
        WorkspaceProcessContext(instance, InProcessTestWorkspaceLoadTarget(origin)) as process,
    ):
        assert type(instance.run_launcher).__name__ == "K8sRunLauncher"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert type(instance.compute_log_manager).__name__ == "S3ComputeLogManager"
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"

        workspace = process.create_request_context()
        location = next(iter(workspace.get_code_location_entries().values())).code_location
        repo = next(iter(location.get_repositories().values()))
        remote_job = repo.get_full_job("recaption_shards_job")
        from recap_dagster.definitions_k8s import defs

        job_def = defs.resolve_job_def("recaption_shards_job")
        instance.add_dynamic_partitions("laion_shard_groups", ["00000-00099"])
        run = instance.create_run_for_job(
            job_def,
            tags={**job_def.tags, "dagster/partition": "00000-00099"},
            remote_job_origin=remote_job.get_remote_origin(),
            job_code_origin=remote_job.get_python_origin(),
        )
        instance.submit_run(run.run_id, workspace)
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.QUEUED
        assert created == []  # queued: nothing sent to the cluster yet

        list(QueuedRunCoordinatorDaemon(interval_seconds=1).run_iteration(process))
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTING

    assert len(created) == 1
    path, job = created[0]
    assert path == "/apis/batch/v1/namespaces/recap/jobs"
    assert job["metadata"]["labels"]["dagster/run-id"] == run.run_id
    assert job["spec"]["backoffLimit"] == 0
    assert job["spec"]["ttlSecondsAfterFinished"] == 86400
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == IMAGE
    assert container["args"][:3] == ["dagster", "api", "execute_run"]
    assert "nvidia.com/gpu" not in json.dumps(container)  # the run pod only orchestrates
    annotations = job["spec"]["template"]["metadata"]["annotations"]
    assert annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
    assert {"configMapRef": {"name": "recap-dagster-env"}} in container["envFrom"]
    assert {"secretRef": {"name": "recap-dagster-aws"}} in container["envFrom"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DAGSTER_HOME"] == "/opt/dagster/dagster_home"
    assert env["DAGSTER_K8S_NAMESPACE"] == "recap"
    assert pod["serviceAccountName"] == "recap-dagster"
    # The run pod gets the instance config in its arguments, with the `env:` references
    # unresolved: the database URL (a secret) is read from the pod's own Secret.
    arguments = " ".join(container["args"])
    assert "DAGSTER_POSTGRES_URL" in arguments
    assert os.environ["DAGSTER_POSTGRES_URL"] not in json.dumps(job)


# -- multi-node training: N pods meeting through a headless Service ---------------------


class _Response:
    """What ``ApiClient.deserialize`` reads: the JSON body of an API response."""

    def __init__(self, payload: dict) -> None:
        self.data = json.dumps(payload)


def _validated(manifest: dict, model: str) -> dict:
    """``manifest`` read into the kubernetes client's ``model`` and written back: a key
    the model does not know is dropped (so the round trip differs), a missing required
    field or a bad enum raises."""
    from kubernetes.client import ApiClient

    api = ApiClient()
    obj = api.deserialize(_Response(manifest), model)
    assert api.sanitize_for_serialization(obj) == manifest, model
    return manifest


def _group(**kw: Any):
    from recap_dagster.orchestration.k8s_training import NodeGroup

    base = {"name": "recap-sd-recap-mix-ab12cd34-a0", "namespace": "recap", "image": IMAGE,
            "nodes": 4, "gpus": 8}  # fmt: skip
    return NodeGroup(**{**base, **kw})


def test_node_group_manifests_validate_and_wire_the_rendezvous() -> None:
    from dagster_k8s.pipes import build_pod_body

    from recap_dagster.orchestration import k8s_training as kt

    group = _group()
    config_map, service, job = kt.manifests(group, '{"job": 1}')
    _validated(config_map, "V1ConfigMap")
    _validated(service, "V1Service")
    _validated(job, "V1Job")
    # Headless: one DNS record per pod of the run, also before they are ready.
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    # Nodes 1..3: an indexed Job; ranks from the completion index.
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 3
    assert spec["backoffLimit"] == 0
    worker = spec["template"]["spec"]
    command = worker["containers"][0]["command"]
    assert command[:2] == ["sh", "-c"]
    assert '--node-rank="$((JOB_COMPLETION_INDEX + 1))"' in command[2]
    assert (
        "--rdzv-endpoint=recap-sd-recap-mix-ab12cd34-a0-0.recap-sd-recap-mix-ab12cd34-a0:29400"
        in command[2]
    )
    assert "--nnodes=4" in command[2] and "--nproc_per_node=8" in command[2]
    assert worker["containers"][0]["resources"] == {"limits": {"nvidia.com/gpu": "8"}}
    assert worker["subdomain"] == group.name
    # Node 0: the pod Pipes launches, built by dagster-k8s's own function.
    meta, pod_spec = kt.node0_pod(group)
    body = build_pod_body("dagster-abc", None, None, {"DAGSTER_PIPES_CONTEXT": "x"}, meta, pod_spec)
    pod = _validated(kubernetes_dict(body), "V1Pod")
    assert pod["spec"]["hostname"] == f"{group.name}-0"  # the rendezvous endpoint's host
    assert pod["spec"]["subdomain"] == group.name
    node0 = pod["spec"]["containers"][0]
    assert node0["command"][node0["command"].index("-m") + 1] == "torch.distributed.run"
    assert "--node-rank=0" in node0["command"]
    assert {"name": "DAGSTER_PIPES_CONTEXT", "value": "x"} in node0["env"]
    # Every pod of the run is behind the Service: node 0 and whichever node c10d ranks 0.
    selector = service["spec"]["selector"].items()
    assert selector <= pod["metadata"]["labels"].items()
    assert selector <= spec["template"]["metadata"]["labels"].items()
    # Every pod mounts the job file from the ConfigMap.
    for container, volumes in (
        (node0, pod["spec"]["volumes"]),
        (worker["containers"][0], worker["volumes"]),
    ):
        assert {"name": "job", "mountPath": kt.JOB_MOUNT, "readOnly": True} in container[
            "volumeMounts"
        ]
        assert {"name": "job", "configMap": {"name": config_map["metadata"]["name"]}} in volumes
    # One node: no workers, torchrun alone (--standalone).
    assert [m["kind"] for m in kt.manifests(_group(nodes=1), "{}")] == ["ConfigMap", "Service"]
    assert "--standalone" in kt.node0_pod(_group(nodes=1))[1]["containers"][0]["command"]


def kubernetes_dict(body: Any) -> dict:
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(body)


def test_node_group_validation_catches_mistakes() -> None:
    from recap_dagster.orchestration import k8s_training as kt

    job = kt.worker_job(_group())
    job["spec"]["completionMod"] = job["spec"].pop("completionMode")  # a typo
    with pytest.raises(AssertionError):
        _validated(job, "V1Job")
    with pytest.raises(ValueError, match="DNS label"):
        _group(name="Recap_SD")
    with pytest.raises(ValueError, match="at least 1"):
        _group(gpus=0)
    assert (
        kt.group_name("recap-sd", "recap_mix", "AB12cd34", "a0") == "recap-sd-recap-mix-ab12cd34-a0"
    )


def test_node_group_is_created_and_deleted_through_the_api(fake_kubernetes) -> None:
    """Against the stand-in API server: a leftover group is deleted first, then the job
    file, the Service and the worker Job are posted to the namespace; deleting tolerates
    what is already gone."""
    import kubernetes

    from recap_dagster.orchestration import k8s_training as kt

    kubeconfig, created = fake_kubernetes
    api = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    group = _group(nodes=2)
    kt.create_group(api, group, '{"steps": 1}')
    posts = [(path, body) for path, body in created if not path.startswith("DELETE")]
    assert [path for path, _ in posts] == [
        "/api/v1/namespaces/recap/configmaps",
        "/api/v1/namespaces/recap/services",
        "/apis/batch/v1/namespaces/recap/jobs",
    ]
    assert posts[0][1]["data"] == {"job.json": '{"steps": 1}'}
    assert posts[2][1]["spec"]["completions"] == 1
    deletes = [path for path, _ in created if path.startswith("DELETE")]
    assert deletes[0].startswith(f"DELETE /apis/batch/v1/namespaces/recap/jobs/{group.name}-w")
    assert len(deletes) == 3  # before creating: the worker Job, the Service, the job file
    kt.delete_group(api, group)


def test_sd_checkpoints_on_kubernetes_always_deletes_its_node_group(
    fake_kubernetes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """launcher k8s: the group is created in the namespace, node 0 runs through Pipes with
    the group's pod spec, and the group is deleted when node 0's pod fails (preempted), so
    the step's retry starts a whole new one."""
    import dagster_k8s

    from recap_dagster.assets import t2i
    from recap_dagster.orchestration.partitions import variant_seed_key
    from recap_dagster.t2i.stream import CaptionSource, StreamSpec
    from recap_dagster.t2i.train import TrainJob

    kubeconfig, created = fake_kubernetes
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setenv("DAGSTER_CURRENT_IMAGE", IMAGE)
    monkeypatch.setenv("DAGSTER_K8S_NAMESPACE", "recap")
    runs: list[dict] = []

    class PreemptedNodeZero:
        """Stands in for PipesK8sClient (no kubelet here): node 0's pod is lost."""

        def run(self, **kwargs: Any) -> None:
            runs.append(kwargs)
            raise RuntimeError("pod preempted")

    monkeypatch.setattr(dagster_k8s, "PipesK8sClient", PreemptedNodeZero)
    data = StreamSpec("s3://b/cache", "vae", ("00000",), CaptionSource(root="s3://b/shards"))
    job = TrainJob("/models/sd", "v1", "s3://b/recap", ("state",), ("snapshots",), data)
    context = dg.build_asset_context(partition_key=variant_seed_key("recap_mix", 0))
    with pytest.raises(RuntimeError, match="preempted"):
        t2i._train_on_kubernetes(context, job, processes=8, nodes=3)

    (run,) = runs
    spec = run["base_pod_spec"]
    name = spec["subdomain"]
    assert name.startswith("recap-sd-recap-mix-seed-0-") and spec["hostname"] == f"{name}-0"
    assert run["namespace"] == "recap" and spec["containers"][0]["image"] == IMAGE
    assert "--nnodes=3" in spec["containers"][0]["command"]
    posts = [(path, body) for path, body in created if not path.startswith("DELETE")]
    assert [body["kind"] for _, body in posts] == ["ConfigMap", "Service", "Job"]
    assert json.loads(posts[0][1]["data"]["job.json"]) == json.loads(job.to_json())
    assert posts[2][1]["spec"]["completions"] == 2
    # Deleted before creating (a leftover) and after node 0 failed: 3 + 3 deletions.
    deletes = [path for path, _ in created if path.startswith("DELETE")]
    assert len(deletes) == 6 and created[-1][0].startswith("DELETE")
