"""RECAP's captioner: one interface over BLIP, GIT, PaliGemma, Florence-2 (plain Python).

``Captioner`` loads any supported checkpoint with ``from_pretrained``, captions batches in a
style selected by a fixed text prefix, and computes the caption-only LM loss that
``fine_tune`` (RECAP step 1) minimises. ``build_tiny_captioner`` makes small random models of
the same architectures offline, for tests and for the miniworld.
"""

from recap_dagster.captioner.families import FAMILIES, Family
from recap_dagster.captioner.finetune import (
    CaptionExample,
    FineTuneConfig,
    fine_tune,
    sample_batches,
    swap_left_right,
    training_examples,
)
from recap_dagster.captioner.model import CAPTIONER_FILE, STYLE_PREFIXES, Captioner
from recap_dagster.captioner.tiny import (
    DEFAULT_WORDS,
    build_tiny_captioner,
    build_tiny_model,
    build_tiny_processor,
)

__all__ = [
    "CAPTIONER_FILE",
    "DEFAULT_WORDS",
    "FAMILIES",
    "STYLE_PREFIXES",
    "CaptionExample",
    "Captioner",
    "Family",
    "FineTuneConfig",
    "build_tiny_captioner",
    "build_tiny_model",
    "build_tiny_processor",
    "fine_tune",
    "sample_batches",
    "swap_left_right",
    "training_examples",
]
