"""The base captioner's pretraining tasks: what the miniworld's analog of PaLI learns from.

RECAP fine-tunes a *web-pretrained* captioner (PaLI) whose "outputs are relatively terse and
lack in detail". PaLI is not a captioner only: its pretraining mixes captioning with
OCR, VQA and object detection/grounding, and its language model has read far more text
than captions, so it *knows* where things are and how to say it even though its captions
do not. That knowledge is what lets RECAP's 100 human captions teach detailed captions. The
analog pretrains on four tasks, each under its own prompt (:data:`PRETRAIN_PREFIXES`,
:data:`TEXT_PROMPT`):

- ``"caption:"`` -> the terse web-style caption of the pretraining set (kinds only, no
  counts, no positions: "red circle and blue square");
- ``"detect:"`` -> every object with its grid cell, grouped by kind (:func:`detection_text`:
  "two red circles in the top left and at the bottom; a blue square in the center"), the
  analog of PaLI's detection/grounding output;
- VQA-style questions (:func:`vqa_pair`: "how many red circles?", "what is in the top
  left?");
- ``"text:"`` -> sentences of the miniworld's language about *other* random scenes, with a
  blank image (:func:`text_sample`): text-only language modelling, the analog of the text
  PaLI's language model was trained on. It teaches the words and sentence shapes, never
  which image they fit.

None of them is a RECAP style: the prefixes RECAP uses later ("describe briefly:",
"describe in detail:", :data:`~recap_dagster.captioner.STYLE_PREFIXES`) never appear in
pretraining. Without the grounding task, 100 captions are far too few to learn counts and
positions from scratch; without the text task the fine-tune must learn the language too
(measured: README, "The miniworld's base captioner").
"""

from __future__ import annotations

import io
import json
import os
import random
from dataclasses import dataclass

from PIL import Image

from recap_dagster.captioner.model import STYLE_PREFIXES
from recap_dagster.miniworld.captions import (
    CANONICAL_POSITIONS,
    PLURALS,
    POSITION_PHRASES,
    long_caption,
    short_caption,
)
from recap_dagster.miniworld.scenes import COLOURS, GRID, SHAPES, Scene, cell_name, sample_scene

#: The pretraining tasks and their prefixes; disjoint from the RECAP style prefixes.
PRETRAIN_PREFIXES: dict[str, str] = {"caption": "caption:", "detect": "detect:"}
#: The prompt of the text-only examples (sentences without their image).
TEXT_PROMPT = "text:"
assert not {*PRETRAIN_PREFIXES.values(), TEXT_PROMPT} & set(STYLE_PREFIXES.values())

DETECT_FORMATS = ("words", "grouped", "objects", "canonical")


def detection_text(scene: Scene, fmt: str = "words") -> str:
    """The ``detect:`` target: every object's kind and cell, kinds in the order of their
    first object in reading order (row, then column).

    - ``"words"``: one entry per kind, count (as a word) first, then its cells:
      'two red circles: top left, bottom; one blue square: center';
    - ``"grouped"``: the same with digits and singular nouns: '2 red circle: top left, ...';
    - ``"objects"``: one entry per object: 'red circle top left; red circle bottom; ...';
    - ``"canonical"``: plain phrases: 'two red circles in the top left and at the bottom;
      a blue square in the center'.
    """
    groups = _cells_by_kind(scene)
    if fmt == "objects":
        return "; ".join(
            f"{c} {s} {cell_name(*cell)}" for (c, s), cells in groups.items() for cell in cells
        )
    entries = []
    for (colour, shape), cells in groups.items():
        n = len(cells)
        if fmt == "grouped":
            entries.append(f"{n} {colour} {shape}: " + ", ".join(cell_name(*c) for c in cells))
        elif fmt == "words":
            head = f"{NUMBER_WORDS[n]} {colour} {_noun(shape, n)}"
            entries.append(f"{head}: " + ", ".join(cell_name(*c) for c in cells))
        elif fmt == "canonical":
            places = " and ".join(CANONICAL_POSITIONS[c] for c in cells)
            entries.append(f"{_count_phrase(colour, shape, n)} {places}")
        else:
            raise ValueError(f"unknown detection format {fmt!r}; known: {DETECT_FORMATS}")
    return "; ".join(entries)


