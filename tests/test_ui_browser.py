"""The Dagster UI in a real browser: headless Chromium against ``dagster-webserver``.

A temporary instance (the project's dagster.yaml) gets real materializations of
human_captions (+ its checks), captioner_checkpoint and recaptioned_shards (one shard group)
at tiny sizes; the webserver serves it from ``workspace.yaml`` on loopback, and Playwright
drives Debian's Chromium through the pages a person would open. Screenshots land in
``test-artifacts/ui/``. Without a browser these tests fail; they never skip.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
from browser import REPO, chromium_page, dagster_webserver, screenshot

from recap_dagster.miniworld.captions import vocabulary_texts
from recap_dagster.miniworld.definitions import ASSET_CHECKS, ASSETS
from recap_dagster.miniworld.resources import (
    MiniworldResource,
    MiniworldWorldResource,
    miniworld_sources,
)
from recap_dagster.miniworld.tiny_captioner import build_tiny_captioner
from recap_dagster.orchestration.partitions import shard_group_partitions
from recap_dagster.resources import (
    ComputeResource,
    ModelsResource,
    StorageResource,
)

pytestmark = pytest.mark.slow

ASSET_NAMES = [
    "human_caption_file",
    "base_captioner_model",
    "laion_shards",
    "human_captions",
    "captioner_checkpoint",
    "recaptioned_shards",
    "base_t2i_model",
    "t2i_latents",
    "training_corpus",
    "sd_checkpoints",
    "metric_reports",
    "recap_report",
]
SHARDS = ["00000", "00001"]
GROUP = "00000-00099"  # the one partition (shard group) that holds both shards
HUMAN_CAPTIONS = dg.AssetKey("human_captions")
# The UI loads the code location in a code server after the webserver answers.
LOAD_TIMEOUT_MS = 90_000


@dataclass(frozen=True)
class Materialized:
    """The temporary instance and what its materializations recorded (the expected UI)."""

    home: Path
    env: dict[str, str]
    sample_record: dict[str, str]
    loss_curve_src: str
    captioner_version: str


def _latest_metadata(instance: dg.DagsterInstance, name: str) -> dict:
    event = instance.get_latest_materialization_event(dg.AssetKey(name))
    assert event is not None, f"{name} was not materialized"
    return event.asset_materialization.metadata


@pytest.fixture(scope="module")
def materialized(
    miniworld_paths, random_clip: str, tmp_path_factory: pytest.TempPathFactory
) -> Materialized:
    """Materialize the captioner half of the graph into a fresh on-disk instance."""
    home = tmp_path_factory.mktemp("dagster_home")
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    storage_root = tmp_path_factory.mktemp("storage")
    base = tmp_path_factory.mktemp("base_captioner")
    words = sorted({w for text in vocabulary_texts() for w in text.lower().split()})
    build_tiny_captioner("git", base, words=words, hidden_size=32, max_text_tokens=64)
    resources = {
        "sources": miniworld_sources(str(miniworld_paths.root)),
        "storage": StorageResource(root=str(storage_root)),
        "models": ModelsResource(base_captioner=str(base), clip=random_clip),
        "compute": ComputeResource(),
        "world": MiniworldWorldResource(),
        "miniworld": MiniworldResource(root=str(miniworld_paths.root)),
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
    }
    tune = {"steps": 4, "batch_size": 8, "learning_rate": 1e-3, "seed": 0}
    tune |= {"eval_batch_size": 8, "max_new_tokens": 12, "sample_rows": 2}
    recaption = {"batch_size": 8, "max_new_tokens_short": 12, "max_new_tokens_long": 12}
    defs = [*ASSETS, *ASSET_CHECKS]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DAGSTER_HOME", str(home))  # the project's dagster.yaml reads it
        with dg.DagsterInstance.get() as instance:
            instance.add_dynamic_partitions(shard_group_partitions.name, [GROUP])
            result = dg.materialize(
                defs,
                selection=["human_captions", "captioner_checkpoint"],
                instance=instance,
                resources=resources,
                run_config={"ops": {"captioner_checkpoint": {"config": tune}}},
            )
            assert result.success
            result = dg.materialize(
                defs,
                selection=["recaptioned_shards"],
                instance=instance,
                resources=resources,
                run_config={"ops": {"recaptioned_shards": {"config": recaption}}},
                partition_key=GROUP,
            )
            assert result.success
            sample = _latest_metadata(instance, "human_captions")["sample"].value
            checkpoint = _latest_metadata(instance, "captioner_checkpoint")
    image = re.search(r"\((data:image/png;base64,[^)\s]+)\)", checkpoint["loss_curve"].value)
    assert image, "captioner_checkpoint's loss_curve holds no PNG image"
    return Materialized(
        home=home,
        # The webserver's code location builds the project's resources from these.
        env={
            "RECAP_WORKDIR": str(tmp_path_factory.mktemp("workdir")),
            "RECAP_MINIWORLD_DIR": str(miniworld_paths.root),
            "RECAP_STORAGE_ROOT": str(storage_root),
        },
        sample_record=dict(sample.records[0].data),
        loss_curve_src=image.group(1),
        captioner_version=str(checkpoint["version"].value),
    )


@pytest.fixture(scope="module")
def ui(materialized: Materialized, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """(base URL, Playwright page) for the webserver over the materialized instance."""
    logs = tmp_path_factory.mktemp("webserver")
    with (
        dagster_webserver(materialized.home, materialized.env, logs / "webserver.log") as url,
        chromium_page(tmp_path_factory.mktemp("chromium_profile")) as page,
    ):
        yield url, page


@pytest.fixture
def browser(ui, request: pytest.FixtureRequest) -> Iterator[tuple]:
    """The shared page; a failing test leaves a screenshot of where it stopped."""
    failed_before = request.session.testsfailed
    yield ui
    # The call's report is logged before teardown, so a failure is already counted.
    if request.session.testsfailed > failed_before:
        screenshot(ui[1], f"FAILED_{request.node.name}")


def _metadata_row(page, label: str):
    """The metadata table row whose first cell is exactly ``label``."""
    cell = page.locator("td").filter(has_text=re.compile(rf"^\s*{re.escape(label)}\s*$")).first
    cell.wait_for(timeout=LOAD_TIMEOUT_MS)
    return cell.locator("xpath=..")


def _names_asset(text: str, name: str) -> bool:
    """Whether a node's text is ``name``, whole or shortened in the middle with an ellipsis."""
    if text == name:
        return True
    head, sep, tail = text.partition("\u2026")
    return bool(sep and head and tail) and name.startswith(head) and name.endswith(tail)


