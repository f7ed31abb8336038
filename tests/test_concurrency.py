"""The `gpu` pool across runs, step retries for transient errors only, and run retries.

Pool: two runs, each in its own process (as two run workers are), start at nearly the
same time on one real instance (the project's dagster.yaml on SQLite; the Postgres
profile on a real server). Their GPU steps record when they run: with the pool the
intervals never overlap, without it (the control) they do.

Retries: real exceptions (a refused S3 connection, S3 throttling as s3fs reports it, a bad
captions file) through real step executions with ``recap_dagster.orchestration.retries``.
"""

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
from pg_server import PostgresServer, postgres_server  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
LOCAL_PROFILE = ROOT / "dagster.yaml"
POSTGRES_PROFILE = ROOT / "deploy" / "postgres" / "dagster.yaml"
STEP_SECONDS = 1.5

# -- the pool ---------------------------------------------------------------------------


def _worker(name: str, pool: str, out: str, delay: str) -> int:
    """One run worker: wait for the go signal (plus ``delay`` seconds), then materialize a
    timed asset (this file is its own subprocess entry point; only dagster is imported)."""

    @dg.asset(name=name, pool=pool or None)
    def timed() -> None:
        start = time.time()
        time.sleep(STEP_SECONDS)
        Path(out, f"{name}.json").write_text(json.dumps([start, time.time()]))

    with dg.DagsterInstance.get() as instance:
        Path(out, f"{name}.ready").touch()
        deadline = time.monotonic() + 120
        while not Path(out, "go").exists():
            if time.monotonic() > deadline:
                return 2
            time.sleep(0.01)
        time.sleep(float(delay))
        result = dg.materialize([timed], instance=instance)
        Path(out, f"{name}.run").write_text(result.run_id)
        return 0 if result.success else 1


