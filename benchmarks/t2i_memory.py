"""Memory of fine-tuning real Stable Diffusion (UNet + CLIP text encoder): estimate and check.

    .venv/bin/python benchmarks/t2i_memory.py [--models sd15 sd21] [--precision no bf16]
        [--ema off on] [--optimizer adamw adamw_8bit] [--checkpointing off on]
    .venv/bin/python benchmarks/t2i_memory.py --real-step [--shape sd15|sd21|tiny]
        [--precision no] [--optimizer adamw] [--ema off]

Estimate (default; meta device only, seconds, < 1 GB): for SD 1.5 and SD 2.1's published
shapes (:mod:`recap_dagster.t2i.real_shapes`) prints the parameter counts, the activation
line (bytes per sample and intercept, from the saved tensors of a meta forward at micro-batch
1 and 2) and, for every picked configuration, the bytes per component of one training
process (:mod:`recap_dagster.t2i.memory`), its total at micro-batch 1 and the largest
micro-batch that fits 24, 40 and 80 GiB by that estimate, at 1 process.

``--real-step``: builds the real-size pipeline (random init, fp32, saved in a temp dir with
the miniworld tokenizer), a one-shard synthetic latent cache at the UNet's latent size, and
runs ONE optimizer step of the trainer itself (``recap_dagster.t2i.train.train``, batch 1)
in a fresh child process per measurement, with gradient checkpointing off and on. Prints
the child's peak RSS (and CUDA peaks when on a GPU) after the step, before the final
snapshot and training state the trainer writes, then its peak over the whole run, against
the estimate. A child killed by the kernel or out of CUDA memory is "did not fit". SD 1.5
needs about 25 GB of disk (pipeline 4.3 GB, final snapshot 4.3 GB, training state with
AdamW 12 GB) and, on a CPU, about 25-40 GB of RAM.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recap_dagster.t2i.memory import (  # noqa: E402
    CUDA_CONTEXT_BYTES,
    CUDA_OVERHEAD_BYTES,
    GIB,
    ActivationEstimate,
    MemoryEstimate,
    TrainSetup,
    activation_estimate,
    autocast_weight_bytes,
    estimate,
    largest_micro_batch,
    meta_models,
    parameter_count,
)
from recap_dagster.t2i.real_shapes import SHAPES, SDShapes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CAPACITIES_GIB = (24, 40, 80)


def gib(value: int) -> str:
    return f"{value / GIB:6.2f}"


class Estimator:
    """Estimates for one model's shapes, reusing the meta measurements between setups."""

    def __init__(self, shapes: SDShapes) -> None:
        self.shapes = shapes
        self.unet, self.text_encoder = meta_models(shapes.unet, shapes.text_encoder)
        self._lines: dict[tuple[bool, str], ActivationEstimate] = {}
        self._copies: dict[str, int] = {}

    def line(self, checkpointing: bool, precision: str) -> ActivationEstimate:
        key = (checkpointing, precision)
        if key not in self._lines:
            self._lines[key] = activation_estimate(
                self.unet,
                self.text_encoder,
                gradient_checkpointing=checkpointing,
                mixed_precision=precision,
            )
        return self._lines[key]

    def __call__(self, setup: TrainSetup) -> MemoryEstimate:
        if setup.mixed_precision not in self._copies:
            self._copies[setup.mixed_precision] = autocast_weight_bytes(
                self.unet, self.text_encoder, setup.mixed_precision
            )
        return estimate(
            self.unet,
            self.text_encoder,
            setup,
            activations=self.line(setup.gradient_checkpointing, setup.mixed_precision),
            autocast_weights=self._copies[setup.mixed_precision],
        )


def vae_parameters(config: dict[str, Any]) -> int:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return parameter_count(AutoencoderKL(**config))


