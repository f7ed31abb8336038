"""The miniworld evaluator reads scenes back off images, and its scores separate right from
wrong. Rates are measured on thousands of random scenes and printed (``pytest -s``)."""

from __future__ import annotations

import io
import json
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage

from recap_dagster.miniworld.evaluator import (
    Detection,
    EvaluationSummary,
    _colour_map,
    detect,
    evaluate_images,
    scene_from_detections,
    score,
)
from recap_dagster.miniworld.scenes import (
    COLOURS,
    GRID,
    SHAPES,
    PromptTruth,
    Requirement,
    Scene,
    render,
    sample_scene,
    scene_from_requirements,
)

N_SCENES = 2000


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def degrade(image: Image.Image, seed: int, radius: float = 0.7, sigma: float = 8.0) -> Image.Image:
    """Gaussian blur plus Gaussian pixel noise: a stand-in for a small generator's output."""
    arr = np.asarray(image.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)
    arr = arr + np.random.default_rng(seed).normal(0.0, sigma, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))


VARIANTS = {
    "clean": lambda im, i: im,
    "jpeg95": lambda im, i: jpeg(im, 95),
    "jpeg85": lambda im, i: jpeg(im, 85),
}


def exact_rate(scenes: list[Scene], images: list[Image.Image]) -> float:
    """Fraction of images whose detections equal the scene (multiset of colour/shape/cell)."""
    hits = sum(
        Counter(scene_from_detections(detect(im)).objects) == Counter(s.objects)
        for s, im in zip(scenes, images, strict=True)
    )
    return hits / len(scenes)


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    rng = random.Random(20231020)
    return [sample_scene(rng) for _ in range(N_SCENES)]


@pytest.fixture(scope="module")
def renders_32(scenes: list[Scene]) -> list[Image.Image]:
    return [render(s, size=32, seed=i) for i, s in enumerate(scenes)]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reads_back_random_scenes_at_32px(
    variant: str, scenes: list[Scene], renders_32: list[Image.Image]
) -> None:
    images = [VARIANTS[variant](im, i) for i, im in enumerate(renders_32)]
    rate = exact_rate(scenes, images)
    print(f"32 px {variant}: exact scene read-back {rate:.4f} over {len(scenes)} scenes")
    assert rate >= 0.99


@pytest.mark.parametrize("size", [48, 64])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reads_back_random_scenes_at_larger_sizes(
    size: int, variant: str, scenes: list[Scene]
) -> None:
    subset = scenes[:500]
    images = [VARIANTS[variant](render(s, size=size, seed=i), i) for i, s in enumerate(subset)]
    rate = exact_rate(subset, images)
    print(f"{size} px {variant}: exact scene read-back {rate:.4f} over {len(subset)} scenes")
    assert rate >= 0.99


def test_degraded_images(scenes: list[Scene], renders_32: list[Image.Image]) -> None:
    images = [degrade(im, seed=i) for i, im in enumerate(renders_32)]
    rate = exact_rate(scenes, images)
    # The throwaway prototype got ~0.92 here; this evaluator measures ~1.0.
    print(f"32 px blur 0.7 + noise 8: exact scene read-back {rate:.4f}")
    assert rate >= 0.95


# --- prompts -------------------------------------------------------------------------


def random_truth(rng: random.Random, category: str) -> PromptTruth:
    """A random prompt of a category, with the requirements a correct image meets."""
    kinds = [(c, s) for c in COLOURS for s in SHAPES]
    if category == "single_object":
        reqs = [Requirement(*rng.choice(kinds))]
    elif category == "two_objects":
        reqs = [Requirement(*k) for k in rng.sample(kinds, 2)]
    elif category == "counting":
        reqs = [Requirement(*rng.choice(kinds), count=rng.randint(2, 3))]
    elif category == "colours":
        shape = rng.choice(SHAPES)
        reqs = [Requirement(c, shape) for c in rng.sample(list(COLOURS), 2)]
    elif category == "position":
        cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], 2)
        picked = rng.sample(kinds, rng.randint(1, 2))
        reqs = [Requirement(c, s, cell=cell) for (c, s), cell in zip(picked, cells, strict=False)]
    else:
        raise ValueError(category)
    text = " and ".join(f"{r.count} {r.colour} {r.shape}" for r in reqs)
    return PromptTruth(text, category, tuple(reqs))


