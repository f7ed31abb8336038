"""Text-to-image training at corpus shape: throughput, memory and start-up.

    .venv/bin/python benchmarks/t2i_throughput.py [--steps 40] [--shards 8] [--per-shard 500]

(a) Training images/s of the asset's code path (the trainer: streamed latent cache,
    DataLoader worker, checkpoint-free run) against a bare diffusers-style loop over the
    same model, the same cached latents held in memory, the same batch. Target: >= 0.95.
(b) Peak RSS of a training process over N and over 4N images (one epoch each, a fresh
    process per run, read from the kernel's ``ru_maxrss``). Target: within 10%.
(c) Time from launching the training command (torchrun) to the end of its first
    optimizer step.

The model is the miniworld's text-to-image size (``MINIWORLD_PROFILE``); the latent cache
is synthetic (random latents of the model's shape, short captions), written as the
``t2i_latents`` asset writes it, so any number of shards can be made in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from synthetic_latents import cache_job, write_cache

from recap_dagster.miniworld.captions import vocabulary_texts
from recap_dagster.miniworld.run_configs import op_settings
from recap_dagster.miniworld.t2i_profiles import MINIWORLD_PROFILE
from recap_dagster.miniworld.tokenizer import train_clip_tokenizer
from recap_dagster.storage.root import Storage
from recap_dagster.t2i.model import build_pipeline, load_pipeline, save_pipeline
from recap_dagster.t2i.train import TrainConfig, TrainJob, launch_command


def make_world(root: Path, shards: int, per_shard: int) -> tuple[str, str, list[str]]:
    """A saved miniworld-size pipeline and a synthetic latent cache + caption tables."""
    tokenizer = root / "tokenizer"
    train_clip_tokenizer(vocabulary_texts(), str(tokenizer), vocab_size=600)
    pipe = build_pipeline(tokenizer, MINIWORLD_PROFILE.model, seed=0)
    model = save_pipeline(pipe, root / "model")
    config = MINIWORLD_PROFILE.model
    shape = (config.vae_latent_channels, config.latent_size, config.latent_size)
    names = write_cache(root / "store", shape, shards, per_shard)
    return model, str(root / "store"), names


def job_for(model: str, store: str, shards: list[str], out: str, config: TrainConfig) -> TrainJob:
    return cache_job(model, store, shards, out, config, base_version="bench", num_workers=1)


def bare_loop(model: str, store: str, shards: list[str], config: TrainConfig, steps: int) -> float:
    """diffusers' train_text_to_image.py loop over in-memory cached latents: images/s."""
    from diffusers import DDPMScheduler

    from recap_dagster.t2i.latents import read_latent_shard

    storage = Storage(store)
    latents = torch.cat([read_latent_shard(storage, "v", s).mean for s in shards[:2]])
    captions = [
        c
        for s in shards[:2]
        for c in storage.read_parquet("captions", f"{s}.parquet")["caption"].to_pylist()
    ]
    pipe = load_pipeline(model, device="cpu")
    unet, text_encoder, tokenizer = pipe.unet, pipe.text_encoder, pipe.tokenizer
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    unet.train()
    text_encoder.train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=1e-2)
    scaling = pipe.vae.config.scaling_factor
    batch = config.micro_batch_size
    start = 0.0
    for step in range(steps + 3):
        if step == 3:
            start = time.perf_counter()  # the first steps warm up allocators
        idx = torch.randint(0, len(latents), (batch,))
        x = latents[idx] * scaling
        noise = torch.randn_like(x)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
        ids = tokenizer([captions[i] for i in idx.tolist()], padding="max_length",
                        max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids  # fmt: skip
        hidden = text_encoder(ids, return_dict=False)[0]
        pred = unet(scheduler.add_noise(x, noise, t), t, hidden, return_dict=False)[0]
        from diffusers.training_utils import compute_snr

        snr = compute_snr(scheduler, t)
        weight = torch.clamp(snr, max=config.snr_gamma) / snr
        per = torch.nn.functional.mse_loss(pred.float(), noise.float(), reduction="none")
        loss = (per.mean(dim=(1, 2, 3)) * weight).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps * batch / (time.perf_counter() - start)


# Runs the trainer's command in this interpreter and prints its peak RSS (KiB) and its
# children's (the DataLoader worker), which ru_maxrss keeps apart.
RSS_WRAPPER = """
import json, resource, sys
from recap_dagster.t2i.train import main
main(["--job", sys.argv[1]])
own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"trainer_kib": own, "worker_kib": children}))
"""


def run_command(
    job: TrainJob, workdir: Path, *, torchrun: bool = False
) -> tuple[dict, float, dict]:
    """Run the training command; (its run summary, launch -> first step s, peak RSS MiB of
    the trainer and of its DataLoader worker)."""
    job_file = workdir / f"job-{time.monotonic_ns()}.json"
    job_file.write_text(job.to_json())
    if torchrun:  # exactly what sd_checkpoints launches
        command = launch_command(str(job_file), 1)
    else:
        command = [sys.executable, "-c", RSS_WRAPPER, str(job_file)]
    launched = time.time()
    done = subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True)  # fmt: skip
    summary = json.loads(Storage(job.storage_root).read_text("state", "last_run.json"))
    rss = {} if torchrun else json.loads(done.stdout.strip().splitlines()[-1])
    return summary, summary["first_step_at"] - launched, {k: v / 1024 for k, v in rss.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="steps timed in (a)")
    parser.add_argument("--shards", type=int, default=8, help="shards of the N run in (b)")
    parser.add_argument("--per-shard", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="recap-t2i-bench-"))
    model, store, names = make_world(tmp, 4 * args.shards, args.per_shard)
    finetune = op_settings(TrainConfig, "default", "sd_checkpoints")
    base = replace(finetune, checkpoint_every=0, snapshot_every=0)
    print(f"model: miniworld size, batch {base.batch_size}, one torch thread; cache: "
          f"{4 * args.shards} shards x {args.per_shard} synthetic latents in {tmp}")  # fmt: skip

    # (a) throughput, asset path vs bare loop, alternated twice
    rates: dict[str, list[float]] = {"asset": [], "bare": []}
    for repeat in range(2):
        config = replace(base, steps=args.steps + 3)
        summary, _, _ = run_command(
            job_for(model, store, names, str(tmp / f"a{repeat}"), config), tmp
        )
        # the command's samples/s includes the start-up; the per-step rate excludes it
        rates["asset"].append(summary["steady_samples_per_second"])
        rates["bare"].append(bare_loop(model, store, names, base, args.steps))
    asset, bare = max(rates["asset"]), max(rates["bare"])
    print(f"(a) images/s: asset path {asset:.1f}, bare loop {bare:.1f}, ratio {asset / bare:.3f}"
          f"  (runs: {rates})")  # fmt: skip

    # (b) peak RSS over N and 4N images, one epoch each
    rss = {}
    for label, count in (("N", args.shards), ("4N", 4 * args.shards)):
        images = count * args.per_shard
        config = replace(base, steps=images // base.batch_size)
        _, _, peak = run_command(
            job_for(model, store, names[:count], str(tmp / label), config), tmp
        )
        rss[label] = peak
        print(
            f"(b) {label}: {images} images, {config.steps} steps, peak RSS trainer "
            f"{peak['trainer_kib']:.0f} MiB, DataLoader worker {peak['worker_kib']:.0f} MiB"
        )
    ratio = {k: rss["4N"][k] / rss["N"][k] for k in rss["N"]}
    print(
        f"(b) peak RSS 4N / N: trainer {ratio['trainer_kib']:.3f}, worker {ratio['worker_kib']:.3f}"
    )

    # (c) launch (torchrun) -> first optimizer step
    config = replace(base, steps=2)
    job = job_for(model, store, names, str(tmp / "c"), config)
    summary, first, _ = run_command(job, tmp, torchrun=True)
    print(f"(c) launch -> first optimizer step: {first:.1f} s "
          f"(of which in the trainer: {summary['first_step_seconds']:.1f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
