"""The PostgreSQL instance profile (deploy/postgres/dagster.yaml) against a real server.

A throwaway PostgreSQL cluster runs on loopback (tests/pg_server.py). The test loads the
instance from the shipped yaml, materializes the real ``human_captions`` asset with its
blocking checks, registers shards as dynamic partitions, starts the real schedule and
sensor of the code location, then reads PostgreSQL's own tables to prove everything went
there (and nothing into SQLite under DAGSTER_HOME).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import yaml
from pg_server import PostgresServer, postgres_server  # noqa: F401  (fixture)

from recap_dagster.assets.human_captions import human_captions, human_captions_checks
from recap_dagster.orchestration.partitions import shard_group_partitions
from recap_dagster.resources import DataSourcesResource, StorageResource

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "deploy" / "postgres" / "dagster.yaml"


@pytest.fixture
def pg_instance(
    postgres_server: PostgresServer,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[dg.DagsterInstance, str]]:
    """DagsterInstance.get() from a DAGSTER_HOME holding a copy of the Postgres profile."""
    database = postgres_server.create_database("recap_instance")
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(PROFILE, home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, which dagster-postgres does not
    # support: the profile documents the +psycopg2 driver, so the test uses it too.
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", postgres_server.url(database, driver="psycopg2"))
    monkeypatch.setenv("RECAP_WORKDIR", str(tmp_path / "recap"))
    with dg.DagsterInstance.get() as instance:
        yield instance, postgres_server.url(database)


def _rows(url: str, sql: str, *args: object) -> list[tuple]:
    import psycopg2

    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()
    finally:
        conn.close()


def test_profile_storage_is_postgres(pg_instance) -> None:
    instance, _ = pg_instance
    assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
    assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"
    # The URL came from the environment: the yaml only names the variable.
    storage = yaml.safe_load(PROFILE.read_text())["storage"]
    assert storage == {"postgres": {"postgres_url": {"env": "DAGSTER_POSTGRES_URL"}}}
    assert instance.get_settings("concurrency")["pools"]["default_limit"] == 1
    assert instance.event_log_storage.supports_global_concurrency_limits


def test_runs_events_partitions_and_schedules_land_in_postgres(
    pg_instance, miniworld_paths, tmp_path: Path
) -> None:
    instance, url = pg_instance

    # 1. A real asset of the project, with its five blocking checks.
    resources = {
        "sources": DataSourcesResource(
            shards_root=str(miniworld_paths.corpus),
            human_captions_path=str(miniworld_paths.human_captions),
            tokenizer_path=str(miniworld_paths.tokenizer),
        ),
        "storage": StorageResource(root=str(tmp_path / "storage")),
    }
    result = dg.materialize(
        [human_captions, *human_captions_checks], instance=instance, resources=resources
    )
    assert result.success
    run_id = result.run_id

    # 2. Shards registered as dynamic partitions (what laion_shard_sensor does).
    instance.add_dynamic_partitions(shard_group_partitions.name, ["00000-00099", "00100-00199"])

    # 3. The code location's real schedule and sensor, started on this instance.
    from dagster._core.test_utils import in_process_test_workspace
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

    origin = LoadableTargetOrigin(
        executable_path=sys.executable,
        module_name="recap_dagster.miniworld.definitions",
        working_directory=str(ROOT),
    )
    with in_process_test_workspace(instance, origin) as workspace:
        location = next(iter(workspace.get_code_location_entries().values())).code_location
        assert location is not None
        repo = next(iter(location.get_repositories().values()))
        schedule = repo.get_schedule("recaption_backfill_schedule")
        sensor = repo.get_sensor("laion_shard_sensor")
        schedule_origin_id = schedule.get_remote_origin_id()
        sensor_origin_id = sensor.get_remote_origin_id()
        # The schedule is off by default: starting it stores a RUNNING state. The sensor is
        # on by default: stopping it (an operator pausing discovery) stores a STOPPED one.
        instance.start_schedule(schedule)
        instance.stop_sensor(sensor_origin_id, sensor.selector_id, sensor)

    # Read back through Dagster ...
    assert instance.get_run_by_id(run_id).is_success
    assert instance.get_dynamic_partitions("laion_shard_groups") == ["00000-00099", "00100-00199"]
    state = instance.get_instigator_state(schedule_origin_id, schedule.selector_id)
    assert state is not None and state.is_running

    # ... and straight from PostgreSQL's tables.
    assert _rows(url, "SELECT status FROM runs WHERE run_id = %s", run_id) == [("SUCCESS",)]
    events = dict(
        _rows(
            url,
            "SELECT dagster_event_type, count(*) FROM event_logs WHERE run_id = %s "
            "GROUP BY dagster_event_type",
            run_id,
        )
    )
    assert events["ASSET_MATERIALIZATION"] == 1
    assert events["ASSET_CHECK_EVALUATION"] == 5
    assert events["PIPELINE_SUCCESS"] == 1  # the run-success event keeps its legacy name
    assert _rows(url, "SELECT asset_key FROM asset_keys") == [('["human_captions"]',)]
    checks = _rows(
        url,
        "SELECT check_name, execution_status FROM asset_check_executions WHERE run_id = %s",
        run_id,
    )
    assert sorted(checks) == sorted((c.check_key.name, "SUCCEEDED") for c in human_captions_checks)
    assert _rows(
        url,
        "SELECT partition FROM dynamic_partitions WHERE partitions_def_name = %s "
        "ORDER BY partition",
        "laion_shard_groups",
    ) == [("00000-00099",), ("00100-00199",)]
    instigators = dict(_rows(url, "SELECT selector_id, instigator_type FROM instigators"))
    assert instigators == {schedule.selector_id: "SCHEDULE", sensor.selector_id: "SENSOR"}
    jobs = dict(_rows(url, "SELECT job_origin_id, status FROM jobs"))
    assert jobs == {schedule_origin_id: "RUNNING", sensor_origin_id: "STOPPED"}

    # Nothing went to SQLite under DAGSTER_HOME (compute logs are files, that is expected).
    home = Path(instance.root_directory)
    assert not list(home.rglob("*.db")), list(home.rglob("*.db"))
