"""Test helpers: a storage root holding the evaluation's images of a few variants (small
synthetic PNGs in the layout ``metric_reports`` writes) and a rating task built on them,
and the human evaluation's figures recomputed by hand from a list of answers."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

from recap_dagster.evaluation import human
from recap_dagster.evaluation.world import EvalPrompt
from recap_dagster.storage.root import Storage

VARIANTS = ("alttext", "recap_short", "recap_mix")
PROMPTS = [
    EvalPrompt("a red circle", "colours"),
    EvalPrompt("two blue squares", "counting"),
    EvalPrompt("a green triangle left of a red circle", "position"),
    EvalPrompt("three yellow circles", "counting"),
]
COLOURS = {"alttext": (200, 40, 40), "recap_short": (40, 160, 40), "recap_mix": (40, 40, 200)}


def write_images(store: Storage, variants=VARIANTS, prompts=PROMPTS) -> None:
    """Each variant's image of every prompt (seed 0), as ``evaluate_variant`` saves them."""
    for variant in variants:
        images = [_image(COLOURS[variant], i) for i in range(len(prompts))]
        human.save_generated_images(
            store, variant, 0, images, prompts, list(range(len(prompts))), [0] * len(prompts),
            checkpoint_version=f"{variant}-v1", limit=100,
        )  # fmt: skip


def _image(colour: tuple[int, int, int], n: int) -> Image.Image:
    """A 32 px image of a shape, its colour the variant's and its size the prompt's."""
    image = Image.new("RGB", (32, 32), (245, 245, 245))
    box = (4 + n, 4 + n, 27 - n, 27 - n)
    draw = ImageDraw.Draw(image)
    (draw.ellipse if n % 2 == 0 else draw.rectangle)(box, fill=colour)
    return image


def make_task(root: Path | str, prompts: int = 3) -> tuple[Storage, dict]:
    store = Storage(str(root))
    write_images(store)
    task = human.build_task(
        human.read_image_indexes(store, VARIANTS, 0), human.TaskSettings(prompts=prompts)
    )
    human.write_task(store, task)
    return store, task


def wilson(k: int, n: int) -> tuple[float, float]:
    """The Wilson 95% interval, written out again from its textbook form."""
    z = 1.959963984540054
    p = k / n
    centre = p + z**2 / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    return (centre - spread) / (1 + z**2 / n), (centre + spread) / (1 + z**2 / n)


def expected_figures(task: dict, given: list[tuple[str, str, str]]) -> dict:
    """Success rate per variant, win rate per variant against alttext (tie = 1/2) and the
    unrated count, from ``given`` = [(rater, question id, answer)], by plain counting."""
    questions = {q["id"]: q for q in task["questions"]}
    success: dict[str, list[int]] = {v: [] for v in task["variants"]}
    wins: dict[str, list[float]] = {v: [] for v in task["variants"][1:]}
    for _, qid, answer in given:
        q = questions[qid]
        if q["kind"] == "success":
            success[q["variant"]].append(1 if answer == "yes" else 0)
        else:
            other = q["left"] if q["left"] != "alttext" else q["right"]
            chosen = {"left": q["left"], "right": q["right"], "tie": None}[answer]
            wins[other].append(0.5 if chosen is None else (1.0 if chosen == other else 0.0))
    return {
        "success": {v: (sum(s) / len(s), sum(s), len(s)) for v, s in success.items() if s},
        "win": {v: sum(w) / len(w) for v, w in wins.items() if w},
        "unrated": len(task["questions"]) - len({qid for _, qid, _ in given}),
    }
