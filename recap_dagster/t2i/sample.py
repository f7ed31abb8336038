"""Sampling: batched, seeded text-to-image generation for evaluation."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image


def generate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    guidance_scale: float = 5.0,
    num_inference_steps: int = 20,
    batch_size: int = 64,
    negative_prompt: str | None = None,
    between_steps: Callable[[], None] | None = None,
) -> list[Image.Image]:
    """One image per (prompt, seed), independent of batching: every image draws its
    initial noise from its own CPU ``torch.Generator`` seeded with its seed (CPU, so the
    same seed gives the same noise on any device). ``between_steps`` runs after each
    denoising step (the CPU share's rebalancer)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    pipe.set_progress_bar_config(disable=True)
    images: list[Image.Image] = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            generators = [
                torch.Generator().manual_seed(int(s)) for s in seeds[start : start + batch_size]
            ]
            out = pipe(
                prompt=chunk,
                negative_prompt=[negative_prompt] * len(chunk) if negative_prompt else None,
                generator=generators,
                guidance_scale=guidance_scale,
                num_inference_steps=num_inference_steps,
                output_type="pil",
                callback_on_step_end=_calling(between_steps) if between_steps else None,
            )
            images.extend(out.images)
    return images


def _calling(hook: Callable[[], None]):
    """A diffusers ``callback_on_step_end`` that runs ``hook`` and changes nothing."""

    def on_step_end(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        hook()
        return callback_kwargs

    return on_step_end
