"""Image-text agreement of recaptioned shard groups as asset metadata (the Dagster side of
:mod:`recap_dagster.evaluation.agreement`), for ``recaptioned_shards`` to call."""

from __future__ import annotations

import torch

from recap_dagster.assets.metadata import typed_table
from recap_dagster.evaluation.agreement import overall_summary, score_recaptioned_shards
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
    sample_rows: int,
    device: str | torch.device | None = None,
    max_pixels: int,
) -> dict[str, object]:
    """Metadata of a group's CLIP scores: a per-shard table and the group's means and gains
    (``clip_*``, ``gain_*``); empty without a CLIP model or with ``sample_rows`` 0."""
    if not clip_model or sample_rows <= 0:
        return {}
    results = score_recaptioned_shards(
        store,
        shards_root,
        shards,
        clip_model,
        sample_rows=sample_rows,
        device=device,
        max_pixels=max_pixels,
    )
    overall = overall_summary(results)
    rows = [r.summary() for r in results] + [overall]
    return {
        "image_text_agreement": typed_table(rows, AGREEMENT_COLUMNS),
        **{k: v for k, v in overall.items() if k.startswith(("clip_", "gain_")) and v is not None},
    }
