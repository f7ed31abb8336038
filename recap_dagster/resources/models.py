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
    clip: str = Field(
        default="",
        description="CLIP-family model (transformers CLIPModel + CLIPProcessor layout: local "
        "directory or hub id) that scores image-text agreement: CLIP score in the "
        "text-to-image reports and of the captioner's held-out captions. Empty: not scored. "
        "The miniworld's is built by its clip_model asset.",
    )
    full_weights_hash: bool = Field(
        default=False,
        description="Version the base models by a SHA-256 of every weights byte (gigabytes per "
        "observation) instead of file sizes, safetensors headers and samples of every tensor.",
    )
