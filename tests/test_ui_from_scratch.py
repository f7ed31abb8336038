"""From an empty instance to the RECAP report with clicks only, in a real browser.

``dagster dev`` (webserver + daemon) serves ``workspace.yaml`` over a fresh instance with
the quick profile's run config (``RECAP_RUN_CONFIG``); headless Chromium does what a new
user does, no terminal command in between:

1. the ``miniworld`` group's page: "Materialize all" (the inputs: corpus, human captions,
   evaluation prompts, tokenizer, both base models);
2. the ``laion_shard_sensor`` (on by default) registers the shard groups;
3. the global asset lineage: "Materialize all", then "Launch backfill" (every partition
   of every asset; the backfill daemon runs them in dependency order: one recaptioning
   run per shard group, one training-and-evaluation run per caption variant);
4. the ``recap_report`` asset's page shows the report table.

The test only waits between the clicks (reading the instance for when to go on, as the
user watches the UI). Screenshots land in ``test-artifacts/ui/``: ``scratch_1_miniworld``,
``scratch_2_backfill``, ``scratch_3_lineage`` (inputs to report) and ``scratch_4_report``.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml
from browser import REPO, chromium_page, dagster_dev, screenshot

from recap_dagster.miniworld.run_configs import profile_run_config
from recap_dagster.orchestration.partitions import shard_group_partitions

pytestmark = pytest.mark.slow

LOAD_TIMEOUT_MS = 120_000
REPORT = dg.AssetKey("recap_report")


def _wait(condition, what: str, timeout: float, page=None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            if page is not None:
                screenshot(page, f"FAILED_scratch_{what.replace(' ', '_')}")
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def _materialized(instance: dg.DagsterInstance, key: str) -> bool:
    return instance.get_latest_materialization_event(dg.AssetKey(key)) is not None


def test_from_an_empty_instance_to_the_report_in_the_ui(tmp_path: Path) -> None:
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    run_config = tmp_path / "run_config.yaml"  # as recap-miniworld run-config writes it
    run_config.write_text(yaml.safe_dump(profile_run_config("quick")))
    env = {
        "RECAP_WORKDIR": str(tmp_path / "recap"),
        "RECAP_RUN_CONFIG": str(run_config),
        # One training seed: "Materialize all" fine-tunes each variant once.
        "RECAP_TRAINING_SEEDS": "0",
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DAGSTER_HOME", str(home))
        instance = dg.DagsterInstance.get()
    # As ./dev does for a new instance: the gpu pool's slots exist before two runs claim one.
    instance.event_log_storage.initialize_concurrency_limit_to_default("gpu")
    with (
        dagster_dev(home, env, tmp_path / "dagster_dev.log", ["-w", "workspace.yaml"]) as url,
        chromium_page(tmp_path / "chromium") as page,
    ):
        # 1. The miniworld group: Materialize all.
        page.goto(f"{url}/locations/recap_dagster/asset-groups/miniworld")
        button = page.get_by_role("button", name="Materialize all")
        button.wait_for(timeout=LOAD_TIMEOUT_MS)
        page.get_by_text("base_t2i_model").first.wait_for(timeout=LOAD_TIMEOUT_MS)
        screenshot(page, "scratch_1_miniworld")
        button.click()
        # Every input, the miniworld's CLIP last: the backfill below would build it again.
        _wait(
            lambda: all(_materialized(instance, k) for k in ("base_t2i_model", "clip_model")),
            "the miniworld inputs",
            600,
            page,
        )

        # 2. The sensor registers the shard groups (the user sees them on laion_shards).
        _wait(
            lambda: instance.get_dynamic_partitions(shard_group_partitions.name),
            "the shard groups",
            240,
            page,
        )

        # 3. The global lineage: Materialize all -> Launch backfill.
        page.goto(f"{url}/asset-groups")
        button = page.get_by_role("button", name="Materialize all")
        button.wait_for(timeout=LOAD_TIMEOUT_MS)
        button.click()
        launch = page.get_by_role("button", name=re.compile(r"Launch .*backfill", re.I))
        launch.wait_for(timeout=LOAD_TIMEOUT_MS)
        screenshot(page, "scratch_2_backfill")
        launch.click()
        _wait(lambda: _materialized(instance, "recap_report"), "recap_report", 1500, page)

        # The lineage from the inputs to the report (recap_report's upstream graph), every
        # asset materialized.
        page.goto(f"{url}/assets/recap_report?view=lineage&lineageScope=upstream&lineageDepth=10")
        page.get_by_text("miniworld_corpus").first.wait_for(timeout=LOAD_TIMEOUT_MS)
        page.get_by_text("sd_checkpoints").first.wait_for(timeout=LOAD_TIMEOUT_MS)
        time.sleep(3)  # let the graph lay itself out and fetch the latest states
        screenshot(page, "scratch_3_lineage")

        # 4. The report's table on its asset page.
        page.goto(f"{url}/assets/recap_report")
        page.get_by_text("recap_mix").first.wait_for(timeout=LOAD_TIMEOUT_MS)
        text = page.locator("body").inner_text()
        for variant in ("base", "alttext", "recap_short", "recap_long", "recap_mix", "oracle"):
            assert variant in text, variant
        screenshot(page, "scratch_4_report", full_page=True)

    # Everything ran through the instance: one run per shard group and per variant.
    assert instance.get_materialized_partitions(dg.AssetKey("sd_checkpoints")) == {
        "0|alttext", "0|recap_short", "0|recap_long", "0|recap_mix", "0|oracle"
    }  # fmt: skip
    assert instance.get_materialized_partitions(dg.AssetKey("recaptioned_shards")) == {
        "00000-00099"
    }
