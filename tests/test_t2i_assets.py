"""RECAP step 3 and evaluation through a real Dagster instance (quick sizes)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pytest
from recorded import record_recaptions

from recap_dagster.assets.human_eval import human_eval_report, human_eval_task
from recap_dagster.assets.inputs import base_t2i_model
from recap_dagster.assets.latents import t2i_latents
from recap_dagster.assets.t2i import (
    base_metric_report,
    metric_reports,
    recap_report,
    sd_checkpoints,
)
from recap_dagster.assets.training_corpus import training_corpus
from recap_dagster.captioner.recaption import SCHEMA, output_parts
from recap_dagster.corpus.listing import list_shards
from recap_dagster.corpus.reading import iter_shard
from recap_dagster.corpus.shard_groups import groups_of
from recap_dagster.miniworld.captions import long_caption, short_caption
from recap_dagster.miniworld.definitions import ASSET_CHECKS, ASSETS
from recap_dagster.miniworld.resources import (
    MiniworldResource,
    MiniworldWorldResource,
    miniworld_sources,
)
from recap_dagster.miniworld.scenes import Scene
from recap_dagster.orchestration.partitions import (
    CAPTION_VARIANTS,
    shard_group_partitions,
    variant_seed_key,
)
from recap_dagster.resources import (
    ComputeResource,
    ModelsResource,
    StorageResource,
)
from recap_dagster.storage.fingerprint import model_fingerprint
from recap_dagster.storage.root import Storage

SD_CONFIG = {
    "steps": 4,
    "snapshot_every": 2,
    "checkpoint_every": 2,
    "learning_rate": 1e-3,
    "batch_size": 8,
    "micro_batch_size": 8,
    "sample_prompts": 4,
}
METRIC_CONFIG = {
    "num_inference_steps": 2,
    "reference_images": 32,
    "batch_size": 16,
    "images_per_prompt": 2,
}
#: Every variant with seed 0, the two the verdict compares with a second seed too.
PARTITIONS = [(v, 0) for v in CAPTION_VARIANTS] + [("alttext", 1), ("recap_mix", 1)]


def _write_recaptions(storage: Storage, corpus: str) -> list[str]:
    """Recaptioned shards as the upstream asset writes them (ground-truth captions)."""
    shards = [info.key for info in list_shards(corpus)]
    for shard in shards:
        rows = []
        for record in iter_shard(corpus, shard):
            ok = record.image is not None
            scene = Scene.from_dict(record.metadata["scene"]) if ok else None
            rng = random.Random(record.key)
            rows.append(
                {
                    "key": record.key,
                    "url": record.url,
                    "alt_text": record.alt_text,
                    "recap_short": short_caption(scene, rng) if ok else None,
                    "recap_long": long_caption(scene, rng) if ok else None,
                    "width": record.width,
                    "height": record.height,
                    "delivered": record.delivered,
                    "status": record.status,
                    "error": record.error,
                    "captioner_version": "ground-truth",
                    "generation": "{}",
                }
            )
        storage.write_parquet(pa.Table.from_pylist(rows, schema=SCHEMA), *output_parts(shard))
    return shards


@pytest.mark.slow
def test_variants_reports_and_recap_report(
    miniworld_paths, base_t2i, miniworld_clip: str, tmp_path: Path
) -> None:
    resources = {
        "sources": miniworld_sources(str(miniworld_paths.root)),
        "storage": StorageResource(root=str(tmp_path / "storage")),
        # The miniworld's own CLIP: the reports carry CLIP score.
        "models": ModelsResource(base_captioner="unused", base_t2i=base_t2i, clip=miniworld_clip),
        "compute": ComputeResource(),
        "world": MiniworldWorldResource(),
        "miniworld": MiniworldResource(root=str(miniworld_paths.root)),
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
    }
    storage = resources["storage"].get()
    shards = _write_recaptions(storage, str(miniworld_paths.corpus))
    with dg.instance_for_test() as instance:
        groups = groups_of(shards)
        instance.add_dynamic_partitions(shard_group_partitions.name, groups)
        # The fixture's base (the quick recipe): found in the cache, not trained again.
        observed = dg.materialize(
            [*ASSETS],
            selection=[base_t2i_model.key],
            instance=instance,
            resources=resources,
            run_config={"ops": {"base_t2i_model": {"config": {"recipe": "quick"}}}},
        )
        assert observed.success
        assert all(e.passed for e in record_recaptions(instance, resources, groups).values())
        for group in groups:
            result = dg.materialize(
                [*ASSETS, *ASSET_CHECKS], selection=[t2i_latents.key], partition_key=group,
                instance=instance, resources=resources,
            )  # fmt: skip
            assert result.success
            (check,) = result.get_asset_check_evaluations()
            assert check.check_name == "latents_match_decodable_images" and check.passed
            meta = result.asset_materializations_for_node("t2i_latents")[0].metadata
            assert meta["rows"].value == sum(
                1 for s in shards for r in iter_shard(str(miniworld_paths.corpus), s) if r.image
            )
            assert meta["bytes_written"].value > 0 and meta["images_per_second"].value > 0
        # The cache remembers which base model it was made from: a new base makes it stale.
        record = instance.get_latest_materialization_event(t2i_latents.key)
        tags = record.asset_materialization.tags
        assert tags["dagster/input_data_version/base_t2i_model"] == model_fingerprint(base_t2i)
        corpus = dg.materialize(
            [*ASSETS], selection=[training_corpus.key], instance=instance, resources=resources
        )
        corpus_meta = corpus.asset_materializations_for_node("training_corpus")[0].metadata
        assert corpus_meta["groups"].value == len(groups)
        assert corpus_meta["shards"].value == len(shards)
        assert corpus_meta["pending_groups"].value == 0
        noise: dict[tuple[str, int], list] = {}
        for variant, seed in PARTITIONS:
            result = dg.materialize(
                [*ASSETS, *ASSET_CHECKS],
                selection=[sd_checkpoints.key, metric_reports.key],
                partition_key=variant_seed_key(variant, seed),
                instance=instance,
                resources=resources,
                run_config={
                    "ops": {
                        "sd_checkpoints": {"config": SD_CONFIG},
                        "metric_reports": {"config": METRIC_CONFIG},
                    }
                },
            )
            assert result.success
            sd_meta = result.asset_materializations_for_node("sd_checkpoints")[0].metadata
            assert [s["step"] for s in sd_meta["snapshots"].value] == [2, 4]
            # The trainer (a torchrun subprocess) reported its progress through Pipes.
            messages = [e.user_message for e in instance.all_logs(result.run_id)]
            assert any("step 4/4 (100%) loss" in m for m in messages)
            assert any(m.startswith("snapshot step-000002") for m in messages)
            assert "data:image/png;base64" in sd_meta["samples"].value
            final = ("checkpoints", "sd", variant, f"seed-{seed}", "final")
            assert storage.dir_complete(*final)
            assert (Path(storage.uri(*final)) / "model_index.json").exists()
            report = json.loads(
                storage.read_text("reports", "metrics", variant, f"seed-{seed}.json")
            )
            assert report["seed"] == seed and [p["step"] for p in report["curve"]] == [2, 4]
            measured = {"fid", "kid", "kid_std", "clip_score", "object_accuracy", "count_error",
                        "position_accuracy", "position_chance", "position_given_found"}  # fmt: skip
            assert measured <= set(report["overall"])
            metric_meta = result.asset_materializations_for_node("metric_reports")[0].metadata
            assert 0.0 <= metric_meta["clip_score"].value <= 100.0
            # Every graded image, two per prompt, each with its own noise seed.
            rows = storage.read_parquet("reports", "metrics", variant, f"seed-{seed}.rows.parquet")
            assert metric_meta["graded_rows"].value.endswith(f"{variant}/seed-{seed}.rows.parquet")
            assert rows.num_rows == report["overall"]["n"]
            table = rows.to_pylist()
            assert {r["seed"] for r in table} == {seed} and {r["image"] for r in table} == {0, 1}
            assert len({r["image_seed"] for r in table}) == len(table)  # per (prompt, image)
            noise[(variant, seed)] = [
                (r["prompt_index"], r["image"], r["image_seed"]) for r in table
            ]
            assert set(report["per_category"]) == {
                "single_object", "two_objects", "counting", "colours", "position"
            }  # fmt: skip

        assert len(set(map(tuple, noise.values()))) == 1  # the same noise for every variant

        result = dg.materialize(
            [*ASSETS, *ASSET_CHECKS],
            # The human evaluation's task from the variants' saved images, its (empty) report.
            selection=[human_eval_task.key, human_eval_report.key, recap_report.key,
                       base_metric_report.key],  # the floor: the base model's row
            instance=instance,
            resources=resources,
            run_config={"ops": {"base_metric_report": {"config": METRIC_CONFIG}}},
        )  # fmt: skip
        assert result.success
        task = result.asset_materializations_for_node("human_eval_task")[0].metadata
        variants = task["variants"].value.split(", ")
        assert variants[0] == "alttext" and set(variants) == set(CAPTION_VARIANTS)
        assert task["items"].value > 0
        assert task["questions"].value == task["items"].value * (2 * len(CAPTION_VARIANTS) - 1)
        metadata = result.asset_materializations_for_node("recap_report")[0].metadata
        assert "No human ratings yet" in metadata["human_evaluation"].value
        table = metadata["table"]  # typed: numbers sort as numbers in the UI
        rows = {r.data["variant"]: r.data for r in table.records}
        assert set(rows) == {"base", *CAPTION_VARIANTS}
        assert rows["base"]["seeds"] == 1 and rows["base"]["object_accuracy"] is not None
        assert storage.exists("reports", "metrics", "base", "seed-0.rows.parquet")
        assert rows["recap_mix"]["seeds"] == 2 and rows["recap_short"]["seeds"] == 1
        assert rows["recap_mix"]["object_accuracy_low"] is not None  # an interval over 2 seeds
        assert rows["recap_short"]["object_accuracy_low"] is None  # none from one seed
        types = {c.name: c.type for c in table.schema.columns}
        assert types["fid"] == "float" and types["variant"] == "string"
        assert types["clip_score"] == "float"
        assert rows["alttext"]["fid_vs_alttext"] is None  # deltas against alttext
        assert isinstance(rows["recap_mix"]["fid_vs_alttext"], float)
        assert storage.exists("reports", "recap_report.md")
        assert storage.exists("reports", "recap_fid_vs_steps.png")
        assert storage.exists("reports", "recap_object_accuracy_vs_steps.png")
        against = {(r.data["variant"], r.data["metric"]): r.data
                   for r in metadata["against_alttext"].records}  # fmt: skip
        mix = against[("recap_mix", "object_accuracy")]
        assert mix["seeds"] == 2 and mix["difference_t_low"] is not None
        assert mix["verdict"] in ("better", "worse", "not distinguishable")
        assert against[("recap_short", "object_accuracy")]["verdict"] == "not distinguishable"
        position = {r.data["variant"]: r.data for r in metadata["position"].records}
        assert position["recap_mix"]["chance"] is not None
        (check,) = result.get_asset_check_evaluations()
        assert check.check_name == "recap_mix_beats_alttext"
        assert "object_accuracy" in check.description
        # Four optimizer steps: nothing is shown either way (an error only if worse).
        expected = dg.AssetCheckSeverity.ERROR if "WORSE" in check.description else (
            dg.AssetCheckSeverity.WARN)  # fmt: skip
        assert check.severity == expected and not check.passed

        def fine_tune_alttext(config: dict) -> dict:
            result = dg.materialize(
                [*ASSETS, *ASSET_CHECKS],
                selection=[sd_checkpoints.key],
                partition_key=variant_seed_key("alttext", 0),
                instance=instance,
                resources=resources,
                run_config={"ops": {"sd_checkpoints": {"config": config}}},
            )
            return result.asset_materializations_for_node("sd_checkpoints")[0].metadata

        # Materializing again with the same settings finds the finished run's state.
        meta = fine_tune_alttext(SD_CONFIG)
        assert meta["resumed_from_step"].value == 4
        assert meta["run"].value == "repeat" and not meta["other_runs"].value.records

        # More steps extend the finished run (its state is where it left off).
        meta = fine_tune_alttext({**SD_CONFIG, "steps": 6})
        assert meta["run"].value == "extend" and meta["extended_from_step"].value == 4
        assert [(s["step"], s["name"]) for s in meta["snapshots"].value] == [
            (2, "step-000002"), (4, "step-000004"), (6, "final")
        ]  # fmt: skip
