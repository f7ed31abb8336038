"""The image-text agreement path at real size: CLIP ViT-L/14's published shapes, random init.

    .venv/bin/python benchmarks/clip_real_size.py [--batch 8]

Builds ``openai/clip-vit-large-patch14``'s configuration (vision 24 x 1024, patch 14 at
224 px; text 12 x 768, 77 tokens, vocabulary 49,408; projection 768) on the meta device
for its parameter bytes in fp32 and bf16, then for real (random weights) on this CPU,
saves it with ``save_pretrained`` beside a CLIP processor (the miniworld's tokenizer, whose
ids fit the real vocabulary) and scores one batch through the project's own
:class:`ClipScorer` (pairs and long captions per sentence). Prints sizes, seconds and the
process's peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

import torch
from PIL import Image
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizerFast,
)

from recap_dagster.evaluation.agreement import ClipScorer
from recap_dagster.miniworld.generate import MiniworldConfig, generate_miniworld

#: openai/clip-vit-large-patch14 (its config.json).
VIT_L_14 = {
    "text_config": {
        "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
        "num_hidden_layers": 12, "max_position_embeddings": 77, "vocab_size": 49408,
        "projection_dim": 768,
    },
    "vision_config": {
        "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
        "num_hidden_layers": 24, "image_size": 224, "patch_size": 14, "projection_dim": 768,
    },
    "projection_dim": 768,
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    config = CLIPConfig(**VIT_L_14)
    with torch.device("meta"):
        meta = CLIPModel(config)
    params = sum(p.numel() for p in meta.parameters())
    fp32, bf16 = params * 4 / 2**30, params * 2 / 2**30
    print(f"CLIP ViT-L/14: {params / 1e6:.1f} M parameters, weights {fp32:.2f} GiB fp32, "
          f"{bf16:.2f} GiB bf16")  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        world = generate_miniworld(
            f"{tmp}/world",
            MiniworldConfig(shards=1, images_per_shard=4, human_captions=4, human_heldout=2,
                            pretrain_images=4, eval_prompts_per_category=1),
        )  # fmt: skip
        tokenizer = CLIPTokenizerFast.from_pretrained(world.tokenizer)
        config.text_config.eos_token_id = tokenizer.eos_token_id
        start = time.perf_counter()
        torch.manual_seed(0)
        CLIPModel(config).save_pretrained(f"{tmp}/clip")
        CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer).save_pretrained(
            f"{tmp}/clip"
        )
        print(f"built and saved in {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        scorer = ClipScorer(f"{tmp}/clip", device="cpu", batch_size=args.batch)
        print(f"loaded in {time.perf_counter() - start:.1f} s (dtype {scorer.model.dtype})")
        images = [Image.new("RGB", (512, 384), (40 * i % 256, 90, 200)) for i in range(args.batch)]
        texts = ["a red circle above two blue squares."] * args.batch
        start = time.perf_counter()
        pairs = scorer.score_pairs(images, texts)
        pair_seconds = time.perf_counter() - start
        start = time.perf_counter()
        longs = scorer.score_long(
            images, ["A red circle. Two blue squares. A grey canvas."] * args.batch
        )
        print(f"{args.batch} pairs in {pair_seconds:.1f} s, {args.batch} long captions (3 "
              f"sentences) in {time.perf_counter() - start:.1f} s; scores in [0, 100]: "
              f"{all(0 <= s <= 100 for s in pairs + longs)}")  # fmt: skip
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS {peak:.2f} GiB")


if __name__ == "__main__":
    main()
