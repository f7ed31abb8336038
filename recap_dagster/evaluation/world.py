"""The world behind the evaluation: prompts with their ground truth, image and caption grading.

A *world* knows what a correct image for an evaluation prompt contains and what a correct
caption of an image says. The core (metrics, report, captioner quality, the assets) only
sees this interface; the miniworld (``recap_dagster.miniworld.world``) and GenEval-style
real prompts (``recap_dagster.evaluation.geneval``) implement it. Plain Python, no Dagster.

Grades are plain dicts, one per image or caption, with the keys below. A value is ``None``
where the world cannot grade it (no detector, no scene truth, no placement asked for);
the core averages over the values that are not ``None`` and reports "not graded" when there
are none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from PIL import Image

#: Per-image grade keys (all floats in [0, 1] except ``count_error``, a mean |error|).
IMAGE_METRICS = (
    "object_accuracy",  # fraction of the required objects present
    "count_error",  # mean |detected - required| count over the required objects
    "count_accuracy",  # 1.0 when every required count is exact
    "position_accuracy",  # fraction of required placements met; None when none asked for
    "all_correct",  # 1.0 when everything the prompt asks for holds
    # Position, read three more ways: how many placed objects were found at all, what
    # position accuracy placement that ignores the text would score (the chance level given
    # what was drawn; None where the world cannot say), and GenEval's relation form ("A left
    # of B": the placed objects stand as the prompt's positions do; None unless two placed).
    "position_found",
    "position_chance",
    "relative_position",
)
#: Per-caption grade keys (means of these are the captioner's quality).
CAPTION_METRICS = (
    "objects",  # stated vs true kinds (Jaccard)
    "counts",  # kinds stated with the right count
    "positions",  # placements stated right
    "counts_exact",  # kinds and counts all right
    "exact",  # ... and positions too
    "hallucinated",  # kinds stated that are not there
    "states_positions",  # the caption names any position
)


@dataclass(frozen=True)
class EvalPrompt:
    """A held-out evaluation prompt and its world-specific ground truth.

    ``truth`` is JSON-able and opaque to the core: only the world that read the prompt
    interprets it (a miniworld's requirements, GenEval's ``include``/``exclude``).
    """

    prompt: str
    category: str
    truth: dict[str, Any] = field(default_factory=dict)


def ungraded_image(detected: str = "") -> dict[str, Any]:
    """The grade of an image a world cannot read (every metric None)."""
    return {**dict.fromkeys(IMAGE_METRICS), "detected": detected}


def ungraded_caption() -> dict[str, Any]:
    """The grade of a caption without ground truth (every metric None)."""
    return dict.fromkeys(CAPTION_METRICS)


@runtime_checkable
class World(Protocol):
    """Evaluation prompts with ground truth, image grading and caption grading."""

    name: str

    def read_eval_prompts(self, path: str) -> list[EvalPrompt]:
        """The evaluation prompts of a prompt file, in file order."""
        ...

    def grade_images(
        self, images: Sequence[Image.Image], prompts: Sequence[EvalPrompt]
    ) -> list[dict[str, Any]]:
        """One grade per (image, prompt) pair: :data:`IMAGE_METRICS` plus ``detected``
        (what the world read off the image, as text)."""
        ...

    def grade_captions(
        self, captions: Sequence[str], truths: Sequence[dict[str, Any] | None]
    ) -> list[dict[str, Any]]:
        """One grade per (caption, truth) pair: :data:`CAPTION_METRICS`."""
        ...