def _two_runs_at_once(
    home: Path, out: Path, pool: str, stagger: float = 0.0
) -> dict[str, tuple[float, float, str]]:
    """Start two run workers, release them together (the second ``stagger`` seconds later);
    {name: (start, end, run_id)}."""
    names = ["first", "second"]
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, "worker", name, pool, str(out), str(stagger * i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, name in enumerate(names)
    ]
    try:
        deadline = time.monotonic() + 90
        while not all((out / f"{n}.ready").exists() for n in names):
            assert all(w.poll() is None for w in workers), [w.communicate()[0] for w in workers]
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.05)
        (out / "go").touch()
        outputs = [w.communicate(timeout=120)[0] for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    failed = [
        f"exit {w.returncode}:\n{o[-3000:]}"
        for w, o in zip(workers, outputs, strict=True)
        if w.returncode
    ]
    assert not failed, "\n".join(failed)
    result = {}
    for name in names:
        start, end = json.loads((out / f"{name}.json").read_text())
        result[name] = (start, end, (out / f"{name}.run").read_text())
    return result


def _home(tmp_path: Path, profile: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(profile, home / "dagster.yaml")
    return home


def _overlap(a: tuple[float, float, str], b: tuple[float, float, str]) -> float:
    return min(a[1], b[1]) - max(a[0], b[0])


@pytest.mark.parametrize("profile", ["sqlite", "postgres"])
def test_gpu_pool_keeps_two_runs_off_the_gpu_at_once(
    profile: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request
) -> None:
    if profile == "postgres":
        server: PostgresServer = request.getfixturevalue("postgres_server")
        database = server.create_database("recap_pool")
        monkeypatch.setenv("DAGSTER_POSTGRES_URL", server.url(database, driver="psycopg2"))
        home = _home(tmp_path, POSTGRES_PROFILE)
    else:
        home = _home(tmp_path, LOCAL_PROFILE)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    out = tmp_path / "out"
    out.mkdir()
    with dg.DagsterInstance.get() as instance:
        assert instance.get_settings("concurrency")["pools"]["default_limit"] == 1
        # Instance setup, before any run (what `./dev` should do on a new DAGSTER_HOME):
        # Dagster creates a pool's slots lazily at the first claim, and two runs that do it
        # at once race. Seen here without this line: on SQLite both GPU steps ran together,
        # on PostgreSQL one run crashed (InFailedSqlTransaction after an IntegrityError).
        # Opening the instance first also creates the tables before two processes would.
        instance.event_log_storage.initialize_concurrency_limit_to_default("gpu")
        assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == 1

    # The second run starts 0.3 s after the first, well inside the first one's step. Not
    # at the same instant: Dagster 1.13 claims a slot with a SELECT then an UPDATE in
    # autocommit mode (no lock held in between, on SQLite and PostgreSQL alike), so two
    # claims within the same few milliseconds can both win. Released together, the steps
    # overlapped in 1 of ~20 runs here (28 ms apart); launched runs are seconds apart.
    runs = _two_runs_at_once(home, out, "gpu", stagger=0.3)

    first, second = sorted(runs.values())
    assert _overlap(first, second) <= 0, f"GPU steps overlapped: {runs}"
    with dg.DagsterInstance.get() as instance:
        # The later run waited for the slot (not luck) and every slot was given back.
        blocked = [
            run_id
            for *_, run_id in runs.values()
            if any(
                "blocked by limit for pool gpu" in (record.message or "")
                for record in instance.all_logs(run_id)
            )
        ]
        assert blocked == [second[2]], blocked
        info = instance.event_log_storage.get_concurrency_info("gpu")
        assert info.slot_count == 1 and info.active_slot_count == 0


def test_without_the_pool_the_same_runs_overlap(tmp_path: Path, monkeypatch) -> None:
    """Control: the same two runs with no pool run their steps side by side."""
    home = _home(tmp_path, LOCAL_PROFILE)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    out = tmp_path / "out"
    out.mkdir()
    with dg.DagsterInstance.get():
        pass
    runs = _two_runs_at_once(home, out, "")
    first, second = sorted(runs.values())
    assert _overlap(first, second) > 0.5 * STEP_SECONDS, runs


def test_project_gpu_assets_are_in_the_gpu_pool() -> None:
    from recap_dagster.miniworld.definitions import defs

    graph = defs.resolve_asset_graph()
    pools = {
        key.to_user_string(): graph.get(key).assets_def.op.pool
        for key in graph.get_all_asset_keys()
        if graph.get(key).is_executable
    }
    assert {k for k, pool in pools.items() if pool == "gpu"} == {
        "captioner_checkpoint",
        "recaptioned_shards",
        "t2i_latents",
        "sd_checkpoints",
        "metric_reports",
        "base_metric_report",
    }
    assert {pool for pool in pools.values()} <= {"gpu", None}  # no other pool to configure


# -- which errors are transient ---------------------------------------------------------


def _dead_endpoint() -> str:
    with socket.socket() as sock:  # bound then closed: nothing listens there
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def _refused_s3_call() -> Exception:
    """A real botocore error: S3 unreachable (connection refused)."""
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=_dead_endpoint(),
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
        config=Config(retries={"total_max_attempts": 1}, connect_timeout=2),
    )
    try:
        client.list_objects_v2(Bucket="recap")
    except Exception as exc:
        return exc
    raise AssertionError("the call to a closed port succeeded")


def _client_error(code: str, status: int) -> Exception:
    from botocore.exceptions import ClientError

    response = {
        "Error": {"Code": code, "Message": code},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, "GetObject")


def _s3fs_error(code: str, status: int) -> Exception:
    """What s3fs raises for an S3 error response: a builtin OSError caused by ClientError."""
    from s3fs.errors import translate_boto_error

    return translate_boto_error(_client_error(code, status))


def _data_errors(tmp_path: Path) -> list[Exception]:
    """Real errors of the project's own code on bad input."""
    from recap_dagster.corpus import human_captions as core
    from recap_dagster.storage.root import Storage, validate_part

    errors: list[Exception] = []
    bad = tmp_path / "captions.jsonl"
    bad.write_text('{"key": "a"\n')
    for call in (
        lambda: core.load_human_captions(bad),
        lambda: Storage(str(tmp_path)).read_bytes("missing.parquet"),
        lambda: validate_part("../escape"),
    ):
        try:
            call()
        except Exception as exc:
            errors.append(exc)
    assert len(errors) == 3
    return errors


def test_transient_classification(tmp_path: Path) -> None:
    import aiohttp
    import httpx
    import requests
    import torch

    from recap_dagster.orchestration.retries import is_transient

    def caused(outer: Exception, cause: Exception) -> Exception:
        try:
            raise outer from cause
        except Exception as exc:
            return exc

    def during(outer: Exception, context: Exception) -> Exception:
        try:
            try:
                raise context
            except Exception:
                raise outer  # noqa: B904 (the point: implicit context, no `from`)
        except Exception as exc:
            return exc

    http_429 = requests.HTTPError(response=requests.Response())
    http_429.response.status_code = 429
    request = httpx.Request("GET", "https://huggingface.co")
    transient = {
        "refused S3 connection": _refused_s3_call(),
        "S3 SlowDown (botocore)": _client_error("SlowDown", 503),
        "S3 SlowDown (s3fs)": _s3fs_error("SlowDown", 503),
        "S3 InternalError (s3fs)": _s3fs_error("InternalError", 500),
        "S3 RequestTimeout (s3fs)": _s3fs_error("RequestTimeout", 400),
        "connection reset": ConnectionResetError(errno.ECONNRESET, "reset by peer"),
        "socket timeout": TimeoutError("timed out"),
        "errno ETIMEDOUT": OSError(errno.ETIMEDOUT, "timed out"),
        "aiohttp disconnect": aiohttp.ServerDisconnectedError(),
        "requests 429": http_429,
        "httpx connect": httpx.ConnectError("refused", request=request),
        "httpx 503": httpx.HTTPStatusError(
            "503", request=request, response=httpx.Response(503, request=request)
        ),
        "wrapped with `from`": caused(RuntimeError("upload failed"), ConnectionResetError()),
    }
    permanent = {
        "S3 NoSuchKey (s3fs)": _s3fs_error("NoSuchKey", 404),
        "S3 AccessDenied (s3fs)": _s3fs_error("AccessDenied", 403),
        "httpx 404": httpx.HTTPStatusError(
            "404", request=request, response=httpx.Response(404, request=request)
        ),
        "CUDA out of memory": torch.cuda.OutOfMemoryError("CUDA out of memory."),
        "raised while handling a network error": during(ValueError("bad row"), ConnectionError()),
        **{f"data: {type(e).__name__}": e for e in _data_errors(tmp_path)},
    }
    wrong = [name for name, exc in transient.items() if not is_transient(exc)]
    wrong += [name for name, exc in permanent.items() if is_transient(exc)]
    assert not wrong, wrong


# -- step retries in real runs -----------------------------------------------------------


class CaptionsConfig(dg.Config):
    path: str


def _attempts(result: dg.ExecuteInProcessResult, step: str) -> tuple[int, int]:
    """(STEP_START count, STEP_UP_FOR_RETRY count) of one step."""
    events = [e for e in result.all_events if e.step_key == step]
    starts = sum(e.event_type_value in ("STEP_START", "STEP_RESTARTED") for e in events)
    return starts, sum(e.event_type_value == "STEP_UP_FOR_RETRY" for e in events)


def test_transient_error_is_retried_then_succeeds(tmp_path: Path) -> None:
    from recap_dagster.orchestration.retries import retry_only_transient, transient_retry_policy

    calls = tmp_path / "calls"

    @dg.asset(retry_policy=transient_retry_policy(max_retries=3, delay=0.1, jitter=False))
    @retry_only_transient
    def uploads_to_s3(context: dg.AssetExecutionContext) -> None:
        calls.write_text(str(int(calls.read_text() or 0) + 1) if calls.exists() else "1")
        if context.retry_number == 0:
            raise _s3fs_error("SlowDown", 503)  # S3 throttles the first attempt

    with dg.instance_for_test() as instance:
        result = dg.materialize([uploads_to_s3], instance=instance)
    assert result.success
    assert calls.read_text() == "2"
    assert _attempts(result, "uploads_to_s3") == (2, 1)


def test_bad_data_fails_at_once_without_retry(tmp_path: Path) -> None:
    from recap_dagster.corpus import human_captions as core
    from recap_dagster.orchestration.retries import retry_only_transient, transient_retry_policy

    bad = tmp_path / "captions.jsonl"
    bad.write_text('{"key": "a", "image": "a.png", "short": "s"}\n')  # no long caption
    calls: list[int] = []

    @dg.asset(retry_policy=transient_retry_policy(max_retries=3, delay=0.1, jitter=False))
    @retry_only_transient
    def reads_captions(context: dg.AssetExecutionContext, config: CaptionsConfig) -> None:
        calls.append(context.retry_number)
        core.load_human_captions(config.path)

    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [reads_captions],
            instance=instance,
            run_config={"ops": {"reads_captions": {"config": {"path": str(bad)}}}},
            raise_on_error=False,
        )
    assert not result.success
    assert calls == [0]
    assert _attempts(result, "reads_captions") == (1, 0)
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    error = failure.step_failure_data.error
    assert "missing field" in error.message and "not retried" in error.message
    assert failure.step_failure_data.user_failure_data.metadata["transient"].value is False


