"""A killed run never blocks the gpu pool.

Real run workers (subprocesses that materialize a GPU-pool asset using the project's
``ComputeResource``, as ``./dev pipeline`` does) on a real instance, SQLite and PostgreSQL:
one holds the pool's only slot and is SIGKILLed while a second run of the same asset waits;
the watchdog marks the dead run failed, frees its slot, and the second run completes. The
waiting run is told, at INFO in its own logs, which run holds the slot and since when.
"""

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
from pg_server import PostgresServer, postgres_server  # noqa: F401  (fixture)

from recap_dagster.orchestration.pool_watchdog import GPU_POOL
from recap_dagster.resources import ComputeResource

ROOT = Path(__file__).resolve().parents[1]
PROFILES = {"sqlite": ROOT / "dagster.yaml", "postgres": ROOT / "deploy/postgres/dagster.yaml"}
# Kill -> the waiting step starts: the watchdog's sweep interval here plus Dagster's claim
# back-off (at most 15 s between a blocked step's claims) and process start-up.
RECOVERY_BOUND_SECONDS = 30


def _worker(name: str, out: str, hold: str) -> int:
    """One run worker (this file is its own entry point): materialize a GPU-pool asset that
    records its run id and start time, then holds the GPU for ``hold`` seconds."""

    @dg.asset(name="gpu_step", pool=GPU_POOL)
    def gpu_step(context: dg.AssetExecutionContext, compute: ComputeResource) -> None:
        Path(out, f"{name}.started").write_text(f"{context.run_id} {time.time()}")
        time.sleep(float(hold))

    with dg.DagsterInstance.get() as instance:
        result = dg.materialize(
            [gpu_step], instance=instance, resources={"compute": ComputeResource()}
        )
        return 0 if result.success else 1


