"""A miniworld corpus's decoded images, in shard order (for fitting the miniworld's VAE)."""

from __future__ import annotations

from collections.abc import Iterator


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
