"""Base models: the pretrained captioner and text-to-image model RECAP starts from."""

import dagster as dg
from pydantic import Field


class ModelsResource(dg.ConfigurableResource):
    """Where the base models are. Each is a local directory or a model-hub id."""

    base_captioner: str = Field(
        description="Pretrained image-to-text captioner (BLIP, GIT, PaliGemma): local "
        "directory or hub id. The miniworld's is built by its base_captioner_model asset.",
    )
    base_t2i: str = Field(
        default="",
        description="Base text-to-image pipeline (Stable Diffusion layout): local directory "
        "or hub id.",
    )