CATEGORIES = ("single_object", "two_objects", "counting", "colours", "position")


@pytest.fixture(scope="module")
def prompt_set() -> tuple[list[PromptTruth], list[Image.Image]]:
    rng = random.Random(7)
    truths = [random_truth(rng, CATEGORIES[i % len(CATEGORIES)]) for i in range(500)]
    images = [
        render(scene_from_requirements(t.requirements, rng), size=32, seed=i)
        for i, t in enumerate(truths)
    ]
    return truths, images


def test_matched_pairs_score_perfectly(
    prompt_set: tuple[list[PromptTruth], list[Image.Image]],
) -> None:
    truths, images = prompt_set
    summary = evaluate_images(images, truths)
    print("matched:", summary.overall)
    assert summary.overall["object_accuracy"] == 1.0
    assert summary.overall["all_correct"] == 1.0
    assert summary.per_category["counting"]["count_error"] == 0.0
    assert summary.per_category["counting"]["count_accuracy"] == 1.0
    assert summary.per_category["position"]["position_accuracy"] == 1.0
    # Prompts without cells have no position score, and it is not averaged in.
    assert summary.per_category["counting"]["position_accuracy"] is None


def test_mismatched_pairs_score_low(
    prompt_set: tuple[list[PromptTruth], list[Image.Image]],
) -> None:
    truths, images = prompt_set
    shifted = truths[1:] + truths[:1]  # every image paired with another prompt
    summary = evaluate_images(images, shifted)
    print("mismatched:", summary.overall)
    assert summary.overall["object_accuracy"] < 0.3
    assert summary.overall["all_correct"] < 0.1
    assert summary.overall["count_error"] > 0.5


def test_summary_shape(prompt_set: tuple[list[PromptTruth], list[Image.Image]]) -> None:
    truths, images = prompt_set
    summary = evaluate_images(images[:10], truths[:10])
    assert isinstance(summary, EvaluationSummary)
    assert summary.n == 10 and summary.overall["n"] == 10
    assert set(summary.per_category) == set(CATEGORIES)
    row = summary.rows[0]
    assert set(row) >= {
        "prompt",
        "category",
        "object_accuracy",
        "count_error",
        "count_accuracy",
        "position_accuracy",
        "all_correct",
        "detected",
    }
    assert isinstance(summary.to_dict()["rows"], list)
    with pytest.raises(ValueError):
        evaluate_images(images[:2], truths[:3])


# --- scoring semantics ---------------------------------------------------------------


def test_score_semantics() -> None:
    dets = [
        Detection("red", "circle", 0, 0, 40),
        Detection("red", "circle", 2, 2, 40),
        Detection("blue", "square", 1, 1, 49),
    ]
    counting = PromptTruth("three red circles", "counting", (Requirement("red", "circle", 3),))
    s = score(dets, counting)
    assert (s.object_accuracy, s.count_error, s.count_correct) == (1.0, 1.0, False)
    assert s.position_accuracy is None and not s.all_correct

    two = PromptTruth(
        "a red circle and a green triangle",
        "two_objects",
        (Requirement("red", "circle", 2), Requirement("green", "triangle")),
    )
    s = score(dets, two)
    assert s.object_accuracy == 0.5 and s.count_error == 0.5 and not s.all_correct

    placed = PromptTruth(
        "a blue square in the center and a red circle at the top left",
        "position",
        (Requirement("blue", "square", cell=(1, 1)), Requirement("red", "circle", cell=(2, 0))),
    )
    s = score(dets, placed)
    assert s.position_accuracy == 0.5 and not s.all_correct

    # Extra objects the prompt does not mention cost nothing.
    single = PromptTruth("a blue square", "single_object", (Requirement("blue", "square"),))
    assert score(dets, single).all_correct
    assert not score([], single).all_correct and score([], single).object_accuracy == 0.0


