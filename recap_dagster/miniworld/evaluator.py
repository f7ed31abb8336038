"""A deterministic miniworld evaluator: read shapes, colours, counts and cells off an image.

This is the miniworld's analog of GenEval / SOA. It works on clean renders, JPEGs of them
and blurry, noisy samples from small text-to-image models, at any size (typically 32 px):

1. Background: the median of the image border (shapes sit inside their cells, and a
   generated image's border is mostly background even where a shape touches it).
2. Colour: every pixel is *unmixed*. Its deviation from the background is compared with
   the direction background -> palette colour of each palette colour. Blur and JPEG
   fringes are mixtures of a shape colour and the background, so they lie on that line
   with a partial coverage; a pixel belongs to a colour when it is at least half covered
   and its direction is close to that colour's. Fringes therefore keep their hue instead
   of drifting to a neighbouring palette colour (half red on a light background is pink,
   which plain nearest-RGB calls orange), and colours that match no palette direction
   (grey, black, cyan, ...) are ignored. The direction is read from the 3x3 neighbourhood
   (JPEG keeps colour at half resolution), the coverage from the pixel itself.
3. Objects: connected components per colour (8-connected, so thin triangle tips stay
   attached); same-coloured neighbours bridged by a fringe are split at their cores;
   specks below a fraction of the image are dropped.
4. Shape: two moment ratios of the object's soft coverage (see :func:`_classify_shape`),
   vertical skewness for triangles and the normalised cross-cumulant k22 for circle vs
   square. Both are scale-free and degrade gracefully under blur.
5. Cell: the grid cell of the centroid.

Nothing is fitted per image; thresholds are fractions of the image size, coverages or
angles, so the same code serves 32, 48, 64 px and above.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from recap_dagster.evaluation.metrics import summarize
from recap_dagster.miniworld.scenes import (
    COLOURS,
    GRID,
    PromptTruth,
    Scene,
    SceneObject,
)

# Palette order is fixed so that detection is deterministic.
_NAMES: tuple[str, ...] = tuple(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _NAMES], dtype=np.float32)  # (K, 3)

# Opponent colour axes (luma, red-green, yellow-blue). Luma is down-weighted so that a
# pixel's *hue* decides its colour: grey and black differ from the light background mostly
# in luma and must not be read as the darkest palette colour (purple).
_OPPONENT = np.array(
    [
        [1 / math.sqrt(3), 1 / math.sqrt(3), 1 / math.sqrt(3)],
        [1 / math.sqrt(2), -1 / math.sqrt(2), 0.0],
        [1 / math.sqrt(6), 1 / math.sqrt(6), -2 / math.sqrt(6)],
    ],
    dtype=np.float32,
)
LUMA_WEIGHT = 0.5
# A pixel is part of a shape when at least half of it is covered by the shape colour.
MIN_COVERAGE = 0.5
# ...and not implausibly far beyond the palette colour (e.g. black along purple's line).
MAX_COVERAGE = 1.6
# Largest tolerated angle between a pixel's (neighbourhood's) deviation from the background
# and the nearest palette colour's, as a tangent (~21 degrees). The nearest direction
# wins, so this only rejects colours that are none of the palette's: in this space the
# closest palette pair (yellow/orange) is ~22 degrees apart, and grey/black lie >= 33
# degrees from every palette colour.
MAX_OFF_AXIS = 0.38
# Components smaller than this fraction of the image are specks (a rendered shape covers
# ~5% of a 3x3-grid image; 0.6% is ~12% of the smallest shape).
MIN_AREA_FRACTION = 0.006
# Palette colours closer than this (RGB distance) to the background are not looked for.
MIN_CONTRAST = 40.0
MIN_AREA_PIXELS = 4
# Touching shapes are split when their cores (coverage >= CORE_LEVEL x the component's
# peak coverage) are apart and each at least CORE_MIN_FRACTION x the minimum area.
CORE_LEVEL = 0.8
CORE_MIN_FRACTION = 0.5

# Shape thresholds (see _classify_shape): ideal values are triangle skewness -0.57 and
# disk k22 ratio -1/3; blur and JPEG pull both towards 0, so the cuts sit about a quarter
# (skewness) and a third (k22) of the way from the symmetric / square value.
TRIANGLE_MAX_SKEW = -0.15
CIRCLE_MAX_K22 = -0.13


@dataclass(frozen=True)
class Detection:
    """One object found in an image; ``row``/``col`` is the grid cell of its centroid."""

    colour: str
    shape: str
    row: int
    col: int
    area: int  # pixels

    @property
    def kind(self) -> tuple[str, str]:
        return (self.colour, self.shape)


@dataclass
class PromptScore:
    """How well one image matches one prompt's ground truth."""

    object_accuracy: float  # fraction of requirements whose colour+shape is present
    count_error: float  # mean |detected - required| over requirements
    count_correct: bool  # every required kind appears exactly as often as asked
    position_accuracy: float | None  # fraction of placed requirements met; None if unplaced
    all_correct: bool  # everything the prompt asks for holds


