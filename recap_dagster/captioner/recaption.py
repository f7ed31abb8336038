"""RECAP step 2: recaption one LAION shard in both styles (plain Python, no Dagster).

Decoding and the processor's work (resizing, normalising, prompt ids) run in DataLoader
workers while the main process generates, so they overlap generation. Undecodable images
keep their row with ``status``/``error`` set and null captions, and so do rows that
img2dataset never delivered (dead URLs: its own status and error, ``delivered`` false),
counted apart: nothing is dropped silently, and a dead URL is not a decoding failure.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import torch
from torch.utils.data import DataLoader

from recap_dagster.captioner import Captioner
from recap_dagster.captioner.model import CaptionInputs
from recap_dagster.corpus.dataset import ShardDataset, collate_records
from recap_dagster.corpus.decoding import DEFAULT_MAX_PIXELS, STATUS_OK
from recap_dagster.corpus.reading import LaionRecord

# Bump when a change here changes what is written for the same inputs: Dagster then shows
# every recaptioned group as stale (the asset's code_version).
CODE_VERSION = "2"

STYLES = ("short", "long")

SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("alt_text", pa.string()),
        pa.field("recap_short", pa.string()),
        pa.field("recap_long", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("delivered", pa.bool_(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("captioner_version", pa.string(), nullable=False),
        pa.field("generation", pa.string(), nullable=False),
    ]
)
COLUMN_DESCRIPTIONS = {
    "key": "img2dataset sample key",
    "url": "source URL",
    "alt_text": "original alt text",
    "recap_short": "RECAP short caption (null when the image did not decode)",
    "recap_long": "RECAP long caption (null when the image did not decode)",
    "width": "decoded width in pixels",
    "height": "decoded height in pixels",
    "delivered": "img2dataset delivered an image for this row (false: a failed download)",
    "status": "ok; for a delivered image why it could not be used (decode_error, too_large, "
    "...); for an undelivered one img2dataset's status (failed_to_download, ...)",
    "error": "error message for failed rows (img2dataset's own for undelivered ones)",
    "captioner_version": "fingerprint of the captioner weights that wrote the captions",
    "generation": "what decided the captions as JSON: dtype, and per style the prompt and the "
    "merged generation config",
}


#: Longest repeated word n-gram in 3,000 miniworld human captions of each style: 6 (long, 2
#: of them), 4 (short, 1). A guard of 8 never touches captions like those, and stops a loop
#: ("a hat on top of a hat on top of ...") within two turns of it.
DEFAULT_NO_REPEAT_NGRAM_SIZE = 8


@dataclass(frozen=True)
class GenerationSettings:
    """How captions are generated. What changes the captions is recorded in every row
    (:meth:`record`); ``batch_size`` and ``num_workers`` change only the speed."""

    batch_size: int = 64
    num_workers: int = 1
    #: Per style: a short caption that has not ended by then is a runaway, and one runaway
    #: keeps its whole batch generating to the cap. Long captions fill CLIP's 77 tokens.
    max_new_tokens_short: int = 32
    max_new_tokens_long: int = 77
    num_beams: int = 1
    #: Repetition guard, see :data:`DEFAULT_NO_REPEAT_NGRAM_SIZE` (0 turns it off).
    no_repeat_ngram_size: int = DEFAULT_NO_REPEAT_NGRAM_SIZE
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if min(self.batch_size, self.max_new_tokens_short, self.max_new_tokens_long) < 1:
            raise ValueError("batch_size and max_new_tokens must be at least 1")
        if self.num_beams < 1 or self.no_repeat_ngram_size < 0 or self.repetition_penalty <= 0:
            raise ValueError(
                "num_beams must be >= 1, no_repeat_ngram_size >= 0, repetition_penalty > 0"
            )

    def generate_kwargs(self, style: str) -> dict[str, Any]:
        """The ``generate`` overrides for one style."""
        limits = {"short": self.max_new_tokens_short, "long": self.max_new_tokens_long}
        return {
            "max_new_tokens": limits[style],
            "num_beams": self.num_beams,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
            "repetition_penalty": self.repetition_penalty,
        }

    def record(self, captioner: Captioner) -> str:
        """JSON of everything that decides the captions: the weights' dtype and, per style,
        the prompt and the merged generation config (the checkpoint's ``generation_config``,
        the family's tokens, these settings). A finished shard is reused only when its
        record equals this one."""
        styles = {
            style: {
                "prompt": captioner.prefix(style),
                "generation_config": captioner.generation_record(**self.generate_kwargs(style)),
            }
            for style in STYLES
        }
        record = {"dtype": str(captioner.dtype).removeprefix("torch."), "styles": styles}
        return json.dumps(record, sort_keys=True)


@dataclass
class RecaptionStats:
    """Counts of one or more shards. Rows img2dataset did not deliver are counted apart from
    delivered images that could not be decoded: only the latter are our failures."""

    rows: int = 0
    captioned: int = 0
    seconds: float = 0.0
    not_delivered_by_status: dict[str, int] = field(default_factory=dict)
    undecodable_by_status: dict[str, int] = field(default_factory=dict)
    short_words: list[int] = field(default_factory=list)
    long_words: list[int] = field(default_factory=list)

    @property
    def not_delivered(self) -> int:
        return sum(self.not_delivered_by_status.values())

    @property
    def delivered(self) -> int:
        return self.rows - self.not_delivered

    @property
    def undecodable(self) -> int:
        return sum(self.undecodable_by_status.values())

    @property
    def images_per_second(self) -> float:
        return self.captioned / self.seconds if self.seconds > 0 else 0.0

    @property
    def failure_fraction(self) -> float:
        """Delivered images that could not be captioned, over delivered images."""
        return self.undecodable / self.delivered if self.delivered else 0.0

    def add_row(self, delivered: bool, status: str, short: str | None, long: str | None) -> None:
        """Count one output row: captioned, or by why it has no captions."""
        if short is not None and long is not None:
            self.captioned += 1
            self.short_words.append(len(short.split()))
            self.long_words.append(len(long.split()))
            return
        counts = self.undecodable_by_status if delivered else self.not_delivered_by_status
        counts[status] = counts.get(status, 0) + 1

    def length_summary(self) -> dict[str, float]:
        """Mean and max caption length in words, per style."""
        summary: dict[str, float] = {}
        for name, lengths in (("short", self.short_words), ("long", self.long_words)):
            if lengths:
                summary[f"{name}_words_mean"] = round(statistics.fmean(lengths), 2)
                summary[f"{name}_words_max"] = max(lengths)
        return summary

    def merge(self, other: RecaptionStats) -> None:
        self.rows += other.rows
        self.captioned += other.captioned
        self.seconds += other.seconds
        for mine, theirs in (
            (self.not_delivered_by_status, other.not_delivered_by_status),
            (self.undecodable_by_status, other.undecodable_by_status),
        ):
            for status, n in theirs.items():
                mine[status] = mine.get(status, 0) + n
        self.short_words += other.short_words
        self.long_words += other.long_words


@dataclass
class PreparedBatch:
    """One DataLoader batch: its records, the decoded ones among them, and the inputs of
    each style for those."""

    records: list[LaionRecord]
    decoded: list[LaionRecord]
    inputs: dict[str, dict[str, torch.Tensor]]  # style -> generate inputs; {} if none decoded

    def pin_memory(self) -> PreparedBatch:
        """Page-locked copies of the tensors (the DataLoader calls this with ``pin_memory``)."""
        pinned = {
            style: {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in d.items()}
            for style, d in self.inputs.items()
        }
        return PreparedBatch(self.records, self.decoded, pinned)


@dataclass(frozen=True)
class PrepareBatch:
    """DataLoader ``collate_fn``: a batch's records plus the ``generate`` inputs of each style
    for its decoded images, so workers do the processor's work as well as the decoding."""

    build: CaptionInputs

    def __call__(self, records: list[LaionRecord]) -> PreparedBatch:
        decoded = [r for r in records if r.status == STATUS_OK and r.image is not None]
        images = [r.image for r in decoded]
        inputs = {style: self.build(images, style) for style in STYLES} if images else {}
        return PreparedBatch(collate_records(records), decoded, inputs)


def _caption_batch(
    captioner: Captioner, batch: PreparedBatch, settings: GenerationSettings
) -> dict[str, tuple[str, str]]:
    if not batch.decoded:
        return {}
    shorts, longs = (
        captioner.generate_from(batch.inputs[s], **settings.generate_kwargs(s)) for s in STYLES
    )
    return {r.key: (s, lo) for r, s, lo in zip(batch.decoded, shorts, longs, strict=True)}


def recaption_shard(
    captioner: Captioner,
    shards_root: str,
    shard: str,
    *,
    captioner_version: str,
    settings: GenerationSettings | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[pa.Table, RecaptionStats]:
    """Caption every decodable image of ``shard`` in both styles; one row per source row."""
    settings = settings or GenerationSettings()
    dataset = ShardDataset(shards_root, [shard], max_pixels=max_pixels)
    loader = DataLoader(
        dataset,
        batch_size=settings.batch_size,
        collate_fn=PrepareBatch(captioner.input_builder()),
        num_workers=settings.num_workers,
        # Workers decode and preprocess the next batches while the model generates this one.
        prefetch_factor=2 if settings.num_workers > 0 else None,
        persistent_workers=False,
        pin_memory=captioner.device.type == "cuda",
    )
    generation = settings.record(captioner)
    stats = RecaptionStats()
    rows: list[dict] = []
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in loader:
            captions = _caption_batch(captioner, batch, settings)
            for record in batch.records:
                short, long = captions.get(record.key, (None, None))
                ok = short is not None
                rows.append(
                    {
                        "key": record.key,
                        "url": record.url,
                        "alt_text": record.alt_text,
                        "recap_short": short,
                        "recap_long": long,
                        "width": record.width,
                        "height": record.height,
                        "delivered": record.delivered,
                        "status": record.status if not ok else STATUS_OK,
                        "error": record.error if not ok else None,
                        "captioner_version": captioner_version,
                        "generation": generation,
                    }
                )
                stats.add_row(record.delivered, rows[-1]["status"], short, long)
            if on_batch is not None:
                on_batch(len(rows))
    stats.seconds = time.perf_counter() - start
    stats.rows = len(rows)
    # Workers interleave records; img2dataset keys sort in shard order.
    rows.sort(key=lambda row: row["key"])
    return pa.Table.from_pylist(rows, schema=SCHEMA), stats


def finished_stats(
    table: pa.Table, captioner_version: str, generation: str
) -> RecaptionStats | None:
    """Counts of a shard that this captioner already wrote with this generation record
    (:meth:`GenerationSettings.record`), so that a resumed run keeps it instead of captioning
    it again; None when it must be recaptioned (another captioner, dtype or generation
    config, an older schema, an empty file)."""
    if not set(SCHEMA.names) <= set(table.schema.names) or table.num_rows == 0:
        return None
    written_by = set(table.column("captioner_version").to_pylist())
    if written_by != {captioner_version} or set(table.column("generation").to_pylist()) != {
        generation
    }:
        return None
    stats = RecaptionStats(rows=table.num_rows)
    for row in table.select(["delivered", "status", "recap_short", "recap_long"]).to_pylist():
        stats.add_row(row["delivered"], row["status"], row["recap_short"], row["recap_long"])
    return stats


def validate_recaptions(
    table: pa.Table,
    expected_rows: int,
    count_tokens: Callable[[list[str]], list[int]] | None,
    max_failure_fraction: float = 1.0,
) -> dict[str, tuple[bool, str]]:
    """The recaptioned-shard checks as plain results: name -> (passed, description).

    ``failure_fraction`` judges delivered images only: a row img2dataset did not deliver (a
    dead URL) is the source's loss, not a failure of the recaptioner."""
    results: dict[str, tuple[bool, str]] = {}
    missing = [name for name in SCHEMA.names if name not in table.schema.names]
    results["schema"] = (not missing, f"missing columns: {missing}" if missing else "schema ok")
    results["row_count"] = (
        table.num_rows == expected_rows,
        f"{table.num_rows} rows written, source shard has {expected_rows}",
    )
    if missing:
        return results
    rows = table.select(["key", "delivered", "status", "recap_short", "recap_long"]).to_pylist()
    empty = [
        r["key"]
        for r in rows
        if r["status"] == STATUS_OK
        and (not (r["recap_short"] or "").strip() or not (r["recap_long"] or "").strip())
    ]
    results["no_empty_captions"] = (
        not empty,
        f"{len(empty)} decoded rows with an empty caption {empty[:5]}" if empty else "none empty",
    )
    delivered = sum(r["delivered"] for r in rows)
    undecodable = sum(r["delivered"] and r["status"] != STATUS_OK for r in rows)
    fraction = undecodable / delivered if delivered else 0.0
    results["failure_fraction"] = (
        fraction <= max_failure_fraction,
        f"{undecodable} of {delivered} delivered images undecodable ({fraction:.2%}), "
        f"{len(rows) - delivered} rows not delivered by img2dataset",
    )
    if count_tokens is not None:
        longs = [r["recap_long"] for r in rows if r["status"] == STATUS_OK]
        counts = count_tokens(longs) if longs else []
        over = sum(n > 77 for n in counts)
        longest = max(counts, default=0)
        results["long_within_77_tokens"] = (
            over == 0,
            f"{over} of {len(counts)} long captions exceed 77 tokens (max {longest})",
        )
    return results
