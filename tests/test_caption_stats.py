"""The training corpus's caption figures per variant, as the report shows them."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from recap_dagster.captioner.recaption import output_parts
from recap_dagster.evaluation.agreement import agreement_parts
from recap_dagster.evaluation.caption_stats import corpus_caption_stats, stats_rows
from recap_dagster.evaluation.report import build_report
from recap_dagster.storage.root import Storage


def _count(texts: list[str]) -> list[int]:
    """Words plus the start and end tokens: a stand-in CLIP tokenizer."""
    return [len(t.split()) + 2 for t in texts]


def _row(key: str, alt: str, short_tokens: int, long_tokens: int, **facts) -> dict:
    return {
        "key": key, "status": "ok", "alt_text": alt,
        "recap_short": "a cat.", "recap_long": "A cat. It sits.",
        "short_clip_tokens": short_tokens, "long_clip_tokens": long_tokens,
        "short_hit_cap": facts.get("short_hit_cap", False),
        "long_hit_cap": facts.get("long_hit_cap", False),
        "short_repetition": facts.get("short_repetition", 0.0),
        "long_repetition": facts.get("long_repetition", 0.0),
        "short_trim": None, "long_trim": facts.get("long_trim"),
    }  # fmt: skip


@pytest.fixture
def store(tmp_path: Path) -> Storage:
    store = Storage(str(tmp_path))
    rows_a = [
        _row("a0", "a cat", 4, 10),
        _row("a1", "cat cat cat cat cat", 6, 20, long_hit_cap=True, long_trim="sentence"),
    ]
    failed = {**_row("a2", "x", 0, 0), "status": "undecodable"}  # not counted
    rows_b = [_row("b0", "a dog on grass", 8, 30, long_repetition=0.9)]
    store.write_parquet(pa.Table.from_pylist([*rows_a, failed]), *output_parts("00000"))
    store.write_parquet(pa.Table.from_pylist(rows_b), *output_parts("00001"))
    scores = [{"key": "a0", "clip_alt_text": 20.0, "clip_recap_short": 30.0,
               "clip_recap_long": 24.0}]  # fmt: skip
    store.write_parquet(pa.Table.from_pylist(scores), *agreement_parts("00000"))
    return store


def test_caption_figures_per_variant(store: Storage) -> None:
    columns, read = corpus_caption_stats(store, ["00000", "00001", "00002"], _count)
    assert read == 2  # 00002 was never recaptioned
    rows = {r["variant"]: r for r in stats_rows(columns, ["alttext", "recap_long", "recap_mix"])}
    alt = rows["alttext"]
    assert alt["rows"] == 3 and alt["clip_tokens_mean"] == pytest.approx((4 + 7 + 6) / 3, 0.01)
    assert alt["cap_hit_rate"] is None and alt["degenerate_rate"] == pytest.approx(1 / 3, 1e-3)
    assert alt["caption_clip_score"] == 20.0
    long = rows["recap_long"]
    assert long["clip_tokens_mean"] == 20.0 and long["clip_tokens_p95"] == 30
    assert long["cap_hit_rate"] == pytest.approx(1 / 3, 1e-3)
    assert long["over_context_rate"] == pytest.approx(1 / 3, 1e-3)
    assert long["degenerate_rate"] == pytest.approx(1 / 3, 1e-3)
    mix = rows["recap_mix"]  # short and long pooled
    assert mix["rows"] == 6 and mix["clip_tokens_mean"] == pytest.approx(78 / 6, 0.01)
    assert mix["caption_clip_score"] == 27.0
    # A shard written before the facts columns: its captions are counted and scored here.
    old = {"key": "c0", "status": "ok", "alt_text": "a cat", "recap_short": "cat " * 6,
           "recap_long": "A cat.", "short_clip_tokens": None, "short_repetition": None}  # fmt: skip
    store.write_parquet(pa.Table.from_pylist([old]), *output_parts("00002"))
    columns, read = corpus_caption_stats(store, ["00002"], _count)
    short = stats_rows(columns, ["recap_short"])[0]
    assert read == 1 and short["clip_tokens_mean"] == 8 and short["degenerate_rate"] == 1.0
    # A sample of the shards when there are more than max_shards: the same one each time.
    assert corpus_caption_stats(store, ["00000", "00001"], _count, max_shards=1)[1] == 1


def test_the_report_shows_the_captions_beside_the_metrics(store: Storage) -> None:
    columns, read = corpus_caption_stats(store, ["00000", "00001"], _count)
    overall = {"object_accuracy": 0.5, "clip_score": 31.0, "fid": 2.0}
    reports = {v: [{"seed": 0, "overall": overall, "curve": []}] for v in ("alttext", "recap_mix")}
    built = build_report(reports, caption_rows=stats_rows(columns, list(reports)), shards_read=read)
    assert "## The captions behind the metrics" in built.markdown
    assert "over 2 recaptioned shard(s)" in built.captions_markdown
    line = next(x for x in built.captions_markdown.splitlines() if x.startswith("| recap_mix"))
    assert "recap_short + recap_long" in line and "| 27.000 | 0.500 | 31.000 |" in line
    assert "No caption statistics" in build_report(reports).captions_markdown