def test_without_the_decorator_the_policy_retries_bad_data_too(tmp_path: Path) -> None:
    """Why retry_only_transient exists: a bare RetryPolicy retries any exception."""
    from recap_dagster.orchestration.retries import transient_retry_policy

    @dg.asset(retry_policy=transient_retry_policy(max_retries=2, delay=0.01, jitter=False))
    def bare() -> None:
        raise ValueError("bad row")

    with dg.instance_for_test() as instance:
        result = dg.materialize([bare], instance=instance, raise_on_error=False)
    assert _attempts(result, "bare") == (3, 2)


# Assets that talk to storage / S3 or hold a GPU for long: the ones a transient failure
# (throttling, a dropped connection, a preempted pod) should not fail outright.
RETRIED_ASSETS = {
    "human_captions",
    "captioner_checkpoint",
    "recaptioned_shards",
    "t2i_latents",
    "sd_checkpoints",
    "metric_reports",
    "base_metric_report",
    "human_eval_task",
    "human_eval_report",
    "recap_report",
}


def test_project_assets_retry_transient_errors_only() -> None:
    from dagster._core.definitions.policy import calculate_delay

    from recap_dagster.miniworld.definitions import defs
    from recap_dagster.orchestration.retries import TRANSIENT_RETRY_POLICY

    graph = defs.resolve_asset_graph()
    policies = {
        key.to_user_string(): graph.get(key).assets_def.op.retry_policy
        for key in graph.get_all_asset_keys()
        if graph.get(key).is_executable
    }
    assert {k for k, p in policies.items() if p is not None} == RETRIED_ASSETS
    assert all(policies[k] == TRANSIENT_RETRY_POLICY for k in RETRIED_ASSETS)
    policy = TRANSIENT_RETRY_POLICY
    assert policy.max_retries == 3 and policy.jitter == dg.Jitter.PLUS_MINUS
    unjittered = [calculate_delay(n, policy.backoff, None, policy.delay) for n in (1, 2, 3)]
    assert unjittered == [30, 90, 210]  # exponential backoff, seconds


