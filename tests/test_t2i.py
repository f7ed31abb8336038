"""The text-to-image core: build/save/load, the latent cache, the training stream, the
trainer (one and two processes, resume, S3), SD 1.x / 2.x shapes, sampling, the base."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from transformers import CLIPTokenizer

from recap_dagster.corpus.listing import list_shards
from recap_dagster.corpus.reading import iter_shard
from recap_dagster.miniworld.captions import vocabulary_texts
from recap_dagster.miniworld.t2i_profiles import QUICK_PROFILE
from recap_dagster.miniworld.tokenizer import train_clip_tokenizer
from recap_dagster.storage.root import Storage
from recap_dagster.t2i import latents as latent_cache
from recap_dagster.t2i import runs
from recap_dagster.t2i.machine_cache import LEDGER_SUFFIX, MachineCache, Reader
from recap_dagster.t2i.model import TinyT2IConfig, build_pipeline, load_pipeline, save_pipeline
from recap_dagster.t2i.sample import generate
from recap_dagster.t2i.stream import (
    CaptionSource,
    DataPosition,
    LatentStream,
    StreamSpec,
    select_caption,
)
from recap_dagster.t2i.train import (
    FINAL,
    TrainConfig,
    TrainJob,
    launch_command,
    train,
    training_stream,
    write_job,
)
from recap_dagster.training.cpu_share import CpuShare

TINY = QUICK_PROFILE.model
#: img2dataset's parquet: the alt text is ``caption``; delivered rows are ``success``.
ALT_TEXT = {"columns": ("caption",), "ok_status": "success"}


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


def _cached_world(corpus: str, model_dir: str, root: str) -> tuple[str, list[str]]:
    """The latent cache of every shard of ``corpus`` for the VAE of ``model_dir``."""
    vae, resolution, version = latent_cache.load_vae(model_dir, torch.device("cpu"))
    shards = [info.key for info in list_shards(corpus)]
    latent_cache.cache_latents(vae, version, Storage(root), corpus, shards, resolution=resolution)
    return version, shards


@pytest.fixture(scope="module")
def world(miniworld_paths, tokenizer_dir: str, tmp_path_factory: pytest.TempPathFactory):
    """A saved tiny pipeline and the latent cache of the quick miniworld's corpus."""
    root = tmp_path_factory.mktemp("t2i_world")
    model = save_pipeline(build_pipeline(tokenizer_dir, TINY, seed=0), root / "model")
    cache = str(root / "cache")
    version, shards = _cached_world(str(miniworld_paths.corpus), model, cache)
    return {"corpus": str(miniworld_paths.corpus), "model": model, "cache": cache,
            "vae_version": version, "shards": shards}  # fmt: skip


def _job(world, storage_root: str, **settings) -> TrainJob:
    base = {"steps": 6, "learning_rate": 1e-3, "batch_size": 8, "micro_batch_size": 8,
            "checkpoint_every": 0, "snapshot_every": 0, "window_shards": 1}  # fmt: skip
    config = TrainConfig(**{**base, **settings})
    return TrainJob(
        base_model=world["model"],
        base_version="test",
        storage_root=storage_root,
        state_parts=("state",),
        snapshot_parts=("snapshots",),
        data=training_stream(
            config,
            base_model=world["model"],
            latents_root=world["cache"],
            vae_version=world["vae_version"],
            shards=world["shards"],
            captions=CaptionSource(root=world["corpus"], **ALT_TEXT),
        ),
        config=config,
        num_workers=0,
    )


def _weights(directory: str | Path) -> dict[str, torch.Tensor]:
    pipe = load_pipeline(directory, device="cpu")
    state = {f"unet.{k}": v for k, v in pipe.unet.state_dict().items()}
    return state | {f"te.{k}": v for k, v in pipe.text_encoder.state_dict().items()}


def _assert_same_weights(a: str | Path, b: str | Path, atol: float = 0.0) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    print(f"max abs weight difference {worst:.3g}")
    assert worst <= atol, f"weights differ by up to {worst}"


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


def test_latent_cache_files(world) -> None:
    store = Storage(world["cache"])
    shard = world["shards"][0]
    cached = latent_cache.read_latent_shard(store, world["vae_version"], shard)
    decodable = [r.key for r in iter_shard(world["corpus"], shard) if r.image is not None]
    assert cached.keys == decodable
    size = TINY.latent_size
    assert cached.mean.shape == (len(decodable), TINY.vae_latent_channels, size, size)
    assert cached.std.shape == cached.mean.shape and cached.meta["resolution"] == "32"
    # The file is safetensors: loadable without pickle by any safetensors reader.
    from safetensors import safe_open

    path = store.uri(latent_cache.LATENTS_DIR, world["vae_version"], f"{shard}.safetensors")
    with safe_open(path, framework="pt") as handle:
        assert set(handle.keys()) == {"mean", "std"}
    # Again: the finished shard is kept, not encoded twice.
    vae, resolution, version = latent_cache.load_vae(world["model"], torch.device("cpu"))
    stats = latent_cache.cache_latents(
        vae, version, store, world["corpus"], world["shards"], resolution=resolution
    )
    assert stats.shards_kept == world["shards"] and stats.rows == 0


def test_half_precision_cache_trains_on_the_same_path(world, tmp_path: Path) -> None:
    vae, resolution, version = latent_cache.load_vae(world["model"], torch.device("cpu"))
    cache = str(tmp_path / "cache16")
    stats = latent_cache.cache_latents(
        vae, version, Storage(cache), world["corpus"], world["shards"],
        resolution=resolution, dtype=latent_cache.storage_dtype("float16"),
    )  # fmt: skip
    full = Storage(world["cache"])
    for shard in world["shards"]:
        half = latent_cache.read_latent_shard(Storage(cache), version, shard)
        exact = latent_cache.read_latent_shard(full, version, shard)
        assert half.mean.dtype == torch.float16 and half.meta["dtype"] == "float16"
        assert torch.allclose(half.mean.float(), exact.mean, atol=2e-3, rtol=1e-3)
    assert stats.bytes_written < 0.6 * sum(
        len(full.read_bytes(latent_cache.LATENTS_DIR, version, f"{s}.safetensors"))
        for s in world["shards"]
    )
    result = train(_job({**world, "cache": cache}, str(tmp_path / "out"), steps=2))
    assert all(np.isfinite(result.losses))
    assert result.truncated_prompts == 0  # the miniworld's alt texts fit the context
    with pytest.raises(ValueError, match="latent dtype"):
        latent_cache.storage_dtype("int8")


