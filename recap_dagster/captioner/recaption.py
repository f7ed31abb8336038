"""RECAP step 2: recaption one LAION shard in both styles (plain Python, no Dagster).

Decoding and the processor's work (resizing, normalising, prompt ids) run in DataLoader
workers while the main process generates, so they overlap generation. Undecodable images
keep their row with ``status``/``error`` set and null captions, and so do rows that
img2dataset never delivered (dead URLs: its own status and error, ``delivered`` false),
counted apart: nothing is dropped silently, and a dead URL is not a decoding failure.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pyarrow as pa
import torch

from recap_dagster.captioner.caption_facts import (
    CLIP_CONTEXT,
    CaptionCheckThresholds,
    TokenCounter,
    caption_checks,
    caption_facts,
)
from recap_dagster.captioner.model import Captioner, CaptionInputs
from recap_dagster.corpus.dataset import (
    ShardBatch,
    ShardBatches,
    completed_shards,
    shard_batch_loader,
)
from recap_dagster.corpus.decoding import DEFAULT_MAX_PIXELS, STATUS_OK
from recap_dagster.corpus.human_captions import clip_token_counter
from recap_dagster.corpus.reading import LaionRecord
from recap_dagster.storage.root import Storage
from recap_dagster.training.cpu_share import CpuShare
from recap_dagster.training.devices import dtype_name
from recap_dagster.training.per_device import DeviceShare, Emit, run_per_device

# Bump when a change here changes what is written for the same inputs: Dagster then shows
# every recaptioned group as stale (the asset's code_version).
CODE_VERSION = "3"

STYLES = ("short", "long")
#: Under the storage root: one parquet file per shard.
OUTPUT_DIR = "recaptioned"

SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("alt_text", pa.string()),
        pa.field("recap_short", pa.string()),
        pa.field("recap_long", pa.string()),
        *(
            column
            for style in ("short", "long")
            for column in (
                pa.field(f"{style}_clip_tokens", pa.int32()),
                pa.field(f"{style}_hit_cap", pa.bool_()),
                pa.field(f"{style}_repetition", pa.float32()),
                pa.field(f"{style}_trim", pa.string()),
            )
        ),
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
    **{
        name: text.format(style=style)
        for style in ("short", "long")
        for name, text in (
            (
                f"{style}_clip_tokens",
                "CLIP tokens of the {style} caption as written, start and end included "
                "(the text encoder's tokenizer; at most 77)",
            ),
            (
                f"{style}_hit_cap",
                "the {style} caption hit max_new_tokens instead of ending on its own",
            ),
            (
                f"{style}_repetition",
                "fraction of the {style} caption's word 2- or 3-grams that repeat an earlier "
                "one (the larger; near 1 for a loop)",
            ),
            (
                f"{style}_trim",
                "null: the {style} caption is as generated; else it was over 77 CLIP tokens "
                "and was cut at the last sentence, clause or word boundary that fits",
            ),
        )
    },
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
#: of them), 4 (short, 1). In the miniworld a word is a token, so a guard of 8 tokens never
#: touches captions like those and stops a loop ("a hat on top of a hat on top of ...")
#: within two turns of it; with a real BPE tokenizer 8 tokens are 5-6 words.
DEFAULT_NO_REPEAT_NGRAM_SIZE = 8


@dataclass(frozen=True)
class GenerationSettings:
    """How captions are generated. What decides the captions is recorded in every row
    (:meth:`record`); ``batch_size`` and ``num_workers`` are not decoding settings (other
    batches sum in another order, which can at most flip a greedy near-tie)."""

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
        record = {"dtype": dtype_name(captioner.dtype), "styles": styles}
        return json.dumps(record, sort_keys=True)


@dataclass
class StyleFacts:
    """Running totals of one style's caption facts (see :mod:`caption_facts`)."""

    tokens_sum: int = 0
    tokens_max: int = 0
    hit_cap: int = 0
    trimmed: int = 0
    repetition_max: float = 0.0

    def add(self, tokens: int, hit_cap: bool, trim: str | None, repetition: float) -> None:
        self.tokens_sum += tokens
        self.tokens_max = max(self.tokens_max, tokens)
        self.hit_cap += bool(hit_cap)
        self.trimmed += trim is not None
        self.repetition_max = max(self.repetition_max, repetition)

    def merge(self, other: StyleFacts) -> None:
        self.tokens_sum += other.tokens_sum
        self.tokens_max = max(self.tokens_max, other.tokens_max)
        self.hit_cap += other.hit_cap
        self.trimmed += other.trimmed
        self.repetition_max = max(self.repetition_max, other.repetition_max)


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
    #: Per style, running totals of the caption facts (not per-row lists: a group's counts
    #: stay a few numbers however many rows it has).
    facts: dict[str, StyleFacts] = field(
        default_factory=lambda: {style: StyleFacts() for style in STYLES}
    )

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

    @classmethod
    def of_rows(cls, rows: Iterable[Mapping[str, Any]]) -> RecaptionStats:
        """The counts of output rows (their delivered, status, caption and fact columns)."""
        stats = cls()
        for row in rows:
            stats.rows += 1
            stats.add_row(row)
        return stats

    def add_row(self, row: Mapping[str, Any]) -> None:
        """Count one output row: captioned (with its facts), or by why it has no captions."""
        short, long = row["recap_short"], row["recap_long"]
        if short is not None and long is not None:
            self.captioned += 1
            self.short_words.append(len(short.split()))
            self.long_words.append(len(long.split()))
            for style in STYLES:
                self.facts[style].add(
                    row[f"{style}_clip_tokens"],
                    row[f"{style}_hit_cap"],
                    row[f"{style}_trim"],
                    row[f"{style}_repetition"],
                )
            return
        counts = self.undecodable_by_status if row["delivered"] else self.not_delivered_by_status
        counts[row["status"]] = counts.get(row["status"], 0) + 1

    def length_summary(self) -> dict[str, float]:
        """Mean and max caption length in words, per style."""
        summary: dict[str, float] = {}
        for name, lengths in (("short", self.short_words), ("long", self.long_words)):
            if lengths:
                summary[f"{name}_words_mean"] = round(statistics.fmean(lengths), 2)
                summary[f"{name}_words_max"] = max(lengths)
        return summary

    def facts_summary(self) -> dict[str, float]:
        """Per style: mean and max CLIP tokens, cap-hit rate, captions trimmed to 77 CLIP
        tokens, the largest repetition score."""
        summary: dict[str, float] = {}
        if not self.captioned:
            return summary
        for style, facts in self.facts.items():
            summary[f"{style}_clip_tokens_mean"] = round(facts.tokens_sum / self.captioned, 2)
            summary[f"{style}_clip_tokens_max"] = facts.tokens_max
            summary[f"{style}_cap_hit_rate"] = round(facts.hit_cap / self.captioned, 4)
            summary[f"{style}_trimmed"] = facts.trimmed
            summary[f"{style}_repetition_max"] = round(facts.repetition_max, 3)
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
        for style, facts in other.facts.items():
            self.facts[style].merge(facts)