def test_real_asset_fails_bad_input_without_retry(miniworld_paths, tmp_path: Path) -> None:
    """sd_checkpoints with no recaptioned shard is a data problem: one attempt, no retry
    (retries would wait 30 s, 90 s, 210 s for nothing)."""
    from recap_dagster.assets.t2i import sd_checkpoints
    from recap_dagster.miniworld.resources import (
        MiniworldResource,
        MiniworldWorldResource,
        miniworld_sources,
    )
    from recap_dagster.orchestration.partitions import variant_seed_key
    from recap_dagster.resources import (
        ComputeResource,
        ModelsResource,
        StorageResource,
    )

    resources = {
        "sources": miniworld_sources(str(miniworld_paths.root)),
        "storage": StorageResource(root=str(tmp_path / "storage")),
        "models": ModelsResource(base_captioner=str(tmp_path / "none")),
        "compute": ComputeResource(device="cpu"),
        "world": MiniworldWorldResource(),
        "miniworld": MiniworldResource(root=str(miniworld_paths.root)),
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
    }
    started = time.monotonic()
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [sd_checkpoints],
            instance=instance,
            resources=resources,
            partition_key=variant_seed_key("alttext", 0),
            raise_on_error=False,
        )
    assert not result.success
    assert _attempts(result, "sd_checkpoints") == (1, 0)
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "materialize training_corpus first" in failure.step_failure_data.error.to_string()
    assert time.monotonic() - started < 20


# -- run retries ---------------------------------------------------------------------------


@pytest.fixture
def local_instance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The project's own dagster.yaml (run retries on) in a temporary DAGSTER_HOME."""
    monkeypatch.setenv("DAGSTER_HOME", str(_home(tmp_path, LOCAL_PROFILE)))
    with dg.DagsterInstance.get() as instance:
        assert instance.run_retries_enabled
        yield instance


def _recaption_like_job(asset: dg.AssetsDefinition) -> dg.JobDefinition:
    """A job with the recaption job's tags (its run-retry settings) over ``asset``."""
    from recap_dagster.orchestration.automation import recaption_job

    job = dg.define_asset_job("recaption_like", tags=recaption_job.tags)
    return dg.Definitions(assets=[asset], jobs=[job]).resolve_job_def("recaption_like")


def test_recaption_job_does_not_rerun_a_step_failure(local_instance) -> None:
    """Bad data in a recaption run: the run is not re-run (max_retries is for lost workers)."""

    @dg.asset
    def bad_shard() -> None:
        raise ValueError("corrupt shard 00042")

    result = _recaption_like_job(bad_shard).execute_in_process(
        instance=local_instance, raise_on_error=False
    )
    assert not result.success
    run = local_instance.get_run_by_id(result.run_id)
    assert run.tags["dagster/max_retries"] == "2"
    assert run.tags["dagster/failure_reason"] == "STEP_FAILURE"
    assert run.tags["dagster/will_retry"] == "false"


def test_recaption_job_reruns_a_lost_run_worker(local_instance) -> None:
    """A run whose worker died (preempted machine / pod) is re-run by the daemon."""
    from dagster._core.events import JobFailureData, RunFailureReason

    @dg.asset
    def shard() -> None:
        pass

    job = _recaption_like_job(shard)
    run = local_instance.create_run_for_job(job, tags=job.tags)
    local_instance.report_run_failed(
        run,
        "run worker lost",
        JobFailureData(error=None, failure_reason=RunFailureReason.RUN_WORKER_RESTART),
    )
    run = local_instance.get_run_by_id(run.run_id)
    assert run.status == dg.DagsterRunStatus.FAILURE
    assert run.tags["dagster/will_retry"] == "true"


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    sys.exit(_worker(*sys.argv[2:6]))
