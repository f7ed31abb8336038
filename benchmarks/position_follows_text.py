"""Does a text-to-image model place objects where the prompt says, or where its initial
noise says?

Run: ``python benchmarks/position_follows_text.py MODEL_DIR [--seeds 12] [--beta-end B]``
(MODEL_DIR: a saved miniworld pipeline, e.g. a fine-tune's ``final`` snapshot). For each
noise seed it generates "a <colour> <shape> <cell>" for all nine cells from the SAME
initial noise and prints how often the stated cell was hit, the hit rate chance would
give (the cells the object was drawn in, out of nine), and how many seeds drew the same
layout whatever cell was asked for (a model that ignores position words draws one layout
per seed). It also prints, for the model's noise schedule, how visible a single object
stays in the noisiest latents it trains on: the object's latent norm times sqrt(SNR), in
standard deviations of the noise (a matched filter's detection margin). Where that margin
is large at every timestep, the denoiser can read the layout off its input and never
needs the prompt for it.

Last, whether the denoiser reads the position words at all: the nine one-object scenes,
noised at a timestep with one noise, denoised with the prompt stating the true cell, each
wrong cell and nothing (the empty prompt); it prints the mean squared error of the
predicted clean latent for each. A model that uses the words errs less with the true cell
than with a wrong one where the noise hides the object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from recap_dagster.miniworld.captions import prompt_text
from recap_dagster.miniworld.evaluator import detect
from recap_dagster.miniworld.scenes import GRID, Requirement, Scene, SceneObject, render
from recap_dagster.t2i.latents import pixels
from recap_dagster.t2i.model import load_pipeline
from recap_dagster.t2i.sample import generate

KINDS = (("red", "circle"), ("blue", "square"), ("green", "triangle"))


def layout_margin(pipe, beta_end: float | None) -> dict[int, float]:
    """Mean detection margin (in noise standard deviations) of one object's latent at
    timesteps 500, 750, 900 and the last, under the pipeline's schedule (or ``beta_end``)."""
    config = dict(pipe.scheduler.config)
    if beta_end is not None:
        config["beta_end"] = beta_end
    from diffusers import DDPMScheduler

    alphas = DDPMScheduler.from_config(config).alphas_cumprod
    snr = alphas / (1 - alphas)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    # The nine one-object scenes and the empty one, encoded in one batch.
    scenes = [
        Scene((SceneObject("blue", "square", r, c),)) for r in range(GRID) for c in range(GRID)
    ]
    images = [render(scene, resolution) for scene in [*scenes, Scene(())]]
    with torch.no_grad():
        latents = pipe.vae.encode(pixels(images, resolution)).latent_dist.mean
    scale = pipe.vae.config.scaling_factor
    norms = [float((one - latents[-1]).norm()) * scale for one in latents[:-1]]
    norm = float(np.mean(norms))
    last = len(snr) - 1
    return {t: round(norm * float(snr[t].sqrt()), 2) for t in (500, 750, 900, last)}


def position_word_use(pipe, timesteps: tuple[int, ...]) -> dict[int, dict[str, float]]:
    """Mean x0 error (per latent element) with the true cell, a wrong cell and no prompt, for
    one-object scenes noised at each of ``timesteps`` (leaving out a zero-SNR one for an
    epsilon model, whose x0 estimate divides by zero)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]

    def encode(prompts: list[str]) -> torch.Tensor:
        return pipe.encode_prompt(prompts, pipe.device, 1, False)[0]

    with torch.no_grad():
        # Per kind: its nine scenes' clean latents and the nine stated cells' prompts, then
        # the empty prompt; the same for every timestep.
        kinds = []
        for colour, shape in KINDS:
            images = [render(Scene((SceneObject(colour, shape, *c),)), resolution) for c in cells]
            clean = pipe.vae.encode(pixels(images, resolution)).latent_dist.mean
            stated = [prompt_text((Requirement(colour, shape, 1, c),), "position") for c in cells]
            kinds.append((clean * pipe.vae.config.scaling_factor, encode([*stated, ""])))
        errors: dict[int, dict[str, float]] = {}
        for t in timesteps:
            alpha = scheduler.alphas_cumprod[t]
            if alpha == 0 and not v_prediction:
                continue  # epsilon at zero SNR: no x0 estimate to score
            sums = {"true_cell": 0.0, "wrong_cell": 0.0, "no_prompt": 0.0}
            for clean, texts in kinds:
                noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(t))
                noisy = alpha.sqrt() * clean + (1 - alpha).sqrt() * noise
                for i in range(len(cells)):
                    # Scene i under all nine stated cells, then under the empty prompt.
                    inputs = noisy[i : i + 1].expand(len(texts), -1, -1, -1)
                    pred = pipe.unet(inputs, t, texts).sample
                    x0 = (
                        alpha.sqrt() * inputs - (1 - alpha).sqrt() * pred
                        if v_prediction
                        else (inputs - (1 - alpha).sqrt() * pred) / alpha.sqrt()
                    )
                    err = ((x0 - clean[i : i + 1]) ** 2).mean(dim=(1, 2, 3))
                    wrong = (err[: len(cells)].sum() - err[i]) / (len(cells) - 1)
                    sums["true_cell"] += float(err[i])
                    sums["wrong_cell"] += float(wrong)
                    sums["no_prompt"] += float(err[-1])
            n = len(KINDS) * len(cells)
            errors[t] = {k: round(v / n, 4) for k, v in sums.items()}
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--seeds", type=int, default=12)
    parser.add_argument("--guidance", type=float, default=7.0)
    parser.add_argument("--beta-end", type=float, default=None, help="margin under this schedule")
    args = parser.parse_args()
    pipe = load_pipeline(args.model, device="cpu")
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    hits = occupied = fixed_layouts = 0
    for seed in range(args.seeds):
        colour, shape = KINDS[seed % len(KINDS)]
        prompts = [
            prompt_text((Requirement(colour, shape, 1, cell),), "position") for cell in cells
        ]
        images = generate(pipe, prompts, [seed] * len(cells), guidance_scale=args.guidance)
        layouts = set()
        for cell, image in zip(cells, images, strict=True):
            placed = {(d.row, d.col) for d in detect(image) if d.kind == (colour, shape)}
            layouts.add(frozenset(placed))
            occupied += len(placed)  # cells a text-blind placement could hit
            hits += cell in placed
        fixed_layouts += len(layouts) == 1
    total = args.seeds * len(cells)
    print(
        json.dumps(
            {
                "model": str(Path(args.model)),
                "prompts": total,
                "hit_rate": round(hits / total, 3),
                "chance": round(occupied / total / GRID**2, 3),
                "times_chance": round(hits * GRID**2 / occupied, 2) if occupied else None,
                "seeds_with_one_layout_for_all_cells": f"{fixed_layouts}/{args.seeds}",
                "layout_margin_sigma_at_timestep": layout_margin(pipe, args.beta_end),
                "x0_error_at_timestep": position_word_use(
                    pipe, (300, 600, 800, 900, pipe.scheduler.config.num_train_timesteps - 1)
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
