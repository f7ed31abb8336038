"""``recap-dagster check``: every asset check against an instance, exit 1 on blocking failures.

The command runs as CI runs it, in a subprocess over an on-disk instance whose
human_captions this test materialized; the project's definitions find the same storage
and miniworld through the RECAP_* environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
from test_human_captions import _write_bad_set

from recap_dagster.assets.human_captions import human_captions
from recap_dagster.cli import main as cli_main
from recap_dagster.definitions import JOBS
from recap_dagster.miniworld.definitions import ASSET_CHECKS, ASSETS
from recap_dagster.miniworld.resources import (
    MiniworldResource,
    MiniworldWorldResource,
    miniworld_sources,
)
from recap_dagster.orchestration.checks_runner import (
    SKIPPED,
    CheckOutcome,
    ChecksReport,
    run_checks,
)
from recap_dagster.resources import (
    ComputeResource,
    DataSourcesResource,
    ModelsResource,
    StorageResource,
)

HUMAN_CHECKS = [
    "human_captions_images_decode",
    "human_captions_present",
    "human_captions_long_within_77_tokens",
    "human_captions_unique_keys",
    "human_captions_min_rows",
]


def _materialize_human_captions(home: Path, storage: Path, miniworld_paths, captions=None):
    """Materialize only the asset: finding what is wrong is the command's job."""
    sources = DataSourcesResource(
        shards_root=str(miniworld_paths.corpus),
        human_captions_path=str(captions or miniworld_paths.human_captions),
        tokenizer_path=str(miniworld_paths.tokenizer),
    )
    with dg.DagsterInstance.from_config(str(home)) as instance:
        result = dg.materialize(
            [human_captions],
            instance=instance,
            resources={"sources": sources, "storage": StorageResource(root=str(storage))},
        )
    assert result.success


