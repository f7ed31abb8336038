"""Recaptioning throughput: the asset's code path vs a bare batched ``model.generate`` loop.

    .venv/bin/python benchmarks/recaption_throughput.py [--captioner DIR] [--images 1000]
        [--processes 1 2]

Both sides caption the same images in both styles with the same batch size and generation
settings. The asset path streams the shard (DataLoader workers decode the images and build
the processor's inputs while the model generates), writes the parquet atomically and records
per-row status; the bare loop gets already-decoded batches and runs the processor and
``model.generate`` on them. Prints images/s and the ratio.

Then a group of 4 shards (``--images`` in all) is recaptioned as the asset does it
(``recaption_group``) by 1 process, then by 2 (spawned, as one per GPU; on this CPU each takes
one of the two cores): images/s over the wall clock, model loads and process starts
included, and over the captioning alone. Run it on an otherwise idle machine: with two torch
threads on two cores, any other job takes the worker's share.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from recap_dagster.captioner import Captioner
from recap_dagster.captioner.recaption import (
    GenerationSettings,
    RecaptionJob,
    recaption_group,
    recaption_shard,
)
from recap_dagster.corpus.human_captions import clip_token_counter
from recap_dagster.corpus.listing import list_shards
from recap_dagster.corpus.reading import iter_shard
from recap_dagster.miniworld.captions import vocabulary_texts
from recap_dagster.miniworld.generate import MiniworldConfig, generate_miniworld
from recap_dagster.miniworld.tiny_captioner import build_tiny_captioner
from recap_dagster.storage.root import Storage


def bare_generate(captioner: Captioner, images: list, settings: GenerationSettings) -> int:
    adapter, model, processor = captioner.adapter, captioner.model, captioner.processor
    done = 0
    with torch.inference_mode():
        for start in range(0, len(images), settings.batch_size):
            batch = images[start : start + settings.batch_size]
            for style in ("short", "long"):
                inputs = adapter.generation_inputs(
                    model.config, processor, batch, captioner.prefix(style)
                )
                inputs = {k: v.to(captioner.device) for k, v in inputs.items()}
                model.generate(
                    **inputs,
                    **settings.generate_kwargs(style),
                    do_sample=False,
                    **adapter.generate_kwargs(model.config, processor),
                )
            done += len(batch)
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--captioner", help="captioner directory (default: a tiny random GIT)")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--processes", type=int, nargs="*", default=[1, 2])
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="recap-bench-")
    paths = generate_miniworld(
        f"{work}/mw",
        MiniworldConfig(
            shards=1, images_per_shard=args.images, pretrain_images=16, human_heldout=4
        ),
    )
    if args.captioner:
        captioner = Captioner.from_pretrained(args.captioner)
    else:
        words = sorted({w for t in vocabulary_texts() for w in t.lower().split()})
        build_tiny_captioner("git", f"{work}/captioner", words=words, hidden_size=64, num_layers=2)
        captioner = Captioner.from_pretrained(f"{work}/captioner")
    # Force generation to the full length on both sides so the comparison is like for like.
    captioner.model.generation_config.min_new_tokens = args.max_new_tokens
    settings = GenerationSettings(
        batch_size=args.batch_size,
        num_workers=args.workers,
        max_new_tokens_short=args.max_new_tokens,
        max_new_tokens_long=args.max_new_tokens,
    )
    storage = Storage(f"{work}/storage")
    images = [r.image for r in iter_shard(paths.corpus, "00000") if r.image is not None]
    print(
        f"{captioner.family}, {captioner.num_parameters():,} parameters, {len(images)} images, "
        f"batch {args.batch_size}, {args.max_new_tokens} new tokens, "
        f"torch threads {torch.get_num_threads()}"
    )

    bare_generate(captioner, images[: args.batch_size], settings)  # warm-up
    asset_rates, bare_rates = [], []
    count = clip_token_counter(paths.tokenizer)
    for _ in range(args.repeats):
        start = time.perf_counter()
        table, stats = recaption_shard(
            captioner,
            paths.corpus,
            "00000",
            captioner_version="bench",
            count_tokens=count,
            settings=settings,
        )
        storage.write_parquet(table, "recaptioned", "00000.parquet")
        asset_rates.append(stats.captioned / (time.perf_counter() - start))
        start = time.perf_counter()
        done = bare_generate(captioner, images, settings)
        bare_rates.append(done / (time.perf_counter() - start))
    asset, bare = max(asset_rates), max(bare_rates)
    print(f"asset code path : {asset:8.1f} images/s (both styles)")
    print(f"bare generate   : {bare:8.1f} images/s (both styles)")
    print(f"ratio           : {asset / bare:8.3f}")
    if args.processes:
        compare_processes(args, work, captioner, settings)


def compare_processes(
    args: argparse.Namespace, work: str, captioner: Captioner, settings: GenerationSettings
) -> None:
    """A 4-shard group recaptioned by each of ``args.processes`` process counts."""
    paths = generate_miniworld(
        f"{work}/mw4",
        MiniworldConfig(
            shards=4, images_per_shard=args.images // 4, pretrain_images=16, human_heldout=4
        ),
    )
    shards = [info.key for info in list_shards(paths.corpus)]
    checkpoint = f"{work}/forced"  # what each process loads, min_new_tokens included
    captioner.save_pretrained(checkpoint)
    print(f"group of {len(shards)} shards, {args.images // 4 * len(shards)} rows")
    for processes in args.processes:
        job = RecaptionJob(
            checkpoint=checkpoint,
            captioner_version="bench",
            shards_root=paths.corpus,
            storage_root=f"{work}/processes-{processes}",
            settings=settings,
            tokenizer_path=paths.tokenizer,
            reuse_finished_shards=False,
        )
        start = time.perf_counter()
        result = recaption_group(job, shards, [torch.device("cpu")] * processes)
        wall = time.perf_counter() - start
        images = result.captioned.captioned
        print(
            f"{processes} process(es): {images / wall:8.1f} images/s wall (loads included), "
            f"{result.captioned.images_per_second:8.1f} images/s captioning"
        )


if __name__ == "__main__":
    main()