def print_estimates(key: str, args: argparse.Namespace) -> None:
    shapes = SHAPES[key]
    started = time.perf_counter()
    estimator = Estimator(shapes)
    unet_n, text_n = parameter_count(estimator.unet), parameter_count(estimator.text_encoder)
    size = shapes.unet["sample_size"]
    print(
        f"\n=== {shapes.name}: UNet {unet_n / 1e6:.1f} M, text encoder {text_n / 1e6:.1f} M "
        f"parameters, trained together ({(unet_n + text_n) / 1e6:.1f} M); VAE "
        f"{vae_parameters(shapes.vae) / 1e6:.1f} M stays on the CPU (cached latents). "
        f"Latents {shapes.unet['in_channels']}x{size}x{size} ({8 * size} px), "
        f"{shapes.text_encoder['max_position_embeddings']} tokens."
    )
    print("activations (saved for the backward, flash-attention style; with checkpointing")
    print("plus the largest block the backward recomputes):")
    print(f"  {'precision':<9} {'checkpointing':<13} {'GiB/sample':>10} {'intercept MiB':>13}")
    for precision in args.precision:
        for checkpointing in args.checkpointing:
            line = estimator.line(checkpointing == "on", precision)
            print(
                f"  {precision:<9} {checkpointing:<13} {gib(line.per_sample):>10} "
                f"{line.intercept / 2**20:>13.1f}"
            )
    header = (
        f"  {'prec':<4} {'ema':<7} {'optimizer':<10} {'ckpt':<4} | {'weights':>7} "
        f"{'ac-copy':>7} {'grads':>6} {'optim':>6} {'ema':>6} {'ovh':>6} {'step+':>6} "
        f"{'act@1':>6} {'tot@1':>6} | " + " ".join(f"{c:>4}G" for c in CAPACITIES_GIB)
    )
    print("per process (GiB; max micro-batch that fits each capacity, 0 = none):")
    print(header)
    for precision in args.precision:
        for ema in args.ema:
            for optimizer in args.optimizer:
                for checkpointing in args.checkpointing:
                    setup = TrainSetup(
                        optimizer=optimizer,
                        mixed_precision=precision,
                        gradient_checkpointing=checkpointing == "on",
                        use_ema=ema != "off",
                        ema_offload=ema == "offload",
                    )
                    result = estimator(setup)
                    step = max(result.optimizer_step_temporary, result.ema_update_temporary)
                    fits = " ".join(
                        f"{largest_micro_batch(result, c * GIB):>5}" for c in CAPACITIES_GIB
                    )
                    print(
                        f"  {precision:<4} {ema:<7} {optimizer:<10} {checkpointing:<4} | "
                        f"{gib(result.weights):>7} {gib(result.autocast_weights):>7} "
                        f"{gib(result.gradients):>6} {gib(result.optimizer):>6} "
                        f"{gib(result.ema):>6} {gib(result.overhead):>6} {gib(step):>6} "
                        f"{gib(result.activations.at(1)):>6} {gib(result.total(1)):>6} | {fits}"
                    )
    grads = 4 * (unet_n + text_n)
    print(
        f"step+: the optimizer step's / EMA update's temporary (foreach AdamW's sqrt of the "
        f"UNet group's exp_avg_sq; the UNet EMAModel's foreach step, plus its shadow when "
        f"offloaded), live once the activations are freed:\n"
        f"tot = max(static + act, static - ac-copy + step+).\n"
        f"DDP (processes > 1) adds its gradient buckets, about one more gradient copy: "
        f"+{grads / GIB:.2f} GiB per process. ({time.perf_counter() - started:.1f} s)"
    )


# --------------------------------------------------------------------------- --real-step

