"""The text-to-image core: build/save/load, training, resume, sampling, base pretraining."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from recap_dagster.miniworld.captions import vocabulary_texts
from recap_dagster.miniworld.scenes import render, sample_scene
from recap_dagster.miniworld.tokenizer import train_clip_tokenizer
from recap_dagster.t2i.model import TinyT2IConfig, build_pipeline, load_pipeline, save_pipeline
from recap_dagster.t2i.profiles import QUICK_PROFILE
from recap_dagster.t2i.sample import generate
from recap_dagster.t2i.train import TrainConfig, TrainingExample, select_caption, train

TINY = QUICK_PROFILE.model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread avoids OpenMP barrier stalls (up to 40x slower on a shared
    2-core machine) and costs nothing at this size."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("tok")
    train_clip_tokenizer(vocabulary_texts(), str(out), vocab_size=600)
    return str(out)


@pytest.fixture(scope="module")
def examples() -> list[TrainingExample]:
    rng = random.Random(0)
    out = []
    for i in range(8):
        scene = sample_scene(rng)
        o = scene.objects[0]
        out.append(
            TrainingExample(
                render(scene, 32, seed=i), (f"{o.colour} {o.shape}", f"a {o.colour} {o.shape}")
            )
        )
    return out


def _config(**kw) -> TrainConfig:
    base = {"steps": 6, "learning_rate": 1e-3, "batch_size": 4, "micro_batch_size": 4}
    return TrainConfig(**{**base, **kw})


def _state(pipe) -> dict[str, torch.Tensor]:
    state = {f"unet.{k}": v.clone() for k, v in pipe.unet.state_dict().items()}
    state |= {f"te.{k}": v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    return state


def test_build_save_load_through_both_loaders(tokenizer_dir: str, tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    pipe = build_pipeline(tokenizer_dir, TINY, seed=0)
    out = save_pipeline(pipe, tmp_path / "model")
    for loaded in (load_pipeline(out, device="cpu"), DiffusionPipeline.from_pretrained(out)):
        assert isinstance(loaded, StableDiffusionPipeline)
        assert loaded.safety_checker is None
        for name in ("unet", "text_encoder", "vae"):
            ours, theirs = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
            assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert load_pipeline(out, device="cpu").recap_t2i_config == TINY
    # Saving again over an existing save replaces it atomically.
    save_pipeline(pipe, out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_real_sd_layout_loads(tokenizer_dir: str, tmp_path: Path) -> None:
    """An SD 1.x-style directory (PNDM scheduler, safety checker, feature extractor, no
    recap_t2i.json) of the real component classes loads; the safety checker is skipped."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import (
        StableDiffusionSafetyChecker,
    )
    from transformers import CLIPConfig, CLIPImageProcessor

    pipe = build_pipeline(tokenizer_dir, TINY, seed=1)
    clip = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "vocab_size": 100},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
        projection_dim=16,
    )  # fmt: skip
    sd = StableDiffusionPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=pipe.unet,
        scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1),
        safety_checker=StableDiffusionSafetyChecker(clip),
        feature_extractor=CLIPImageProcessor(crop_size=32, size=32),
    )
    sd.save_pretrained(tmp_path / "sd")
    assert (tmp_path / "sd" / "safety_checker").is_dir()
    loaded = load_pipeline(tmp_path / "sd", device="cpu")
    assert loaded.safety_checker is None
    assert type(loaded.scheduler).__name__ == "PNDMScheduler"
    images = generate(loaded, ["red circle"], [0], guidance_scale=2.0, num_inference_steps=2)
    assert images[0].size == (32, 32)


def test_select_caption_honours_dropout() -> None:
    rng = random.Random(0)
    draws = [select_caption(("short", "long"), rng, 0.14) for _ in range(20_000)]
    empty = draws.count("") / len(draws)
    assert abs(empty - 0.14) < 0.01
    kept = [d for d in draws if d]
    assert abs(kept.count("short") / len(kept) - 0.5) < 0.02
    assert select_caption(("only",), rng, 0.0) == "only"


def test_training_reduces_loss(tokenizer_dir: str, examples, tmp_path: Path) -> None:
    pipe = build_pipeline(tokenizer_dir, TINY, seed=0)
    config = _config(steps=40, learning_rate=3e-3, batch_size=8, micro_batch_size=8)
    result = train(pipe, examples[:4], config, tmp_path / "work")
    assert result.steps_done == 40 and len(result.losses) == 40
    assert np.mean(result.losses[-10:]) < 0.7 * np.mean(result.losses[:5])
    assert (tmp_path / "work" / "checkpoint-40").is_dir()


