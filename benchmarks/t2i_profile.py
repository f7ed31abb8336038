"""Reproduce the miniworld RECAP experiment for a text-to-image profile and print the table.

Protocol: pretrain the base on ALT TEXT, fine-tune two copies for the same number of steps,
(a) on alt text and (b) on RECAP Mix (50/50 SHORT/LONG per sample; ground-truth captions
stand in for recaptions), sample the eval prompts with fixed seeds and CFG, score with the
evaluator. Example::

    python benchmarks/t2i_profile.py --miniworld /tmp/t2i_mw --out /tmp/t2i_runs/p1
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image


def _overrides(args: argparse.Namespace):
    from recap_dagster.t2i.profiles import get_profile

    prof = get_profile(args.profile)
    model, base, ft, sample = prof.model, prof.base, prof.finetune, prof.sample
    if args.vae_blocks is not None:
        model = replace(model, vae_block_out_channels=(16, 32)[: args.vae_blocks])
    if args.base_steps is not None:
        base = replace(base, steps=args.base_steps)
    if args.ft_steps is not None:
        ft = replace(ft, steps=args.ft_steps)
    if args.base_lr is not None:
        base = replace(base, learning_rate=args.base_lr)
    if args.ft_lr is not None:
        ft = replace(ft, learning_rate=args.ft_lr)
    if args.snr_gamma is not None:
        ft = replace(ft, snr_gamma=args.snr_gamma)
    if args.ema_decay is not None:
        ft = replace(ft, use_ema=True, ema_decay=args.ema_decay)
    if args.lr_scheduler is not None:
        ft = replace(ft, lr_scheduler=args.lr_scheduler)
    if args.guidance is not None:
        sample = replace(sample, guidance_scale=args.guidance)
    if args.prediction_type is not None:
        model = replace(model, prediction_type=args.prediction_type)
    vae_steps = args.vae_steps if args.vae_steps is not None else prof.vae_steps
    return replace(
        prof, model=model, base=base, finetune=ft, sample=sample, vae_steps=vae_steps,
        corpus_limit=args.corpus_limit if args.corpus_limit is not None else prof.corpus_limit,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--miniworld", default="/tmp/t2i_mw")
    parser.add_argument("--out", default="/tmp/t2i_runs/default")
    parser.add_argument("--profile", default="miniworld")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--per-category", type=int, default=40)
    parser.add_argument("--variants", default="alttext,recap_mix")
    parser.add_argument("--vae-blocks", type=int)
    parser.add_argument("--vae-steps", type=int)
    parser.add_argument("--base-steps", type=int)
    parser.add_argument("--ft-steps", type=int)
    parser.add_argument("--base-lr", type=float)
    parser.add_argument("--ft-lr", type=float)
    parser.add_argument("--guidance", type=float)
    parser.add_argument("--snr-gamma", type=float, help="Min-SNR loss weighting of the fine-tunes")
    parser.add_argument("--ema-decay", type=float, help="fine-tune with an EMA of this decay")
    parser.add_argument("--lr-scheduler", help="fine-tune LR schedule (a diffusers name)")
    parser.add_argument("--guidances", default="", help="extra guidance scales to score")
    parser.add_argument("--prediction-type")
    parser.add_argument("--corpus-limit", type=int)
    args = parser.parse_args()
    # On a shared 2-core machine OpenMP barriers stall badly; --threads 1 there.
    torch.set_num_threads(args.threads)

    from recap_dagster.evaluator import evaluate_images
    from recap_dagster.miniworld.generate import (
        MiniworldConfig,
        generate_miniworld,
        read_eval_prompts,
    )
    from recap_dagster.t2i.base import build_miniworld_base
    from recap_dagster.t2i.data import corpus_examples
    from recap_dagster.t2i.model import load_pipeline, read_saved_meta
    from recap_dagster.t2i.sample import generate
    from recap_dagster.t2i.train import train

    prof = _overrides(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = generate_miniworld(
        args.miniworld,
        MiniworldConfig(
            shards=4, images_per_shard=1000, pretrain_images=16, human_heldout=16,
            eval_prompts_per_category=args.per_category,
        ),
    )  # fmt: skip
    truths = read_eval_prompts(paths.eval_prompts)
    prompts = [t.prompt for t in truths]
    seeds = [1000 + i for i in range(len(truths))]

    t0 = time.perf_counter()
    base_dir = build_miniworld_base(paths.root, str(out / "base"), prof)
    base_seconds = time.perf_counter() - t0
    base_meta = read_saved_meta(base_dir) or {}
    print(
        f"base: {base_seconds:.0f}s now, {base_meta.get('seconds')}s when built "
        f"(vae {base_meta.get('vae_seconds')}s, loss {base_meta.get('train_final_loss')})"
    )

    def score(pipe, name: str, seconds: float) -> list[dict]:
        rows = []
        for g in [prof.sample.guidance_scale] + [float(x) for x in args.guidances.split(",") if x]:
            t = time.perf_counter()
            images = generate(pipe, prompts, seeds, guidance_scale=g,
                              num_inference_steps=prof.sample.num_inference_steps,
                              batch_size=prof.sample.batch_size)  # fmt: skip
            summary = evaluate_images(images, truths)
            row = {"variant": name, "guidance": g, "train_s": round(seconds),
                   "sample_s": round(time.perf_counter() - t), **summary.overall,
                   "per_category": summary.per_category}  # fmt: skip
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "per_category"}))
            grid = images[:64]
            sheet = Image.new("RGB", (32 * 8, 32 * 8))
            for i, im in enumerate(grid):
                sheet.paste(im, (32 * (i % 8), 32 * (i // 8)))
            sheet.save(out / f"{name}_g{g}.png")
        return rows

    results = score(load_pipeline(base_dir), "base", base_seconds)
    for variant in args.variants.split(","):
        examples = corpus_examples(str(Path(paths.root) / "laion"), variant, prof.corpus_limit)
        t = time.perf_counter()
        result = train(load_pipeline(base_dir), examples, prof.finetune, out / f"work-{variant}")
        seconds = time.perf_counter() - t
        print(f"{variant}: {seconds:.0f}s, loss {sum(result.losses[-20:]) / 20:.4f}")
        results += score(result.pipeline, variant, seconds)

    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n{'variant':<10} {'cfg':>4} {'obj_acc':>8} {'count_err':>9} {'count_acc':>9} "
          f"{'pos_acc':>8} {'all':>6} {'train_s':>7}")  # fmt: skip
    for r in results:
        print(
            f"{r['variant']:<10} {r['guidance']:>4} {r['object_accuracy']:>8.3f} "
            f"{r['count_error']:>9.3f} {r['count_accuracy']:>9.3f} "
            f"{r['position_accuracy']:>8.3f} {r['all_correct']:>6.3f} {r['train_s']:>7}"
        )
    by = {(r["variant"], r["guidance"]): r for r in results}
    for (variant, g), r in by.items():
        if variant == "alttext" or ("alttext", g) not in by:
            continue
        a = by[("alttext", g)]
        rel = {
            m: (r[m] - a[m]) / a[m] if a[m] else float("inf")
            for m in ("object_accuracy", "count_error", "position_accuracy")
        }
        print(
            f"{variant} vs alttext @cfg {g}: " + ", ".join(f"{m} {v:+.1%}" for m, v in rel.items())
        )
    print(f"pid {os.getpid()} done")


if __name__ == "__main__":
    main()
