"""GenEval-style evaluation on real prompts: the production world
(:class:`~recap_dagster.evaluation.world.World`).

Prompts come from GenEval's ``evaluation_metadata.jsonl``: one JSON object per line with
``prompt``, ``tag`` (single_object, two_object, counting, colors, position, color_attr),
``include`` (``{"class", "count", optional "color", optional "position": [relation, index
of another include]}``) and optional ``exclude`` (``{"class", "count"}``: fewer than
``count`` of that class may appear; GenEval's way of asking for exact counts).

Images are graded with an open-vocabulary detector (transformers' OWL-ViT, loaded with
``from_pretrained`` from a local directory) queried with the prompt's class names, and
GenEval's rules (:func:`grade_detections`): an include holds when at least ``count`` boxes
of its class score above the threshold (after non-maximum suppression); a position holds
when every counted box stands in the relation to every box of the other include, judged
from box centres as GenEval does (:func:`relative_position`). Colours are not scored
(GenEval crops each box and asks CLIP; here they are left out of ``all_correct``). With no
detector configured every image metric is None: "not graded". Captions have no ground
truth on real data: their grades are None too.

Plain Python, no Dagster.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from recap_dagster.evaluation.world import EvalPrompt, ungraded_caption, ungraded_image

#: GenEval's margin: centres must be apart by more than this fraction of the boxes' sizes.
POSITION_THRESHOLD = 0.1
RELATIONS = ("left of", "right of", "above", "below")
NMS_IOU = 0.5
MAX_OBJECTS = 16


@dataclass(frozen=True)
class Box:
    """A detected object: ``(x0, y0, x1, y1)`` in pixels and its score."""

    label: str
    score: float
    xyxy: tuple[float, float, float, float]


def read_geneval_prompts(path: str) -> list[EvalPrompt]:
    """GenEval's ``evaluation_metadata.jsonl``: category = ``tag``, truth = the whole row
    without the prompt (``include``, ``exclude``, ...)."""
    prompts = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "prompt" not in row or "include" not in row:
                raise ValueError(f"{path}:{number}: a GenEval row needs 'prompt' and 'include'")
            truth = {k: v for k, v in row.items() if k not in ("prompt", "tag")}
            prompts.append(EvalPrompt(row["prompt"], row.get("tag", "unknown"), truth))
    return prompts


def query_classes(truth: dict[str, Any]) -> list[str]:
    """The class names a prompt's truth asks the detector about, in first-mention order."""
    names = [r["class"] for r in truth.get("include", [])]
    names += [r["class"] for r in truth.get("exclude", [])]
    return list(dict.fromkeys(names))


def relative_position(a: Box, b: Box) -> set[str]:
    """GenEval's relations of box ``a`` to box ``b`` (image coordinates, y down)."""
    boxes = np.array([a.xyxy, b.xyxy], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (dim_a + dim_b), 0)
    revised = revised * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def non_max_suppression(boxes: Sequence[Box], iou: float = NMS_IOU) -> list[Box]:
    """Per label, the highest-scoring boxes that overlap no kept box by more than ``iou``."""
    kept: list[Box] = []
    for box in sorted(boxes, key=lambda b: -b.score):
        if all(k.label != box.label or _iou(k.xyxy, box.xyxy) <= iou for k in kept):
            kept.append(box)
    return kept[:MAX_OBJECTS] if len(kept) > MAX_OBJECTS else kept