# Runs the trainer in this interpreter: one optimizer step; records the peak RSS (and CUDA
# peaks) when the step's progress callback fires, i.e. before the final snapshot and state.
CHILD = """
import json, resource, sys, time
import torch
from recap_dagster.t2i.train import TrainJob, train
job = TrainJob.from_json(open(sys.argv[1]).read())
# The interpreter and libraries, before any model: VmRSS now (ru_maxrss is a peak).
status = open("/proc/self/status").read().split("VmRSS:")[1]
seen = {"baseline_kib": int(status.split()[0])}
def progress(step, steps, loss, rate):
    seen["step_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seen["step_at"] = time.perf_counter()
    if torch.cuda.is_available():
        seen["cuda_allocated"] = torch.cuda.max_memory_allocated()
        seen["cuda_reserved"] = torch.cuda.max_memory_reserved()
    seen["loss"] = loss
started = time.perf_counter()
train(job, on_progress=progress)
seen["after_step_s"] = time.perf_counter() - seen["step_at"]
seen["step_s"] = seen["step_at"] - started
del seen["step_at"]
open(sys.argv[2], "w").write(json.dumps(seen))
"""


def build_pipeline_dir(root: Path, shapes: SDShapes) -> str:
    """A random-init fp32 pipeline of ``shapes`` with the miniworld tokenizer (77 tokens)."""
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from recap_dagster.miniworld.captions import vocabulary_texts
    from recap_dagster.miniworld.tokenizer import train_clip_tokenizer

    train_clip_tokenizer(vocabulary_texts(), str(root / "tokenizer"), vocab_size=600)
    tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"), model_max_length=77)
    torch.manual_seed(0)
    # The real vocabulary (49,408) holds the miniworld's 600 ids; pooling needs its eos id.
    text_config = CLIPTextConfig(
        **shapes.text_encoder,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # SD 2.1 (768 px) predicts v; 1.5 and the tiny one epsilon. Same memory either way.
    prediction = "v_prediction" if shapes.unet["sample_size"] == 96 else "epsilon"
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**shapes.vae),
        text_encoder=CLIPTextModel(text_config),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**shapes.unet),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out = root / "model"
    pipe.save_pretrained(str(out), safe_serialization=True)
    return str(out)


def run_child(job: Any, workdir: Path) -> dict[str, Any]:
    """The trainer in a fresh process: its report, and its whole-run peak RSS (wait4)."""
    job_file, report = workdir / "job.json", workdir / "report.json"
    job_file.write_text(job.to_json())
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    started = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(job_file), str(report)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    # wait4 gives this child's own rusage (RUSAGE_CHILDREN would mix the runs).
    stderr_lines: list[str] = []
    assert child.stderr is not None
    for line in child.stderr:
        stderr_lines = [*stderr_lines[-40:], line]
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    result: dict[str, Any] = {
        "returncode": child.returncode,
        "peak_kib": usage.ru_maxrss,
        "seconds": time.perf_counter() - started,
    }
    if child.returncode == 0 and report.exists():
        result.update(json.loads(report.read_text()))
    else:
        tail = "".join(stderr_lines)
        oom = "OutOfMemoryError" in tail or "out of memory" in tail
        killed = child.returncode < 0
        result["did_not_fit"] = oom or killed
        result["error"] = tail[-2000:]
    return result


