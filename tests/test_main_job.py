"""The README's main job, end to end, at the quick profile's tiny sizes: through dagster dev
and the instance, as the UI would, telling where it is while it runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import yaml

from recap_dagster.miniworld.run_configs import profile_run_config

BIN = Path(sys.executable).parent


def _main_job(tmp_path: Path) -> tuple[Path, str]:
    """(workdir, stdout) of a quick main job with seed 1: the one .ci/run just ran (it
    names its workdir and output in RECAP_MAIN_JOB_WORKDIR / _OUTPUT), else a new one."""
    if os.environ.get("RECAP_MAIN_JOB_WORKDIR"):
        workdir = Path(os.environ["RECAP_MAIN_JOB_WORKDIR"])
        return workdir, Path(os.environ["RECAP_MAIN_JOB_OUTPUT"]).read_text()
    env = dict(os.environ)
    env["RECAP_WORKDIR"] = str(tmp_path / "recap")
    env["DAGSTER_HOME"] = str(tmp_path / "recap" / "dagster_home")
    result = subprocess.run(
        [str(BIN / "recap-miniworld"), "pipeline", "--profile", "quick", "--seed", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp_path / "recap", result.stdout


def test_quick_pipeline_runs_end_to_end(tmp_path: Path) -> None:
    workdir, out = _main_job(tmp_path)
    env = {"DAGSTER_HOME": str(workdir / "dagster_home")}
    assert "recap-miniworld pipeline (quick, seed 1) succeeded" in out
    # It said where it was: progress, elapsed and left, and what each running step logs.
    assert "Dagster UI at http://127.0.0.1:" in out
    # 23 asset partitions: 7 unpartitioned assets outside the miniworld group, the quick
    # profile's 7 variant x seed partitions each of sd_checkpoints and metric_reports, and
    # recaptioned_shards and t2i_latents for the quick corpus's one shard group.
    assert re.search(
        r"\d+/23 asset partitions done \(\d+% of the work\), elapsed 0:\d\d:\d\d, about "
        r"0:\d\d:\d\d left",
        out,
    )
    assert re.search(r"running: (sd_checkpoints|metric_reports) \[\d\|\w+\] \(run \w{8}\): ", out)
    assert "| recap_mix |" in out and "| alttext |" in out
    # The verdict check as the UI shows it: a warning (not shown better) is not a failure.
    check = re.search(r"check recap_mix_beats_alttext: (\w+)\. recap_mix is (\w+)", out)
    assert check, out[-3000:]
    expected = {"better": "SUCCEEDED", "not": "WARNED", "WORSE": "FAILED"}[check.group(2)]
    assert check.group(1) == expected, check.group(0)
    # The UI and the job share one run config: the profile with the seed.
    run_config = yaml.safe_load((workdir / "run_config.yaml").read_text())
    assert run_config == profile_run_config("quick", seed=1)
    storage = workdir / "storage"
    for path in (
        "human_captions/human_captions.parquet",
        "checkpoints/captioner/_SUCCESS",
        "recaptioned/00000.parquet",
        "recaptioned/00001.parquet",
        "checkpoints/sd/recap_mix/seed-1/final/model_index.json",
        "reports/metrics/recap_mix/seed-1.json",
        "reports/metrics/recap_mix/seed-1.rows.parquet",
        "reports/recap_report.md",
        "reports/recap_fid_vs_steps.png",
    ):
        assert (storage / path).exists(), path
    assert "## The captions behind the metrics" in (storage / "reports/recap_report.md").read_text()

    # Everything went through the real instance: the UI shows these runs and events.
    previous = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = env["DAGSTER_HOME"]
    try:
        with dg.DagsterInstance.get() as instance:
            for key in (
                "miniworld_corpus",
                "human_captions",
                "captioner_checkpoint",
                "recap_report",
            ):
                assert instance.get_latest_materialization_event(dg.AssetKey(key)) is not None
            partitions = instance.get_materialized_partitions(dg.AssetKey("recaptioned_shards"))
            assert partitions == {"00000-00099"}  # one group holds both shards
            assert instance.get_materialized_partitions(dg.AssetKey("sd_checkpoints")) == {
                "0|alttext", "1|alttext", "0|recap_mix", "1|recap_mix", "0|recap_short",
                "0|recap_long", "0|oracle",
            }  # fmt: skip
            # Launched as backfills through the daemon, as from the UI.
            backfill_runs = [r for r in instance.get_runs() if "dagster/backfill" in r.tags]
            assert len(backfill_runs) >= 7
            # Each group shows its captions before anything trains on them: a CLIP-scored
            # sample against the alt text, and the best, median and worst examples.
            group = instance.get_latest_materialization_event(dg.AssetKey("recaptioned_shards"))
            meta = group.asset_materialization.metadata
            assert {"clip_alt_text", "clip_recap_short", "clip_recap_long"} <= set(meta)
            assert meta["examples"].value.count("data:image/png;base64,") == 9
            report = instance.get_latest_materialization_event(dg.AssetKey("recap_report"))
            assert "dagster/backfill" in instance.get_run_by_id(report.run_id).tags
    finally:
        if previous is None:
            del os.environ["DAGSTER_HOME"]
        else:
            os.environ["DAGSTER_HOME"] = previous
