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
    full_weights_hash: bool = Field(
        default=False,
        description="Version the base models by a SHA-256 of every weights byte (gigabytes per "
        "observation) instead of file sizes, safetensors headers and samples of every tensor.",
    )
