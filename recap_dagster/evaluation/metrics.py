"""RECAP's evaluation: FID, CLIP score and a world's semantic metrics (no Dagster).

FID uses torchmetrics' ``FrechetInceptionDistance``. The standard Inception-v3 weights
(torch-fidelity's ``pt_inception-2015-12-05``) cannot be downloaded here, so:

- with ``inception_weights`` pointing at that file (and torch-fidelity installed), FID is
  the standard one;
- otherwise the miniworld's offline extractor is used: a fixed, seeded, randomly
  initialised convolutional network (:class:`RandomConvFeatures`). Random-weight CNN
  features are a known stand-in for learnt ones when comparing image distributions (they
  respond to colour, edge and layout statistics, which is what differs between miniworld
  models), need no download, and are identical on every machine. Its values are NOT
  comparable with published FIDs; compare variants with each other only.

Object accuracy (the analog of SOA), counting error and position accuracy come from the
world (:mod:`recap_dagster.evaluation.world`) grading generated images against each prompt's ground
truth; their means, overall and per prompt category, are taken here. A metric no image
could be graded on (no detector configured) is None: "not graded".
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import nn

from recap_dagster.evaluation.world import IMAGE_METRICS, EvalPrompt, World

FID_IMAGE_SIZE = 64  # images are resized to this before feature extraction


def means(rows: Sequence[dict]) -> dict[str, float | None]:
    """Metric means over graded rows (``n`` = row count); each metric over the rows that
    have a value, None when none has (position where nothing is placed; no detector)."""
    out: dict[str, float | None] = {"n": len(rows)}
    for metric in IMAGE_METRICS:
        values = [float(r[metric]) for r in rows if r.get(metric) is not None]
        out[metric] = sum(values) / len(values) if values else None
    found = [float(r["position_accuracy"]) for r in all_placed_found(rows)]
    out["position_given_found"] = sum(found) / len(found) if found else None
    return out


def all_placed_found(rows: Sequence[dict]) -> list[dict]:
    """The rows whose every placed object was found: where placement can be judged (a model
    that cannot draw the object cannot show whether it places it)."""
    return [
        r for r in rows
        if r.get("position_found") == 1.0 and r.get("position_accuracy") is not None
    ]  # fmt: skip


def summarize(rows: Sequence[dict]) -> tuple[dict[str, float | None], dict[str, dict]]:
    """(overall means, means per prompt ``category``) of graded rows."""
    by_category: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_category[row["category"]].append(row)
    return means(rows), {c: means(rs) for c, rs in sorted(by_category.items())}


def grade_generations(
    world: World, images: Sequence[Image.Image], prompts: Sequence[EvalPrompt]
) -> list[dict]:
    """One row per image: its prompt, category and the world's grade."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    grades = world.grade_images(list(images), list(prompts))
    return [
        {"prompt": p.prompt, "category": p.category, **grade}
        for p, grade in zip(prompts, grades, strict=True)
    ]


class RandomConvFeatures(nn.Module):
    """Fixed random CNN features for FID on small images (see module docstring)."""

    num_features = 64

    def __init__(self, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        layers: list[nn.Module] = []
        channels = [3, 32, 64, 64]
        for c_in, c_out in zip(channels, channels[1:], strict=False):
            conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
                conv.weight.mul_(math.sqrt(2.0 / (c_in * 9)))
                conv.bias.zero_()
            layers += [conv, nn.ReLU()]
        self.body = nn.Sequential(*layers)
        projection = torch.randn(64 * 2, self.num_features, generator=generator) / math.sqrt(128)
        self.register_buffer("projection", projection)
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # torchmetrics passes uint8 images (normalize=False) or floats in [0, 1].
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        x = nn.functional.interpolate(x, size=(FID_IMAGE_SIZE, FID_IMAGE_SIZE), mode="bilinear")
        x = self.body(x * 2 - 1)
        pooled = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        return pooled @ self.projection


def _to_uint8(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    arrays = [
        np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))
        for image in images
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def distribution_distances(
    real: Sequence[Image.Image],
    fake: Sequence[Image.Image],
    *,
    inception_weights: str | None = None,
    batch_size: int = 256,
) -> dict[str, float | str]:
    """FID and KID (its mean and its spread over subsets) between two image sets, on the
    same features; ``fid_features`` names the extractor. KID is unbiased at small sample
    sizes, where FID is not: the two side by side show how far FID can be trusted."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if inception_weights:
        fid = FrechetInceptionDistance(
            feature=2048, feature_extractor_weights_path=inception_weights
        )
        size, extractor = 299, "inception-v3 (torch-fidelity weights)"
        features: nn.Module = fid.inception
    else:
        features = RandomConvFeatures()
        fid = FrechetInceptionDistance(feature=features)
        size, extractor = FID_IMAGE_SIZE, "miniworld random-conv-64"
    subset = max(2, min(len(real), len(fake), 1000))
    kid = KernelInceptionDistance(feature=features, subsets=100, subset_size=subset)
    for images, is_real in ((real, True), (fake, False)):
        for start in range(0, len(images), batch_size):
            batch = _to_uint8(images[start : start + batch_size], size)
            fid.update(batch, real=is_real)
            kid.update(batch, real=is_real)
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std),
            "fid_features": extractor}  # fmt: skip


def as_jpeg(images: Sequence[Image.Image], quality: int) -> list[Image.Image]:
    """``images`` encoded as JPEG at ``quality`` and decoded again, so generated images
    carry the same compression as the real ones they are compared with (0: unchanged)."""
    if quality <= 0:
        return list(images)
    out = []
    for image in images:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            out.append(decoded.convert("RGB"))
    return out


def clip_score(
    clip_model: str,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    *,
    device: str | torch.device | None = None,
) -> float:
    """Mean CLIP score of (image, prompt) pairs (:mod:`recap_dagster.evaluation.agreement`,
    the definition of torchmetrics' CLIPScore) with a CLIP model from a local directory or
    hub id."""
    from recap_dagster.evaluation.agreement import ClipScorer

    scores = ClipScorer(clip_model, device=device).score_pairs(images, prompts)
    return sum(scores) / len(scores) if scores else float("nan")


@dataclass
class MetricReport:
    """Metrics of one checkpoint: overall, per prompt category, per prompt."""

    overall: dict
    per_category: dict[str, dict]
    rows: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"overall": self.overall, "per_category": self.per_category}


def evaluate_generations(
    images: Sequence[Image.Image],
    prompts: Sequence[EvalPrompt],
    reference: Sequence[Image.Image],
    *,
    world: World,
    inception_weights: str | None = None,
    clip_model: str | None = None,
    device: str | torch.device | None = None,
) -> MetricReport:
    """The paper's metrics for images generated from ``prompts``, graded by ``world``."""
    rows = grade_generations(world, images, prompts)
    overall, per_category = summarize(rows)
    overall.update(distribution_distances(reference, images, inception_weights=inception_weights))
    if clip_model:
        overall["clip_score"] = clip_score(
            clip_model, images, [p.prompt for p in prompts], device=device
        )
    return MetricReport(overall=overall, per_category=per_category, rows=rows)