def test_catalog_and_graph_list_every_asset(browser) -> None:
    url, page = browser
    page.goto(f"{url}/assets")
    for name in ASSET_NAMES:
        link = page.locator(f'a[href="/assets/{name}"]').first
        link.wait_for(timeout=LOAD_TIMEOUT_MS)
        assert name in link.inner_text()
    # Materialized assets say so in the catalog's status column.
    page.get_by_text("Materialized").first.wait_for()
    screenshot(page, "01_asset_catalog")

    # Global lineage opens with groups collapsed; expand them to see every asset node.
    page.goto(f"{url}/asset-groups")
    page.get_by_role("button", name="settings", exact=True).click(timeout=LOAD_TIMEOUT_MS)
    page.get_by_text("Expand all groups").filter(visible=True).click()
    page.keyboard.press("Escape")
    graph = page.locator("foreignObject")
    graph.get_by_text("laion_shards", exact=True).first.wait_for()
    for group in ("corpus", "captioner", "recaption", "text_to_image", "evaluation"):
        graph.get_by_text(group, exact=True).first.wait_for()
    # Zoomed out to fit every asset, nodes are minimal and shorten a long name in the
    # middle ("base_captio…_model"); every asset still has its node.
    deadline = time.monotonic() + LOAD_TIMEOUT_MS / 1000
    while True:  # nodes render as the layout settles: poll until every asset has its node
        shown = [t.strip() for t in graph.evaluate_all("nodes => nodes.map(n => n.textContent)")]
        missing = [n for n in ASSET_NAMES if not any(_names_asset(t, n) for t in shown)]
        if not missing or time.monotonic() > deadline:
            break
        page.wait_for_timeout(200)
    assert not missing, (missing, shown)
    screenshot(page, "02_asset_graph_expanded")

    # An asset's lineage tab is small enough for full nodes, which carry their statuses:
    # the two materialized unpartitioned assets and human_captions' passed checks.
    page.goto(f"{url}/assets/human_captions?view=lineage&lineageScope=neighbors&lineageDepth=1")
    graph.get_by_text("captioner_checkpoint", exact=True).first.wait_for(timeout=LOAD_TIMEOUT_MS)
    graph.get_by_text("5 / 5 Passed").wait_for()
    from playwright.sync_api import expect  # here: without playwright, the fixture fails clearly

    expect(graph.get_by_text("Materialized", exact=True)).to_have_count(2, timeout=LOAD_TIMEOUT_MS)
    screenshot(page, "02b_human_captions_lineage")


