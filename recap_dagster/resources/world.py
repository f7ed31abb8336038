"""The world the evaluation grades against: prompts with ground truth, image and caption
grading (:mod:`recap_dagster.evaluation.world`)."""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from recap_dagster.evaluation.world import World


class WorldResource(dg.ConfigurableResource):
    """Base of the world resources (resource key ``world``): ``get()`` returns the
    :class:`~recap_dagster.evaluation.world.World` the evaluation assets use."""

    def get(self) -> World:
        raise NotImplementedError(f"{type(self).__name__} does not provide a world")


class GenEvalWorldResource(WorldResource):
    """Real data: GenEval-style prompts (``evaluation_metadata.jsonl``), images graded by an
    open-vocabulary detector (OWL-ViT) when one is configured, captions not graded."""

    detector: str = Field(
        default="",
        description="Local directory of an OWL-ViT detector (transformers "
        "OwlViTForObjectDetection + OwlViTProcessor, save_pretrained layout); empty: images "
        "are not graded (the reports say so) and only FID / CLIP score are computed.",
    )
    score_threshold: float = Field(
        default=0.3, description="Detector score a box needs to count as an object."
    )
    device: str = Field(default="cpu", description="Device the detector runs on (cpu, cuda).")

    def get(self) -> World:
        from recap_dagster.evaluation.geneval import GenEvalWorld

        return GenEvalWorld(
            detector=self.detector or None,
            score_threshold=self.score_threshold,
            device=self.device,
        )
