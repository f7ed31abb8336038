"""Held-out caption quality of the miniworld's base captioner, before and after RECAP step 1.

Run: ``python benchmarks/captioner_quality.py [--miniworld DIR] [--out DIR]``. Generates (or
reuses) the default miniworld, builds (or reuses) the base captioner with the default
:class:`BaseCaptionerConfig`, grades its captions of the held-out human-captioned images in
both RECAP styles (and its pretraining tasks), fine-tunes it on the 100 human captions with
the default profile's ``captioner_checkpoint`` settings, grades again, and prints a table
plus timings. The target: the
fine-tuned LONG captions get >= 0.9 of objects, counts and positions right.

``--base k=v`` / ``--finetune k=v`` override config fields (repeatable), for experiments.
Runs with 2 torch threads (the miniworld's reference machine) unless ``--threads`` says
otherwise.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch

from recap_dagster.captioner import Captioner, FineTuneConfig, fine_tune
from recap_dagster.captioner.quality import (
    QualityRow,
    evaluate_captioner,
    format_quality_table,
    load_captioned,
)
from recap_dagster.miniworld.base_captioner import (
    BaseCaptionerConfig,
    build_base_captioner,
    read_base_manifest,
)
from recap_dagster.miniworld.generate import MiniworldConfig, generate_miniworld
from recap_dagster.miniworld.pretrain_tasks import PRETRAIN_PREFIXES
from recap_dagster.miniworld.run_configs import op_settings
from recap_dagster.miniworld.world import MiniworldWorld


def _overrides(config, pairs: list[str]):
    types = {f.name: f for f in fields(config)}
    changes = {}
    for pair in pairs:
        name, _, text = pair.partition("=")
        if name not in types:
            raise SystemExit(f"unknown field {name!r} of {type(config).__name__}")
        try:
            changes[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            changes[name] = text  # a bare string, e.g. family=git
    return replace(config, **changes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--miniworld", default="/tmp/recap-miniworld", help="miniworld folder")
    parser.add_argument("--out", default="/tmp/recap-base-captioner", help="base captioner folder")
    parser.add_argument("--base", action="append", default=[], metavar="K=V")
    parser.add_argument("--finetune", action="append", default=[], metavar="K=V")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--force", action="store_true", help="rebuild the base even if cached")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base_config = _overrides(BaseCaptionerConfig(), args.base)
    ft_config = _overrides(
        op_settings(FineTuneConfig, "default", "captioner_checkpoint"), args.finetune
    )

    paths = generate_miniworld(args.miniworld, MiniworldConfig())
    heldout = load_captioned(paths.human_captions_heldout)
    train = [c.to_example() for c in load_captioned(paths.human_captions)]

    print(f"base config: {asdict(base_config)}")
    print(f"fine-tune config: {asdict(ft_config)}")
    start = time.perf_counter()
    last = [start]

    def progress(step: int, loss: float) -> None:
        if step % 50 == 0:
            now = time.perf_counter()
            print(f"  step {step}: loss {loss:.3f} ({now - last[0]:.1f}s)", flush=True)
            last[0] = now

    out = build_base_captioner(paths, args.out, base_config, force=args.force, on_step=progress)
    build_wall = time.perf_counter() - start
    manifest = read_base_manifest(out) or {}
    print(
        f"base: {manifest.get('family')} {manifest.get('parameters')} params, "
        f"built in {manifest.get('seconds')}s (this call {build_wall:.1f}s), "
        f"loss {manifest.get('first_loss', 0):.3f} -> {manifest.get('final_loss', 0):.3f}"
    )

    prefixes = {**Captioner.from_pretrained(out).prefixes, **PRETRAIN_PREFIXES}
    base = Captioner.from_pretrained(out, prefixes=prefixes)
    before = evaluate_captioner(
        base, heldout, world=MiniworldWorld(), styles=("short", "long", "caption", "detect")
    )

    tuned = Captioner.from_pretrained(out)
    start, cpu_start = time.perf_counter(), time.process_time()
    losses = fine_tune(tuned, train, ft_config, on_step=progress)
    ft_seconds = time.perf_counter() - start
    ft_cpu = time.process_time() - cpu_start
    print(
        f"fine-tune: {len(losses)} steps in {ft_seconds:.1f}s, loss {losses[0]:.3f} -> "
        f"{sum(losses[-10:]) / len(losses[-10:]):.3f}"
    )
    after = evaluate_captioner(tuned, heldout, world=MiniworldWorld())

    rows = [QualityRow("base", s, before[s]) for s in ("short", "long", "caption", "detect")]
    rows += [QualityRow("fine-tuned", s, after[s]) for s in ("short", "long")]
    print()
    print(f"held-out: {len(heldout)} images (human_captions_heldout)")
    print(format_quality_table(rows))
    print()
    for label, results in (("base", before), ("fine-tuned", after)):
        for style, metrics in results.items():
            print(
                f"{label:<11}{style:<8}{metrics['captions_per_s']:7.1f} captions/s  "
                f"e.g. {metrics['samples'][0]!r}"
            )
    print()
    # CPU seconds too: on a shared machine wall time depends on the neighbours' load.
    print(
        f"timings: base build {manifest.get('seconds')}s wall / {manifest.get('cpu_seconds')}"
        f" CPU-s, fine-tune {ft_seconds:.1f}s wall / {ft_cpu:.1f} CPU-s "
        f"({ft_seconds / max(1, len(losses)):.2f}s/step), threads {torch.get_num_threads()}"
    )
    long = after["long"]
    reached = min(long["objects"], long["counts"], long["positions"]) >= 0.9
    print(
        f"target (fine-tuned long >= 0.9 objects/counts/positions): "
        f"{'reached' if reached else 'NOT reached'}"
    )
    if args.json:
        strip = {"samples"}
        Path(args.json).write_text(
            json.dumps(
                {
                    "base_config": asdict(base_config),
                    "finetune_config": asdict(ft_config),
                    "base_manifest": manifest,
                    "finetune_seconds": ft_seconds,
                    "finetune_cpu_seconds": ft_cpu,
                    "finetune_losses": losses,
                    "before": {
                        s: {k: v for k, v in m.items() if k not in strip} for s, m in before.items()
                    },
                    "after": {
                        s: {k: v for k, v in m.items() if k not in strip} for s, m in after.items()
                    },
                    "samples": {
                        f"{label}/{s}": m["samples"]
                        for label, r in (("base", before), ("fine-tuned", after))
                        for s, m in r.items()
                    },
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
