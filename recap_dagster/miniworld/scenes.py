"""The miniworld's vocabulary and renderer: flat-coloured shapes on a 3x3 grid.

A scene is a light, slightly varied background with 1-4 shapes, each in its own grid
cell. Everything the rest of the project knows about an image's content (captions,
prompts, the evaluator) is expressed in these terms.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

# Saturated, well-separated colours: the evaluator tells them apart by nearest RGB.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (240, 208, 30),
    "purple": (128, 60, 170),
    "orange": (255, 127, 14),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
GRID = 3
ROW_NAMES = ("top", "middle", "bottom")
COL_NAMES = ("left", "center", "right")
MAX_OBJECTS = 4
MAX_PER_KIND = 3
DEFAULT_SIZE = 32


def cell_name(row: int, col: int) -> str:
    """Human name of a grid cell: 'top left', 'center', 'bottom', 'left', ..."""
    if row == 1 and col == 1:
        return "center"
    if row == 1:
        return COL_NAMES[col]
    if col == 1:
        return ROW_NAMES[row]
    return f"{ROW_NAMES[row]} {COL_NAMES[col]}"


CELL_NAMES: dict[str, tuple[int, int]] = {
    cell_name(r, c): (r, c) for r in range(GRID) for c in range(GRID)
}


@dataclass(frozen=True, order=True)
class SceneObject:
    colour: str
    shape: str
    row: int
    col: int

    @property
    def kind(self) -> tuple[str, str]:
        return (self.colour, self.shape)


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int] = (235, 235, 235)

    def kinds(self) -> Counter[tuple[str, str]]:
        """How many objects of each (colour, shape)."""
        return Counter(o.kind for o in self.objects)

    def to_dict(self) -> dict:
        return {
            "objects": [
                {"colour": o.colour, "shape": o.shape, "row": o.row, "col": o.col}
                for o in self.objects
            ],
            "background": list(self.background),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        objects = tuple(
            SceneObject(o["colour"], o["shape"], int(o["row"]), int(o["col"]))
            for o in data["objects"]
        )
        return cls(objects=objects, background=tuple(data.get("background", (235, 235, 235))))


@dataclass(frozen=True)
class Requirement:
    """What a prompt asks for: ``count`` objects of a colour and shape, optionally at a cell."""

    colour: str
    shape: str
    count: int = 1
    cell: tuple[int, int] | None = None

    def to_dict(self) -> dict:
        return {
            "colour": self.colour,
            "shape": self.shape,
            "count": self.count,
            "cell": list(self.cell) if self.cell is not None else None,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Requirement:
        cell = data.get("cell")
        return cls(
            data["colour"],
            data["shape"],
            int(data.get("count", 1)),
            tuple(cell) if cell is not None else None,
        )


@dataclass(frozen=True)
class PromptTruth:
    """A held-out evaluation prompt and what a correct image contains."""

    prompt: str
    category: str  # single_object | two_objects | counting | colours | position
    requirements: tuple[Requirement, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "category": self.category,
            "requirements": [r.to_dict() for r in self.requirements],
        }

    @classmethod
    def from_dict(cls, data: dict) -> PromptTruth:
        return cls(
            data["prompt"],
            data["category"],
            tuple(Requirement.from_dict(r) for r in data["requirements"]),
        )


def sample_background(rng: random.Random) -> tuple[int, int, int]:
    """A light, slightly tinted background colour, far from every shape colour."""
    base = rng.randint(222, 246)
    return tuple(min(255, max(0, base + rng.randint(-8, 8))) for _ in range(3))  # type: ignore[return-value]


def sample_scene(rng: random.Random, max_objects: int = MAX_OBJECTS) -> Scene:
    """A random scene: 1-``max_objects`` shapes, up to 3 of a kind, each in its own cell."""
    total = rng.randint(1, max_objects)
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], total)
    objects: list[SceneObject] = []
    while len(objects) < total:
        kind = (rng.choice(list(COLOURS)), rng.choice(SHAPES))
        already = sum(1 for o in objects if o.kind == kind)
        room = min(MAX_PER_KIND - already, total - len(objects))
        if room <= 0:
            continue
        for _ in range(rng.randint(1, room)):
            row, col = cells[len(objects)]
            objects.append(SceneObject(kind[0], kind[1], row, col))
    return Scene(objects=tuple(sorted(objects)), background=sample_background(rng))


def scene_from_requirements(
    requirements: tuple[Requirement, ...] | list[Requirement], rng: random.Random
) -> Scene:
    """A scene that satisfies ``requirements`` (fixed cells kept, the rest placed at random)."""
    taken = {r.cell for r in requirements if r.cell is not None}
    free = [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in taken]
    rng.shuffle(free)
    objects = []
    for req in requirements:
        for i in range(req.count):
            row, col = req.cell if (req.cell is not None and i == 0) else free.pop()
            objects.append(SceneObject(req.colour, req.shape, row, col))
    return Scene(objects=tuple(sorted(objects)), background=sample_background(rng))


def _shape_box(size: int, row: int, col: int, jitter: tuple[int, int]) -> tuple[int, int, int, int]:
    cell = size / GRID
    # Shapes fill ~70% of a cell, so neighbours never touch and stay separable.
    extent = max(5, int(round(cell * 0.7)))
    x0 = int(round(col * cell + (cell - extent) / 2)) + jitter[0]
    y0 = int(round(row * cell + (cell - extent) / 2)) + jitter[1]
    return x0, y0, x0 + extent - 1, y0 + extent - 1


def render(scene: Scene, size: int = DEFAULT_SIZE, seed: int = 0) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``size`` x ``size`` pixels.

    The background gets a gentle gradient and a little noise (web images are not flat);
    shapes are flat-coloured so their colour is unambiguous.
    """
    rng = np.random.default_rng(seed)
    background = np.array(scene.background, dtype=np.float32)
    ramp = np.linspace(-6, 6, size, dtype=np.float32)
    direction = rng.integers(0, 2)
    gradient = ramp[None, :, None] if direction == 0 else ramp[:, None, None]
    pixels = background[None, None, :] + gradient + rng.normal(0, 2.0, (size, size, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    max_jitter = max(0, int(size / GRID * 0.1))
    for obj in scene.objects:
        jitter = tuple(int(j) for j in rng.integers(-max_jitter, max_jitter + 1, size=2))
        x0, y0, x1, y1 = _shape_box(size, obj.row, obj.col, jitter)  # type: ignore[arg-type]
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}")
    return image
