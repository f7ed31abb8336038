"""Text-to-image training examples from recaptioned shards, per caption variant (no Dagster).

The recaptioned parquet holds captions, not pixels: images are streamed from the source
LAION shards and joined by key. Rows whose image failed to decode are left out (their
status is recorded in the recaptioned shard).
"""

from __future__ import annotations

from collections.abc import Iterable

from recap_dagster.shards import iter_shard
from recap_dagster.storage import Storage
from recap_dagster.t2i.train import TrainingExample

VARIANTS = ("alttext", "recap_short", "recap_long", "recap_mix")


def variant_captions(row: dict, variant: str) -> tuple[str, ...]:
    """The captions a training draw chooses from: RECAP Mix is 50/50 short/long per sample."""
    if variant == "alttext":
        return (row["alt_text"] or "",)
    if variant == "recap_short":
        return (row["recap_short"],)
    if variant == "recap_long":
        return (row["recap_long"],)
    if variant == "recap_mix":
        return (row["recap_short"], row["recap_long"])
    raise ValueError(f"unknown caption variant {variant!r}; expected one of {VARIANTS}")


def recaptioned_examples(
    storage: Storage,
    shards_root: str,
    shards: Iterable[str],
    variant: str,
    *,
    recaptioned_dir: str = "recaptioned",
    limit: int | None = None,
) -> list[TrainingExample]:
    """Every usable (image, captions) pair of ``shards`` for ``variant``."""
    examples: list[TrainingExample] = []
    for shard in shards:
        table = storage.read_parquet(recaptioned_dir, f"{shard}.parquet")
        rows = {r["key"]: r for r in table.to_pylist() if r["status"] == "ok"}
        for record in iter_shard(shards_root, shard):
            row = rows.get(record.key)
            if row is None or record.image is None:
                continue
            examples.append(TrainingExample(record.image, variant_captions(row, variant)))
            if limit is not None and len(examples) >= limit:
                return examples
    return examples
