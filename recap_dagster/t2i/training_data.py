"""Which captions each RECAP variant trains on (no Dagster)."""

from __future__ import annotations

from recap_dagster.corpus.reading import SOURCE_SUCCESS
from recap_dagster.storage.root import Storage
from recap_dagster.t2i.stream import CaptionSource

ORACLE = "oracle"
VARIANTS = ("alttext", "recap_short", "recap_long", "recap_mix", ORACLE)
#: The shards' own columns (img2dataset's additional columns) holding what each image truly
#: shows, short and long, where the world knows it (the miniworld writes them): the oracle
#: variant, RECAP's ceiling, trains on them.
ORACLE_COLUMNS = ("true_short", "true_long")
#: The parquet columns a variant's draws choose from (uniformly, per sample): RECAP Mix is
#: 50/50 short/long, and so is the oracle. The oracle's are the corpus shards', the others'
#: the recaptioned shards'.
VARIANT_COLUMNS = {
    "alttext": ("alt_text",),
    "recap_short": ("recap_short",),
    "recap_long": ("recap_long",),
    "recap_mix": ("recap_short", "recap_long"),
    ORACLE: ORACLE_COLUMNS,
}


def variant_captions(
    storage_root: str, variant: str, shards_root: str, recaptioned_dir: str = "recaptioned"
) -> CaptionSource:
    """The caption tables of ``variant``: the recaptioned shards, rows captioned ``ok``; for
    the oracle, the corpus shards' true captions, rows downloaded."""
    if variant not in VARIANT_COLUMNS:
        raise ValueError(f"unknown caption variant {variant!r}; expected one of {VARIANTS}")
    if variant == ORACLE:
        return CaptionSource(root=shards_root, columns=ORACLE_COLUMNS, ok_status=SOURCE_SUCCESS)
    return CaptionSource(
        root=storage_root, prefix=(recaptioned_dir,), columns=VARIANT_COLUMNS[variant]
    )


def require_captions(source: CaptionSource, shard: str) -> None:
    """Fail early, and clearly, when ``shard``'s table lacks the source's columns (the
    oracle on a corpus whose world does not know what its images show)."""
    names = set(Storage(source.root).parquet_schema(*source.prefix, f"{shard}.parquet").names)
    missing = [c for c in (source.key_column, source.status_column, *source.columns)
               if c not in names]  # fmt: skip
    if missing:
        raise ValueError(
            f"{source.root}/{'/'.join((*source.prefix, shard))}.parquet has no column "
            f"{missing}: the {ORACLE} variant trains on the true descriptions a world writes "
            f"beside the alt text ({', '.join(ORACLE_COLUMNS)}; the miniworld does), which "
            "these shards do not have"
        )
