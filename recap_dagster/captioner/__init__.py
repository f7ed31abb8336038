"""RECAP's captioner (steps 1 and 2): one interface over BLIP, GIT, PaliGemma, Florence-2 and
Qwen-VL chat models, its fine-tune, recaptioning a shard (``recaption``) and caption quality
(``quality``). Plain Python, no Dagster.

``Captioner`` loads any supported checkpoint with ``from_pretrained``, captions batches in a
style selected by a fixed text prefix, and computes the caption-only LM loss that
``fine_tune`` (RECAP step 1) minimises. Small random models of the same architectures,
built offline for tests and for the miniworld, are in
``recap_dagster.miniworld.tiny_captioner``.
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

__all__ = [
    "CAPTIONER_FILE",
    "FAMILIES",
    "STYLE_PREFIXES",
    "CaptionExample",
    "Captioner",
    "Family",
    "FineTuneConfig",
    "fine_tune",
    "sample_batches",
    "swap_left_right",
    "training_examples",
]
