"""Image-text agreement: CLIP score per (image, text) pair, no ground truth needed (no Dagster).

CLIP score (Hessel et al., 2021), as torchmetrics' ``CLIPScore`` defines it:
``100 * max(cos(image embedding, text embedding), 0)``, here per pair rather than as a mean,
with a CLIP-family model loaded by transformers (``AutoModel`` + ``AutoProcessor`` from a
local directory or hub id: ``CLIPModel`` / ``CLIPProcessor`` for a CLIP checkpoint). This
is the one implementation. (torchmetrics' class gives a mean only, loads only the hub names
it knows, not a local directory, and in torchmetrics 1.9 fails on transformers 5, whose
``get_image_features`` returns an output object rather than a tensor.)
:func:`recap_dagster.evaluation.metrics.clip_score` (the text-to-image report's CLIP score)
is the mean of :meth:`ClipScorer.score_pairs`.

Long texts: CLIP's text encoder reads 77 tokens; a RECAP long caption may run longer, and
truncating it would score only its start. :meth:`ClipScorer.score_long` splits a text into
sentences (:func:`sentences`), scores each against the image (each truncated to the
encoder's context as a last resort) and takes their MEAN. The mean, not the max: a long
caption is judged on everything it says, so a hallucinated sentence lowers it; the max
would reward one right sentence among wrong ones.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from recap_dagster.corpus.decoding import DEFAULT_MAX_PIXELS
from recap_dagster.corpus.reading import iter_shard_selected
from recap_dagster.storage.root import Storage

_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")


def sentences(text: str) -> list[str]:
    """``text`` split after ``.``, ``!``, ``?`` or ``;`` followed by space; empty parts
    dropped; a text without any such break is one sentence."""
    parts = [part.strip() for part in _SENTENCE_END.split(text or "")]
    return [part for part in parts if part]


class ClipScorer:
    """A CLIP-family model and its processor, scoring (image, text) pairs in batches."""

    def __init__(
        self, model_path: str, *, device: str | torch.device | None = None, batch_size: int = 64
    ) -> None:
        from transformers import AutoModel, AutoProcessor

        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.model_path = model_path
        self.device = torch.device(
            device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        )
        self.model = AutoModel.from_pretrained(model_path).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(model_path)
        self.batch_size = batch_size
        #: Tokens the text encoder reads (77 for CLIP); longer texts are truncated to it.
        self.context = int(self.model.config.text_config.max_position_embeddings)

    def score_pairs(self, images: Sequence[Image.Image], texts: Sequence[str]) -> list[float]:
        """The CLIP score of each (image, text) pair, in order."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        scores: list[float] = []
        for start in range(0, len(images), self.batch_size):
            end = start + self.batch_size
            scores += self._batch([i.convert("RGB") for i in images[start:end]], texts[start:end])
        return scores

    def score_long(self, images: Sequence[Image.Image], texts: Sequence[str]) -> list[float]:
        """Per (image, text): the mean CLIP score of the text's sentences against the image
        (see the module docstring); a text without words scores 0."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        owners: list[int] = []
        pieces: list[str] = []
        for row, text in enumerate(texts):
            for sentence in sentences(text):
                owners.append(row)
                pieces.append(sentence)
        flat = self.score_pairs([images[row] for row in owners], pieces)
        totals, counts = [0.0] * len(texts), [0] * len(texts)
        for row, value in zip(owners, flat, strict=True):
            totals[row] += value
            counts[row] += 1
        return [
            total / count if count else 0.0 for total, count in zip(totals, counts, strict=True)
        ]

    @torch.inference_mode()
    def _batch(self, images: list[Image.Image], texts: Sequence[str]) -> list[float]:
        inputs = self.processor(
            text=list(texts),
            images=images,
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.context,
        )
        inputs = {k: v.to(self.device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        # The forward pass returns both embeddings projected and L2-normalised.
        out = self.model(**inputs)
        cosine = (out.image_embeds * out.text_embeds).sum(dim=-1)
        return (100.0 * cosine.clamp(min=0)).float().cpu().tolist()


# ----------------------------------------------------------------------------------------
# A recaptioned shard's sample
# ----------------------------------------------------------------------------------------

#: The caption columns of a recaptioned shard that are scored, and how.
SCORED_COLUMNS = {"alt_text": "pairs", "recap_short": "pairs", "recap_long": "long"}


@dataclass
class ShardAgreement:
    """CLIP scores of a shard's sample: one row per scored image (``key`` and a score per
    caption column), and per column the mean and its gain over the alt text."""

    shard: str
    rows: list[dict[str, Any]]

    def means(self) -> dict[str, float | None]:
        """Mean score per caption column (None without rows)."""
        out: dict[str, float | None] = {}
        for column in SCORED_COLUMNS:
            values = [r[column] for r in self.rows]
            out[column] = sum(values) / len(values) if values else None
        return out

    def gains(self) -> dict[str, float | None]:
        """Mean per-row gain of each RECAP caption over the alt text (None without rows)."""
        out: dict[str, float | None] = {}
        for column in ("recap_short", "recap_long"):
            values = [r[column] - r["alt_text"] for r in self.rows]
            out[column] = sum(values) / len(values) if values else None
        return out

    def summary(self) -> dict[str, Any]:
        """One plain dict: ``n``, the means (``clip_<column>``) and gains (``gain_<column>``)."""
        return {
            "shard": self.shard,
            "n": len(self.rows),
            **{f"clip_{k}": v for k, v in self.means().items()},
            **{f"gain_{k}": v for k, v in self.gains().items()},
        }


def sample_keys(keys: Iterable[str], n: int, seed: int = 0) -> list[str]:
    """``n`` of ``keys`` (all when fewer), the same ones whatever the order they come in:
    a seeded draw from the sorted keys, returned sorted."""
    ordered = sorted(set(keys))
    if n >= len(ordered):
        return ordered
    return sorted(random.Random(seed).sample(ordered, n))


def score_shard_sample(
    scorer: ClipScorer,
    rows: Sequence[dict[str, Any]],
    shards_root: str,
    shard: str,
    *,
    n: int,
    seed: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ShardAgreement:
    """Score a deterministic sample of ``n`` rows of a recaptioned shard.

    ``rows`` are the shard's recaptioned rows (``key``, ``alt_text``, ``recap_short``,
    ``recap_long``); rows without both captions (undecodable or undelivered images) are
    not candidates. The sample is drawn by :func:`sample_keys`; its images are read from
    the source shard (``shards_root``/``shard``), decoded as recaptioning decodes them.
    """
    by_key = {
        r["key"]: r
        for r in rows
        if r.get("recap_short") is not None and r.get("recap_long") is not None
    }
    wanted = set(sample_keys(by_key, n, seed))
    # Two passes: one without decoding finds where the sample lies, the second decodes only
    # those images (a shard holds thousands).
    positions = {
        index
        for index, record in enumerate(iter_shard_selected(shards_root, shard, decode=False))
        if record.key in wanted
    }
    images: dict[str, Image.Image] = {}
    selected = iter_shard_selected(
        shards_root, shard, max_pixels=max_pixels, select=positions.__contains__
    )
    for record in selected:
        if record.key in wanted and record.image is not None:
            images[record.key] = record.image
    keys = sorted(images)
    pictures = [images[k] for k in keys]
    scores: dict[str, list[float]] = {}
    for column, how in SCORED_COLUMNS.items():
        texts = [by_key[k][column] or "" for k in keys]
        if how == "long":
            scores[column] = scorer.score_long(pictures, texts)
        else:
            scores[column] = scorer.score_pairs(pictures, texts)
    return ShardAgreement(
        shard=shard,
        rows=[{"key": k, **{c: scores[c][i] for c in SCORED_COLUMNS}} for i, k in enumerate(keys)],
    )


#: Rows of each recaptioned shard scored by default: enough for a mean to +-1 CLIP point on
#: real data, a few seconds per shard on a GPU.
DEFAULT_SAMPLE_ROWS = 64


def score_recaptioned_shards(
    store: Storage,
    shards_root: str,
    shards: Sequence[str],
    clip_model: str,
    *,
    sample_rows: int = DEFAULT_SAMPLE_ROWS,
    seed: int = 0,
    device: str | torch.device | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[ShardAgreement]:
    """A sample of every recaptioned shard of ``shards`` (their parquet under ``store``)
    scored by one CLIP model loaded once (:func:`score_shard_sample`)."""
    from recap_dagster.captioner.recaption import output_parts

    scorer = ClipScorer(clip_model, device=device)
    columns = ["key", *SCORED_COLUMNS]
    return [
        score_shard_sample(
            scorer,
            store.read_parquet(*output_parts(shard), columns=columns).to_pylist(),
            shards_root,
            shard,
            n=sample_rows,
            seed=seed,
            max_pixels=max_pixels,
        )
        for shard in shards
    ]


def overall_summary(results: Sequence[ShardAgreement]) -> dict[str, Any]:
    """Means over every scored row of ``results`` (as :meth:`ShardAgreement.summary`, with
    ``shard`` ``"all"``)."""
    return ShardAgreement("all", [row for r in results for row in r.rows]).summary()
