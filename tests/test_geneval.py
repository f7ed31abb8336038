"""GenEval-style prompts and grading (the production world): GenEval's counting and
position rules on hand-made boxes, the prompt file, no detector ("not graded") and a tiny
random OWL-ViT run end to end offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from recap_dagster.evaluation.geneval import (
    Box,
    GenEvalWorld,
    grade_detections,
    non_max_suppression,
    query_classes,
    read_geneval_prompts,
    relative_position,
)
from recap_dagster.evaluation.world import CAPTION_METRICS, IMAGE_METRICS, World
from recap_dagster.resources import GenEvalWorldResource

ROWS = [
    {"tag": "single_object", "include": [{"class": "dog", "count": 1}],
     "prompt": "a photo of a dog"},
    {"tag": "counting", "include": [{"class": "cat", "count": 2}],
     "exclude": [{"class": "cat", "count": 3}], "prompt": "a photo of two cats"},
    {"tag": "position",
     "include": [{"class": "dog", "count": 1}, {"class": "cup", "count": 1,
                                                "position": ["left of", 0]}],
     "prompt": "a photo of a cup left of a dog"},
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}],
     "prompt": "a photo of a red car"},
]  # fmt: skip


def box(label: str, x: float, y: float, size: float = 10, score: float = 0.9) -> Box:
    return Box(label, score, (x, y, x + size, y + size))


@pytest.fixture
def prompt_file(tmp_path: Path) -> str:
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "\n")
    return str(path)


def test_reads_geneval_metadata(prompt_file: str) -> None:
    prompts = read_geneval_prompts(prompt_file)
    assert [p.prompt for p in prompts] == [r["prompt"] for r in ROWS]
    assert [p.category for p in prompts] == ["single_object", "counting", "position", "colors"]
    assert prompts[1].truth == {"include": ROWS[1]["include"], "exclude": ROWS[1]["exclude"]}
    assert query_classes(prompts[2].truth) == ["dog", "cup"]
    assert GenEvalWorld().read_eval_prompts(prompt_file) == prompts


def test_counting_rules() -> None:
    truth = ROWS[1]
    two = grade_detections([box("cat", 0, 0), box("cat", 50, 0)], truth)
    assert two["count_accuracy"] == 1.0 and two["count_error"] == 0 and two["all_correct"] == 1.0
    one = grade_detections([box("cat", 0, 0), box("dog", 50, 0)], truth)
    assert one["object_accuracy"] == 1.0 and one["count_error"] == 1
    assert one["count_accuracy"] == 0.0 and one["all_correct"] == 0.0
    three = grade_detections([box("cat", x, 0) for x in (0, 30, 60)], truth)  # the exclude
    assert three["count_accuracy"] == 0.0 and three["count_error"] == 1
    none = grade_detections([], truth)
    assert none["object_accuracy"] == 0.0 and none["count_error"] == 2
    assert none["position_accuracy"] is None and set(IMAGE_METRICS) <= set(none)
    # Duplicates of one object are suppressed before counting.
    dupes = non_max_suppression([box("cat", 0, 0), box("cat", 1, 1, score=0.5)])
    assert len(dupes) == 1 and dupes[0].score == 0.9


def test_position_rules() -> None:
    assert relative_position(box("a", 0, 0), box("b", 50, 0)) == {"left of"}
    assert relative_position(box("a", 50, 50), box("b", 0, 0)) == {"right of", "below"}
    assert relative_position(box("a", 0, 0), box("b", 0, 40)) == {"above"}
    assert relative_position(box("a", 0, 0), box("b", 0.5, 0)) == set()  # within the margin
    truth = ROWS[2]
    right = grade_detections([box("dog", 60, 20), box("cup", 0, 20)], truth)
    assert right["position_accuracy"] == 1.0 and right["all_correct"] == 1.0
    wrong = grade_detections([box("dog", 0, 20), box("cup", 60, 20)], truth)
    assert wrong["position_accuracy"] == 0.0 and wrong["all_correct"] == 0.0
    assert wrong["object_accuracy"] == 1.0
    missing = grade_detections([box("cup", 0, 20)], truth)  # no dog to stand left of
    assert missing["position_accuracy"] == 0.0


def test_no_detector_is_not_graded(prompt_file: str) -> None:
    world = GenEvalWorldResource().get()
    assert isinstance(world, World) and world.name == "geneval"
    prompts = world.read_eval_prompts(prompt_file)
    grades = world.grade_images([Image.new("RGB", (32, 32))] * len(prompts), prompts)
    assert all(g[m] is None for g in grades for m in IMAGE_METRICS)
    (caption,) = world.grade_captions(["a dog"], [None])
    assert set(caption) == set(CAPTION_METRICS) and all(v is None for v in caption.values())


def tiny_owlvit(directory: Path) -> str:
    """A random OWL-ViT small enough for a CPU test, saved like a real one (no network)."""
    from transformers import (
        CLIPTokenizer,
        OwlViTConfig,
        OwlViTForObjectDetection,
        OwlViTImageProcessor,
        OwlViTProcessor,
    )

    from recap_dagster.miniworld.tokenizer import train_clip_tokenizer

    words = ["a photo of a dog", "a photo of a cat", "a photo of a cup", "car object"]
    train_clip_tokenizer(words * 4, str(directory / "tokenizer"), vocab_size=600)
    tokenizer = CLIPTokenizer.from_pretrained(str(directory / "tokenizer"))
    config = OwlViTConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 1, "num_attention_heads": 2,
                     "max_position_embeddings": 16},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )  # fmt: skip
    model = OwlViTForObjectDetection(config).eval()
    images = OwlViTImageProcessor(
        size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32}
    )
    tokenizer.model_max_length = 16
    out = directory / "owlvit"
    model.save_pretrained(str(out))
    OwlViTProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(str(out))
    return str(out)


def test_tiny_owlvit_grades_images(tmp_path: Path, prompt_file: str) -> None:
    detector = tiny_owlvit(tmp_path)
    world = GenEvalWorldResource(detector=detector, score_threshold=0.0).get()
    prompts = world.read_eval_prompts(prompt_file)
    images = [Image.new("RGB", (48, 40), (40 * i, 90, 160)) for i in range(len(prompts))]
    grades = world.grade_images(images, prompts)
    assert len(grades) == len(prompts)
    assert any(g["detected"] for g in grades)  # threshold 0: the random detector finds boxes
    for grade, prompt in zip(grades, prompts, strict=True):
        assert set(grade) == {*IMAGE_METRICS, "detected"}
        assert 0.0 <= grade["object_accuracy"] <= 1.0 and grade["count_error"] >= 0
        assert grade["all_correct"] in (0.0, 1.0)
        assert (grade["position_accuracy"] is None) == (prompt.category != "position")
        # Only the prompt's own classes are reported (threshold 0: random boxes abound).
        named = {part.split(" x")[0] for part in grade["detected"].split("; ") if part}
        assert named <= set(query_classes(prompt.truth))
