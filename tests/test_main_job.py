"""The README's main job, end to end, at the quick profile's tiny sizes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

BIN = Path(sys.executable).parent


def test_quick_pipeline_runs_end_to_end(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["RECAP_WORKDIR"] = str(tmp_path / "recap")
    env["DAGSTER_HOME"] = str(tmp_path / "recap" / "dagster_home")
    result = subprocess.run(
        [str(BIN / "recap-dagster"), "pipeline", "--profile", "quick"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "recap-dagster pipeline (quick, seed 0) succeeded" in out
    assert "| recap_mix |" in out and "| alttext |" in out
    storage = tmp_path / "recap" / "storage"
    for path in (
        "human_captions/human_captions.parquet",
        "checkpoints/captioner/_SUCCESS",
        "recaptioned/00000.parquet",
        "recaptioned/00001.parquet",
        "checkpoints/sd/recap_mix/final/model_index.json",
        "reports/metrics/recap_mix.json",
        "reports/recap_report.md",
        "reports/recap_fid_vs_steps.png",
    ):
        assert (storage / path).exists(), path

    # Everything went through the real instance: the UI shows these runs and events.
    os.environ["DAGSTER_HOME"] = env["DAGSTER_HOME"]
    try:
        with dg.DagsterInstance.get() as instance:
            for key in ("human_captions", "captioner_checkpoint", "recap_report"):
                assert instance.get_latest_materialization_event(dg.AssetKey(key)) is not None
            partitions = instance.get_materialized_partitions(dg.AssetKey("recaptioned_shards"))
            assert partitions == {"00000-00099"}  # one group holds both shards
            assert instance.get_materialized_partitions(dg.AssetKey("sd_checkpoints")) == {
                "alttext", "recap_short", "recap_long", "recap_mix"
            }  # fmt: skip
    finally:
        del os.environ["DAGSTER_HOME"]