@dataclass
class EvaluationSummary:
    """Means over images, overall and per prompt category, plus one row per image."""

    overall: dict[str, float | None]
    per_category: dict[str, dict[str, float | None]]
    rows: list[dict] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.rows)

    def to_dict(self) -> dict:
        return asdict(self)


def _to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """An (H, W, 3) float32 array in 0..255 from a PIL image or an array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    arr = np.asarray(image)
    is_float = np.issubdtype(arr.dtype, np.floating)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W[, 3|4]) image array, got shape {arr.shape}")
    arr = arr[:, :, :3].astype(np.float32)
    # Float images in [0, 1] (e.g. straight out of a model) are rescaled.
    if is_float and arr.size and arr.max() <= 1.0:
        arr = arr * 255.0
    return arr


def _background(pixels: np.ndarray) -> np.ndarray:
    """Median colour of the image's outer border."""
    border = np.concatenate(
        [pixels[0, :], pixels[-1, :], pixels[1:-1, 0], pixels[1:-1, -1]], axis=0
    )
    return np.median(border, axis=0)


def _smooth(dev: np.ndarray) -> np.ndarray:
    """3x3 binomial smoothing of an (H, W, C) array, edges replicated."""
    pad = np.pad(dev, ((1, 1), (1, 1), (0, 0)), mode="edge")
    rows = pad[:-2] + 2 * pad[1:-1] + pad[2:]
    return (rows[:, :-2] + 2 * rows[:, 1:-1] + rows[:, 2:]) / 16.0


def _colour_map(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel palette index (H, W; -1 for background / unknown colours) and per-pixel
    coverage along each palette colour's line (H, W, K).

    *Which* colour is decided from the pixel's 3x3 neighbourhood, *whether* the pixel is
    part of the shape from the pixel alone. JPEG stores colour at half resolution, so a
    shape's edge pixels carry the background's chroma but the shape's luma; averaging
    deviations from the background with background pixels shrinks them but keeps their
    direction, so the neighbourhood still names the right colour.
    """
    h, w, _ = pixels.shape
    bg = _background(pixels)
    dev = pixels - bg  # (H, W, 3)
    axes = _PALETTE - bg  # (K, 3)
    # A palette colour equal to the background (e.g. an all-red image) cannot be seen.
    visible = np.linalg.norm(axes, axis=1) > MIN_CONTRAST
    axes = np.where(visible[:, None], axes, 1.0)
    # Colour choice: angle in opponent space with luma down-weighted (hue decides).
    weights = np.array([LUMA_WEIGHT, 1.0, 1.0], dtype=np.float32)
    transform = (_OPPONENT * weights[:, None]).T
    sdev = (_smooth(dev).reshape(-1, 3) @ transform).astype(np.float32)
    haxes = axes @ transform
    hunit = haxes / np.linalg.norm(haxes, axis=1, keepdims=True)
    proj = sdev @ hunit.T  # (N, K)
    perp_sq = np.maximum((sdev * sdev).sum(axis=1, keepdims=True) - proj * proj, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        # Negative projections point away from the colour entirely.
        off = np.where((proj > 0) & visible, np.sqrt(perp_sq) / proj, np.inf)
    best = np.argmin(off, axis=1)
    idx = np.arange(best.size)
    # Membership: the pixel's own coverage along the chosen colour's line (plain RGB,
    # where luma is sharp even in a JPEG).
    cov_all = (dev.reshape(-1, 3) @ axes.T) / (axes * axes).sum(axis=1)  # (N, K)
    coverage = cov_all[idx, best]
    ok = (off[idx, best] <= MAX_OFF_AXIS) & (coverage >= MIN_COVERAGE) & (coverage <= MAX_COVERAGE)
    return np.where(ok, best, -1).reshape(h, w), cov_all.reshape(h, w, -1)


def _classify_shape(weights: np.ndarray) -> str:
    """Circle, square or triangle from a component's soft coverage (2-D weights).

    Two moment ratios, both independent of size, position and colour strength:

    - vertical skewness: an upward triangle's mass piles up at its base (continuous
      value -0.57; -0.67 for a 7 px render), symmetric shapes have 0. Blur adds to the
      variance but not to the third cumulant, so it dilutes the value without flipping it.
    - k22 / (var_x var_y), the fourth cross-cumulant normalised: 0 for a square (x and y
      independent), -1/3 for a disk (wide rows come with short columns).
    """
    total = weights.sum()
    if total <= 0:
        return "square"
    ys, xs = np.indices(weights.shape, dtype=np.float64)
    p = weights / total
    dy = ys - (p * ys).sum()
    dx = xs - (p * xs).sum()
    var_y = (p * dy * dy).sum()
    var_x = (p * dx * dx).sum()
    if var_y < 1e-6 or var_x < 1e-6:  # a line or a dot: no meaningful shape
        return "square"
    skew = (p * dy**3).sum() / var_y**1.5
    if skew < TRIANGLE_MAX_SKEW:
        return "triangle"
    k22 = (p * dx * dx * dy * dy).sum() - var_x * var_y - 2 * (p * dx * dy).sum() ** 2
    return "circle" if k22 / (var_x * var_y) < CIRCLE_MAX_K22 else "square"


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 binary dilation (a few shifted ORs; much cheaper than ndimage on tiny arrays)."""
    pad = np.pad(mask, 1)
    rows = pad[:-2] | pad[1:-1] | pad[2:]
    return rows[:, :-2] | rows[:, 1:-1] | rows[:, 2:]