NUMBER_WORDS = {0: "none", 1: "one", 2: "two", 3: "three", 4: "four"}
VQA_KINDS = ("count", "where", "what")


def _noun(shape: str, count: int) -> str:
    return shape if count == 1 else PLURALS[shape]


def _count_phrase(colour: str, shape: str, count: int) -> str:
    """'a red circle', 'an orange square', 'two red circles'."""
    if count == 1:
        return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"
    return f"{NUMBER_WORDS[count]} {colour} {PLURALS[shape]}"


def _cells_by_kind(scene: Scene) -> dict[tuple[str, str], list[tuple[int, int]]]:
    cells: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for obj in sorted(scene.objects, key=lambda o: (o.row, o.col)):
        cells.setdefault(obj.kind, []).append((obj.row, obj.col))
    return cells


def text_sample(rng: random.Random) -> str:
    """A sentence of the miniworld's language about a random scene, with no image: the
    text-only part of the mixture (PaLI's language model learnt from text alone)."""
    scene = sample_scene(rng)
    return long_caption(scene, rng) if rng.random() < 0.7 else short_caption(scene, rng)


def vqa_pair(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """A (question, answer) pair about ``scene``, VQA-style (PaLI's mixture has VQA).

    Answers are short and in people's words, the grounding the captions will need:
    'how many red circles?' -> 'two' (or 'none'); 'where are the red circles?' ->
    'in the top left corner and at the bottom'; 'what is in the center?' -> 'a blue
    square' (or 'nothing'). Never a whole description.
    """
    kinds = scene.kinds()
    question = rng.choice(VQA_KINDS)
    if question == "count":
        if rng.random() < 0.25:
            colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        else:
            colour, shape = rng.choice(sorted(kinds))
        return f"how many {colour} {PLURALS[shape]}?", NUMBER_WORDS[kinds[(colour, shape)]]
    if question == "where":
        colour, shape = rng.choice(sorted(kinds))
        cells = [(o.row, o.col) for o in sorted(scene.objects) if o.kind == (colour, shape)]
        subject = f"is the {colour} {shape}" if len(cells) == 1 else f"are the {colour} "
        subject += "" if len(cells) == 1 else PLURALS[shape]
        phrases = [rng.choice(POSITION_PHRASES[cell]) for cell in cells]
        return f"where {subject}?", " and ".join(phrases)
    row, col = rng.randrange(GRID), rng.randrange(GRID)
    found = [o for o in scene.objects if (o.row, o.col) == (row, col)]
    where = rng.choice(POSITION_PHRASES[(row, col)])
    if not found:
        return f"what is {where}?", "nothing"
    colour, shape = found[0].kind
    article = "an" if colour[0] in "aeiou" else "a"
    return f"what is {where}?", f"{article} {colour} {shape}"


@dataclass
class PretrainItem:
    """One pretraining image with its two task targets."""

    key: str
    image: Image.Image
    caption: str
    detection: str
    scene: Scene

    def target(self, style: str) -> str:
        return self.detection if style == "detect" else self.caption


def _open_rgb(data: bytes | str | os.PathLike[str]) -> Image.Image:
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    with Image.open(source) as image:
        return image.convert("RGB")


def load_pretrain(
    path: str | os.PathLike[str], limit: int | None = None, detect_format: str = "grouped"
) -> list[PretrainItem]:
    """The pretraining parquet as items (first ``limit`` rows)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if limit is not None:
        table = table.slice(0, limit)
    items = []
    for row in table.to_pylist():
        scene = Scene.from_dict(json.loads(row["scene"]))
        items.append(
            PretrainItem(
                key=row["key"],
                image=_open_rgb(row["image"]),
                caption=row["caption"],
                detection=detection_text(scene, detect_format),
                scene=scene,
            )
        )
    return items