def grade_detections(boxes: Sequence[Box], truth: dict[str, Any]) -> dict[str, Any]:
    """GenEval's rules on a prompt's detections (already thresholded and suppressed).

    ``object_accuracy``: fraction of includes with any box of their class;
    ``count_error``: mean |boxes - count| over includes; ``count_accuracy``: every include
    has at least ``count`` boxes and no exclude is reached; ``position_accuracy``: fraction
    of positioned includes whose boxes stand in the relation (None when none is
    positioned; ``relative_position`` too), ``position_found``: of those whose boxes were
    all found; ``all_correct``: GenEval's verdict without colours.
    """
    by_class: dict[str, list[Box]] = {}
    for box in sorted(boxes, key=lambda b: -b.score):
        by_class.setdefault(box.label, []).append(box)
    includes = truth.get("include", [])
    present, errors, counts_ok, positions, found_both = [], [], [], [], []
    matched: list[list[Box] | None] = []
    for req in includes:
        found = by_class.get(req["class"], [])
        need = int(req.get("count", 1))
        present.append(bool(found))
        errors.append(abs(len(found) - need))
        enough = len(found) >= need
        counts_ok.append(enough)
        counted = found[:need]
        ok = enough
        if "position" in req:
            relation, other = req["position"][0], int(req["position"][1])
            target = matched[other] if 0 <= other < len(matched) else None
            placed = (
                enough
                and target is not None
                and all(relation in relative_position(o, t) for o in counted for t in target)
            )
            positions.append(placed)
            found_both.append(enough and target is not None)
            ok = ok and placed
        matched.append(counted if ok else None)
    excluded = any(
        len(by_class.get(r["class"], [])) >= int(r["count"]) for r in truth.get("exclude", [])
    )
    count_accuracy = all(counts_ok) and not excluded
    position = sum(positions) / len(positions) if positions else None
    n = max(1, len(includes))
    return {
        "object_accuracy": sum(present) / n if includes else 1.0,
        "count_error": sum(errors) / n,
        "count_accuracy": float(count_accuracy),
        "position_accuracy": position,
        "all_correct": float(count_accuracy and all(positions)),
        # GenEval's positions are already relations; their chance level depends on the
        # detector's boxes, so it is not claimed.
        "position_found": sum(found_both) / len(found_both) if found_both else None,
        "position_chance": None,
        "relative_position": position,
        "detected": _describe(by_class),
    }


def _describe(by_class: dict[str, list[Box]]) -> str:
    return "; ".join(f"{name} x{len(found)}" for name, found in sorted(by_class.items()))


class OwlViTDetector:
    """OWL-ViT queried with class names ("a photo of a dog"), boxes above a threshold."""

    def __init__(self, directory: str, *, score_threshold: float = 0.3, device: str = "cpu"):
        import torch
        from transformers import OwlViTForObjectDetection, OwlViTProcessor

        self.torch = torch
        self.device = device
        self.score_threshold = score_threshold
        self.processor = OwlViTProcessor.from_pretrained(directory)
        self.model = OwlViTForObjectDetection.from_pretrained(directory).to(device).eval()

    def detect(
        self, images: Sequence[Image.Image], queries: Sequence[Sequence[str]], batch_size: int = 8
    ) -> list[list[Box]]:
        """Boxes per image for its own class names (after non-maximum suppression)."""
        out: list[list[Box]] = []
        for start in range(0, len(images), batch_size):
            batch = [i.convert("RGB") for i in images[start : start + batch_size]]
            names = [list(q) or ["object"] for q in queries[start : start + batch_size]]
            texts = [[f"a photo of a {n}" for n in q] for q in names]
            inputs = self.processor(text=texts, images=batch, return_tensors="pt").to(self.device)
            with self.torch.no_grad():
                outputs = self.model(**inputs)
            sizes = self.torch.tensor([(i.height, i.width) for i in batch], device=self.device)
            results = self.processor.post_process_grounded_object_detection(
                outputs, threshold=self.score_threshold, target_sizes=sizes
            )
            for q, result in zip(names, results, strict=True):
                boxes = [
                    Box(q[int(label)], float(score), tuple(float(v) for v in xyxy))  # type: ignore[arg-type]
                    for score, label, xyxy in zip(
                        result["scores"], result["labels"], result["boxes"], strict=True
                    )
                    if int(label) < len(q)  # padded queries of shorter prompts
                ]
                out.append(non_max_suppression(boxes))
        return out


class GenEvalWorld:
    """Real prompts in GenEval's format; images graded by a detector when one is given."""

    name = "geneval"

    def __init__(
        self, detector: str | None = None, *, score_threshold: float = 0.3, device: str = "cpu"
    ):
        self.detector_dir = detector
        self.score_threshold = score_threshold
        self.device = device
        self._detector: OwlViTDetector | None = None

    def read_eval_prompts(self, path: str) -> list[EvalPrompt]:
        return read_geneval_prompts(path)

    def detector(self) -> OwlViTDetector | None:
        if self.detector_dir and self._detector is None:
            self._detector = OwlViTDetector(
                self.detector_dir, score_threshold=self.score_threshold, device=self.device
            )
        return self._detector

    def grade_images(
        self, images: Sequence[Image.Image], prompts: Sequence[EvalPrompt]
    ) -> list[dict[str, Any]]:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        detector = self.detector()
        if detector is None:
            return [ungraded_image() for _ in prompts]
        found = detector.detect(images, [query_classes(p.truth) for p in prompts])
        return [grade_detections(b, p.truth) for b, p in zip(found, prompts, strict=True)]

    def grade_captions(
        self, captions: Sequence[str], truths: Sequence[dict[str, Any] | None]
    ) -> list[dict[str, Any]]:
        return [ungraded_caption() for _ in captions]
