"""Caption quality against ground truth: objects, counts and positions parsed back from text.

Compares captioners (the base and the fine-tuned one, in each style) on human-captioned
images whose scenes are known (the miniworld's held-out set). Used by the
``captioner_checkpoint`` asset, the base captioner's build and the quality benchmark.
Plain Python, no Dagster.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from recap_dagster.captioner.finetune import CaptionExample
from recap_dagster.human_captions import load_human_captions
from recap_dagster.imaging import decode_image
from recap_dagster.miniworld.captions import grade_caption, parse_caption
from recap_dagster.miniworld.scenes import Scene

GRADE_KEYS = ("objects", "counts", "positions", "counts_exact", "exact", "hallucinated")
#: Enough new tokens for the longest long caption (64 CLIP pre-tokens, a little more here).
MAX_NEW_TOKENS = {"short": 40, "long": 80}


@dataclass
class CaptionedImage:
    """A human-captioned image with its ground-truth scene."""

    key: str
    image: Image.Image
    short: str
    long: str
    scene: Scene

    def to_example(self) -> CaptionExample:
        return CaptionExample(key=self.key, image=self.image, short=self.short, long=self.long)


def load_captioned(path: str | Path) -> list[CaptionedImage]:
    """The rows of a human-caption JSONL file that have a decodable image and a scene.

    Rows without a scene (real data) or with a broken image are left out: they cannot be
    graded. The file's own problems raise :class:`~recap_dagster.human_captions.HumanCaptionsError`.
    """
    table = load_human_captions(path)
    examples = []
    for row in table.to_pylist():
        decoded = decode_image(row["image"])
        if decoded.image is None or not row["scene"]:
            continue
        scene = Scene.from_dict(json.loads(row["scene"]))
        examples.append(CaptionedImage(row["key"], decoded.image, row["short"], row["long"], scene))
    return examples


def evaluate_captioner(
    captioner: Any,
    examples: Sequence[Any],
    *,
    styles: Sequence[str] = ("short", "long"),
    batch_size: int = 64,
    max_new_tokens: int | Mapping[str, int] = MAX_NEW_TOKENS,
    samples: int = 3,
) -> dict[str, dict[str, Any]]:
    """Caption ``examples`` in each style and grade the captions against their scenes.

    ``examples`` have ``image`` and ``scene`` (e.g. :class:`CaptionedImage`) or are
    ``(image, scene)`` pairs; ``max_new_tokens`` is one limit or one per style. Returns
    ``{style: metrics}``: the means of :func:`grade_caption`'s :data:`GRADE_KEYS`, plus
    ``words`` (mean caption length), ``states_positions`` (fraction of captions naming any
    position), ``captions_per_s``, ``n`` and the first ``samples`` captions.
    """
    pairs = [_image_and_scene(e) for e in examples]
    images = [image for image, _ in pairs]
    scenes = [scene for _, scene in pairs]
    results: dict[str, dict[str, Any]] = {}
    for style in styles:
        limit = max_new_tokens if isinstance(max_new_tokens, int) else max_new_tokens.get(style, 80)
        start = time.perf_counter()
        captions = captioner.caption(images, style, max_new_tokens=limit, batch_size=batch_size)
        seconds = time.perf_counter() - start
        grades = [grade_caption(t, s) for t, s in zip(captions, scenes, strict=True)]
        n = max(1, len(grades))
        metrics: dict[str, Any] = {k: sum(float(g[k]) for g in grades) / n for k in GRADE_KEYS}
        metrics["words"] = sum(len(c.split()) for c in captions) / n
        metrics["states_positions"] = sum(bool(parse_caption(c).placements()) for c in captions) / n
        metrics["captions_per_s"] = len(grades) / seconds if seconds > 0 else float("inf")
        metrics["n"] = len(grades)
        metrics["samples"] = captions[:samples]
        results[style] = metrics
    return results


def _image_and_scene(example: Any) -> tuple[Image.Image, Scene]:
    image, scene = example if isinstance(example, tuple) else (example.image, example.scene)
    return image, scene if isinstance(scene, Scene) else Scene.from_dict(scene)


@dataclass
class QualityRow:
    """One line of a quality table (for printing)."""

    label: str
    style: str
    metrics: dict[str, Any] = field(default_factory=dict)


def format_quality_table(rows: Sequence[QualityRow]) -> str:
    """A plain-text table: label x style -> objects / counts / positions / exact / words."""
    head = f"{'captioner':<14}{'style':<8}{'objects':>9}{'counts':>9}{'positions':>11}"
    head += f"{'exact':>8}{'words':>8}"
    lines = [head, "-" * len(head)]
    for row in rows:
        m = row.metrics
        lines.append(
            f"{row.label:<14}{row.style:<8}{m['objects']:>9.3f}{m['counts']:>9.3f}"
            f"{m['positions']:>11.3f}{m['exact']:>8.3f}{m['words']:>8.1f}"
        )
    return "\n".join(lines)