def test_sd_checkpoints_config_sets_the_lr_schedule(
    tokenizer_dir: str, examples, tmp_path: Path, learning_rates: list[float]
) -> None:
    from recap_dagster.assets.t2i import SDFineTuneConfig

    asset_config = SDFineTuneConfig(
        learning_rate=1e-3, batch_size=4, micro_batch_size=4, lr_scheduler="cosine"
    )
    config = asset_config.train_config(steps=5, mixed_precision="no")
    assert config.lr_scheduler == "cosine"
    train(build_pipeline(tokenizer_dir, TINY, seed=0), examples[:4], config, tmp_path / "w")
    # cosine from the peak to 0 over 5 steps: 0.5 * (1 + cos(pi * k / 5))
    expected = [1e-3, 9.045085e-4, 6.545085e-4, 3.454915e-4, 9.54915e-5]
    assert learning_rates == pytest.approx(expected)
    with pytest.raises(ValueError, match="lr_scheduler"):
        TrainConfig(lr_scheduler="exponential")


def test_resume_matches_uninterrupted_run(tokenizer_dir: str, examples, tmp_path: Path) -> None:
    config = _config(checkpoint_every=3, keep_checkpoints=1)
    full = train(build_pipeline(tokenizer_dir, TINY, seed=0), examples, config, tmp_path / "a")

    class Killed(Exception):
        pass

    def kill_at_4(step: int, loss: float) -> None:
        if step == 4:
            raise Killed

    with pytest.raises(Killed):
        train(build_pipeline(tokenizer_dir, TINY, seed=0), examples, config, tmp_path / "b",
              on_step=kill_at_4)  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["checkpoint-3"]
    # A fresh process would start from the same base weights.
    resumed = train(build_pipeline(tokenizer_dir, TINY, seed=0), examples, config, tmp_path / "b")
    assert resumed.resumed_from == 3 and full.resumed_from is None
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-7)
    a, b = _state(full.pipeline), _state(resumed.pipeline)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # Asking for the same length again is a no-op resume from the final checkpoint.
    again = train(build_pipeline(tokenizer_dir, TINY, seed=0), examples, config, tmp_path / "b")
    assert again.resumed_from == 6


def test_half_written_checkpoint_is_ignored(tokenizer_dir: str, examples, tmp_path: Path) -> None:
    work = tmp_path / "w"
    (work / ".tmp-checkpoint-9-x").mkdir(parents=True)  # a save killed mid-write
    (work / "checkpoint-5").mkdir()  # no metadata: never completed
    result = train(build_pipeline(tokenizer_dir, TINY, seed=0), examples, _config(steps=2), work)
    assert result.resumed_from is None
    assert not (work / ".tmp-checkpoint-9-x").exists()


def test_ema_bf16_and_accumulation_run(tokenizer_dir: str, examples, tmp_path: Path) -> None:
    pipe = build_pipeline(tokenizer_dir, TINY, seed=0)
    config = _config(steps=3, batch_size=8, micro_batch_size=4, use_ema=True, ema_decay=0.9,
                     mixed_precision="bf16", checkpoint_every=2, snr_gamma=5.0)  # fmt: skip
    result = train(pipe, examples, config, tmp_path / "w")
    assert all(np.isfinite(result.losses))
    assert result.pipeline.unet.dtype == torch.float32
    # EMA state is part of the checkpoint, so a resume restores it.
    resumed = train(
        build_pipeline(tokenizer_dir, TINY, seed=0), examples,
        TrainConfig(**{**config.__dict__, "steps": 4}), tmp_path / "w",
    )  # fmt: skip
    assert resumed.resumed_from == 3


def test_generate_is_deterministic(tokenizer_dir: str) -> None:
    pipe = build_pipeline(tokenizer_dir, TINY, seed=0)
    prompts, seeds = ["a red circle", "two blue squares", "a red circle"], [1, 2, 3]
    kw = {"guidance_scale": 3.0, "num_inference_steps": 3}
    first = generate(pipe, prompts, seeds, batch_size=3, **kw)
    again = generate(pipe, prompts, seeds, batch_size=3, **kw)
    assert all(
        np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again, strict=True)
    )
    # Another batching gives the same noise per image; only float rounding may differ.
    rebatched = generate(pipe, prompts, seeds, batch_size=2, **kw)
    for a, b in zip(first, rebatched, strict=True):
        assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 2
    assert not np.array_equal(np.asarray(first[0]), np.asarray(first[2]))


def test_build_miniworld_base_is_cached(miniworld_paths, tmp_path: Path) -> None:
    from recap_dagster.t2i.base import build_miniworld_base

    root = miniworld_paths.root
    out = build_miniworld_base(root, str(tmp_path / "base"), QUICK_PROFILE)
    stamp = (Path(out) / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert build_miniworld_base(root, out, QUICK_PROFILE) == out
    assert (Path(out) / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    pipe = load_pipeline(out, device="cpu")
    assert pipe.vae.config.scaling_factor != 1.0
    assert isinstance(pipe.recap_t2i_config, TinyT2IConfig)
