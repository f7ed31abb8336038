"""The training corpus's captions in figures, per caption variant, for the report: what the
text-to-image model read beside what it learned (plain Python, no Dagster).

Read from a seeded sample of the corpus's recaptioned shards (at most ``max_shards``: a
LAION-scale corpus has hundreds of thousands), one shard at a time, so the work and memory
stay bounded: CLIP-token counts (mean, 95th percentile from a histogram), how many captions
are longer than the text encoder's context (alt text: cut by the tokenizer; recaptions:
trimmed at a boundary when written), cap hits and degenerate captions (recaptions' facts),
and the mean CLIP score of the captions against their images where the shards' agreement
samples were scored.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from recap_dagster.captioner.caption_facts import CLIP_CONTEXT, repetition_score
from recap_dagster.captioner.recaption import output_parts
from recap_dagster.evaluation.agreement import read_shard_agreement
from recap_dagster.storage.root import Storage
from recap_dagster.t2i.training_data import VARIANT_COLUMNS

#: Shards read for the statistics by default (a seeded sample when the corpus has more).
DEFAULT_MAX_SHARDS = 200
#: A caption is degenerate above this repetition score (as the recaption checks judge).
DEGENERATE_REPETITION = 0.5

#: Column descriptions of :func:`stats_rows`' rows.
STATS_COLUMNS = {
    "variant": "caption variant the fine-tune read",
    "captions": "caption columns it draws from (RECAP Mix: both, 50/50)",
    "rows": "captions counted (captioned rows of the sampled shards, per column)",
    "clip_tokens_mean": "mean CLIP tokens per caption (start and end included)",
    "clip_tokens_p95": "95th percentile of CLIP tokens per caption",
    "over_context_rate": "fraction longer than 77 CLIP tokens before fitting (alt text: cut "
    "by the tokenizer; recaptions: trimmed at a sentence or clause when written)",
    "cap_hit_rate": "fraction of recaptions that hit max_new_tokens (alt text: -)",
    "degenerate_rate": "fraction whose word 2/3-gram repetition score exceeds 0.5",
    "caption_clip_score": "mean CLIP score of the captions against their images "
    "(the shards' scored samples; long captions per sentence)",
}


@dataclass
class ColumnStats:
    """Running figures of one caption column; ``+`` pools two."""

    rows: int = 0
    tokens: Counter[int] = field(default_factory=Counter)
    over_context: int = 0
    hit_cap: int | None = None
    degenerate: int = 0
    clip_sum: float = 0.0
    clip_n: int = 0

    def __add__(self, other: ColumnStats) -> ColumnStats:
        caps = [c for c in (self.hit_cap, other.hit_cap) if c is not None]
        return ColumnStats(
            rows=self.rows + other.rows,
            tokens=self.tokens + other.tokens,
            over_context=self.over_context + other.over_context,
            hit_cap=sum(caps) if caps else None,
            degenerate=self.degenerate + other.degenerate,
            clip_sum=self.clip_sum + other.clip_sum,
            clip_n=self.clip_n + other.clip_n,
        )

    def percentile(self, q: float) -> int | None:
        """The smallest token count at or below which ``q`` of the captions lie."""
        seen = 0
        for count in sorted(self.tokens):
            seen += self.tokens[count]
            if seen >= q * self.rows:
                return count
        return None

    def summary(self) -> dict[str, float | int | None]:
        def rate(hits: int | None) -> float | None:
            return None if hits is None or not self.rows else round(hits / self.rows, 4)

        total = sum(count * n for count, n in self.tokens.items())
        return {
            "rows": self.rows,
            "clip_tokens_mean": round(total / self.rows, 2) if self.rows else None,
            "clip_tokens_p95": self.percentile(0.95),
            "over_context_rate": rate(self.over_context),
            "cap_hit_rate": rate(self.hit_cap),
            "degenerate_rate": rate(self.degenerate),
            "caption_clip_score": round(self.clip_sum / self.clip_n, 2) if self.clip_n else None,
        }


def _shard_stats(
    store: Storage, shard: str, count_tokens: Callable[[list[str]], list[int]]
) -> dict[str, ColumnStats]:
    """One recaptioned shard's figures per caption column (captioned rows only)."""
    table = store.read_parquet(*output_parts(shard))
    rows = [r for r in table.to_pylist() if r["status"] == "ok"]
    out: dict[str, ColumnStats] = {}
    alt = [r["alt_text"] or "" for r in rows]
    alt_tokens = count_tokens(alt) if alt else []
    out["alt_text"] = ColumnStats(
        rows=len(rows),
        tokens=Counter(min(t, CLIP_CONTEXT + 1) for t in alt_tokens),
        over_context=sum(t > CLIP_CONTEXT for t in alt_tokens),
        degenerate=sum(repetition_score(t) > DEGENERATE_REPETITION for t in alt),
    )
    for style in ("short", "long"):
        texts = [r[f"recap_{style}"] or "" for r in rows]
        # Rows without facts (written before the facts columns existed): count them here.
        missing = [i for i, r in enumerate(rows) if r.get(f"{style}_clip_tokens") is None]
        counts = count_tokens([texts[i] for i in missing]) if missing else []
        counted = dict(zip(missing, counts, strict=True))
        tokens = [counted.get(i) or r[f"{style}_clip_tokens"] for i, r in enumerate(rows)]
        repetition = [
            repetition_score(t)
            if r.get(f"{style}_repetition") is None
            else r[f"{style}_repetition"]
            for r, t in zip(rows, texts, strict=True)
        ]
        out[f"recap_{style}"] = ColumnStats(
            rows=len(rows),
            tokens=Counter(tokens),
            over_context=sum(r.get(f"{style}_trim") is not None for r in rows),
            hit_cap=sum(bool(r.get(f"{style}_hit_cap")) for r in rows),
            degenerate=sum(score > DEGENERATE_REPETITION for score in repetition),
        )
    stored = read_shard_agreement(store, shard)
    if stored is not None:
        for column, stats in out.items():
            stats.clip_sum = sum(r[f"clip_{column}"] for r in stored[0].rows)
            stats.clip_n = len(stored[0].rows)
    return out


def corpus_caption_stats(
    store: Storage,
    shards: Sequence[str],
    count_tokens: Callable[[list[str]], list[int]],
    *,
    max_shards: int = DEFAULT_MAX_SHARDS,
    seed: int = 0,
) -> tuple[dict[str, ColumnStats], int]:
    """Figures per caption column over a seeded sample of at most ``max_shards`` of
    ``shards`` (those recaptioned), and how many shards were read."""
    present = sorted(s for s in shards if store.exists(*output_parts(s)))
    if len(present) > max_shards:
        present = sorted(random.Random(seed).sample(present, max_shards))
    totals: dict[str, ColumnStats] = {}
    for shard in present:
        for column, stats in _shard_stats(store, shard, count_tokens).items():
            totals[column] = totals.get(column, ColumnStats()) + stats
    return totals, len(present)


def stats_rows(columns: dict[str, ColumnStats], variants: Sequence[str]) -> list[dict]:
    """One row per variant: its caption columns pooled (RECAP Mix draws both equally).
    Variants without caption columns here (the base model, the oracle's true captions in
    the corpus shards) have no row."""
    rows = []
    for variant in variants:
        names = VARIANT_COLUMNS.get(variant, ())
        if not names or not all(n in columns for n in names):
            continue
        pooled = sum((columns[n] for n in names), ColumnStats())
        rows.append({"variant": variant, "captions": " + ".join(names), **pooled.summary()})
    return rows