def test_scene_from_detections_matches_rendered_scene(scenes: list[Scene]) -> None:
    scene = scenes[0]
    got = scene_from_detections(detect(render(scene, size=32, seed=0)))
    assert got.objects == tuple(sorted(scene.objects))


# --- edge cases ------------------------------------------------------------------------


def test_empty_background_has_no_detections() -> None:
    assert detect(Image.new("RGB", (32, 32), (232, 236, 229))) == []
    assert detect(render(Scene(objects=()), size=32, seed=3)) == []
    assert detect(degrade(render(Scene(objects=()), size=32), seed=1)) == []


@pytest.mark.parametrize(
    "rgb",
    [(0, 190, 200), (128, 128, 128), (20, 20, 20), (255, 255, 255), (250, 150, 200), (120, 70, 30)],
    ids=["cyan", "grey", "black", "white", "pink", "brown"],
)
def test_unknown_colour_blobs_are_ignored(rgb: tuple[int, int, int]) -> None:
    image = Image.new("RGB", (32, 32), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle((2, 2, 8, 8), fill=rgb)
    draw.ellipse((23, 23, 29, 29), fill=rgb)
    draw.polygon([(15, 12), (19, 18), (11, 18)], fill=COLOURS["green"])
    assert [(d.colour, d.shape, d.row, d.col) for d in detect(image)] == [
        ("green", "triangle", 1, 1)
    ]


def test_bridged_same_colour_shapes_are_split() -> None:
    image = Image.new("RGB", (32, 32), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle((12, 2, 18, 8), fill=COLOURS["yellow"])
    draw.rectangle((12, 10, 18, 16), fill=COLOURS["yellow"])  # 1 px gap
    blurred = image.filter(ImageFilter.GaussianBlur(1.0))
    cmap, _ = _colour_map(np.asarray(blurred, dtype=np.float32))
    assert ndimage.label(cmap >= 0, structure=np.ones((3, 3)))[1] == 1  # the blur bridges them
    got = [(d.colour, d.shape, d.row, d.col) for d in detect(blurred)]
    assert got == [("yellow", "square", 0, 1), ("yellow", "square", 1, 1)]


def test_accepts_arrays_and_other_modes(scenes: list[Scene]) -> None:
    image = render(scenes[1], size=32, seed=1)
    expected = detect(image)
    arr = np.asarray(image)
    assert detect(arr) == expected
    assert detect(arr.astype(np.float32) / 255.0) == expected
    assert detect(np.dstack([arr, np.full(arr.shape[:2], 255, np.uint8)])) == expected
    assert detect(image.convert("RGBA")) == expected
    assert detect(image.convert("L")) == []  # no colour, no palette objects
    assert detect(np.zeros((2, 2, 3), np.uint8)) == []
    with pytest.raises(ValueError):
        detect(np.zeros((4, 4, 2), np.uint8))


def test_non_square_and_large_images(scenes: list[Scene]) -> None:
    scene = scenes[2]
    wide = render(scene, 32).resize((48, 32))
    large = render(scene, 128, seed=2)
    for image in (wide, large):
        assert Counter(scene_from_detections(detect(image)).objects) == Counter(scene.objects)


def test_deterministic(renders_32: list[Image.Image]) -> None:
    assert [detect(im) for im in renders_32[:50]] == [detect(im) for im in renders_32[:50]]


# --- the miniworld behind the core's World interface ---------------------------------


def test_miniworld_world_grades_like_the_evaluator(
    prompt_set: tuple[list[PromptTruth], list[Image.Image]], tmp_path
) -> None:
    from recap_dagster.evaluation.metrics import grade_generations, summarize
    from recap_dagster.evaluation.world import IMAGE_METRICS, World
    from recap_dagster.miniworld.world import MiniworldWorld, to_eval_prompt, to_prompt_truth

    truths, images = prompt_set
    world = MiniworldWorld()
    assert isinstance(world, World)
    path = tmp_path / "eval_prompts.jsonl"
    path.write_text("".join(json.dumps(t.to_dict()) + "\n" for t in truths[:40]))
    prompts = world.read_eval_prompts(str(path))
    assert [p.prompt for p in prompts] == [t.prompt for t in truths[:40]]
    assert [to_prompt_truth(p) for p in prompts] == truths[:40]
    assert prompts[0] == to_eval_prompt(truths[0])

    rows = grade_generations(world, images[:40], prompts)
    summary = evaluate_images(images[:40], truths[:40])
    assert rows == summary.rows
    assert summarize(rows) == (summary.overall, summary.per_category)
    assert set(IMAGE_METRICS) <= set(rows[0])
    with pytest.raises(ValueError):
        grade_generations(world, images[:2], prompts[:3])


def test_miniworld_world_grades_captions() -> None:
    from recap_dagster.evaluation.world import CAPTION_METRICS
    from recap_dagster.miniworld.captions import long_caption
    from recap_dagster.miniworld.world import MiniworldWorld

    rng = random.Random(3)
    scenes = [sample_scene(rng) for _ in range(5)]
    captions = [long_caption(s, rng) for s in scenes]
    grades = MiniworldWorld().grade_captions(captions, [s.to_dict() for s in scenes] + [])
    assert all(set(g) == set(CAPTION_METRICS) for g in grades)
    assert all(g["exact"] and g["states_positions"] for g in grades)
    (ungraded,) = MiniworldWorld().grade_captions(["a red circle"], [None])
    assert all(v is None for v in ungraded.values())


def test_position_read_as_found_chance_and_relation() -> None:
    """A red circle asked at (0, 0) left of a blue square at (0, 2): found at (1, 0) and
    (1, 1) it misses both cells but keeps the relation; with the square missing, half the
    placed objects are found and no relation holds; chance counts every cell a kind
    occupies."""
    from recap_dagster.miniworld.evaluator import Detection, position_reading
    from recap_dagster.miniworld.scenes import PromptTruth, Requirement

    truth = PromptTruth(
        "p",
        "position",
        (Requirement("red", "circle", 1, (0, 0)), Requirement("blue", "square", 1, (0, 2))),
    )
    both = [Detection("red", "circle", 1, 0, 50), Detection("blue", "square", 1, 1, 50)]
    assert position_reading(both, truth) == {
        "position_found": 1.0, "position_chance": 1 / 9, "relative_position": 1.0
    }  # fmt: skip
    swapped = [Detection("red", "circle", 1, 2, 50), Detection("blue", "square", 1, 1, 50)]
    assert position_reading(swapped, truth)["relative_position"] == 0.0
    one = position_reading(both[:1], truth)
    assert one == {"position_found": 0.5, "position_chance": 0.5 / 9, "relative_position": 0.0}
    # Three red circles occupy three cells: a text-blind placement hits (0, 0) 3 times in 9.
    # Two copies in one cell (two detections, one cell) count that cell once.
    copies = [Detection("red", "circle", 1, c, 50) for c in range(3)]
    copies += [Detection("blue", "square", 2, 2, 50), Detection("blue", "square", 2, 2, 40)]
    assert position_reading(copies, truth)["position_chance"] == (3 + 1) / 2 / 9
    unplaced = PromptTruth("p", "single_object", (Requirement("red", "circle"),))
    assert set(position_reading(both, unplaced).values()) == {None}
