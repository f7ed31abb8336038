"""Caption quality against ground truth: objects, counts and positions parsed back from text.

Used to compare the base and the fine-tuned captioner on held-out human-captioned images
whose scenes are known (the miniworld). Plain Python, no Dagster.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from recap_dagster.captioner import Captioner
from recap_dagster.human_captions import load_human_captions
from recap_dagster.imaging import decode_image
from recap_dagster.miniworld.captions import grade_caption
from recap_dagster.miniworld.scenes import Scene

METRICS = ("objects", "counts", "positions", "exact")
STYLES = ("short", "long")


@dataclass
class GradedExample:
    key: str
    image: Image.Image
    scene: Scene


def load_graded_examples(path: str) -> list[GradedExample]:
    """Held-out images with ground-truth scenes from a human-caption JSONL file.

    Returns an empty list when no path is configured (real data has no scenes).
    """
    if not path or not Path(path).is_file():
        return []
    table = load_human_captions(path)
    examples = []
    for row in table.select(["key", "image", "scene"]).to_pylist():
        decoded = decode_image(row["image"])
        if decoded.image is None or not row["scene"]:
            continue
        examples.append(
            GradedExample(row["key"], decoded.image, Scene.from_dict(json.loads(row["scene"])))
        )
    return examples


def grade_captions(captions: list[str], scenes: list[Scene]) -> dict[str, float]:
    """Mean of each metric of :func:`grade_caption` over caption/scene pairs."""
    grades = [grade_caption(text, scene) for text, scene in zip(captions, scenes, strict=True)]
    return {m: statistics.fmean(float(g[m]) for g in grades) if grades else 0.0 for m in METRICS}


def evaluate_captioner(
    captioner: Captioner,
    examples: list[GradedExample],
    *,
    batch_size: int = 64,
    max_new_tokens: int = 60,
) -> dict[str, dict[str, float]]:
    """Caption ``examples`` in both styles and grade them: ``{style: {metric: mean}}``."""
    images = [e.image for e in examples]
    scenes = [e.scene for e in examples]
    return {
        style: grade_captions(
            captioner.caption(images, style, max_new_tokens=max_new_tokens, batch_size=batch_size),
            scenes,
        )
        for style in STYLES
    }
