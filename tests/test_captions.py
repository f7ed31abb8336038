"""The miniworld's caption language: generators, parser and grader."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from recap_dagster.miniworld.captions import (
    LONG_CAPTION_BUDGET,
    alt_text,
    count_pretokens,
    grade_caption,
    long_caption,
    parse_caption,
    prompt_text,
    short_caption,
    terse_caption,
)
from recap_dagster.miniworld.scenes import (
    COLOURS,
    SHAPES,
    Requirement,
    Scene,
    SceneObject,
    sample_scene,
    scene_from_requirements,
)

N = 2000


def _scenes(n: int = N, seed: int = 0) -> list[tuple[Scene, random.Random]]:
    rng = random.Random(seed)
    return [(sample_scene(rng), rng) for _ in range(n)]


def test_long_captions_parse_back_exactly() -> None:
    results = [grade_caption(long_caption(s, rng), s)["exact"] for s, rng in _scenes()]
    assert sum(results) / len(results) >= 0.99


def test_long_captions_fit_clip_budget() -> None:
    lengths = [count_pretokens(long_caption(s, rng)) for s, rng in _scenes()]
    assert max(lengths) <= LONG_CAPTION_BUDGET < 77 - 2


def test_short_captions_give_kinds_and_counts() -> None:
    grades = [grade_caption(short_caption(s, rng), s) for s, rng in _scenes()]
    assert sum(g["counts_exact"] for g in grades) / len(grades) >= 0.99
    # Positions are optional and rare in short captions.
    with_positions = sum(1 for g in grades if g["positions"] > 0)
    assert with_positions / len(grades) < 0.1


def test_short_captions_are_one_short_sentence() -> None:
    for scene, rng in _scenes(500):
        text = short_caption(scene, rng)
        assert not text[0].islower() and text.endswith(".")  # may open with "2 ..."
        assert text.count(".") == 1
        assert count_pretokens(text) <= 35


def test_wordings_vary() -> None:
    def skeleton(text: str) -> str:
        words = "|".join(list(COLOURS) + [s + "s?" for s in SHAPES])
        return re.sub(rf"\b({words})\b", "X", text.lower())

    longs = {skeleton(long_caption(s, rng)) for s, rng in _scenes(500)}
    shorts = {skeleton(short_caption(s, rng)) for s, rng in _scenes(500)}
    openings = Counter(long_caption(s, rng).split()[0] for s, rng in _scenes(500))
    assert len(longs) > 300 and len(shorts) > 100
    assert len(openings) >= 8 and max(openings.values()) < 0.4 * 500


def test_terse_captions_name_kinds_only() -> None:
    for scene, rng in _scenes(1000):
        text = terse_caption(scene, rng)
        parsed = parse_caption(text)
        assert not parsed.placements()
        assert not re.search(r"\b(two|three|one|a|an|\d)\b", text)
        assert text == text.lower() and not text.endswith(".")
        if text not in ("shapes", "geometric shapes"):
            assert set(parsed.kinds()) == set(scene.kinds())


def test_alt_text_is_web_like() -> None:
    true = wrong = empty = 0
    for scene, rng in _scenes(3000):
        text = alt_text(scene, rng)
        parsed = parse_caption(text)
        assert not parsed.placements(), text  # never positions
        kinds = set(parsed.kinds())
        if not kinds:
            empty += 1
        elif kinds <= set(scene.kinds()):
            true += 1
        else:
            wrong += 1
        assert len(text) <= 80
    assert 0.25 <= true / 3000 <= 0.45
    assert 0.08 <= wrong / 3000 <= 0.22
    assert 0.40 <= empty / 3000 <= 0.60


def test_alt_text_rarely_counts() -> None:
    counted = 0
    for scene, rng in _scenes(2000):
        if re.search(r"\b(two|three|2|3)\b", alt_text(scene, rng).lower()):
            counted += 1
    assert 0 < counted / 2000 < 0.05


def test_generators_are_deterministic() -> None:
    def run() -> list[str]:
        rng = random.Random(7)
        out = []
        for _ in range(50):
            scene = sample_scene(rng)
            out += [f(scene, rng) for f in (alt_text, short_caption, long_caption, terse_caption)]
        return out

    assert run() == run()


@pytest.mark.parametrize(
    ("text", "kinds", "placements"),
    [
        ("Two red circles and a blue square.", {("red", "circle"): 2, ("blue", "square"): 1}, []),
        ("A pair of small orange triangles.", {("orange", "triangle"): 2}, []),
        ("a trio of yellow squares", {("yellow", "square"): 3}, []),
        ("3 green circles", {("green", "circle"): 3}, []),
        ("RED_CIRCLE_ICON.png", {("red", "circle"): 1}, []),
        ("IMG_4821.jpg", {}, []),
        ("stock photo", {}, []),
        ("blue squares pattern", {("blue", "square"): None}, []),
        (
            "In the top-left corner there is a red circle, and at the bottom sits a blue square.",
            {("red", "circle"): 1, ("blue", "square"): 1},
            [("red", "circle", 0, 0), ("blue", "square", 2, 1)],
        ),
        (
            "Two purple triangles, one on the left and one in the lower right, on a cream canvas.",
            {("purple", "triangle"): 2},
            [("purple", "triangle", 1, 0), ("purple", "triangle", 2, 2)],
        ),
        (
            "Three green squares (top, middle left and bottom right).",
            {("green", "square"): 3},
            [("green", "square", 0, 1), ("green", "square", 1, 0), ("green", "square", 2, 2)],
        ),
        (
            "a red circle at the top center and a yellow triangle in the very center",
            {("red", "circle"): 1, ("yellow", "triangle"): 1},
            [("red", "circle", 0, 1), ("yellow", "triangle", 1, 1)],
        ),
    ],
)
def test_parse_examples(text: str, kinds: dict, placements: list) -> None:
    parsed = parse_caption(text)
    assert parsed.kinds() == kinds
    assert parsed.placements() == Counter(placements)


def test_wrong_captions_grade_low() -> None:
    scenes = _scenes(500)
    mismatched = [
        grade_caption(long_caption(other, rng), scene)
        for (scene, rng), (other, _) in zip(scenes, scenes[1:], strict=False)
        if other.objects != scene.objects  # consecutive one-object scenes can coincide
    ]
    assert sum(g["objects"] for g in mismatched) / len(mismatched) < 0.2
    assert sum(g["exact"] for g in mismatched) == 0

    scene = Scene(
        (SceneObject("red", "circle", 0, 0), SceneObject("blue", "square", 2, 2)),
        (235, 235, 235),
    )
    right = "A red circle in the top left and a blue square in the bottom right."
    assert grade_caption(right, scene)["exact"]
    recoloured = grade_caption(right.replace("red", "green"), scene)
    assert recoloured["objects"] == pytest.approx(1 / 3) and recoloured["hallucinated"] == 1
    moved = grade_caption(right.replace("top left", "top right"), scene)
    assert moved["counts_exact"] and moved["positions"] == 0.5 and not moved["exact"]
    recounted = grade_caption(right.replace("A red circle", "Two red circles"), scene)
    assert recounted["objects"] == 1 and recounted["counts"] == 0.5
    assert grade_caption("IMG_0042.jpg", scene)["objects"] == 0


def test_prompt_text_wording() -> None:
    assert prompt_text([Requirement("red", "circle")], "single_object") == "a red circle"
    assert prompt_text([Requirement("orange", "square")], "single_object") == "an orange square"
    assert prompt_text([Requirement("green", "triangle", 3)], "counting") == "three green triangles"
    two = [Requirement("red", "circle"), Requirement("blue", "square")]
    assert prompt_text(two, "two_objects") == "a red circle and a blue square"
    placed = [Requirement("red", "circle", 1, (0, 0)), Requirement("blue", "triangle", 1, (2, 2))]
    assert (
        prompt_text(placed, "position")
        == "a red circle in the top left and a blue triangle in the bottom right"
    )


def test_prompts_parse_to_their_requirements() -> None:
    rng = random.Random(3)
    cells = [(r, c) for r in range(3) for c in range(3)]
    for _ in range(300):
        kinds = rng.sample([(c, s) for c in COLOURS for s in SHAPES], 2)
        spots = rng.sample(cells, 2)
        reqs = [Requirement(c, s, 1, cell) for (c, s), cell in zip(kinds, spots, strict=True)]
        text = prompt_text(reqs, "position", rng)
        assert grade_caption(text, scene_from_requirements(reqs, rng))["exact"], text
