"""Image-text agreement of recaptioned shard groups as asset metadata (the Dagster side of
:mod:`recap_dagster.evaluation.agreement`), for ``recaptioned_shards``."""

from __future__ import annotations

import dagster as dg
import torch

from recap_dagster.assets.metadata import typed_table
from recap_dagster.evaluation.agreement import (
    ShardAgreement,
    example_images,
    overall_summary,
    pick_examples,
    score_recaptioned_shards,
)
from recap_dagster.evaluation.plots import markdown_image, markdown_table, thumbnail_png
from recap_dagster.storage.root import Storage

#: Column descriptions of the per-shard agreement table.
AGREEMENT_COLUMNS = {
    "shard": "shard key, or all for every scored row",
    "n": "rows scored (a seeded sample of the shard's captioned rows)",
    "clip_alt_text": "mean CLIP score of the alt text against the image",
    "clip_recap_short": "mean CLIP score of the RECAP short caption",
    "clip_recap_long": "mean CLIP score of the RECAP long caption (per sentence, averaged)",
    "gain_recap_short": "mean per-image gain of the short caption over the alt text",
    "gain_recap_long": "mean per-image gain of the long caption over the alt text",
}


def agreement_metadata(
    store: Storage,
    shards_root: str,
    shards: list[str],
    clip_model: str,
    *,
    fingerprint: str,
    sample_rows: int,
    examples_per_band: int = 3,
    device: str | torch.device | None = None,
    max_pixels: int,
) -> dict[str, object]:
    """Metadata of a group's CLIP scores: a per-shard table, the group's means and gains
    (``clip_*``, ``gain_*``) and ``examples``, the best, median and worst scored images with
    their three texts; empty without a CLIP model or with ``sample_rows`` 0."""
    if not clip_model or sample_rows <= 0:
        return {}
    results = score_recaptioned_shards(
        store,
        shards_root,
        shards,
        clip_model,
        fingerprint=fingerprint,
        sample_rows=sample_rows,
        device=device,
        max_pixels=max_pixels,
    )
    overall = overall_summary(results)
    rows = [r.summary() for r in results] + [overall]
    return {
        "image_text_agreement": typed_table(rows, AGREEMENT_COLUMNS),
        **{k: v for k, v in overall.items() if k.startswith(("clip_", "gain_")) and v is not None},
        "examples": dg.MetadataValue.md(
            examples_markdown(results, shards_root, examples_per_band, max_pixels)
        ),
    }


def examples_markdown(
    results: list[ShardAgreement], shards_root: str, per_band: int, max_pixels: int
) -> str:
    """A table of the group's best, median and worst scored images (by the mean CLIP score
    of their two recaptions), each shown with its alt text and both recaptions."""
    picks = pick_examples(results, per_band)
    images = example_images(shards_root, picks, max_pixels=max_pixels)
    rows = []
    for band, shard, row in picks:
        image = images.get((shard, row["key"]))
        rows.append(
            [
                band,
                markdown_image(thumbnail_png(image), row["key"]) if image else "(not readable)",
                f"{row['key']} ({shard})",
                *(
                    f"{row[c]} (CLIP {row[f'clip_{c}']:.1f})"
                    for c in ("alt_text", "recap_short", "recap_long")
                ),
            ]
        )
    header = ["band", "image", "key", "alt text", "RECAP short", "RECAP long"]
    return markdown_table(header, rows) if rows else "No scored rows."