def _split_touching(own: np.ndarray, cov: np.ndarray, min_area: float) -> list[np.ndarray]:
    """Split a component that is several same-coloured shapes bridged by fringe pixels.

    Neighbouring shapes can be 1 px apart; blur or JPEG can lift that gap above 50%
    coverage. The shapes' cores (coverage near the component's typical maximum) stay
    apart, so when there are several sizeable cores, every pixel goes to the nearest one.
    """
    if own.sum() < 2 * min_area:  # too small to hold two objects
        return [own]
    core = own & (cov >= max(MIN_COVERAGE, CORE_LEVEL * float(cov[own].max())))
    cores, n = ndimage.label(core)  # 4-connected: a diagonal touch is no bridge
    if n < 2:
        return [own]
    sizes = ndimage.sum_labels(core, cores, index=np.arange(1, n + 1))
    keep = np.flatnonzero(sizes >= CORE_MIN_FRACTION * min_area) + 1
    if keep.size < 2:
        return [own]
    seeds = np.where(np.isin(cores, keep), cores, 0)
    _, (iy, ix) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    nearest = seeds[iy, ix]
    return [own & (nearest == j) for j in keep]


def detect(image: Image.Image | np.ndarray) -> list[Detection]:
    """All palette-coloured shapes in ``image``, sorted by (row, col, colour, shape)."""
    pixels = _to_array(image)
    h, w, _ = pixels.shape
    if h < 3 or w < 3:
        return []
    cmap, coverage = _colour_map(pixels)
    min_area = max(MIN_AREA_PIXELS, MIN_AREA_FRACTION * h * w)
    cell_h, cell_w = h / GRID, w / GRID
    structure = np.ones((3, 3), dtype=bool)
    unclaimed = cmap < 0
    found: list[Detection] = []
    for k in np.unique(cmap):
        if k < 0:
            continue
        labels, _ = ndimage.label(cmap == k, structure=structure)
        soft = np.clip(coverage[:, :, k], 0.0, 1.0)
        for i, box in enumerate(ndimage.find_objects(labels), start=1):
            if box is None:
                continue
            # Work in the bounding box plus a 1 px margin.
            win = tuple(
                slice(max(0, sl.start - 1), min(n, sl.stop + 1))
                for sl, n in zip(box, (h, w), strict=True)
            )
            component = labels[win] == i
            if component.sum() < min_area:
                continue
            for own in _split_touching(component, soft[win], min_area):
                area = int(own.sum())
                if area < min_area:
                    continue
                ys, xs = np.nonzero(own)
                cy = ys.mean() + win[0].start + 0.5  # pixel centres
                cx = xs.mean() + win[1].start + 0.5
                row = min(GRID - 1, int(cy // cell_h))
                col = min(GRID - 1, int(cx // cell_w))
                # Shape from the soft coverage of the object plus a 1 px rim of unclaimed
                # pixels: the rim holds the blur/JPEG fringe, whose partial coverage
                # restores a triangle's thin tip or a square's corners lost to the 50% cut.
                rim = _dilate(own) & unclaimed[win]
                shape = _classify_shape(np.where(own | rim, soft[win], 0.0))
                found.append(Detection(_NAMES[k], shape, row, col, area))
    found.sort(key=lambda d: (d.row, d.col, d.colour, d.shape, -d.area))
    return found


def scene_from_detections(detections: Iterable[Detection]) -> Scene:
    """The detections as a :class:`Scene` (objects sorted), for exact comparison."""
    objects = tuple(sorted(SceneObject(d.colour, d.shape, d.row, d.col) for d in detections))
    return Scene(objects=objects)


def score(detections: Sequence[Detection], truth: PromptTruth) -> PromptScore:
    """Score detections against a prompt's requirements.

    Counts are per (colour, shape): when several requirements name the same kind, the
    detected count is compared with their total. Objects the prompt does not mention are
    ignored (as in GenEval), so extra shapes never cost object or position accuracy.
    """
    reqs = truth.requirements
    if not reqs:
        return PromptScore(1.0, 0.0, True, None, True)
    detected = Counter(d.kind for d in detections)
    required: Counter[tuple[str, str]] = Counter()
    for r in reqs:
        required[(r.colour, r.shape)] += r.count
    present = [detected[(r.colour, r.shape)] > 0 for r in reqs]
    errors = [abs(detected[(r.colour, r.shape)] - required[(r.colour, r.shape)]) for r in reqs]
    placed = [r for r in reqs if r.cell is not None]
    position: float | None = None
    if placed:
        at = {(d.colour, d.shape, d.row, d.col) for d in detections}
        hits = [(r.colour, r.shape, *r.cell) in at for r in placed]  # type: ignore[misc]
        position = sum(hits) / len(placed)
    object_accuracy = sum(present) / len(reqs)
    count_correct = all(e == 0 for e in errors)
    return PromptScore(
        object_accuracy=object_accuracy,
        count_error=sum(errors) / len(reqs),
        count_correct=count_correct,
        position_accuracy=position,
        all_correct=object_accuracy == 1.0 and count_correct and position in (None, 1.0),
    )


def _sign(value: int) -> int:
    return (value > 0) - (value < 0)


def position_reading(detections: Sequence[Detection], truth: PromptTruth) -> dict[str, Any]:
    """The placed requirements read beyond exact cells: the fraction found anywhere
    (``position_found``), the exact-cell accuracy that placement ignoring the text would
    score with the same detections (``position_chance``: the cells a requirement's kind
    occupies, out of ``GRID**2``, since any copy in the stated cell counts as a hit: three
    red circles hit a stated cell 3 times in 9 by luck) and, for two placed objects,
    whether some detected pair stands as the stated cells do, left/right and above/below
    (``relative_position``, GenEval's form). None where nothing is placed."""
    placed = [r for r in truth.requirements if r.cell is not None]
    if not placed:
        return {"position_found": None, "position_chance": None, "relative_position": None}
    cells: dict[tuple[str, str], set[tuple[int, int]]] = {}
    for d in detections:
        cells.setdefault(d.kind, set()).add((d.row, d.col))
    occupied = [len(cells.get((r.colour, r.shape), ())) for r in placed]
    found = sum(n > 0 for n in occupied) / len(placed)
    relative: float | None = None
    if len(placed) == 2:
        a, b = placed
        assert a.cell is not None and b.cell is not None
        want = (_sign(a.cell[0] - b.cell[0]), _sign(a.cell[1] - b.cell[1]))
        relative = float(
            any(
                (_sign(da.row - db.row), _sign(da.col - db.col)) == want
                for da in detections
                if da.kind == (a.colour, a.shape)
                for db in detections
                if db.kind == (b.colour, b.shape)
            )
        )
    return {
        "position_found": found,
        "position_chance": sum(occupied) / len(placed) / GRID**2,
        "relative_position": relative,
    }


def describe(detections: Sequence[Detection]) -> str:
    return "; ".join(f"{d.colour} {d.shape} @({d.row},{d.col})" for d in detections)


def grade_image(image: Image.Image | np.ndarray, truth: PromptTruth) -> dict[str, Any]:
    """One image against its prompt: the core's image metrics and what was detected."""
    detections = detect(image)
    s = score(detections, truth)
    return {
        "object_accuracy": s.object_accuracy,
        "count_error": s.count_error,
        "count_accuracy": float(s.count_correct),
        "position_accuracy": s.position_accuracy,
        "all_correct": float(s.all_correct),
        **position_reading(detections, truth),
        "detected": describe(detections),
    }


def evaluate_images(
    images: Iterable[Image.Image | np.ndarray], truths: Iterable[PromptTruth]
) -> EvaluationSummary:
    """Detect and score each image against its prompt.

    Pairs are taken in order; repeat a truth for several samples of one prompt. Rows are
    plain dicts (prompt, category, the metrics, detected objects) ready for a table.
    """
    image_list, truth_list = list(images), list(truths)
    if len(image_list) != len(truth_list):
        raise ValueError(f"{len(image_list)} images but {len(truth_list)} prompt truths")
    rows = [
        {"prompt": truth.prompt, "category": truth.category, **grade_image(image, truth)}
        for image, truth in zip(image_list, truth_list, strict=True)
    ]
    overall, per_category = summarize(rows)
    return EvaluationSummary(overall=overall, per_category=per_category, rows=rows)
