"""Speed and accuracy of the miniworld evaluator.

Run: ``python benchmarks/evaluator.py [--scenes 2000]``. Prints images/s of ``detect`` on
32 px scenes and the exact scene read-back rate (colour, shape and cell of every object)
on clean renders, JPEG round-trips, blurred+noisy images and larger sizes, plus matched
vs mismatched prompt scores.
"""

from __future__ import annotations

import argparse
import io
import random
import time
from collections import Counter
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter

from recap_dagster.miniworld.evaluator import detect, evaluate_images, scene_from_detections
from recap_dagster.miniworld.scenes import (
    COLOURS,
    SHAPES,
    PromptTruth,
    Requirement,
    Scene,
    render,
    sample_scene,
    scene_from_requirements,
)


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def degrade(image: Image.Image, seed: int, radius: float = 0.7, sigma: float = 8.0) -> Image.Image:
    arr = np.asarray(image.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)
    arr = arr + np.random.default_rng(seed).normal(0.0, sigma, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))


Variant = Callable[[Image.Image, int], Image.Image]
VARIANTS: dict[str, Variant] = {
    "clean": lambda im, i: im,
    "jpeg95": lambda im, i: jpeg(im, 95),
    "jpeg85": lambda im, i: jpeg(im, 85),
    "jpeg75": lambda im, i: jpeg(im, 75),
    "blur0.7+noise8": degrade,
    "blur1.0+noise12": lambda im, i: degrade(im, i, 1.0, 12.0),
    "blur1.3+noise8": lambda im, i: degrade(im, i, 1.3, 8.0),
}


def exact_rate(scenes: list[Scene], images: list[Image.Image]) -> tuple[float, float]:
    """(exact read-back rate, images/s of detect)."""
    start = time.perf_counter()
    detections = [detect(im) for im in images]
    speed = len(images) / (time.perf_counter() - start)
    hits = sum(
        Counter(scene_from_detections(d).objects) == Counter(s.objects)
        for s, d in zip(scenes, detections, strict=True)
    )
    return hits / len(scenes), speed


def prompt_scores(n: int) -> None:
    """Matched vs mismatched image/prompt pairs (two-object prompts with positions)."""
    rng = random.Random(1)
    kinds = [(c, s) for c in COLOURS for s in SHAPES]
    truths = []
    for _ in range(n):
        (a, b), cells = (
            rng.sample(kinds, 2),
            rng.sample([(r, c) for r in range(3) for c in range(3)], 2),
        )
        reqs = (Requirement(*a, cell=cells[0]), Requirement(*b, count=rng.randint(1, 2)))
        truths.append(PromptTruth(f"{' '.join(a)} and {' '.join(b)}", "mixed", reqs))
    images = [
        render(scene_from_requirements(t.requirements, rng), 32, seed=i)
        for i, t in enumerate(truths)
    ]
    for name, pairs in (("matched", truths), ("mismatched", truths[1:] + truths[:1])):
        o = evaluate_images(images, pairs).overall
        print(
            f"  {name:10s} object {o['object_accuracy']:.3f}  count error {o['count_error']:.3f}"
            f"  count acc {o['count_accuracy']:.3f}  position {o['position_accuracy']:.3f}"
            f"  all correct {o['all_correct']:.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=2000)
    args = parser.parse_args()
    rng = random.Random(0)
    scenes = [sample_scene(rng) for _ in range(args.scenes)]

    print(f"exact scene read-back over {len(scenes)} random scenes (and detect speed):")
    for size in (32, 48, 64):
        renders = [render(s, size=size, seed=i) for i, s in enumerate(scenes)]
        for name, variant in VARIANTS.items():
            if size != 32 and name not in ("clean", "jpeg85", "blur0.7+noise8"):
                continue
            images = [variant(im, i) for i, im in enumerate(renders)]
            rate, speed = exact_rate(scenes, images)
            print(f"  {size:3d} px {name:16s} {rate:.4f}   {speed:6.0f} images/s")
    print("prompt scores (500 prompts, 32 px):")
    prompt_scores(500)


if __name__ == "__main__":
    main()
