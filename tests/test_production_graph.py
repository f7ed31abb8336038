"""The production graph, no miniworld in it: observed inputs, real img2dataset shards, a
GenEval prompt file and base models from directories; every RECAP asset materializes.

(The inputs here are files the miniworld generator wrote, used as plain data: shards in
img2dataset's layout, a human-caption JSONL, a CLIP tokenizer directory.)
"""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

from recap_dagster.assets.corpus import laion_shards
from recap_dagster.assets.inputs import INPUT_ASSETS
from recap_dagster.corpus.listing import list_shards
from recap_dagster.corpus.shard_groups import groups_of
from recap_dagster.definitions import ASSET_CHECKS, RECAP_ASSETS, recap_definitions
from recap_dagster.miniworld.captions import vocabulary_texts
from recap_dagster.miniworld.tiny_captioner import build_tiny_captioner
from recap_dagster.orchestration.partitions import shard_group_partitions, variant_seed_key
from recap_dagster.resources import (
    ComputeResource,
    DataSourcesResource,
    GenEvalWorldResource,
    ModelsResource,
    StorageResource,
)
from recap_dagster.storage.fingerprint import QUICK_PREFIX, model_fingerprint

pytestmark = pytest.mark.slow
DATA_VERSION = "dagster/data_version"

GENEVAL_PROMPTS = [
    {"tag": "single_object", "include": [{"class": "circle", "count": 1}],
     "prompt": "a photo of a circle"},
    {"tag": "counting", "include": [{"class": "square", "count": 2}],
     "exclude": [{"class": "square", "count": 3}], "prompt": "a photo of two squares"},
    {"tag": "position", "include": [{"class": "circle", "count": 1},
                                    {"class": "triangle", "count": 1, "position": ["left of", 0]}],
     "prompt": "a photo of a triangle left of a circle"},
]  # fmt: skip
VARIANTS = ("alttext", "recap_mix")
RUN_CONFIG = {
    "ops": {
        "captioner_checkpoint": {
            "config": {"steps": 2, "batch_size": 8, "learning_rate": 1e-3, "max_new_tokens": 12}
        },
        "recaptioned_shards": {
            "config": {"batch_size": 8, "max_new_tokens_short": 12, "max_new_tokens_long": 12}
        },
        "sd_checkpoints": {
            "config": {"steps": 2, "batch_size": 8, "micro_batch_size": 8, "sample_prompts": 2}
        },
        "metric_reports": {
            "config": {"num_inference_steps": 2, "reference_images": 16, "batch_size": 8}
        },
    }
}


