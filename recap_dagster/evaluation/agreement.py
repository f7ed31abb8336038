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

import pyarrow as pa
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
#: The RECAP caption columns, each compared with the alt text.
RECAP_COLUMNS = ("recap_short", "recap_long")


@dataclass
class ShardAgreement:
    """CLIP scores of a shard's sample: one row per scored image (``key``, its three texts
    and ``clip_<column>`` per caption column), and per column the mean and its gain over the
    alt text."""

    shard: str
    rows: list[dict[str, Any]]

    def means(self) -> dict[str, float | None]:
        """Mean score per caption column (None without rows)."""
        out: dict[str, float | None] = {}
        for column in SCORED_COLUMNS:
            values = [r[f"clip_{column}"] for r in self.rows]
            out[column] = sum(values) / len(values) if values else None
        return out

    def gains(self) -> dict[str, float | None]:
        """Mean per-row gain of each RECAP caption over the alt text (None without rows)."""
        out: dict[str, float | None] = {}
        for column in RECAP_COLUMNS:
            values = [r[f"clip_{column}"] - r["clip_alt_text"] for r in self.rows]
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


def read_images(
    shards_root: str, shard: str, keys: set[str], max_pixels: int = DEFAULT_MAX_PIXELS
) -> dict[str, Image.Image]:
    """The decodable images of ``keys`` in a source shard, decoded as recaptioning decodes
    them. Two passes: one without decoding finds where they lie, the second decodes only
    those (a shard holds thousands)."""
    positions = {
        index
        for index, record in enumerate(iter_shard_selected(shards_root, shard, decode=False))
        if record.key in keys
    }
    selected = iter_shard_selected(
        shards_root, shard, max_pixels=max_pixels, select=positions.__contains__
    )
    return {r.key: r.image for r in selected if r.key in keys and r.image is not None}


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
    images = read_images(shards_root, shard, set(sample_keys(by_key, n, seed)), max_pixels)
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
        rows=[
            {
                "key": k,
                **{c: by_key[k][c] or "" for c in SCORED_COLUMNS},
                **{f"clip_{c}": scores[c][i] for c in SCORED_COLUMNS},
            }
            for i, k in enumerate(keys)
        ],
    )


#: Rows of each recaptioned shard scored by default: enough for a mean to +-1 CLIP point on
#: real data, a few seconds per shard on a GPU.
DEFAULT_SAMPLE_ROWS = 64


#: Where a recaptioned shard's scored sample is kept under the storage root, beside its
#: recaptions: the checks judge it and a retry or a kept shard does not score it again.
AGREEMENT_DIR = "recaption_agreement"

_SAMPLE_SCHEMA = pa.schema(
    [("key", pa.string())]
    + [(c, pa.string()) for c in SCORED_COLUMNS]
    + [(f"clip_{c}", pa.float64()) for c in SCORED_COLUMNS]
)


def agreement_parts(shard: str) -> tuple[str, str]:
    """Where a shard's scored sample lives under the storage root."""
    return (AGREEMENT_DIR, f"{shard}.parquet")


def read_shard_agreement(store: Storage, shard: str) -> tuple[ShardAgreement, str] | None:
    """A shard's stored sample and the fingerprint it was scored under; None when absent."""
    if not store.exists(*agreement_parts(shard)):
        return None
    table = store.read_parquet(*agreement_parts(shard))
    fingerprint = (table.schema.metadata or {}).get(b"fingerprint", b"").decode()
    return ShardAgreement(shard, table.to_pylist()), fingerprint


