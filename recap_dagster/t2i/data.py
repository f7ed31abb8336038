"""Training examples from a miniworld corpus: alt text, or ground-truth SHORT/LONG captions.

The ground-truth captions stand in for recaptions until a recaptioner exists (and give the
upper bound of what perfect recaptioning could do).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator

from recap_dagster.t2i.train import TrainingExample

VARIANTS = ("alttext", "recap_short", "recap_long", "recap_mix")


def _caption_rng(key: str, style: str) -> random.Random:
    digest = hashlib.blake2b(f"t2i/{style}/{key}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def iter_corpus(corpus_root: str, limit: int | None = None) -> Iterator:
    """Decoded, usable records of every shard under ``corpus_root``, in shard order."""
    from recap_dagster.shards import iter_shard, list_shards

    seen = 0
    for info in list_shards(corpus_root):
        for record in iter_shard(corpus_root, info.key):
            if record.image is None:
                continue
            yield record
            seen += 1
            if limit is not None and seen >= limit:
                return


def corpus_examples(
    corpus_root: str, variant: str = "alttext", limit: int | None = None
) -> list[TrainingExample]:
    """Examples for one caption variant; the recap variants use the scenes' ground truth."""
    from recap_dagster.miniworld.captions import long_caption, short_caption
    from recap_dagster.miniworld.scenes import Scene

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    examples = []
    for record in iter_corpus(corpus_root, limit):
        if variant == "alttext":
            captions: tuple[str, ...] = (record.alt_text,)
        else:
            scene = Scene.from_dict(record.metadata["scene"])
            short = short_caption(scene, _caption_rng(record.key, "short"))
            long = long_caption(scene, _caption_rng(record.key, "long"))
            captions = {
                "recap_short": (short,),
                "recap_long": (long,),
                "recap_mix": (short, long),
            }[variant]
        examples.append(TrainingExample(image=record.image, captions=captions))
    return examples
