"""The miniworld as a :class:`~recap_dagster.evaluation.world.World`: its prompt file, its
deterministic shape evaluator and its caption grader behind the core's interface."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image

from recap_dagster.evaluation.world import EvalPrompt, ungraded_caption
from recap_dagster.miniworld.captions import grade_caption, parse_caption
from recap_dagster.miniworld.evaluator import grade_image
from recap_dagster.miniworld.generate import read_jsonl
from recap_dagster.miniworld.scenes import PromptTruth, Scene


def to_eval_prompt(truth: PromptTruth) -> EvalPrompt:
    """A miniworld prompt truth as the core's :class:`EvalPrompt` (truth: its requirements)."""
    data = truth.to_dict()
    return EvalPrompt(truth.prompt, truth.category, {"requirements": data["requirements"]})


def to_prompt_truth(prompt: EvalPrompt) -> PromptTruth:
    """Back from :func:`to_eval_prompt`."""
    return PromptTruth.from_dict(
        {"prompt": prompt.prompt, "category": prompt.category, **prompt.truth}
    )


def caption_grade(caption: str, scene: Scene | dict | None) -> dict[str, Any]:
    """:func:`grade_caption` plus whether the caption states any position."""
    if scene is None:
        return ungraded_caption()
    grade = grade_caption(caption, scene if isinstance(scene, Scene) else Scene.from_dict(scene))
    grade["states_positions"] = bool(parse_caption(caption).placements())
    return grade


class MiniworldWorld:
    """Shapes on a grid: prompts from ``eval_prompts.jsonl``, graded by the shape evaluator;
    captions graded against the scene they describe (the caption truth is a scene dict)."""

    name = "miniworld"

    def read_eval_prompts(self, path: str) -> list[EvalPrompt]:
        return [to_eval_prompt(PromptTruth.from_dict(row)) for row in read_jsonl(path)]

    def grade_images(
        self, images: Sequence[Image.Image], prompts: Sequence[EvalPrompt]
    ) -> list[dict[str, Any]]:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        return [grade_image(i, to_prompt_truth(p)) for i, p in zip(images, prompts, strict=True)]

    def grade_captions(
        self, captions: Sequence[str], truths: Sequence[dict[str, Any] | None]
    ) -> list[dict[str, Any]]:
        return [caption_grade(c, t) for c, t in zip(captions, truths, strict=True)]