def test_partitioned_asset_shows_its_shards(browser, materialized: Materialized) -> None:
    url, page = browser
    page.goto(f"{url}/assets/recaptioned_shards?view=partitions")
    page.locator("span", has_text=GROUP).first.wait_for(timeout=LOAD_TIMEOUT_MS)
    page.get_by_text("Materialized (1)").wait_for()
    screenshot(page, "03_recaptioned_shards_partitions")

    page.locator("span", has_text=GROUP).first.click()
    page.wait_for_url(re.compile(rf"partition={GROUP}"))
    version = _metadata_row(page, "captioner_version")
    version.get_by_text(materialized.captioner_version, exact=True).wait_for()
    per_shard = _metadata_row(page, "per_shard")  # each shard of the group, with its counts
    for shard in SHARDS:
        per_shard.get_by_text(shard, exact=True).first.wait_for()
    screenshot(page, f"04_recaptioned_shards_partition_{GROUP}")


def test_recaption_examples_are_visible(browser) -> None:
    """The group's best, median and worst images, each with its three texts, before any
    training reads them."""
    url, page = browser
    page.goto(f"{url}/assets/recaptioned_shards?view=events&partition={GROUP}")
    _metadata_row(page, "examples").get_by_text("[Show Markdown]").click()
    dialog = page.get_by_role("dialog")
    images = dialog.locator("img")
    images.first.wait_for()
    assert images.count() == 9
    for band in ("best", "median", "worst"):
        dialog.get_by_text(band, exact=True).first.wait_for()
    headers = [h.strip() for h in dialog.locator("th").all_inner_texts()]
    assert headers == ["band", "image", "key", "alt text", "RECAP short", "RECAP long"], headers
    page.wait_for_function(
        "imgs => imgs.every(img => img.complete && img.naturalWidth > 0)",
        arg=images.element_handles(),
    )
    screenshot(page, "07_recaptioned_shards_examples")
    page.keyboard.press("Escape")


def test_table_metadata_is_visible(browser, materialized: Materialized) -> None:
    url, page = browser
    page.goto(f"{url}/assets/human_captions?view=events")
    row = _metadata_row(page, "sample")
    table = row.locator("table").first
    headers = [h.strip() for h in table.locator("th").all_inner_texts()]
    assert headers[:3] == ["key", "short", "long"], headers
    record = materialized.sample_record
    table.get_by_text(record["key"], exact=True).wait_for()
    table.get_by_text(record["short"], exact=True).wait_for()
    assert table.locator("tr").count() >= 2
    row.scroll_into_view_if_needed()
    screenshot(page, "05_human_captions_sample_table")


def test_plot_metadata_is_visible(browser, materialized: Materialized) -> None:
    url, page = browser
    page.goto(f"{url}/assets/captioner_checkpoint?view=events")
    # Long markdown (an inline PNG) sits behind a link that opens it in a dialog.
    _metadata_row(page, "loss_curve").get_by_text("[Show Markdown]").click()
    image = page.get_by_role("dialog").locator("img").first
    image.wait_for()
    src = image.get_attribute("src") or ""
    assert src.startswith("data:image/png"), src[:80]
    assert src == materialized.loss_curve_src
    # Decoded and laid out by the browser, not just present in the DOM.
    page.wait_for_function(
        "img => img.complete && img.naturalWidth > 0", arg=image.element_handle()
    )
    width, height = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert width > 100 and height > 100
    screenshot(page, "06_captioner_checkpoint_loss_curve")
    page.keyboard.press("Escape")


def test_asset_checks_are_visible(browser) -> None:
    url, page = browser
    page.goto(f"{url}/assets/human_captions?view=checks")
    names = [k.name for c in ASSET_CHECKS for k in c.check_keys if k.asset_key == HUMAN_CAPTIONS]
    assert len(names) == 5
    for name in names:
        page.get_by_text(name, exact=True).first.wait_for(timeout=LOAD_TIMEOUT_MS)
    # Each check in the side list shows its latest execution's status.
    assert page.get_by_text("Succeeded", exact=True).count() >= len(names)
    screenshot(page, "07_human_captions_checks")
