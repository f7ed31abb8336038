"""Which captions each RECAP variant trains on (no Dagster)."""

from __future__ import annotations

from recap_dagster.t2i.stream import CaptionSource

VARIANTS = ("alttext", "recap_short", "recap_long", "recap_mix")
#: The recaptioned parquet columns a variant's draws choose from (uniformly, per sample):
#: RECAP Mix is 50/50 short/long.
VARIANT_COLUMNS = {
    "alttext": ("alt_text",),
    "recap_short": ("recap_short",),
    "recap_long": ("recap_long",),
    "recap_mix": ("recap_short", "recap_long"),
}


def variant_captions(storage_root: str, variant: str, recaptioned_dir: str = "recaptioned"):
    """The caption tables of ``variant``: the recaptioned shards, rows captioned ``ok``."""
    if variant not in VARIANT_COLUMNS:
        raise ValueError(f"unknown caption variant {variant!r}; expected one of {VARIANTS}")
    return CaptionSource(
        root=storage_root, prefix=(recaptioned_dir,), columns=VARIANT_COLUMNS[variant]
    )