def score_recaptioned_shards(
    store: Storage,
    shards_root: str,
    shards: Sequence[str],
    clip_model: str,
    *,
    fingerprint: str,
    sample_rows: int = DEFAULT_SAMPLE_ROWS,
    seed: int = 0,
    device: str | torch.device | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[ShardAgreement]:
    """A sample of every recaptioned shard of ``shards`` (their parquet under ``store``)
    scored by one CLIP model loaded once (:func:`score_shard_sample`), each written to
    :func:`agreement_parts` (atomically) under ``fingerprint``: what the recaptions, the
    CLIP model and the sample are (a shard already scored under the same one is read back,
    not scored again)."""
    from recap_dagster.captioner.recaption import output_parts

    key = f"{fingerprint}|{clip_model}|{sample_rows}|{seed}"
    scorer: ClipScorer | None = None
    results = []
    for shard in shards:
        stored = read_shard_agreement(store, shard)
        if stored is not None and stored[1] == key:
            results.append(stored[0])
            continue
        scorer = scorer or ClipScorer(clip_model, device=device)
        rows = store.read_parquet(*output_parts(shard), columns=["key", *SCORED_COLUMNS])
        result = score_shard_sample(
            scorer,
            rows.to_pylist(),
            shards_root,
            shard,
            n=sample_rows,
            seed=seed,
            max_pixels=max_pixels,
        )
        table = pa.Table.from_pylist(result.rows, schema=_SAMPLE_SCHEMA)
        store.write_parquet(
            table.replace_schema_metadata({"fingerprint": key}), *agreement_parts(shard)
        )
        results.append(result)
    return results


# ----------------------------------------------------------------------------------------
# Examples to look at
# ----------------------------------------------------------------------------------------


def recap_score(row: dict[str, Any]) -> float:
    """A scored row's recaptions in one figure: the mean of its short and long CLIP scores."""
    return sum(row[f"clip_{c}"] for c in RECAP_COLUMNS) / len(RECAP_COLUMNS)


def pick_examples(
    results: Sequence[ShardAgreement], per_band: int = 3
) -> list[tuple[str, str, dict[str, Any]]]:
    """``(band, shard, row)`` for the ``per_band`` best, median and worst scored rows of a
    group by :func:`recap_score` (fewer rows: each appears once, best band first)."""
    ranked = sorted(
        ((recap_score(row), r.shard, row) for r in results for row in r.rows),
        key=lambda item: (-item[0], item[1], item[2]["key"]),
    )
    n = len(ranked)
    middle = max(0, n // 2 - per_band // 2)
    bands = {
        "best": range(0, min(per_band, n)),
        "median": range(middle, min(middle + per_band, n)),
        "worst": range(max(0, n - per_band), n),
    }
    picked: list[tuple[str, str, dict[str, Any]]] = []
    seen: set[int] = set()
    for band, indices in bands.items():
        for i in indices:
            if i not in seen:
                seen.add(i)
                picked.append((band, ranked[i][1], ranked[i][2]))
    return picked


def example_images(
    shards_root: str,
    picks: Sequence[tuple[str, str, dict[str, Any]]],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[tuple[str, str], Image.Image]:
    """The images of ``picks`` by ``(shard, key)``, read from their source shards."""
    wanted: dict[str, set[str]] = {}
    for _, shard, row in picks:
        wanted.setdefault(shard, set()).add(row["key"])
    images: dict[tuple[str, str], Image.Image] = {}
    for shard, keys in wanted.items():
        for key, image in read_images(shards_root, shard, keys, max_pixels).items():
            images[(shard, key)] = image
    return images


def judge_clip_vs_alt_text(
    results: Sequence[ShardAgreement], max_deficit: float, worst: int = 5
) -> tuple[bool, str]:
    """Whether each RECAP style's mean CLIP score over ``results`` stays within
    ``max_deficit`` points below the alt text's, and a description naming the scored rows
    whose recaptions lose most to their alt text."""
    summary = overall_summary(results)
    if not summary["n"]:
        return False, "no scored rows: the group has no CLIP scores"
    failing = [
        f"{c}: mean CLIP {summary[f'clip_{c}']:.1f} vs alt text {summary['clip_alt_text']:.1f}"
        for c in RECAP_COLUMNS
        if summary[f"gain_{c}"] < -max_deficit
    ]
    if not failing:
        gains = ", ".join(f"{c} {summary[f'gain_{c}']:+.1f}" for c in RECAP_COLUMNS)
        return True, f"{summary['n']} scored rows; gain over alt text: {gains}"
    rows = sorted(
        (
            (recap_score(row) - row["clip_alt_text"], r.shard, row)
            for r in results
            for row in r.rows
        ),
        key=lambda item: item[0],
    )[:worst]
    named = "; ".join(
        f"{shard}/{row['key']} ({gain:+.1f}: {row['recap_short']!r} vs alt {row['alt_text']!r})"
        for gain, shard, row in rows
    )
    return False, (
        f"recaptions score below the alt text by more than {max_deficit} CLIP points over "
        f"{summary['n']} scored rows ({'; '.join(failing)}); worst rows: {named}"
    )


def overall_summary(results: Sequence[ShardAgreement]) -> dict[str, Any]:
    """Means over every scored row of ``results`` (as :meth:`ShardAgreement.summary`, with
    ``shard`` ``"all"``)."""
    return ShardAgreement("all", [row for r in results for row in r.rows]).summary()