def test_every_recap_asset_runs_on_production_inputs(
    miniworld_paths, base_t2i: str, random_clip: str, tmp_path: Path
) -> None:
    prompts = tmp_path / "evaluation_metadata.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in GENEVAL_PROMPTS))
    captioner = tmp_path / "base_captioner"
    words = sorted({w for text in vocabulary_texts() for w in text.lower().split()})
    build_tiny_captioner("git", captioner, words=words, hidden_size=32, max_text_tokens=64)
    resources = {
        "sources": DataSourcesResource(
            shards_root=str(miniworld_paths.corpus),
            human_captions_path=miniworld_paths.human_captions,
            # Held-out human captions: references for the captioners (no ground truth read).
            human_captions_heldout_path=miniworld_paths.human_captions_heldout,
            eval_prompts_path=str(prompts),
            tokenizer_path=miniworld_paths.tokenizer,
        ),
        "storage": StorageResource(root=str(tmp_path / "storage")),
        # A CLIP-family model from a directory (tiny, random): image-text agreement of the
        # recaptions, of the held-out captions and of the generated images.
        "models": ModelsResource(
            base_captioner=str(captioner), base_t2i=base_t2i, clip=random_clip
        ),
        "compute": ComputeResource(),
        "world": GenEvalWorldResource(),  # no detector: objects, counts, positions not graded
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
    }
    defs = recap_definitions(INPUT_ASSETS, resources, observe_inputs=True)
    assert not {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()} & {
        "miniworld_corpus"
    }
    assets = [*INPUT_ASSETS, laion_shards, *RECAP_ASSETS, *ASSET_CHECKS]
    groups = groups_of(info.key for info in list_shards(str(miniworld_paths.corpus)))

    def materialize(selection: list, partition: str | None = None) -> dg.ExecuteInProcessResult:
        names = {k if isinstance(k, str) else k.to_user_string() for k in selection}
        ops = {op: c for op, c in RUN_CONFIG["ops"].items() if op in names}
        return dg.materialize(
            assets, selection=selection, partition_key=partition, instance=instance,
            resources=resources, run_config={"ops": ops}, raise_on_error=True,
        )  # fmt: skip

    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(shard_group_partitions.name, groups)
        # The five inputs observed as the production schedule does, by its job.
        schedule = defs.resolve_schedule_def("observe_inputs_schedule")
        assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
        assert schedule.job_name == "observe_inputs"
        assert defs.resolve_job_def("observe_inputs").execute_in_process(instance=instance).success
        base_version = model_fingerprint(base_t2i)  # quick: no full read of the weights
        assert base_version.startswith(QUICK_PREFIX)
        observed = instance.get_latest_data_version_record(dg.AssetKey("base_t2i_model"))
        assert observed.event_log_entry.asset_observation.tags[DATA_VERSION] == base_version
        result = materialize(["human_captions", "captioner_checkpoint"])
        meta = result.asset_materializations_for_node("captioner_checkpoint")[0].metadata
        # Judged against the held-out human captions with no world: references and CLIP.
        judged = {(r.data["style"], r.data["captioner"]): r.data
                  for r in meta["heldout_reference"].records}  # fmt: skip
        assert {(s, c) for s in ("short", "long") for c in ("base", "fine-tuned")} <= set(judged)
        assert all(row["clip_score"] is not None for row in judged.values())
        assert all(row["chrf"] is not None for (_, c), row in judged.items() if c != "human")
        for group in groups:
            result = materialize(["recaptioned_shards", "t2i_latents"], group)
            meta = result.asset_materializations_for_node("recaptioned_shards")[0].metadata
            # The caption facts, a CLIP-scored sample and the examples, with no world.
            assert meta["long_clip_tokens_max"].value <= 77
            assert "gain_recap_long" in meta and "data:image/png" in meta["examples"].value
            checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
            assert "scored rows" in checks["recaptioned_clip_vs_alt_text"].description
        assert materialize(["training_corpus"]).success
        for variant in VARIANTS:
            result = materialize(["sd_checkpoints", "metric_reports"], variant_seed_key(variant, 0))
            meta = result.asset_materializations_for_node("metric_reports")[0].metadata
            assert meta["world"].value == "geneval"
            assert meta["fid"].value > 0
        result = materialize(["recap_report"])
        table = result.asset_materializations_for_node("recap_report")[0].metadata["table"]
        rows = {r.data["variant"]: r.data for r in table.records}
        assert "recap_mix" in rows and rows["recap_mix"]["object_accuracy"] is None  # not graded
        assert rows["recap_mix"]["clip_score"] is not None
        captions = {r.data["variant"]: r.data for r in result.asset_materializations_for_node(
            "recap_report")[0].metadata["captions"].records}  # fmt: skip
        assert set(captions) == set(VARIANTS)
        assert captions["recap_mix"]["rows"] == 2 * captions["alttext"]["rows"] > 0
        # Every input's version is recorded where it was read: a changed one makes it stale.
        tags = instance.get_latest_materialization_event(
            dg.AssetKey("metric_reports")
        ).asset_materialization.tags
        assert "dagster/input_data_version/eval_prompt_file" in tags
        # The fine-tune recorded the observed base model version (it hashed nothing again).
        trained = instance.get_latest_materialization_event(dg.AssetKey("sd_checkpoints"))
        trained_tags = trained.asset_materialization.tags
        assert trained_tags["dagster/input_data_version/base_t2i_model"] == base_version
