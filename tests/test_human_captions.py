"""human_captions: loading, validation, the asset and its blocking checks in a real instance."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

from recap_dagster.assets.human_captions import human_captions, human_captions_checks
from recap_dagster.corpus import human_captions as core
from recap_dagster.resources import DataSourcesResource, StorageResource


def _resources(miniworld_paths, tmp_path: Path, captions_path: Path | None = None) -> dict:
    sources = DataSourcesResource(
        shards_root=str(miniworld_paths.corpus),
        human_captions_path=str(captions_path or miniworld_paths.human_captions),
        tokenizer_path=str(miniworld_paths.tokenizer),
    )
    return {"sources": sources, "storage": StorageResource(root=str(tmp_path / "storage"))}


@dg.asset(deps=[human_captions])
def downstream_of_captions() -> None:
    """Stands in for captioner_checkpoint: must not run when a blocking check fails."""


def _materialize(resources: dict) -> dg.ExecuteInProcessResult:
    with dg.instance_for_test() as instance:
        return dg.materialize(
            [human_captions, *human_captions_checks, downstream_of_captions],
            instance=instance,
            resources=resources,
            raise_on_error=False,
        )


def test_miniworld_human_captions_pass_every_check(miniworld_paths, tmp_path: Path) -> None:
    result = _materialize(_resources(miniworld_paths, tmp_path))
    assert result.success
    checks = result.get_asset_check_evaluations()
    assert len(checks) == 5
    assert all(c.passed for c in checks), [(c.check_name, c.description) for c in checks]
    metadata = result.asset_materializations_for_node("human_captions")[0].metadata
    assert metadata["dagster/row_count"].value == 100
    schema = metadata["dagster/column_schema"].value
    assert [c.name for c in schema.columns] == ["key", "image", "short", "long", "scene"]
    assert len(metadata["sample"].value.records) == 8
    assert result.asset_materializations_for_node("downstream_of_captions")


def _write_bad_set(miniworld_paths, directory: Path) -> Path:
    """Copy the miniworld set and break it in every way the checks look for."""
    source = Path(miniworld_paths.root) / "human_captions" / "captions.jsonl"
    rows = [json.loads(line) for line in source.read_text().splitlines()][:60]
    for row in rows:
        row["image"] = str((source.parent / row["image"]).resolve())
    rows[1]["short"] = "   "
    rows[2]["long"] = " ".join(["a red circle in the top left"] * 20)
    rows[3]["key"] = rows[4]["key"]
    (directory / "broken.jpg").write_bytes(b"not an image")
    rows[5]["image"] = str(directory / "broken.jpg")
    path = directory / "captions.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_bad_human_captions_fail_blocking_checks(miniworld_paths, tmp_path: Path) -> None:
    bad = _write_bad_set(miniworld_paths, tmp_path)
    result = _materialize(_resources(miniworld_paths, tmp_path, bad))
    assert not result.success
    by_name = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert {name for name, c in by_name.items() if not c.passed} == {
        "human_captions_images_decode",
        "human_captions_present",
        "human_captions_long_within_77_tokens",
        "human_captions_unique_keys",
        "human_captions_min_rows",
    }
    assert "1 of 60 rows fail" in by_name["human_captions_images_decode"].description
    assert "60 rows (need at least 100)" in by_name["human_captions_min_rows"].description
    # Blocking checks stop everything downstream.
    assert not result.asset_materializations_for_node("downstream_of_captions")


def test_structural_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(core.HumanCaptionsError, match="not found"):
        core.load_human_captions(tmp_path / "missing.jsonl")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"key": "a", "image": "a.png", "short": "s", "long": "l"}\n{oops\n')
    with pytest.raises(core.HumanCaptionsError, match=r"bad.jsonl:2: invalid JSON"):
        core.load_human_captions(bad_json)
    missing = tmp_path / "missing_field.jsonl"
    missing.write_text('{"key": "a", "image": "a.png", "short": "s"}\n')
    with pytest.raises(core.HumanCaptionsError, match=r":1: missing field\(s\) \['long'\]"):
        core.load_human_captions(missing)


def test_missing_image_file_is_reported_not_crashed(tmp_path: Path) -> None:
    path = tmp_path / "captions.jsonl"
    path.write_text('{"key": "a", "image": "gone.png", "short": "s", "long": "l"}\n')
    table = core.load_human_captions(path)
    result = core.check_images_decode(table, max_pixels=10_000)
    assert not result.passed and result.failing_keys == ["a"]


def test_version_changes_with_a_caption_or_an_image(miniworld_paths, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "set"
    shutil.copytree(Path(miniworld_paths.human_captions).parent, copy)
    path = copy / "captions.jsonl"
    first = core.human_captions_version(path)
    assert core.human_captions_version(path) == first
    lines = path.read_text(encoding="utf-8").splitlines()
    item = json.loads(lines[0])
    image = copy / item["image"]
    image.write_bytes(image.read_bytes() + b"\0")  # the same captions, another image
    second = core.human_captions_version(path)
    assert second != first
    item["long"] += " Changed."
    path.write_text("\n".join([json.dumps(item), *lines[1:]]) + "\n", encoding="utf-8")
    assert core.human_captions_version(path) not in (first, second)