def test_resize_center_crop_keeps_the_middle() -> None:
    image = Image.new("RGB", (64, 32), "white")
    image.paste((255, 0, 0), (16, 0, 48, 32))  # a red square in the middle
    out = latent_cache.resize_center_crop(image, 16)
    assert out.size == (16, 16)
    green = np.asarray(out)[:, :, 1]
    assert green[:, 1:-1].max() == 0 and green.max() < 64  # the red middle (edges blended)


def _batches(world, *, micro: int, rank: int = 0, world_size: int = 1, workers: int = 0,
             start: DataPosition | None = None, count: int = 12, window: int = 1):  # fmt: skip
    config = _job(world, "unused", micro_batch_size=micro, window_shards=window).data
    stream = LatentStream(
        config, load_pipeline(world["model"], device="cpu").tokenizer,
        micro_batch_size=micro, rank=rank, world_size=world_size, start=start,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == count:
            return out
    return out


def test_stream_splits_disjointly_and_does_not_depend_on_the_world_size(world) -> None:
    one = _batches(world, micro=8, count=12, window=2)
    ranks = [_batches(world, micro=4, rank=r, world_size=2, workers=2, count=12, window=2)
             for r in (0, 1)]  # fmt: skip
    for step, single in enumerate(one):
        halves = [ranks[0][step]["keys"], ranks[1][step]["keys"]]
        assert not set(halves[0]) & set(halves[1])  # disjoint samples
        assert halves[0] + halves[1] == single["keys"]  # the same global batch
        joined = torch.cat([ranks[0][step]["noise"], ranks[1][step]["noise"]])
        assert torch.equal(joined, single["noise"])  # the same draws per sample
        assert torch.equal(ranks[0][step]["position"], single["position"])
    # 12 steps of 8 cover every sample of the 48 once per epoch, twice in all.
    keys = [k for b in one for k in b["keys"]]
    assert len(set(keys[:48])) == 48 and sorted(keys[:48]) == sorted(keys[48:])
    assert keys[:48] != keys[48:]  # each epoch has its own order


def test_the_stream_counts_the_prompts_its_tokenizer_truncates(tokenizer_dir: str) -> None:
    """A prompt over the text encoder's context is cut to it, and counted, not lost silently."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    spec = StreamSpec("unused", "unused", ("00000",), CaptionSource(root="unused"))
    stream = LatentStream(spec, tokenizer, micro_batch_size=3)
    long = " ".join(["a red circle at the top left"] * 20)
    assert len(tokenizer(long).input_ids) > tokenizer.model_max_length
    zeros = torch.zeros(4, 2, 2)
    samples = [
        {"mean": zeros, "std": zeros, "eps": zeros, "noise": zeros,
         "timesteps": torch.tensor(1), "text": text, "key": f"00000/{i}"}
        for i, text in enumerate(["a red circle", long, ""])
    ]  # fmt: skip
    batch = stream._collate(samples, DataPosition())
    assert int(batch["truncated"]) == 1
    assert batch["input_ids"].shape == (3, tokenizer.model_max_length)


def test_stream_resumes_exactly_from_a_position(world) -> None:
    full = _batches(world, micro=5, count=14)  # crosses windows and an epoch
    position = DataPosition(*full[6]["position"].tolist())
    resumed = _batches(world, micro=5, start=position, count=7)
    assert [b["keys"] for b in resumed] == [b["keys"] for b in full[7:]]
    for a, b in zip(resumed, full[7:], strict=True):
        assert torch.equal(a["noise"], b["noise"]) and torch.equal(a["input_ids"], b["input_ids"])


def test_training_stream_reads_std_only_when_sampling_latents(world) -> None:
    assert not _job(world, "unused").data.read_std
    assert _job(world, "unused", sample_latents=True).data.read_std


def test_stream_reads_an_s3_latent_cache_through_a_small_local_cache(
    world, s3_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = Storage(world["cache"])
    remote = Storage(f"{s3_env}/cache")
    for shard in world["shards"]:
        name = f"{shard}.safetensors"
        blob = local.read_bytes(latent_cache.LATENTS_DIR, world["vae_version"], name)
        remote.write_bytes(blob, latent_cache.LATENTS_DIR, world["vae_version"], name)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    expected = _batches(world, micro=8, count=8)
    from_s3 = _batches({**world, "cache": remote.root}, micro=8, count=8)
    assert [b["keys"] for b in from_s3] == [b["keys"] for b in expected]
    assert all(torch.equal(a["mean"], b["mean"]) for a, b in zip(from_s3, expected, strict=True))
    # Only the windows in use stay on the local disk (one shard a window here).
    cached = list(tmp_path.rglob("*.safetensors"))
    assert len(cached) <= 1, cached


def test_training_reduces_loss(world, tmp_path: Path) -> None:
    job = _job(world, str(tmp_path), steps=40, learning_rate=3e-3, prompt_dropout=0.0)
    result = train(job)
    assert len(result.losses) == 40 and result.resumed_from is None
    assert np.mean(result.losses[-10:]) < 0.7 * np.mean(result.losses[:5])
    assert Storage(str(tmp_path)).dir_complete("snapshots", FINAL)


def test_one_schedule_over_the_run_with_three_snapshots(
    world, tmp_path: Path, learning_rates: list[float]
) -> None:
    from recap_dagster.assets.run_config import settings_from_config
    from recap_dagster.assets.t2i import SDFineTuneConfig

    asset_config = SDFineTuneConfig(
        steps=8, learning_rate=1e-3, batch_size=8, micro_batch_size=8, lr_scheduler="cosine",
        snapshot_every=2, checkpoint_every=0, window_shards=1,
    )  # fmt: skip
    config = settings_from_config(TrainConfig, asset_config)
    job = replace(_job(world, str(tmp_path)), config=config)
    result = train(job)
    assert [s["step"] for s in result.snapshots] == [2, 4, 6, 8]
    assert [s["name"] for s in result.snapshots][-1] == FINAL
    store = Storage(str(tmp_path))
    assert all(store.dir_complete("snapshots", s["name"]) for s in result.snapshots)
    # cosine from the peak to 0 across all 8 steps, not restarted at each snapshot
    expected = [1e-3 * 0.5 * (1 + np.cos(np.pi * k / 8)) for k in range(8)]
    assert learning_rates == pytest.approx(expected)
    assert all(a > b for a, b in zip(learning_rates, learning_rates[1:], strict=False))
    with pytest.raises(ValueError, match="lr_scheduler"):
        TrainConfig(lr_scheduler="exponential")


def test_resume_matches_uninterrupted_run(world, tmp_path: Path) -> None:
    settings = {"checkpoint_every": 3, "keep_checkpoints": 1, "use_ema": True,
                "ema_decay": 0.9, "snr_gamma": 5.0, "snapshot_every": 2}  # fmt: skip
    full = train(_job(world, str(tmp_path / "a"), **settings))

    class Killed(Exception):
        pass

    def kill_at_5(step: int, steps: int, loss: float, rate: float) -> None:
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        train(_job(world, str(tmp_path / "b"), **settings), on_progress=kill_at_5)
    fingerprint = _job(world, "", **settings).fingerprint()
    # the snapshot at 4 saved a state too; one kept
    saved = Storage(str(tmp_path / "b")).listdir("state", fingerprint)
    assert [name for name in saved if name.startswith("checkpoint-")] == ["checkpoint-4"]
    resumed = train(_job(world, str(tmp_path / "b"), **settings))
    assert resumed.resumed_from == 4 and full.resumed_from is None
    assert resumed.losses == pytest.approx(full.losses, rel=1e-6, abs=1e-8)
    assert resumed.snapshots == full.snapshots  # same steps, same weight versions
    _assert_same_weights(tmp_path / "a" / "snapshots" / FINAL, tmp_path / "b" / "snapshots" / FINAL)
    # The same run again is a no-op resume from its final state.
    assert train(_job(world, str(tmp_path / "b"), **settings)).resumed_from == 6


def _on_shards(job: TrainJob, shards: list[str]) -> TrainJob:
    return replace(job, data=replace(job.data, shards=tuple(shards)))


class Killed(Exception):
    """Stands for a preemption at a given step."""


def _kill_at(at: int):
    def progress(step: int, steps: int, loss: float, rate: float) -> None:
        if step == at:
            raise Killed

    return progress


def test_a_retry_after_new_shards_resumes_its_own_run_and_deletes_nothing(
    world, tmp_path: Path
) -> None:
    """The sensor recaptioned more shards while the run was down: the retry trains on the
    manifest the run started with and ends where an uninterrupted run ends; the next launch
    starts a new run on all shards, and the old state stays until asked to go."""
    first, later = world["shards"][:1], world["shards"]
    settings = {"steps": 6, "checkpoint_every": 2, "snapshot_every": 3}
    straight = train(_on_shards(_job(world, str(tmp_path / "a"), **settings), first))
    root = str(tmp_path / "b")
    store = Storage(root)
    started = _on_shards(_job(world, root, **settings), first)
    assert runs.choose_run(store, started).action == "new"
    with pytest.raises(Killed):
        train(started, on_progress=_kill_at(5))
    retry = runs.choose_run(store, _on_shards(_job(world, root, **settings), later))
    assert retry.action == "continue" and retry.job.data.shards == tuple(first)
    assert f"{len(later) - len(first)} shard(s) recaptioned since" in retry.message
    resumed = train(retry.job)
    assert resumed.resumed_from == 4
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-6, abs=1e-8)
    _assert_same_weights(tmp_path / "a" / "snapshots" / FINAL, tmp_path / "b" / "snapshots" / FINAL)

    following = runs.choose_run(store, _on_shards(_job(world, root, **settings), later))
    assert following.action == "new" and following.job.data.shards == tuple(later)
    assert [r.run_id for r in following.others] == [started.fingerprint()]
    train(replace(following.job, config=replace(following.job.config, steps=2)))
    kept = {r.run_id: r for r in runs.list_runs(store, "state")}
    assert set(kept) == {started.fingerprint(), following.job.fingerprint()}
    assert kept[started.fingerprint()].finished_step == 6  # nothing pruned it
    assert runs.remove_runs(store, following.job, [started.fingerprint()]) == [
        started.fingerprint()
    ]
    assert [r.run_id for r in runs.list_runs(store, "state")] == [following.job.fingerprint()]
    with pytest.raises(ValueError, match="is the one this launch trains"):
        runs.remove_runs(store, following.job, [following.job.fingerprint()])


def test_a_finished_run_extends_with_its_schedule_respanned(
    world, tmp_path: Path, learning_rates: list[float]
) -> None:
    settings = {"lr_scheduler": "cosine", "snapshot_every": 2}
    store = Storage(str(tmp_path))
    four = train(_job(world, str(tmp_path), steps=4, **settings))
    longer = _job(world, str(tmp_path), steps=6, **settings)
    choice = runs.choose_run(store, longer)
    assert choice.action == "extend" and "from 4 to 6 steps" in choice.message
    six = train(choice.job)
    assert six.resumed_from == 4 and six.extended_from == 4
    assert six.losses[:4] == four.losses and len(six.losses) == 6
    assert [(s["step"], s["name"]) for s in six.snapshots] == [
        (2, "step-000002"), (4, "step-000004"), (6, FINAL)
    ]  # fmt: skip
    # the old final is kept under its step, the new one is step 6
    assert store.dir_complete("snapshots", "step-000004")
    assert six.snapshots[1]["version"] == four.snapshots[-1]["version"]
    # cosine over 4 steps, then over 6 from step 4 on
    over_4 = [1e-3 * 0.5 * (1 + np.cos(np.pi * k / 4)) for k in range(4)]
    over_6 = [1e-3 * 0.5 * (1 + np.cos(np.pi * k / 6)) for k in (4, 5)]
    assert learning_rates == pytest.approx(over_4 + over_6)
    with pytest.raises(ValueError, match="already finished at 6 steps"):
        runs.choose_run(store, _job(world, str(tmp_path), steps=5, **settings))


def test_gradient_checkpointing_and_fused_adamw_train_the_same(world, tmp_path: Path) -> None:
    settings = {"steps": 3, "micro_batch_size": 4, "snr_gamma": 5.0}
    plain = train(_job(world, str(tmp_path / "plain"), **settings))
    checkpointed = train(
        _job(world, str(tmp_path / "ckpt"), gradient_checkpointing=True, **settings)
    )
    fused = train(_job(world, str(tmp_path / "fused"), optimizer="adamw_fused", **settings))
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-6)
    assert fused.losses == pytest.approx(plain.losses, rel=1e-5)
    _assert_same_weights(
        tmp_path / "plain" / "snapshots" / FINAL, tmp_path / "ckpt" / "snapshots" / FINAL, 1e-6
    )
    # Settings that only change how a batch is computed keep the run resumable.
    assert _job(world, "", gradient_checkpointing=True, micro_batch_size=2).fingerprint() == (
        _job(world, "").fingerprint()
    )
    assert _job(world, "", optimizer="adamw_fused").fingerprint() != _job(world, "").fingerprint()


def test_eight_bit_adamw_trains_with_one_byte_states(world, tmp_path: Path) -> None:
    """bitsandbytes' AdamW8bit (its CPU backend here): the loss falls like AdamW's and the
    saved optimizer state holds uint8 moments."""
    settings = {"steps": 12, "learning_rate": 3e-3, "prompt_dropout": 0.0, "checkpoint_every": 12}
    eight = train(_job(world, str(tmp_path / "8bit"), optimizer="adamw_8bit", **settings))
    plain = train(_job(world, str(tmp_path / "plain"), **settings))
    assert np.mean(eight.losses[-3:]) < 0.85 * np.mean(eight.losses[:3])
    assert abs(np.mean(eight.losses[-3:]) - np.mean(plain.losses[-3:])) < 0.1
    job = _job(world, "", optimizer="adamw_8bit", **settings)
    state = torch.load(
        tmp_path / "8bit" / "state" / job.fingerprint() / "checkpoint-12" / "optimizer.bin",
        weights_only=False,
    )["state"]
    # bitsandbytes keeps tensors under 4,096 elements in 32 bits, the rest in one byte
    packed = [entry["__bnb_optimizer_quant_state__"] for entry in state.values()]
    assert any(
        p["state1"].dtype == torch.uint8 and p["state2"].dtype == torch.uint8 for p in packed
    )


def test_micro_batch_zero_picks_one_that_divides_the_batch(world, tmp_path: Path) -> None:
    result = train(_job(world, str(tmp_path), steps=1, batch_size=24, micro_batch_size=0))
    assert result.micro_batch_size == 8  # the largest power of two dividing 24 (<= 64)


def test_hub_downloads_only_the_diffusers_folders() -> None:
    """SD 1.5's repository (runwayml/stable-diffusion-v1-5, its file list): single-file
    checkpoints, fp16 and non-EMA variants, .bin duplicates and the safety checker stay."""
    from huggingface_hub.utils import filter_repo_objects

    from recap_dagster.t2i.model import HUB_IGNORED, HUB_PATTERNS

    repo = [
        "model_index.json", "v1-5-pruned.ckpt", "v1-5-pruned.safetensors",
        "v1-5-pruned-emaonly.ckpt", "v1-5-pruned-emaonly.safetensors", "README.md",
        "feature_extractor/preprocessor_config.json", "safety_checker/config.json",
        "safety_checker/model.safetensors", "safety_checker/pytorch_model.bin",
        "scheduler/scheduler_config.json", "text_encoder/config.json",
        "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
        "text_encoder/pytorch_model.bin", "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json", "unet/config.json", "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.non_ema.safetensors", "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.bin",
    ]  # fmt: skip
    fetched = set(
        filter_repo_objects(repo, allow_patterns=HUB_PATTERNS, ignore_patterns=HUB_IGNORED)
    )
    assert fetched == {
        "model_index.json", "feature_extractor/preprocessor_config.json",
        "scheduler/scheduler_config.json", "text_encoder/config.json",
        "text_encoder/model.safetensors", "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    }  # fmt: skip


def test_half_written_checkpoint_is_ignored(world, tmp_path: Path) -> None:
    job = _job(world, str(tmp_path), steps=2)
    state = tmp_path / "state" / job.fingerprint()
    (state / "checkpoint-5").mkdir(parents=True)  # no _SUCCESS marker: never completed
    assert train(job).resumed_from is None


def test_gradient_accumulation_matches_one_larger_micro_batch(world, tmp_path: Path) -> None:
    """Effective batch 8: 2 accumulated micro-batches of 4 = 1 micro-batch of 8."""
    settings = {"steps": 4, "snr_gamma": 5.0, "window_shards": 2}
    accumulated = train(_job(world, str(tmp_path / "acc"), micro_batch_size=4, **settings))
    single = train(_job(world, str(tmp_path / "one"), micro_batch_size=8, **settings))
    assert accumulated.losses == pytest.approx(single.losses, rel=1e-5)
    _assert_same_weights(
        tmp_path / "acc" / "snapshots" / FINAL, tmp_path / "one" / "snapshots" / FINAL, atol=1e-5
    )


def test_bf16_run(world, tmp_path: Path) -> None:
    job = replace(_job(world, str(tmp_path), steps=3, micro_batch_size=4), mixed_precision="bf16")
    assert all(np.isfinite(train(job).losses))


def _run_command(job: TrainJob, processes: int, tmp_path: Path, name: str, **popen):
    job_file = write_job(job, str(tmp_path))
    env = {**os.environ, "OMP_NUM_THREADS": "1", **popen.pop("env", {})}
    return subprocess.Popen(
        launch_command(job_file, processes), env=env, cwd=tmp_path,
        stdout=open(tmp_path / f"{name}.log", "wb"), stderr=subprocess.STDOUT,
        start_new_session=True, **popen,
    )  # fmt: skip


def test_two_processes_match_one_with_twice_the_micro_batch(world, tmp_path: Path) -> None:
    """Same effective batch (8): 2 processes x micro-batch 4 (gloo) vs 1 x 8."""
    last = {}
    for processes, micro in ((1, 8), (2, 4)):
        root = tmp_path / f"p{processes}"
        job = _job(world, str(root), steps=4, micro_batch_size=micro, window_shards=2)
        proc = _run_command(job, processes, tmp_path, f"p{processes}")
        _wait_all([proc], tmp_path, f"p{processes}")
        last[processes] = json.loads(Storage(str(root)).read_text("state", "last_run.json"))
    assert last[2]["processes"] == 2 and last[1]["processes"] == 1
    # Equal up to float reassociation (the all-reduce sums two halves): within 1e-5.
    assert last[2]["losses"] == pytest.approx(last[1]["losses"], rel=1e-5, abs=1e-6)
    _assert_same_weights(tmp_path / "p1" / "snapshots" / FINAL,
                         tmp_path / "p2" / "snapshots" / FINAL, atol=1e-5)  # fmt: skip


def test_a_two_process_state_resumes_in_one_process(world, tmp_path: Path) -> None:
    """2 processes x micro-batch 4 to step 3, then 1 process x 4 (2 accumulated micro-batches
    per step) to step 5: the weights of 1 process x 8 throughout, EMA included."""
    settings = {"steps": 5, "micro_batch_size": 4, "window_shards": 2, "checkpoint_every": 3,
                "use_ema": True, "ema_decay": 0.5}  # fmt: skip
    straight = train(_job(world, str(tmp_path / "one"), **settings))
    root = tmp_path / "two"
    job = _job(world, str(root), **settings)
    proc = _run_command(job, 2, tmp_path, "two")
    _wait_all([proc], tmp_path, "two")
    store = Storage(str(root))
    # As if both processes were lost after the state at step 3 (odd: a 2-process state
    # counts 3 micro-steps, which 1 process with 2 per step must not take as mid-step).
    store.remove_dir(*job.run_parts, "checkpoint-5")
    store.remove_dir("snapshots", FINAL)
    os.remove(root / "state" / job.fingerprint() / runs.STATUS_FILE)
    assert runs.choose_run(store, job).action == "continue"
    resumed = train(job)
    assert resumed.resumed_from == 3 and resumed.processes == 1
    # Within 1e-5: the 2-process steps sum two halves (float reassociation).
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-5, abs=1e-6)
    _assert_same_weights(tmp_path / "one" / "snapshots" / FINAL, root / "snapshots" / FINAL, 1e-5)


def test_launch_command_rendezvous() -> None:
    """One node rendezvouses with itself; several meet at one endpoint under one run id."""
    one = launch_command("job.json", 2)
    assert "--standalone" in one and "--nproc_per_node=2" in one
    assert not [a for a in one if a.startswith("--rdzv")]
    two = launch_command("job.json", 8, nodes=2, node_rank=1, rdzv_endpoint="n0:29400", rdzv_id="r")
    assert "--standalone" not in two
    assert {"--nnodes=2", "--node-rank=1", "--rdzv-backend=c10d", "--rdzv-endpoint=n0:29400",
            "--rdzv-id=r", "--nproc_per_node=8"} <= set(two)  # fmt: skip
    with pytest.raises(ValueError, match="rendezvous endpoint"):
        launch_command("job.json", 1, nodes=2, node_rank=0)
    with pytest.raises(ValueError, match="node_rank"):
        launch_command("job.json", 1, nodes=2, node_rank=2, rdzv_endpoint="n0:29400")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_nodes(job: TrainJob, nodes: int, tmp_path: Path, name: str, **popen):
    """``nodes`` torchrun launches of 1 process each meeting on loopback, each with its own
    TMPDIR: "machines" that share nothing local (the storage root is their shared store)."""
    job_file = write_job(job, str(tmp_path))
    endpoint = f"127.0.0.1:{_free_port()}"
    procs = []
    for rank in range(nodes):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "TMPDIR": str(_empty(tmp_path, f"{name}{rank}")),
        }
        command = launch_command(job_file, 1, nodes=nodes, node_rank=rank,
                                 rdzv_endpoint=endpoint, rdzv_id=name)  # fmt: skip
        if rank == 0 and popen.get("stdout"):
            stdout = popen["stdout"]
        else:
            stdout = (tmp_path / f"{name}{rank}.log").open("wb")  # noqa: SIM115 (the child's)
        procs.append(subprocess.Popen(
            command, env=env, cwd=tmp_path, stdout=stdout, stderr=subprocess.STDOUT,
            start_new_session=True,
        ))  # fmt: skip
    return procs


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill a launch as a lost machine loses it: torchrun starts its workers in their
    own sessions, out of reach of a killpg of the launcher's group."""
    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _wait_all(procs: list[subprocess.Popen], tmp_path: Path, name: str) -> None:
    """Every launch ends well (the log of one is ``name.log``; of several, one per node,
    ``name<rank>.log``); else every launch's tree is killed (none goes on loading the
    machine) and the failure shows each log as it then stood."""
    files = [f"{name}.log"] if len(procs) == 1 else [f"{name}{r}.log" for r in range(len(procs))]

    def logs() -> str:
        return "\n".join(
            f"--- {file}:\n{(tmp_path / file).read_text()[-2000:]}"
            for file in files
            if (tmp_path / file).exists()
        )

    try:
        codes = [proc.wait(timeout=240) for proc in procs]
    except subprocess.TimeoutExpired:
        for proc in procs:
            _kill_tree(proc)
        pytest.fail(f"{name}: not ended within 240 s\n{logs()}")
    assert codes == [0] * len(procs), logs()


def test_two_nodes_match_one_node_with_two_processes(world, tmp_path: Path) -> None:
    """2 nodes x 1 process (c10d rendezvous on loopback, separate local dirs) = 1 node x 2
    processes: the same global batch (2 x micro-batch 4), checkpoints on the way."""
    settings = {"steps": 4, "micro_batch_size": 4, "window_shards": 2, "checkpoint_every": 2,
                "keep_checkpoints": 1}  # fmt: skip
    one = _job(world, str(tmp_path / "one"), **settings)
    proc = _run_command(one, 2, tmp_path, "one")
    _wait_all([proc], tmp_path, "one")
    two = _job(world, str(tmp_path / "two"), **settings)
    _wait_all(_run_nodes(two, 2, tmp_path, "two"), tmp_path, "two")
    last = {n: json.loads(Storage(str(tmp_path / n)).read_text("state", "last_run.json"))
            for n in ("one", "two")}  # fmt: skip
    assert (last["two"]["nodes"], last["two"]["processes"]) == (2, 2)
    assert (last["one"]["nodes"], last["one"]["processes"]) == (1, 2)
    print("losses", last["one"]["losses"], last["two"]["losses"])
    # The same two-rank all-reduce over gloo, only across two torchrun agents: equal up to
    # float reassociation, within 1e-5 like one process against two.
    assert last["two"]["losses"] == pytest.approx(last["one"]["losses"], rel=1e-5, abs=1e-6)
    _assert_same_weights(tmp_path / "one" / "snapshots" / FINAL,
                         tmp_path / "two" / "snapshots" / FINAL, atol=1e-5)  # fmt: skip
    # Both ranks' RNG states (written on different "machines") are in the one checkpoint.
    store = Storage(str(tmp_path / "two"))
    (checkpoint,) = [
        n for n in store.listdir("state", two.fingerprint()) if n.startswith("checkpoint-")
    ]
    files = store.listdir("state", two.fingerprint(), checkpoint)
    assert {"random_states_0.pkl", "random_states_1.pkl", "_SUCCESS"} <= set(files)
    assert not [p for p in (tmp_path / "two" / "state" / two.fingerprint()).iterdir()
                if p.name.startswith(".")]  # fmt: skip


def test_both_nodes_killed_after_a_checkpoint_resume_it(world, tmp_path: Path) -> None:
    """Kill both nodes' whole process trees mid-run; both restarted (new local dirs) resume
    from the last checkpoint and end with the weights of an uninterrupted 2-node run."""
    settings = {"steps": 24, "checkpoint_every": 3, "keep_checkpoints": 1, "micro_batch_size": 4}
    straight = _job(world, str(tmp_path / "straight"), **settings)
    _wait_all(_run_nodes(straight, 2, tmp_path, "straight"), tmp_path, "straight")

    killed = _job(world, str(tmp_path / "killed"), **settings)
    procs = _run_nodes(killed, 2, tmp_path, "killed", stdout=subprocess.PIPE)
    # Node 0 logs every step (steps // 20 < 2) before that step's checkpoint: once step 9
    # is logged, checkpoint 6 is complete on both nodes (save ends at a barrier).
    seen = []
    for line in procs[0].stdout:
        seen.append(line.decode(errors="replace"))
        if "step 9/24" in seen[-1]:
            break
    assert "step 9/24" in seen[-1], "".join(seen)[-3000:]
    for proc in procs:
        _kill_tree(proc)
    store = Storage(killed.storage_root)
    assert not store.dir_complete("snapshots", FINAL)
    print("killed after", store.listdir("state", killed.fingerprint()))

    _wait_all(_run_nodes(killed, 2, tmp_path, "resumed"), tmp_path, "resumed")
    run = json.loads(store.read_text("state", "last_run.json"))
    print("resumed from step", run["resumed_from_step"])
    assert 6 <= run["resumed_from_step"] < 24 and run["nodes"] == 2
    expected = json.loads(Storage(straight.storage_root).read_text("state", "last_run.json"))
    assert run["losses"] == pytest.approx(expected["losses"], rel=1e-6, abs=1e-8)
    _assert_same_weights(tmp_path / "straight" / "snapshots" / FINAL,
                         tmp_path / "killed" / "snapshots" / FINAL)  # fmt: skip


@pytest.mark.slow
def test_sigkilled_run_resumes_from_s3_with_an_empty_local_disk(
    world, tmp_path: Path, s3_env: str
) -> None:
    settings = {"steps": 60, "checkpoint_every": 5, "snapshot_every": 30}
    straight = _job(world, f"{s3_env}/straight", **settings)
    proc = _run_command(straight, 1, tmp_path, "straight")
    _wait_all([proc], tmp_path, "straight")

    killed = _job(world, f"{s3_env}/killed", **settings)
    store = Storage(killed.storage_root)
    state = ("state", killed.fingerprint())
    proc = _run_command(killed, 1, tmp_path, "killed", env={"TMPDIR": str(_empty(tmp_path, "a"))})
    deadline = time.monotonic() + 240
    while not any(store.dir_complete(*state, name) for name in store.listdir(*state)):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint in time"
        store.fs.invalidate_cache()
        time.sleep(0.2)
    # Killing the launcher's group alone left the trainer running on to step 60.
    _kill_tree(proc)
    print("killed after", store.listdir(*state))
    assert not store.dir_complete("snapshots", FINAL)
    # Another "machine": nothing local survives; the state comes from S3 alone.
    proc = _run_command(killed, 1, tmp_path, "resumed", env={"TMPDIR": str(_empty(tmp_path, "b"))})
    _wait_all([proc], tmp_path, "resumed")
    run = json.loads(store.read_text("state", "last_run.json"))
    assert 0 < run["resumed_from_step"] < 60
    straight_store = Storage(straight.storage_root)
    with (
        straight_store.local_dir("snapshots", FINAL) as a,
        store.local_dir("snapshots", FINAL) as b,
    ):
        _assert_same_weights(a, b)


def _empty(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"tmp-{name}"
    path.mkdir()
    return path


@pytest.mark.parametrize(
    ("shape", "prediction_type"), [("sd1", "epsilon"), ("sd2", "v_prediction")]
)
def test_stable_diffusion_shapes_train_on_the_same_path(
    miniworld_paths, tokenizer_dir: str, tmp_path: Path, shape: str, prediction_type: str
) -> None:
    """Tiny random pipelines of SD 1.x / 2.x shape: 4 latent channels, an 8x VAE (four
    blocks), a 77-token CLIP text encoder, the VAE's scaling factor from its config."""
    config = TinyT2IConfig(
        resolution=64, unet_block_out_channels=(16, 32), unet_cross_attention=(True, True),
        text_hidden_size=32, text_layers=1, text_heads=2, text_intermediate_size=64,
        vae_block_out_channels=(8, 8, 8, 8), vae_latent_channels=4, vae_norm_num_groups=4,
        prediction_type=prediction_type, sampler="ddim",
    )  # fmt: skip
    pipe = build_pipeline(tokenizer_dir, config, seed=0)
    pipe.vae.register_to_config(scaling_factor=0.18215)
    assert pipe.tokenizer.model_max_length == 77
    model = save_pipeline(pipe, tmp_path / shape)
    cache = str(tmp_path / "cache")
    version, shards = _cached_world(str(miniworld_paths.corpus), model, cache)
    cached = latent_cache.read_latent_shard(Storage(cache), version, shards[0])
    assert cached.mean.shape[1:] == (4, 8, 8) and cached.meta["resolution"] == "64"
    world = {"corpus": str(miniworld_paths.corpus), "model": model, "cache": cache,
             "vae_version": version, "shards": shards}  # fmt: skip
    result = train(_job(world, str(tmp_path / "out"), steps=2, micro_batch_size=4))
    assert all(np.isfinite(result.losses))
    trained = load_pipeline(tmp_path / "out" / "snapshots" / FINAL, device="cpu")
    assert trained.scheduler.config.prediction_type == prediction_type
    assert trained.vae.config.scaling_factor == pytest.approx(0.18215)


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
    # The hook between denoising steps (the CPU share's rebalancer) runs after each one of
    # each batch and changes nothing.
    calls: list[None] = []
    rebatched = generate(
        pipe, prompts, seeds, batch_size=2, between_steps=lambda: calls.append(None), **kw
    )
    assert len(calls) == 2 * 3
    for a, b in zip(first, rebatched, strict=True):
        assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 2
    assert not np.array_equal(np.asarray(first[0]), np.asarray(first[2]))


def test_build_miniworld_base_is_cached(miniworld_paths, tmp_path: Path) -> None:
    from recap_dagster.miniworld.t2i_base import build_miniworld_base

    root = miniworld_paths.root
    out = build_miniworld_base(root, str(tmp_path / "base"), QUICK_PROFILE)
    stamp = (Path(out) / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert build_miniworld_base(root, out, QUICK_PROFILE) == out
    assert (Path(out) / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    pipe = load_pipeline(out, device="cpu")
    assert pipe.vae.config.scaling_factor != 1.0
    assert isinstance(pipe.recap_t2i_config, TinyT2IConfig)


def test_two_processes_cache_what_one_caches(world, tmp_path: Path) -> None:
    """The group's latents by 2 CPU processes (spawned, as on 2 GPUs), each with 2 DataLoader
    workers, are the single-process cache's, byte for byte."""
    job = latent_cache.LatentJob(
        base_model=world["model"],
        storage_root=str(tmp_path / "two"),
        shards_root=world["corpus"],
        batch_size=5,
        num_workers=2,
    )
    events: list[dict] = []
    stats = latent_cache.cache_group(
        job, world["shards"], [torch.device("cpu")] * 2, on_event=events.append
    )
    assert stats.shards_written == sorted(world["shards"])
    assert {e["rank"] for e in events} == {0, 1}
    version = latent_cache.latent_vae_version(world["model"])
    for shard in world["shards"]:
        parts = (latent_cache.LATENTS_DIR, version, latent_cache.latent_file(shard))
        two = latent_cache.read_latent_shard(Storage(job.storage_root), version, shard)
        one = latent_cache.read_latent_shard(Storage(world["cache"]), version, shard)
        assert two.keys == one.keys
        assert torch.equal(two.mean, one.mean) and torch.equal(two.std, one.std), shard
        assert Storage(job.storage_root).exists(*parts)
    again = latent_cache.cache_group(job, world["shards"], [torch.device("cpu")] * 2)
    assert again.shards_kept == sorted(world["shards"]) and again.rows == 0


# -- the machine-local cache of an s3:// latent cache ---------------------------------------
@pytest.fixture
def counting_s3(s3_env: str) -> Iterator[tuple[str, str, list[dict]]]:
    """A second S3 endpoint onto the same loopback moto backends that records every GET
    it serves (object path, Range header, bytes sent), from any process: (bucket URI,
    endpoint, records)."""
    from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    from recap_dagster.orchestration.launcher import free_port

    app = DomainDispatcherApplication(create_backend_app)
    records: list[dict] = []

    def counting(environ, start_response):
        if environ["REQUEST_METHOD"] != "GET":
            return app(environ, start_response)
        record = {"path": environ["PATH_INFO"], "range": environ.get("HTTP_RANGE")}

        def start(status, headers, *args):
            record["bytes"] = int(dict(headers).get("Content-Length", 0))
            return start_response(status, headers, *args)

        records.append(record)  # list.append is atomic: the server runs a thread a request
        return app(environ, start)

    server = make_server(
        "127.0.0.1", free_port(), counting, True, request_handler=MotoRequestHandler
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield s3_env, f"http://127.0.0.1:{server.server_port}", records
    finally:
        server.shutdown()
        thread.join()


def _latent_gets(records: list[dict]) -> dict[str, list[dict]]:
    """The recorded GETs of latent files, by file name."""
    out: dict[str, list[dict]] = {}
    for record in records:
        if record["path"].endswith(".safetensors"):
            out.setdefault(record["path"].rsplit("/", 1)[1], []).append(record)
    return out


def _synthetic_cache(root: str, captions_dir: Path, shards: int, rows: int) -> StreamSpec:
    """A latent cache of ``shards`` x ``rows`` random float16 latents under ``root`` (with
    every caption ok) and the stream spec of it, one shard a window."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    gen = torch.Generator().manual_seed(0)
    names = [f"{i:05d}" for i in range(shards)]
    captions_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        keys = [f"{name}{r:04d}" for r in range(rows)]
        data = latent_cache.LatentShard(
            keys,
            torch.randn(rows, 4, 2, 2, generator=gen).half(),
            torch.rand(rows, 4, 2, 2, generator=gen).half(),
            {"dtype": "float16"},
        )
        latent_cache.write_latent_shard(Storage(root), "vae", name, data)
        table = {
            "key": keys,
            "status": ["ok"] * rows,
            "caption": [f"a red circle {k}" for k in keys],
        }
        pq.write_table(pa.table(table), captions_dir / f"{name}.parquet")
    return StreamSpec(root, "vae", tuple(names), CaptionSource(root=str(captions_dir)),
                      window_shards=1)  # fmt: skip


#: One process of a two-process reading of a synthetic cache: a DataLoader with two
#: workers over its rank's share; it writes what it read, says "read", then keeps its
#: workers (readers on the machine) alive until its stdin closes.
_READER = """
import json, sys, torch
from transformers import CLIPTokenizer
from recap_dagster.t2i.stream import LatentStream, StreamSpec
spec, tokenizer, rank, count, out = json.loads(sys.argv[1])
torch.set_num_threads(1)
stream = LatentStream(StreamSpec.from_dict(spec), CLIPTokenizer.from_pretrained(tokenizer),
                      micro_batch_size=4, rank=rank, world_size=2)
batches = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2))
read = [next(batches) for _ in range(count)]
torch.save([{"keys": b["keys"], "mean": b["mean"]} for b in read], out)
print("read", flush=True)
sys.stdin.read()
"""


def _reader_env(endpoint: str, cache_dir: Path, **extra: str) -> dict[str, str]:
    """A reader subprocess's environment: the counting endpoint, this machine's cache."""
    here = {"AWS_ENDPOINT_URL": endpoint, "RECAP_LATENT_CACHE_DIR": str(cache_dir)}
    code = {"PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    return {**os.environ, **here, **code, **extra}


def test_two_processes_with_two_workers_fetch_each_latent_file_once(
    counting_s3, tokenizer_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 processes x 2 DataLoader workers (4 readers on one machine, not in step with each
    other) reading an s3:// cache: one GET per latent file, the mean alone, and the same
    batches as one local reader."""
    bucket, endpoint, records = counting_s3
    spec = _synthetic_cache(f"{bucket}/cache", tmp_path / "captions", shards=12, rows=8)
    cache_dir, count = tmp_path / "machine", 3
    procs = []
    for rank in (0, 1):
        args = json.dumps(
            [spec.to_dict(), tokenizer_dir, rank, count, str(tmp_path / f"r{rank}.pt")]
        )
        env = _reader_env(endpoint, cache_dir, LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
        procs.append(subprocess.Popen([sys.executable, "-c", _READER, args], env=env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE))  # fmt: skip
    try:
        for proc in procs:  # both have read their batches, their workers still alive
            assert proc.stdout.readline() == b"read\n"
    finally:
        for proc in procs:
            proc.stdin.close()
        for proc in procs:
            proc.wait(timeout=60)
    gets = _latent_gets(records)
    # Their workers exited holding the last windows: the next reader to start removes them.
    left_behind = sorted(p.name for p in cache_dir.rglob("*.safetensors"))
    parts = ("t2i_latents", "vae")
    store = Storage(spec.latents_root)
    next_run = Reader("next", "0.0", ("0.0",))
    monkeypatch.setenv("RECAP_LATENT_CACHE_DIR", str(cache_dir))
    root_dir = LatentStream(spec, None, micro_batch_size=4)._cache_dir()
    MachineCache(store, parts, root_dir, next_run, mean_only=True).collect_garbage()
    assert not list(cache_dir.rglob("*.safetensors")), left_behind
    # 3 global batches of 8 are the first 3 windows (8 rows each); the workers ran ahead
    # (DataLoader prefetch, the next window's fetch) but not past epoch 0's 12 windows.
    windows = LatentStream(spec, None, micro_batch_size=4)._windows(0)
    assert {f"{w[0]}.safetensors" for w in windows[:3]} <= gets.keys()
    assert all(len(requests) == 1 for requests in gets.values()), gets
    # The mean-only fetch: a ranged read (of the whole of files this small, under its 1 MiB
    # first read; the bytes saved are checked in the next test).
    assert all(requests[0]["range"] for requests in gets.values()), gets
    # The same global batches as one reader with twice the micro-batch.
    monkeypatch.setenv("RECAP_LATENT_CACHE_DIR", str(tmp_path / "reference"))
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    one = iter(LatentStream(spec, tokenizer, micro_batch_size=8))
    halves = [torch.load(tmp_path / f"r{rank}.pt") for rank in (0, 1)]
    for step in range(count):
        single = next(one)
        assert halves[0][step]["keys"] + halves[1][step]["keys"] == single["keys"]
        joined = torch.cat([halves[0][step]["mean"], halves[1][step]["mean"]])
        assert torch.equal(joined, single["mean"])
    one.close()


def test_a_mean_only_copy_reads_the_means_of_a_full_read(
    counting_s3, tokenizer_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default (mean-only) fetch gives the batches of a full read, std aside (zero, and
    unused: the trainer takes ``mean`` unless it samples latents), without fetching any
    byte of ``std``; the local copies are gone once the stream is closed."""
    import s3fs

    from recap_dagster.t2i import machine_cache

    bucket, endpoint, records = counting_s3
    spec = _synthetic_cache(f"{bucket}/cache", tmp_path / "captions", shards=4, rows=8)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.setenv("RECAP_LATENT_CACHE_DIR", str(tmp_path / "machine"))
    monkeypatch.setattr(machine_cache, "HEAD_BYTES", 64)  # under the header: 3 ranged reads
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)

    def read(spec: StreamSpec) -> tuple[list[dict], dict[str, list[dict]]]:
        """6 micro-batches of 4 (windows 0-2, the fourth prefetched) and the GETs made."""
        records.clear()
        stream = iter(LatentStream(spec, tokenizer, micro_batch_size=4))
        batches = [next(stream) for _ in range(6)]
        stream.close()
        return batches, _latent_gets(records)

    mean_only, mean_gets = read(spec)
    full, full_gets = read(replace(spec, read_std=True))
    for a, b in zip(mean_only, full, strict=True):
        assert a["keys"] == b["keys"]
        for name in ("mean", "eps", "noise", "timesteps", "input_ids"):
            assert torch.equal(a[name], b[name]), name
        assert not a["std"].any() and b["std"].any()
    store = Storage(spec.latents_root)
    assert mean_gets.keys() == full_gets.keys() == {f"{s}.safetensors" for s in spec.shards}
    for name, requests in full_gets.items():
        size = len(store.read_bytes("t2i_latents", "vae", name))
        assert len(requests) == 1 and requests[0]["bytes"] == size
        std_bytes = 8 * 4 * 2 * 2 * 2  # rows x C x h x w x float16, stored after the mean
        assert sum(r["bytes"] for r in mean_gets[name]) == size - std_bytes
        assert all(r["range"] for r in mean_gets[name])
    assert not list((tmp_path / "machine").rglob("*.safetensors"))


#: Holds a local copy as reader ``0.1`` of a two-reader session until it is killed.
_HOLDER = """
import json, sys
from recap_dagster.storage.root import Storage
from recap_dagster.t2i.machine_cache import MachineCache, Reader
root, cache_dir = json.loads(sys.argv[1])
reader = Reader("run", "0.1", ("0.0", "0.1"))
cache = MachineCache(Storage(root), ("t2i_latents", "vae"), cache_dir, reader, mean_only=True)
print(cache.acquire("00000.safetensors", "0.0"), flush=True)
sys.stdin.read()
"""


def test_a_killed_holder_does_not_keep_a_local_copy(
    counting_s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A live holder keeps the machine's copy when the other reader leaves; once it is
    killed (it never releases), its entry no longer blocks the eviction."""
    import s3fs

    bucket, endpoint, records = counting_s3
    spec = _synthetic_cache(f"{bucket}/cache", tmp_path / "captions", shards=1, rows=8)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
    cache_dir, name = tmp_path / "machine", "00000.safetensors"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, json.dumps([spec.latents_root, str(cache_dir)])],
        env=_reader_env(endpoint, cache_dir), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        path = holder.stdout.readline().decode().strip()
        me = Reader("run", "0.0", ("0.0", "0.1"))
        cache = MachineCache(Storage(spec.latents_root), ("t2i_latents", "vae"), str(cache_dir),
                             me, mean_only=True)  # fmt: skip
        assert cache.acquire(name, "0.0") == path  # the holder's download, not a second one
        cache.release(name, "0.0")
        assert Path(path).exists()  # reader 0.1 still holds it
    finally:
        holder.kill()
        holder.wait(timeout=60)
    cache.collect_garbage()  # as the next reader to start does
    assert not Path(path).exists() and not Path(path + LEDGER_SUFFIX).exists()
    assert len(_latent_gets(records)[name]) == 1


def test_a_diverged_two_process_run_ends_failed_naming_the_step(world, tmp_path: Path) -> None:
    """A loss that is not finite stops every process at the same step (it is all-reduced
    first): torchrun ends non-zero, the log names the step, no final snapshot is written."""
    job = _job(world, str(tmp_path / "run"), steps=6, micro_batch_size=4, window_shards=2,
               learning_rate=1e12)  # fmt: skip
    proc = _run_command(job, 2, tmp_path, "diverged")
    try:
        code = proc.wait(timeout=240)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        pytest.fail("the diverged run did not end:\n" + (tmp_path / "diverged.log").read_text())
    log = (tmp_path / "diverged.log").read_text()
    assert code != 0, log[-3000:]
    assert "training diverged: loss" in log and "at step" in log, log[-3000:]
    assert not Storage(job.storage_root).dir_complete("snapshots", FINAL)


def test_a_trainer_left_alone_takes_the_cores_of_its_cpu_share(world, tmp_path: Path) -> None:
    """Launched for a step that started with half the cores (two slots), the trainer
    takes both once it sees no other step running on the machine."""
    share = CpuShare(cores=2, slots=2, folder=str(tmp_path / "steps"))
    job = _job(world, str(tmp_path / "run"), steps=2)
    with share.holding():  # as the Dagster step that launches it
        proc = _run_command(job, 1, tmp_path, "alone", env=share.to_env(processes=1))
        _wait_all([proc], tmp_path, "alone")
    assert "CPU threads 1 -> 2" in (tmp_path / "alone.log").read_text()
