"""The miniworld's base captioner: deterministic cached build, standard checkpoint, terse
under the RECAP prefixes, fine-tunable, and graded by ``evaluate_captioner``."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recap_dagster.captioner import STYLE_PREFIXES, Captioner, FineTuneConfig, fine_tune
from recap_dagster.captioner.quality import evaluate_captioner, load_captioned
from recap_dagster.miniworld import base_captioner as bc
from recap_dagster.miniworld import pretrain_tasks
from recap_dagster.miniworld.base_captioner import (
    QUICK_BASE_CAPTIONER,
    build_base_captioner,
    read_base_manifest,
)
from recap_dagster.miniworld.captions import grade_caption, parse_caption
from recap_dagster.miniworld.pretrain_tasks import detection_text
from recap_dagster.miniworld.run_configs import op_settings
from recap_dagster.miniworld.scenes import Scene, sample_scene
from recap_dagster.miniworld.world import MiniworldWorld

WORLD = MiniworldWorld()


@pytest.fixture(scope="module")
def base_dir(quick_base_captioner: str) -> str:
    return quick_base_captioner


def _weights(directory: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / "model.safetensors"))


def test_pretraining_targets_are_grounded() -> None:
    rng = random.Random(0)
    for _ in range(200):
        scene = sample_scene(rng)
        for fmt in pretrain_tasks.DETECT_FORMATS:
            text = detection_text(scene, fmt)
            assert grade_caption(text, scene)["exact"], text  # every object, count and cell
        assert len(detection_text(scene, "objects").split(";")) == len(scene.objects)
        assert len(detection_text(scene, "words").split(";")) == len(scene.kinds())
        question, answer = pretrain_tasks.vqa_pair(scene, rng)
        assert question.endswith("?") and answer
        for prefix in STYLE_PREFIXES.values():
            assert prefix not in question
    scene = sample_scene(random.Random(5))
    (colour, shape), count = scene.kinds().most_common(1)[0]
    answers = {pretrain_tasks.vqa_pair(scene, random.Random(i)) for i in range(200)}
    assert (f"how many {colour} {shape}s?", pretrain_tasks.NUMBER_WORDS[count]) in answers


def test_config_keeps_recap_prefixes_out_of_pretraining() -> None:
    for prompt in STYLE_PREFIXES.values():
        with pytest.raises(ValueError, match="RECAP"):
            replace(QUICK_BASE_CAPTIONER, caption_prompts=("caption:", prompt))
    with pytest.raises(ValueError):
        replace(QUICK_BASE_CAPTIONER, detect_fraction=0.8, vqa_fraction=0.3)
    assert QUICK_BASE_CAPTIONER.key() == replace(QUICK_BASE_CAPTIONER).key()
    assert QUICK_BASE_CAPTIONER.key() != replace(QUICK_BASE_CAPTIONER, seed=1).key()


def test_build_is_standard_deterministic_and_cached(
    base_dir: str, miniworld_paths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {p.name for p in Path(base_dir).iterdir()}
    assert {"model.safetensors", "config.json", bc.MANIFEST_FILE, "recap_captioner.json"} <= files
    assert not [p for p in Path(base_dir).parent.iterdir() if p.name.startswith(".")]
    manifest = read_base_manifest(base_dir)
    assert manifest is not None and manifest["family"] == QUICK_BASE_CAPTIONER.family
    assert manifest["pretrain_prefixes"] == bc.pretrain_prefixes(QUICK_BASE_CAPTIONER)
    assert manifest["final_loss"] < manifest["first_loss"]

    again = build_base_captioner(miniworld_paths, tmp_path / "again", QUICK_BASE_CAPTIONER)
    first, second = _weights(base_dir), _weights(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)

    def boom(*args, **kwargs):
        raise AssertionError("should have been cached")

    stamp = (Path(base_dir) / bc.MANIFEST_FILE).stat().st_mtime_ns
    monkeypatch.setattr(bc, "pretrain", boom)
    assert build_base_captioner(miniworld_paths, base_dir, QUICK_BASE_CAPTIONER) == base_dir
    assert (Path(base_dir) / bc.MANIFEST_FILE).stat().st_mtime_ns == stamp
    # A different config is a different model: not served from the cache.
    other = replace(QUICK_BASE_CAPTIONER, steps=QUICK_BASE_CAPTIONER.steps + 1)
    with pytest.raises(AssertionError, match="cached"):
        build_base_captioner(miniworld_paths, base_dir, other)
    assert read_base_manifest(base_dir) == manifest  # the failed rebuild left it intact


def test_loads_and_is_terse_under_recap_prefixes(base_dir: str, miniworld_paths) -> None:
    captioner = Captioner.from_pretrained(base_dir)
    assert captioner.family == QUICK_BASE_CAPTIONER.family
    assert captioner.prefixes == STYLE_PREFIXES  # the checkpoint carries the RECAP styles
    stored = json.loads((Path(base_dir) / "recap_captioner.json").read_text())
    assert stored["prefixes"] == STYLE_PREFIXES

    heldout = load_captioned(miniworld_paths.human_captions_heldout)
    results = evaluate_captioner(captioner, heldout, world=WORLD, styles=("short", "long"))
    for style in ("short", "long"):
        # Never taught these prefixes: no sentences, no positions (the paper's terse base).
        assert results[style]["words"] <= 6, results[style]["samples"]
        assert results[style]["states_positions"] <= 0.25, results[style]["samples"]
    # Its pretraining tasks answer under their own prefixes.
    probe = Captioner.from_pretrained(
        base_dir, prefixes={**STYLE_PREFIXES, **bc.pretrain_prefixes(QUICK_BASE_CAPTIONER)}
    )
    texts = probe.caption([h.image for h in heldout[:4]], "caption", max_new_tokens=12)
    assert all(parse_caption(t).kinds() for t in texts), texts


def test_quick_fine_tune_lowers_the_loss(base_dir: str, miniworld_paths) -> None:
    torch.manual_seed(0)
    captioner = Captioner.from_pretrained(base_dir)
    examples = [c.to_example() for c in load_captioned(miniworld_paths.human_captions)][:32]
    images = [e.image for e in examples]
    longs = [e.long for e in examples]

    def held_loss() -> float:
        with torch.no_grad():
            return float(captioner.loss(images, longs, ["long"] * len(images)))

    before = held_loss()
    quick = op_settings(FineTuneConfig, "quick", "captioner_checkpoint")
    losses = fine_tune(captioner, examples, quick)
    assert len(losses) == quick.steps
    assert held_loss() < before


class _FakeCaptioner:
    """Answers from a lookup: image id -> caption per style."""

    def __init__(self, answers: dict[str, dict[int, str]]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, int]] = []

    def caption(self, images, style, *, max_new_tokens=40, num_beams=1, batch_size=None):
        self.calls.append((style, max_new_tokens))
        return [self.answers[style][id(image)] for image in images]


def test_evaluate_captioner_grades(miniworld_paths) -> None:
    heldout = load_captioned(miniworld_paths.human_captions_heldout)
    perfect = _FakeCaptioner(
        {
            "short": {id(h.image): h.long for h in heldout},  # long is exact in both styles
            "long": {id(h.image): h.long for h in heldout},
        }
    )
    results = evaluate_captioner(perfect, heldout, world=WORLD, batch_size=4)
    for style in ("short", "long"):
        metrics = results[style]
        for key in ("objects", "counts", "positions", "exact", "counts_exact"):
            assert metrics[key] == pytest.approx(1.0), (style, key)
        assert metrics["hallucinated"] == 0 and metrics["n"] == len(heldout)
        assert metrics["states_positions"] == 1.0
    assert perfect.calls == [("short", 40), ("long", 80)]

    # Terse answers: objects right, no positions; empty answers: nothing right.
    terse = _FakeCaptioner(
        {
            "short": {
                id(h.image): detection_text(Scene.from_dict(h.truth)).split(";")[0] for h in heldout
            },
            "long": {id(h.image): "" for h in heldout},
        }
    )
    pairs = [(h.image, h.truth) for h in heldout]  # (image, truth) pairs work
    results = evaluate_captioner(terse, pairs, world=WORLD)
    assert 0 < results["short"]["objects"] <= 1 and results["short"]["exact"] < 1
    assert results["long"]["objects"] == 0 and results["long"]["words"] == 0