def _check_cli(home: Path, storage: Path, miniworld_paths, tmp_path: Path, *args: str):
    env = {
        **os.environ,
        "RECAP_WORKDIR": str(tmp_path / "workdir"),
        "RECAP_MINIWORLD_DIR": str(miniworld_paths.root),
        "RECAP_STORAGE_ROOT": str(storage),
    }
    env.pop("DAGSTER_HOME", None)  # --instance must be what picks the instance
    command = [sys.executable, "-m", "recap_dagster.cli", "check", "--instance", str(home)]
    command += ["--definitions", "recap_dagster.miniworld.definitions"]
    return subprocess.run(
        [*command, *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def _rows(stdout: str) -> dict[str, str]:
    """check name -> its printed row."""
    return {line.split()[0]: line for line in stdout.splitlines() if line.strip()}


def test_good_then_broken_human_captions(miniworld_paths, tmp_path: Path) -> None:
    home, storage = tmp_path / "home", tmp_path / "storage"
    home.mkdir()
    _materialize_human_captions(home, storage, miniworld_paths)
    good = _check_cli(home, storage, miniworld_paths, tmp_path)
    assert good.returncode == 0, good.stdout + good.stderr[-3000:]
    rows = _rows(good.stdout)
    for name in HUMAN_CHECKS:
        assert "passed" in rows[name] and "ERROR" in rows[name], rows[name]
    # Never materialized: reported, not run, not failing.
    for name in ("recaptioned_schema_and_rows", "recap_mix_beats_alttext"):
        assert SKIPPED in rows[name]
    assert "5 of 17 checks ran" in good.stdout

    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    _materialize_human_captions(
        home, storage, miniworld_paths, _write_bad_set(miniworld_paths, bad_dir)
    )
    bad = _check_cli(home, storage, miniworld_paths, tmp_path, "--select", "human_captions")
    assert bad.returncode == 1, bad.stdout + bad.stderr[-3000:]
    rows = _rows(bad.stdout)
    assert set(rows) >= set(HUMAN_CHECKS) and "recap_mix_beats_alttext" not in rows
    for name in HUMAN_CHECKS:
        assert "FAILED" in rows[name], rows[name]
    assert "60 rows (need at least 100)" in rows["human_captions_min_rows"]
    assert "FAILED (blocking): " in bad.stdout and "human_captions_min_rows" in bad.stdout

    # The command's runs are ordinary runs in the instance: the UI shows their results.
    with dg.DagsterInstance.from_config(str(home)) as instance:
        records = instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(human_captions.key, "human_captions_min_rows"), limit=5
        )
    assert [r.status.value for r in records][:2] == ["FAILED", "SUCCEEDED"]


def test_nothing_materialized_reports_every_check_skipped(miniworld_paths, tmp_path) -> None:
    resources = {
        "sources": miniworld_sources(str(miniworld_paths.root)),
        "storage": StorageResource(root=str(tmp_path / "storage")),
        "models": ModelsResource(base_captioner=str(tmp_path / "unused")),
        "compute": ComputeResource(),
        "world": MiniworldWorldResource(),
        "miniworld": MiniworldResource(root=str(miniworld_paths.root)),
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
    }
    defs = dg.Definitions(assets=ASSETS, asset_checks=ASSET_CHECKS, jobs=JOBS, resources=resources)
    with dg.instance_for_test() as instance:
        report = run_checks(defs, instance)
        assert report.run_id is None  # nothing to run, so no run was launched
    assert len(report.outcomes) == 17  # 5 caption-fact checks and the CLIP check among them
    assert {o.status for o in report.outcomes} == {SKIPPED}
    assert report.exit_code == 0
    with pytest.raises(ValueError, match="matches no asset check"):
        run_checks(defs, dg.DagsterInstance.ephemeral(), ["no_such_check"])


def test_only_blocking_failures_fail_the_command() -> None:
    def outcome(status: str, severity: str) -> CheckOutcome:
        return CheckOutcome(f"{status}_{severity}", "asset", status, severity, "why")

    warned = ChecksReport([outcome("passed", "ERROR"), outcome("FAILED", "WARN")], "run")
    assert warned.exit_code == 0
    assert "warnings (not failing): FAILED_WARN" in warned.render()
    assert ChecksReport([outcome("ERROR", "WARN"), outcome(SKIPPED, "ERROR")], None).exit_code == 0
    assert ChecksReport([outcome("FAILED", "ERROR")], "run").exit_code == 1
    crashed = ChecksReport([outcome("ERROR", "ERROR")], "run")
    assert crashed.exit_code == 1 and "FAILED (blocking): ERROR_ERROR" in crashed.render()


def test_missing_instance_is_an_error(tmp_path: Path, capsys) -> None:
    assert cli_main(["check", "--instance", str(tmp_path / "nowhere")]) == 2
    assert "no Dagster instance at" in capsys.readouterr().out


def test_checks_that_crash_are_reported_as_errors(miniworld_paths, tmp_path) -> None:
    """Materialized per the instance, but the stored output is gone: the checks raise."""
    resources = {
        "sources": miniworld_sources(str(miniworld_paths.root)),
        "storage": StorageResource(root=str(tmp_path / "empty_storage")),
        "models": ModelsResource(base_captioner=str(tmp_path / "unused")),
        "compute": ComputeResource(),
        "world": MiniworldWorldResource(),
        "miniworld": MiniworldResource(root=str(miniworld_paths.root)),
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
    }
    defs = dg.Definitions(assets=ASSETS, asset_checks=ASSET_CHECKS, jobs=JOBS, resources=resources)
    with dg.instance_for_test() as instance:
        for name in ("human_captions", "recap_report"):
            instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=name))
        report = run_checks(defs, instance, ["human_captions_min_rows", "recap_report"])
    by_name = {o.name: o for o in report.outcomes}
    assert set(by_name) == {"human_captions_min_rows", "recap_mix_beats_alttext"}
    blocking, warning = by_name["human_captions_min_rows"], by_name["recap_mix_beats_alttext"]
    assert (blocking.status, blocking.severity) == ("ERROR", "ERROR")
    assert (warning.status, warning.severity) == ("ERROR", "WARN")
    assert "human_captions.parquet" in blocking.description, blocking.description
    assert report.exit_code == 1
    assert "FAILED (blocking): human_captions_min_rows" in report.render()