def real_step(args: argparse.Namespace) -> None:
    from synthetic_latents import cache_job, write_cache

    from recap_dagster.t2i.train import TrainConfig

    shapes = SHAPES[args.shape]
    precision, optimizer = args.precision[0], args.optimizer[0]
    ema, offload = args.ema[0] != "off", args.ema[0] == "offload"
    on_gpu = torch.cuda.is_available()
    tmp = Path(tempfile.mkdtemp(prefix="recap-t2i-memory-"))
    print(
        f"{shapes.name} real step in {tmp} ({'GPU' if on_gpu else 'CPU'}; precision "
        f"{precision}, {optimizer}, EMA {args.ema[0]}, micro-batch 1)"
    )
    started = time.perf_counter()
    model = build_pipeline_dir(tmp, shapes)
    size, channels = shapes.unet["sample_size"], shapes.unet["in_channels"]
    store = str(tmp / "store")
    shards = write_cache(store, (channels, size, size), shards=1, per_shard=4)
    print(f"  built the pipeline and the cache in {time.perf_counter() - started:.1f} s")
    estimator = Estimator(shapes)
    for checkpointing in (False, True):
        config = TrainConfig(
            steps=1,
            batch_size=1,
            micro_batch_size=1,
            checkpoint_every=0,
            snapshot_every=0,
            use_ema=ema,
            ema_offload=offload,
            gradient_checkpointing=checkpointing,
            optimizer=optimizer,
        )
        workdir = tmp / f"run-ckpt-{'on' if checkpointing else 'off'}"
        workdir.mkdir()
        # The data in the trainer's own process (no DataLoader worker): one RSS to read.
        job = cache_job(
            model, store, shards, str(workdir / "out"), config,
            base_version="memory-bench", mixed_precision=precision, num_workers=0,
        )  # fmt: skip
        result = run_child(job, workdir)
        guess = estimator(
            TrainSetup(
                optimizer=optimizer,
                mixed_precision=precision,
                gradient_checkpointing=checkpointing,
                use_ema=ema,
                ema_offload=offload,
            )
        )
        label = f"  checkpointing {'on ' if checkpointing else 'off'}:"
        if result["returncode"] != 0:
            what = "did not fit" if result["did_not_fit"] else "failed"
            print(
                f"{label} {what} (exit {result['returncode']}, peak RSS "
                f"{result['peak_kib'] / 2**20:.2f} GiB)\n{result['error']}"
            )
            continue
        # On a CPU the process also holds the interpreter, torch and the VAE, and no CUDA
        # context: compare RSS with the estimate less its CUDA overhead.
        without = guess.total(1) - guess.overhead
        base = result["baseline_kib"]
        print(
            f"{label} step {result['step_s']:.1f} s, loss {result['loss']:.4f}; peak RSS "
            f"after the step {result['step_kib'] / 2**20:.2f} GiB, over the run (with the "
            f"final snapshot + state, {result['after_step_s']:.1f} s) "
            f"{result['peak_kib'] / 2**20:.2f} GiB; above the interpreter's "
            f"{base / 2**20:.2f} GiB before any model: "
            f"{(result['step_kib'] - base) / 2**20:.2f} / {(result['peak_kib'] - base) / 2**20:.2f}"
            f" GiB. Estimate {without / GIB:.2f} GiB without the CUDA overhead "
            f"({guess.total(1) / GIB:.2f} GiB with it; the CPU process also holds the VAE)"
        )
        if "cuda_allocated" in result:
            print(
                f"    CUDA peak allocated {result['cuda_allocated'] / GIB:.2f} GiB, reserved "
                f"{result['cuda_reserved'] / GIB:.2f} GiB; estimate without the context "
                f"{(guess.total(1) - CUDA_CONTEXT_BYTES) / GIB:.2f} GiB"
            )
    if args.keep:
        print(f"kept {tmp}")
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=["sd15", "sd21"])
    parser.add_argument("--precision", nargs="+", choices=("no", "bf16"), default=["no", "bf16"])
    parser.add_argument("--ema", nargs="+", choices=("off", "on", "offload"), default=["off", "on"])
    parser.add_argument(
        "--optimizer",
        nargs="+",
        choices=("adamw", "adamw_fused", "adamw_8bit"),
        default=["adamw", "adamw_8bit"],
    )
    parser.add_argument("--checkpointing", nargs="+", choices=("off", "on"), default=["off", "on"])
    parser.add_argument("--real-step", action="store_true", help="one real trainer step")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="sd15", help="--real-step")
    parser.add_argument("--keep", action="store_true", help="--real-step: keep the temp dir")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    if args.real_step:
        real_step(args)
        return
    print(
        f"CUDA overhead per process: {CUDA_OVERHEAD_BYTES / GIB:.2f} GiB (context "
        f"{CUDA_CONTEXT_BYTES / GIB:.2f} + workspaces/fragmentation allowance). Capacities "
        f"are nominal GiB (an 80 GB H100 shows 79.6 GiB)."
    )
    for key in args.models:
        print_estimates(key, args)


if __name__ == "__main__":
    main()
