"""The code location loads: through Dagster's CLI, dg, and in Python."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["RECAP_WORKDIR"] = str(tmp_path / "recap")
    env["DAGSTER_HOME"] = str(tmp_path / "home")
    (tmp_path / "home").mkdir(exist_ok=True)
    shutil.copy(ROOT / "dagster.yaml", tmp_path / "home" / "dagster.yaml")
    return env


def test_dagster_definitions_validate(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=ROOT,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Validation successful" in result.stdout + result.stderr


def test_dg_check_defs(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "dg"), "check", "defs", "--use-active-venv"],
        cwd=ROOT,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_instance_yaml_matches_the_issue(tmp_path: Path) -> None:
    env = _env(tmp_path)
    os.environ["DAGSTER_HOME"] = env["DAGSTER_HOME"]
    try:
        with dg.DagsterInstance.get() as instance:
            assert type(instance.run_storage).__name__ == "ConsolidatedSqliteEventLogStorage" or (
                "Sqlite" in type(instance.run_storage).__name__
            )
            assert instance.run_monitoring_enabled
            settings = instance.get_settings("concurrency")
            assert settings["pools"]["default_limit"] == 1
            assert not instance.get_settings("telemetry")["enabled"]
            assert instance.run_coordinator.dequeue_interval_seconds == 1
    finally:
        del os.environ["DAGSTER_HOME"]


def test_sensor_intervals_come_from_the_environment(tmp_path: Path) -> None:
    """The sensors tick at their own minimum interval unless RECAP_SENSOR_INTERVAL_SECONDS
    sets one for all (the tests' dagster dev uses 2 s)."""
    code = (
        "from recap_dagster.orchestration import automation as a; "
        "print(a.laion_shard_sensor.minimum_interval_seconds, "
        "a.gpu_pool_watchdog.minimum_interval_seconds)"
    )

    def intervals(setting: str | None) -> str:
        env = _env(tmp_path)
        env.pop("RECAP_SENSOR_INTERVAL_SECONDS", None)
        if setting is not None:
            env["RECAP_SENSOR_INTERVAL_SECONDS"] = setting
        result = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.split("\n")[-2]

    assert intervals(None) == "60 15"
    assert intervals("2") == "2 2"


def test_definitions_contents() -> None:
    from recap_dagster.miniworld.definitions import defs

    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {"laion_shards", "human_captions", "miniworld_corpus", "recap_report"} <= keys
    assert defs.resolve_sensor_def("laion_shard_sensor")


READERS = {
    "human_caption_file": {"human_captions"},
    "caption_tokenizer": {"human_captions", "recaptioned_shards"},
    "eval_prompt_file": {"metric_reports", "base_metric_report"},
    "base_captioner_model": {"captioner_checkpoint"},
    "base_t2i_model": {"t2i_latents", "sd_checkpoints", "base_metric_report"},
}


def test_production_inputs_are_observed_upstream_of_what_they_feed() -> None:
    """A new base model or human-caption set makes what was built on it stale: each input
    is an observable external asset upstream of the assets that read it."""
    from recap_dagster.assets.inputs import INPUT_KEYS
    from recap_dagster.definitions import defs

    assert {k.to_user_string() for k in INPUT_KEYS} == set(READERS)
    graph = defs.resolve_asset_graph()
    for name, readers in READERS.items():
        node = graph.get(dg.AssetKey(name))
        assert node.is_observable and not node.is_materializable, name
        children = {k.to_user_string() for k in node.child_keys}
        assert readers <= children, (name, children)
    laion = graph.get(dg.AssetKey("laion_shards"))
    assert not laion.is_materializable and not laion.parent_keys


def test_miniworld_builds_the_same_inputs_in_its_own_group() -> None:
    """The miniworld's location has the same RECAP graph; its inputs (same keys) are
    materializable assets of the miniworld group, upstream of the corpus spec too."""
    from recap_dagster.definitions import defs as production
    from recap_dagster.miniworld.definitions import defs

    graph = defs.resolve_asset_graph()
    for name, readers in READERS.items():
        node = graph.get(dg.AssetKey(name))
        assert node.is_materializable and node.group_name == "miniworld", name
        assert readers <= {k.to_user_string() for k in node.child_keys}, name
    laion = graph.get(dg.AssetKey("laion_shards"))
    assert {k.to_user_string() for k in laion.parent_keys} == {"miniworld_corpus"}
    production_graph = production.resolve_asset_graph()
    for key in production_graph.get_all_asset_keys():  # the same RECAP graph in both
        if key.to_user_string() not in READERS and key != laion.key:
            assert graph.get(key).parent_keys == production_graph.get(key).parent_keys, key


def test_asset_pages_name_owners_source_and_columns() -> None:
    """Every materializable asset and the corpus name their owners and link to their
    source; the tables declare their columns on the definition, before any run."""
    from recap_dagster.definitions import defs

    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        if node.is_materializable or key.to_user_string() == "laion_shards":
            assert node.owners and all(o.startswith("team:") for o in node.owners), key
        if node.is_materializable:
            (reference,) = node.metadata["dagster/code_references"].code_references
            lines = Path(reference.file_path).read_text().splitlines()
            # The line of the asset's own function (not of a decorator's wrapper).
            assert f"def {key.path[-1]}(" in lines[reference.line_number - 1] or any(
                f"def {key.path[-1]}(" in line
                for line in lines[reference.line_number - 1 : reference.line_number + 30]
            ), (key, reference)
    for name, column in (
        ("laion_shards", "status"),
        ("recaptioned_shards", "recap_long"),
        ("human_captions", "short"),
    ):
        schema = graph.get(dg.AssetKey(name)).metadata["dagster/column_schema"]
        assert column in {c.name for c in schema.columns}, name


def test_long_jobs_carry_a_code_version() -> None:
    """A change of the recaptioning, latent-cache, manifest or trainer code shows as stale."""
    from recap_dagster.definitions import defs

    graph = defs.resolve_asset_graph()
    for name in ("recaptioned_shards", "t2i_latents", "training_corpus", "sd_checkpoints"):
        assert graph.get(dg.AssetKey(name)).code_version, name