def _start(name: str, out: Path, hold: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, __file__, "worker", name, str(out), str(hold)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _start_holder(out: Path) -> tuple[subprocess.Popen, str]:
    """A run worker whose GPU step has started and holds the slot; (process, run id)."""
    out.mkdir()
    holder = _start("holder", out, hold=600)
    try:
        _wait_for(lambda: (out / "holder.started").exists(), "holder's step", workers=[holder])
    except BaseException:
        holder.kill()
        raise
    return holder, (out / "holder.started").read_text().split()[0]


def _wait_for(predicate, what: str, timeout: float = 90, workers=()) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for worker in workers:
            if worker.poll() is not None:
                raise AssertionError(f"{what}: worker exited\n{worker.communicate()[0][-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting: {what}"
        time.sleep(0.1)


@pytest.fixture(params=sorted(PROFILES))
def instance(request, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A real instance of one of the project's profiles, with the gpu pool initialised."""
    if request.param == "postgres":
        server: PostgresServer = request.getfixturevalue("postgres_server")
        url = server.url(server.create_database("recap_watchdog"), driver="psycopg2")
        monkeypatch.setenv("DAGSTER_POSTGRES_URL", url)
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(PROFILES[request.param], home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as instance:
        assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] > 0
        instance.event_log_storage.initialize_concurrency_limit_to_default("gpu")
        yield instance


def _holders(instance: dg.DagsterInstance) -> list[str]:
    return [s.run_id for s in instance.event_log_storage.get_concurrency_info("gpu").claimed_slots]


def _pending(instance: dg.DagsterInstance) -> list[str]:
    info = instance.event_log_storage.get_concurrency_info("gpu")
    return [s.run_id for s in info.pending_steps if s.assigned_timestamp is None]


def test_sigkilled_run_worker_frees_the_pool_for_the_next_run(
    instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    from recap_dagster.orchestration.pool_watchdog import WORKER_TAG, watching_pool

    out = tmp_path / "out"
    holder, holder_run = _start_holder(out)
    waiter = None
    said: list[str] = []
    try:
        assert _holders(instance) == [holder_run]
        assert instance.get_run_by_id(holder_run).tags[WORKER_TAG]

        waiter = _start("waiter", out, hold=0)
        _wait_for(lambda: _pending(instance), "the second run to wait", workers=[waiter])
        waiter_run = _pending(instance)[0]
        with watching_pool(instance, said.append, every_seconds=1.0):
            # A live holder is left alone; the waiting run is told who holds the pool.
            def told() -> list:
                events = instance.all_logs(waiter_run, of_type=dg.DagsterEventType.ENGINE_EVENT)
                return [e for e in events if "waited since" in e.message]

            # The sweep that told it saw the holder alive and did not free its slot.
            _wait_for(told, "the waiting run to be told", 30)
            assert instance.get_run_by_id(holder_run).status == dg.DagsterRunStatus.STARTED
            assert _holders(instance) == [holder_run]
            told = told()
            assert told[0].level == logging.INFO, told
            assert f"held by run {holder_run[:8]} (step gpu_step, STARTED) since" in (
                told[0].message
            )
            assert any(f"run {holder_run[:8]}" in line for line in said), said

            os.kill(holder.pid, signal.SIGKILL)
            killed_at = time.time()
            holder.wait()
            _wait_for(lambda: (out / "waiter.started").exists(), "the second run's step", 60)
            assert waiter.wait(timeout=60) == 0, waiter.communicate()[0][-3000:]
        recovered_in = float((out / "waiter.started").read_text().split()[1]) - killed_at
        print(f"kill -> next gpu step started: {recovered_in:.1f} s")
        assert recovered_in < RECOVERY_BOUND_SECONDS

        dead = instance.get_run_by_id(holder_run)
        assert dead.status == dg.DagsterRunStatus.FAILURE
        failure = instance.all_logs(holder_run, of_type=dg.DagsterEventType.RUN_FAILURE)
        assert "Run worker lost: no process of the run is alive" in failure[-1].message
        assert instance.get_run_by_id(waiter_run).status == dg.DagsterRunStatus.SUCCESS
        assert _holders(instance) == []
        assert any("freed the slot(s) of run " + holder_run[:8] in line for line in said), said
    finally:
        for worker in (holder, waiter):
            if worker is not None and worker.poll() is None:
                worker.kill()


def test_run_that_fails_normally_releases_its_slot_at_once(
    instance: dg.DagsterInstance,
) -> None:
    @dg.asset(pool="gpu")
    def failing_gpu_step() -> None:
        raise RuntimeError("out of memory, say")

    @dg.asset(pool="gpu")
    def next_gpu_step() -> None:
        pass

    failed = dg.materialize([failing_gpu_step], instance=instance, raise_on_error=False)
    assert not failed.success
    assert _holders(instance) == []  # no watchdog needed: released when the step failed
    started = time.monotonic()
    assert dg.materialize([next_gpu_step], instance=instance).success
    assert time.monotonic() - started < 10


def test_sensor_frees_a_leaked_slot_and_reports_the_pool(instance: dg.DagsterInstance) -> None:
    """A run that ended but still holds a slot (a preempted pod marked failed by run
    monitoring, dagster-io/dagster #32560) gets it back at the sensor's next tick."""
    from recap_dagster.orchestration.automation import gpu_pool_watchdog

    @dg.asset(pool="gpu")
    def gpu_step() -> None:
        pass

    ended = dg.materialize([gpu_step], instance=instance).run_id
    storage = instance.event_log_storage
    assert storage.claim_concurrency_slot("gpu", ended, "gpu_step").is_claimed
    assert _holders(instance) == [ended]

    result = gpu_pool_watchdog(dg.build_sensor_context(instance=instance))
    assert _holders(instance) == []
    assert result.skip_reason and "freed the slot(s) of run " + ended[:8] in str(result.skip_reason)
    again = gpu_pool_watchdog(dg.build_sensor_context(instance=instance, cursor=result.cursor))
    assert "0/1 slot(s) held by nobody" in str(again.skip_reason)


def test_a_dead_looking_run_of_another_machine_keeps_its_slot(
    instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    """Its pids mean nothing here (a Kubernetes pod): its launcher's health check decides."""
    from recap_dagster.orchestration.pool_watchdog import (
        WORKER_TAG,
        sweep_pool,
        this_host,
        worker_is_dead,
    )

    out = tmp_path / "out"
    holder, run_id = _start_holder(out)
    try:
        instance.add_run_tags(run_id, {WORKER_TAG: "recap-run-7f9c/another-boot"})
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        run = instance.get_run_by_id(run_id)
        events = list(instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_START))
        assert worker_is_dead(run, events) is None
        assert "no process of the run is alive" in worker_is_dead(
            run.with_tags({WORKER_TAG: this_host()}), events
        )
        name = this_host().split("/")[0]
        rebooted = run.with_tags({WORKER_TAG: f"{name}/an-earlier-boot"})
        assert "before the machine restarted" in worker_is_dead(rebooted, events)
        assert worker_is_dead(run.with_tags({WORKER_TAG: ""}), events) is None
        sweep = sweep_pool(instance)
        assert [h.run_id for h in sweep.holders] == [run_id] and not sweep.freed
        assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.STARTED
    finally:
        if holder.poll() is None:
            holder.kill()


def _watchdog_ticks(instance: dg.DagsterInstance, after: float) -> list:
    """The gpu_pool_watchdog sensor's ticks since ``after`` (a timestamp)."""
    return [
        tick
        for state in instance.all_instigator_state()
        if state.name == "gpu_pool_watchdog"
        for tick in instance.get_ticks(state.instigator_origin_id, state.selector_id, after=after)
    ]


def _run_events(instance: dg.DagsterInstance, run_id: str, kind: dg.DagsterEventType) -> list:
    return list(instance.all_logs(run_id, of_type=kind))


# SQLite only: the PostgreSQL profile uses the same launcher and sweep, and its pool
# recovery is tested above (measured under dagster dev too: README).
@pytest.mark.slow
@pytest.mark.parametrize("instance", ["sqlite"], indirect=True)
def test_ui_launched_run_killed_under_dagster_dev_frees_the_pool(
    instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    """Runs launched as the UI launches them (GraphQL, the default run launcher, a run
    worker process with step subprocesses) under ``dagster dev``, whose daemon runs the
    ``gpu_pool_watchdog`` sensor and the run queue; the holder's worker and step processes
    are SIGKILLed while a second run waits for the pool."""
    from browser import dagster_dev
    from dagster_graphql import DagsterGraphQLClient

    home = Path(os.environ["DAGSTER_HOME"])
    location = Path(__file__).with_name("pool_location.py")
    with dagster_dev(home, {}, tmp_path / "dagster-dev.log", ["-f", str(location)]) as url:
        port = int(url.rsplit(":", 1)[1])
        client = DagsterGraphQLClient("127.0.0.1", port_number=port)

        def launch(seconds: float) -> str:
            config = {"ops": {"gpu_step": {"config": {"seconds": seconds}}}}
            return client.submit_job_execution("gpu_job", run_config=config)

        def step_started(run_id: str) -> float | None:
            starts = _run_events(instance, run_id, dg.DagsterEventType.STEP_START)
            return starts[0].timestamp if starts else None

        holder = launch(600)
        _wait_for(lambda: step_started(holder), "the holder's step", timeout=120)
        assert _holders(instance) == [holder]
        waiter = launch(0)
        # The run queue sees the pool is full and keeps the second run QUEUED (the UI shows
        # why); it is launched once the slot is free.
        status = lambda run_id: instance.get_run_by_id(run_id).status  # noqa: E731
        _wait_for(lambda: status(waiter) == dg.DagsterRunStatus.QUEUED, "the queued run", 60)
        # Two watchdog ticks with the holder alive and the waiter queued: it is left alone.
        queued_at = time.time()
        _wait_for(lambda: len(_watchdog_ticks(instance, queued_at)) >= 2, "two watchdog ticks")
        assert status(waiter) == dg.DagsterRunStatus.QUEUED
        assert status(holder) == dg.DagsterRunStatus.STARTED and _holders(instance) == [holder]

        pids = {
            e.dagster_event.pid
            for kind in (dg.DagsterEventType.RUN_START, dg.DagsterEventType.STEP_START)
            for e in _run_events(instance, holder, kind)
        }
        assert len(pids) == 2  # the run worker and its step subprocess
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        killed_at = time.time()
        _wait_for(lambda: step_started(waiter), "the second run's step", timeout=90)
        recovered_in = step_started(waiter) - killed_at
        print(f"dagster dev: kill -> next gpu step started: {recovered_in:.1f} s")
        # The sensor's interval (2 s here, 15 s by default), the daemon's 5-s sensor loop, and
        # Dagster's claim back-off.
        assert recovered_in < 60
        _wait_for(lambda: status(waiter) == dg.DagsterRunStatus.SUCCESS, "success", 60)
    # dagster dev's code server outlived the worker it started: it saw the worker die and
    # failed the run (the watchdog's pid check covers a lost code server), but left the
    # slot held; the watchdog freed it.
    assert status(holder) == dg.DagsterRunStatus.FAILURE
    messages = [e.message for e in instance.all_logs(holder)]
    assert any("SIGKILL" in m or "Run worker lost" in m for m in messages), messages[-5:]
    assert _holders(instance) == []


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    raise SystemExit(_worker(*sys.argv[2:]))