@dataclass
class PreparedBatch:
    """One DataLoader item: a batch of one shard's records, the decoded ones among them, and
    the inputs of each style for those."""

    batch: ShardBatch
    decoded: list[LaionRecord]
    inputs: dict[str, dict[str, torch.Tensor]]  # style -> generate inputs; {} if none decoded

    def pin_memory(self) -> PreparedBatch:
        """Page-locked copies of the tensors (the DataLoader calls this with ``pin_memory``)."""
        pinned = {
            style: {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in d.items()}
            for style, d in self.inputs.items()
        }
        return PreparedBatch(self.batch, self.decoded, pinned)


@dataclass(frozen=True)
class PrepareBatch:
    """DataLoader ``collate_fn``: a batch's records plus the ``generate`` inputs of each style
    for its decoded images, so workers do the processor's work as well as the decoding."""

    build: CaptionInputs

    def __call__(self, batch: ShardBatch) -> PreparedBatch:
        decoded = [r for r in batch.records if r.status == STATUS_OK and r.image is not None]
        inputs = {s: self.build([r.image for r in decoded], s) for s in STYLES} if decoded else {}
        # The decoded images stay here: only the model inputs cross to the main process.
        records = [dataclasses.replace(r, image=None) for r in batch.records]
        keep = {r.key for r in decoded}
        batch = dataclasses.replace(batch, records=records)
        return PreparedBatch(batch, [r for r in records if r.key in keep], inputs)


