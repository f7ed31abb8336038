"""Caption quality against ground truth: objects, counts and positions graded by a world.

Compares captioners (the base and the fine-tuned one, in each style) on human-captioned
images whose ground truth is known (the miniworld's held-out set carries scenes); the world
(:mod:`recap_dagster.evaluation.world`) grades each caption against it, the means are taken
here. Used by the ``captioner_checkpoint`` asset, the base captioner's build and the quality
benchmark.
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
from recap_dagster.corpus.decoding import decode_image
from recap_dagster.corpus.human_captions import load_human_captions
from recap_dagster.evaluation.plots import markdown_image, markdown_table, png_of
from recap_dagster.evaluation.world import CAPTION_METRICS, World

GRADE_KEYS = ("objects", "counts", "positions", "counts_exact", "exact", "hallucinated")
#: Enough new tokens for the longest long caption (64 CLIP pre-tokens, a little more here).
MAX_NEW_TOKENS = {"short": 40, "long": 80}


@dataclass
class CaptionedImage:
    """A human-captioned image with its ground truth (world-specific, e.g. a scene dict)."""

    key: str
    image: Image.Image
    short: str
    long: str
    truth: dict[str, Any]

    def to_example(self) -> CaptionExample:
        return CaptionExample(key=self.key, image=self.image, short=self.short, long=self.long)


def load_captioned(path: str | Path) -> list[CaptionedImage]:
    """The rows of a human-caption JSONL file that have a decodable image and ground truth
    (its ``scene`` field).

    Rows without one (real data) or with a broken image are left out: they cannot be
    graded. The file's own problems raise
    :class:`~recap_dagster.corpus.human_captions.HumanCaptionsError`.
    """
    table = load_human_captions(path)
    examples = []
    for row in table.to_pylist():
        decoded = decode_image(row["image"])
        if decoded.image is None or not row["scene"]:
            continue
        truth = json.loads(row["scene"])
        examples.append(CaptionedImage(row["key"], decoded.image, row["short"], row["long"], truth))
    return examples


def evaluate_captioner(
    captioner: Any,
    examples: Sequence[Any],
    *,
    world: World,
    styles: Sequence[str] = ("short", "long"),
    batch_size: int = 64,
    max_new_tokens: int | Mapping[str, int] = MAX_NEW_TOKENS,
    samples: int = 3,
) -> dict[str, dict[str, Any]]:
    """Caption ``examples`` in each style and have ``world`` grade the captions.

    ``examples`` have ``image`` and ``truth`` (e.g. :class:`CaptionedImage`) or are
    ``(image, truth)`` pairs; ``max_new_tokens`` is one limit or one per style. Returns
    ``{style: metrics}``: the means of the world's caption grades
    (:data:`~recap_dagster.evaluation.world.CAPTION_METRICS`: :data:`GRADE_KEYS` and
    ``states_positions``, the fraction of captions naming any position; None where the
    world could not grade), plus ``words`` (mean caption length), ``captions_per_s``, ``n``
    and the first ``samples`` captions.
    """
    pairs = [_image_and_truth(e) for e in examples]
    images = [image for image, _ in pairs]
    truths = [truth for _, truth in pairs]
    results: dict[str, dict[str, Any]] = {}
    for style in styles:
        limit = max_new_tokens if isinstance(max_new_tokens, int) else max_new_tokens.get(style, 80)
        start = time.perf_counter()
        captions = captioner.caption(images, style, max_new_tokens=limit, batch_size=batch_size)
        seconds = time.perf_counter() - start
        grades = world.grade_captions(captions, truths)
        n = max(1, len(grades))
        metrics: dict[str, Any] = {k: _mean(g.get(k) for g in grades) for k in CAPTION_METRICS}
        metrics["words"] = sum(len(c.split()) for c in captions) / n
        metrics["captions_per_s"] = len(grades) / seconds if seconds > 0 else float("inf")
        metrics["n"] = len(grades)
        metrics["samples"] = captions[:samples]
        results[style] = metrics
    return results


def _mean(values: Any) -> float | None:
    """Mean of the values that are not None (None when all are: not graded)."""
    graded = [float(v) for v in values if v is not None]
    return sum(graded) / len(graded) if graded else None


def _image_and_truth(example: Any) -> tuple[Image.Image, Any]:
    return example if isinstance(example, tuple) else (example.image, example.truth)


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
        cells = [_cell(m.get(k), w) for k, w in (("objects", 9), ("counts", 9),
                                                ("positions", 11), ("exact", 8))]  # fmt: skip
        lines.append(f"{row.label:<14}{row.style:<8}{''.join(cells)}{m['words']:>8.1f}")
    return "\n".join(lines)


def _cell(value: float | None, width: int) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:>{width}.3f}"


def quality_table(before: dict, after: dict) -> str:
    """Markdown: per style and metric, the base's and the fine-tuned captioner's means."""
    rows: list[list[Any]] = []
    for style in ("short", "long"):
        for metric in ("objects", "counts", "positions", "exact"):
            b, a = before[style][metric], after[style][metric]
            if a is None or b is None:
                rows.append([style, metric, "not graded", "not graded", "-"])
            else:
                rows.append([style, metric, b, a, a - b])
    return markdown_table(["style", "metric", "base", "fine-tuned", "delta"], rows)


def sample_table(captioner: Any, examples: Sequence[CaptionedImage], max_new_tokens: int) -> str:
    """Markdown: each example's image with the captioner's short and long caption."""
    images = [e.image for e in examples]
    shorts = captioner.caption(images, "short", max_new_tokens=max_new_tokens)
    longs = captioner.caption(images, "long", max_new_tokens=max_new_tokens)
    return markdown_table(
        ["image", "short", "long"],
        [
            [markdown_image(png_of(e.image, 64), e.key), short, long]
            for e, short, long in zip(examples, shorts, longs, strict=True)
        ],
    )
