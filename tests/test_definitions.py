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
    (tmp_path / "home").mkdir()
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
    finally:
        del os.environ["DAGSTER_HOME"]


def test_definitions_contents() -> None:
    from recap_dagster.definitions import defs

    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {"laion_shards", "human_captions"} <= keys
    assert defs.resolve_sensor_def("laion_shard_sensor")


def test_inputs_are_observed_upstream_of_what_they_feed() -> None:
    """A new base model or human-caption set makes what was built on it stale: each input
    is an observable external asset upstream of the assets that read it."""
    import dagster as dg

    from recap_dagster.definitions import defs

    graph = defs.resolve_asset_graph()
    for name, readers in (
        ("human_caption_file", {"human_captions"}),
        ("base_captioner_model", {"captioner_checkpoint"}),
        ("base_t2i_model", {"t2i_latents", "sd_checkpoints"}),
    ):
        node = graph.get(dg.AssetKey(name))
        assert node.is_observable and not node.is_materializable, name
        children = {k.to_user_string() for k in node.child_keys}
        assert readers <= children, (name, children)