def _caption_batch(
    captioner: Captioner,
    batch: PreparedBatch,
    settings: GenerationSettings,
    count_tokens: TokenCounter,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Key -> style -> the caption fitted to CLIP's context, with its facts."""
    if not batch.decoded:
        return {}
    per_style = {}
    for style in STYLES:
        texts, hit_cap = captioner.generate_with_ends(
            batch.inputs[style], **settings.generate_kwargs(style)
        )
        per_style[style] = caption_facts(texts, hit_cap, count_tokens, CLIP_CONTEXT)
    return {
        r.key: {style: per_style[style][i] for style in STYLES} for i, r in enumerate(batch.decoded)
    }


def _output_row(
    record: LaionRecord,
    captions: dict[str, dict[str, Any]] | None,
    captioner_version: str,
    generation: str,
) -> dict[str, Any]:
    facts = {
        f"{style}_{name}": captions[style][name] if captions else None
        for style in STYLES
        for name in ("clip_tokens", "hit_cap", "repetition", "trim")
    }
    return {
        "key": record.key,
        "url": record.url,
        "alt_text": record.alt_text,
        "recap_short": captions["short"]["caption"] if captions else None,
        "recap_long": captions["long"]["caption"] if captions else None,
        **facts,
        "width": record.width,
        "height": record.height,
        "delivered": record.delivered,
        "status": STATUS_OK if captions else record.status,
        "error": None if captions else record.error,
        "captioner_version": captioner_version,
        "generation": generation,
    }


def recaption_shards(
    captioner: Captioner,
    shards_root: str,
    shards: Sequence[str],
    *,
    captioner_version: str,
    count_tokens: TokenCounter,
    settings: GenerationSettings | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[tuple[str, pa.Table, RecaptionStats]]:
    """Caption every decodable image of ``shards`` in both styles; yields each shard's table
    (one row per source row, in key order) as soon as the shard is complete. Captions over
    CLIP's 77 tokens of ``count_tokens`` (the text encoder's tokenizer) are trimmed at a
    sentence, else clause, boundary and the row says so: training never cuts one silently.

    One DataLoader serves all the shards: its workers start once, each reads only its own
    shards, and decode and preprocess the next batches while the model generates. At most
    one shard per worker is held in memory.
    """
    settings = settings or GenerationSettings()
    loader = shard_batch_loader(
        ShardBatches(shards_root, shards, settings.batch_size, max_pixels=max_pixels),
        PrepareBatch(captioner.input_builder()),
        settings.num_workers,
        pin_memory=captioner.device.type == "cuda",
    )
    generation = settings.record(captioner)

    def captioned() -> Iterator[tuple[ShardBatch, tuple[float, list[dict[str, Any]]]]]:
        """Each batch's output rows, with when its captioning began."""
        for prepared in loader:
            start = time.perf_counter()
            captions = _caption_batch(captioner, prepared, settings, count_tokens)
            records = prepared.batch.records
            rows = [
                _output_row(r, captions.get(r.key), captioner_version, generation) for r in records
            ]
            yield prepared.batch, (start, rows)

    with torch.inference_mode():
        for shard, parts in completed_shards(captioned()):
            rows = [row for _, part_rows in parts for row in part_rows]
            stats = RecaptionStats.of_rows(rows)
            stats.seconds = time.perf_counter() - parts[0][0]
            # Workers interleave records; img2dataset keys sort in shard order.
            rows.sort(key=lambda row: row["key"])
            yield shard, pa.Table.from_pylist(rows, schema=SCHEMA), stats


def recaption_shard(
    captioner: Captioner,
    shards_root: str,
    shard: str,
    *,
    captioner_version: str,
    count_tokens: TokenCounter,
    settings: GenerationSettings | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[pa.Table, RecaptionStats]:
    """:func:`recaption_shards` of one shard: its table and counts."""
    ((_, table, stats),) = recaption_shards(
        captioner,
        shards_root,
        [shard],
        captioner_version=captioner_version,
        count_tokens=count_tokens,
        settings=settings,
        max_pixels=max_pixels,
    )
    return table, stats


@dataclass(frozen=True)
class RecaptionJob:
    """A shard group's recaptioning, as each process runs its share of it."""

    checkpoint: str  # a local captioner directory
    captioner_version: str
    shards_root: str
    storage_root: str
    settings: GenerationSettings
    #: The CLIP tokenizer of the text-to-image model (a directory): counts caption tokens.
    tokenizer_path: str
    dtype: torch.dtype | None = None  # None: the checkpoint's own
    max_pixels: int = DEFAULT_MAX_PIXELS
    reuse_finished_shards: bool = True


def output_parts(shard: str) -> tuple[str, str]:
    """Where a shard's recaptions live under the storage root."""
    return (OUTPUT_DIR, f"{shard}.parquet")


@dataclass
class ShareResult:
    """What one process did: counts, the per-shard lines, and a few rows to show."""

    generation: str  # the record (GenerationSettings.record), dtype included
    total: RecaptionStats = field(default_factory=RecaptionStats)
    captioned: RecaptionStats = field(default_factory=RecaptionStats)  # not kept shards
    kept: list[str] = field(default_factory=list)
    per_shard: list[dict[str, Any]] = field(default_factory=list)
    sample: pa.Table | None = None


def recaption_share(job: RecaptionJob, share: DeviceShare, emit: Emit) -> ShareResult:
    """One process's part of a group: load the captioner on its device, keep the shards it
    already wrote with the same generation record, caption the others and write each one
    (atomically) as soon as it is complete."""
    store = Storage(job.storage_root)
    captioner = Captioner.from_pretrained(job.checkpoint, device=share.device, dtype=job.dtype)
    count_tokens = clip_token_counter(job.tokenizer_path)
    result = ShareResult(job.settings.record(captioner))
    emit({"rank": share.rank, "device": share.device, "shards": len(share.shards)})

    def done(shard: str, stats: RecaptionStats, speed: float | str) -> None:
        result.total.merge(stats)
        line = {
            "shard": shard,
            "rows": stats.rows,
            "not_delivered": stats.not_delivered,
            "undecodable": stats.undecodable,
            "images_per_second": speed,
            "uri": store.uri(*output_parts(shard)),
            "rank": share.rank,
        }
        result.per_shard.append(line)
        emit(line)

    todo = []
    for shard in share.shards:
        kept = None
        if job.reuse_finished_shards and store.exists(*output_parts(shard)):
            existing = store.read_parquet(*output_parts(shard))
            kept = finished_stats(existing, job.captioner_version, result.generation)
        if kept is None:
            todo.append(shard)
        else:
            result.kept.append(shard)
            done(shard, kept, "kept")
    start = time.perf_counter()
    for shard, table, stats in recaption_shards(
        captioner,
        job.shards_root,
        todo,
        captioner_version=job.captioner_version,
        count_tokens=count_tokens,
        settings=job.settings,
        max_pixels=job.max_pixels,
    ):
        store.write_parquet(table, *output_parts(shard))
        result.captioned.merge(stats)
        # take, not slice: a slice pickles the whole table's buffers.
        result.sample = table.take(list(range(min(8, table.num_rows))))
        done(shard, stats, round(stats.images_per_second, 1))
    # Shards overlap when several workers read them: the share's speed is over its wall time.
    result.captioned.seconds = time.perf_counter() - start
    return result


def recaption_group(
    job: RecaptionJob,
    shards: Sequence[str],
    devices: Sequence[torch.device],
    on_event: Emit | None = None,
    cpu: CpuShare | None = None,
) -> ShareResult:
    """A group's shards recaptioned by one process per device (:func:`run_per_device`, with
    the step's ``cpu`` share); the processes' results merged, per-shard lines in shard
    order."""
    results = run_per_device(partial(recaption_share, job), shards, devices, on_event, cpu)
    merged = ShareResult(results[0].generation)
    for result in results:
        if result.generation != merged.generation:
            raise RuntimeError("the processes generated with different settings")
        merged.total.merge(result.total)
        merged.captioned.merge(result.captioned)
        merged.kept += result.kept
        merged.per_shard += result.per_shard
        merged.sample = result.sample if result.sample is not None else merged.sample
    # The processes ran side by side: the group took as long as the slowest.
    merged.captioned.seconds = max(result.captioned.seconds for result in results)
    merged.kept.sort()
    merged.per_shard.sort(key=lambda line: line["shard"])
    return merged


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
    columns = ["delivered", "status", "recap_short", "recap_long", *_FACT_COLUMNS]
    return RecaptionStats.of_rows(table.select(columns).to_pylist())


_FACT_COLUMNS = [
    f"{style}_{name}"
    for style in STYLES
    for name in ("clip_tokens", "hit_cap", "repetition", "trim")
]


def validate_recaptions(
    table: pa.Table,
    expected_rows: int,
    count_tokens: Callable[[list[str]], list[int]] | None,
    max_failure_fraction: float = 1.0,
    thresholds: CaptionCheckThresholds | None = None,
) -> dict[str, tuple[bool, str]]:
    """The recaptioned-shard checks as plain results: name -> (passed, description).

    ``failure_fraction`` judges delivered images only: a row img2dataset did not deliver (a
    dead URL) is the source's loss, not a failure of the recaptioner. With ``thresholds``,
    the caption-fact checks (:func:`caption_checks`) judge the captioned rows too."""
    results: dict[str, tuple[bool, str]] = {}
    missing = [name for name in SCHEMA.names if name not in table.schema.names]
    results["schema"] = (not missing, f"missing columns: {missing}" if missing else "schema ok")
    results["row_count"] = (
        table.num_rows == expected_rows,
        f"{table.num_rows} rows written, source shard has {expected_rows}",
    )
    if missing:
        return results
    columns = ["key", "delivered", "status", "recap_short", "recap_long", *_FACT_COLUMNS]
    rows = table.select(columns).to_pylist()
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
    if thresholds is not None:
        captioned = [
            r
            for r in rows
            if r["status"] == STATUS_OK
            and r["recap_short"] is not None
            and r["recap_long"] is not None
        ]
        results.update(caption_checks(captioned, thresholds))
    return results
