"""Caption facts without ground truth: trimming to CLIP's 77 tokens, cap hits, repetition,
and the shard checks on them, through the real recaption path (the miniworld's fine-tuned
captioner passes; captioners that loop or write one caption for both styles fail)."""

from __future__ import annotations

import statistics

import pyarrow as pa
import pytest
import torch

from recap_dagster.captioner import Captioner
from recap_dagster.captioner.caption_facts import (
    TRIM_CLAUSE,
    TRIM_SENTENCE,
    TRIM_WORD,
    CaptionCheckThresholds,
    caption_facts,
    fit_captions,
    leaks_long_style,
    repetition_score,
    same_or_prefix,
    sentence_count,
)
from recap_dagster.captioner.recaption import (
    SCHEMA,
    GenerationSettings,
    RecaptionStats,
    recaption_shard,
    validate_recaptions,
)
from recap_dagster.corpus.human_captions import clip_token_counter
from recap_dagster.corpus.reading import count_rows, iter_shard

SHARD = "00000"
FACT_CHECKS = (
    "cap_hit_rate",
    "degeneration_rate",
    "unique_captions",
    "short_differs_from_long",
    "style_leakage",
)
SENTENCE = "a red circle sits at the top left beside two blue squares"


@pytest.fixture(scope="module")
def count(miniworld_paths):
    """The miniworld's CLIP tokenizer (the text-to-image model's) as a token counter."""
    return clip_token_counter(miniworld_paths.tokenizer)


def test_repetition_score_of_loops_and_of_plain_captions() -> None:
    assert repetition_score("a red circle and a blue square on a grey canvas") == 0.0
    # 8 bigrams, 3 distinct: 5 repeat an earlier one.
    assert repetition_score("a red circle a red circle a red circle") == pytest.approx(5 / 8)
    assert repetition_score("Red, red. RED red") == pytest.approx(2 / 3)  # case, punctuation
    assert repetition_score("circle") == 0.0 and repetition_score("") == 0.0


def test_sentences_prefixes_and_style_leakage() -> None:
    assert sentence_count("two squares.") == 1 and sentence_count("one. two! three") == 3
    assert sentence_count("a 3.5 cm square") == 1  # not a boundary
    assert same_or_prefix("A red circle.", "a red circle at the top, left")
    assert same_or_prefix("a red circle at the top", "A red circle")
    assert not same_or_prefix("a red circle", "one red circle at the top")
    assert leaks_long_style("a square. a circle.", 5, 30)
    assert leaks_long_style("a square", 30, 30) and not leaks_long_style("a square", 29, 30)


def test_trimming_keeps_whole_sentences_within_77_clip_tokens(count) -> None:
    fits = f"{SENTENCE}."
    long = " ".join(f"{SENTENCE} number {i}." for i in range(12))
    assert count([long])[0] > 77
    [same, trimmed] = fit_captions([fits, long], count)
    assert (same.text, same.trim, same.tokens) == (fits, None, count([fits])[0])
    assert trimmed.trim == TRIM_SENTENCE and trimmed.tokens <= 77
    assert trimmed.tokens == count([trimmed.text])[0]
    assert trimmed.text.endswith(".") and long.startswith(trimmed.text)
    # The longest whole-sentence prefix: one more sentence would not fit.
    after = long[len(trimmed.text) :].split(".")[0]
    assert count([trimmed.text + after + "."])[0] > 77


def test_trimming_falls_back_to_clauses_then_words(count) -> None:
    one_sentence = ", ".join(SENTENCE for _ in range(10)) + "."
    [clause] = fit_captions([one_sentence], count)
    assert clause.trim == TRIM_CLAUSE and clause.tokens <= 77
    assert clause.text.endswith(SENTENCE) and one_sentence.startswith(clause.text)
    run_on = " ".join(SENTENCE for _ in range(10))
    [word] = fit_captions([run_on], count)
    assert word.trim == TRIM_WORD and 70 < word.tokens <= 77 and run_on.startswith(word.text)
    facts = caption_facts([run_on], [True], count)[0]
    assert facts["caption"] == word.text and facts["clip_tokens"] == word.tokens
    assert facts["hit_cap"] and facts["trim"] == TRIM_WORD and facts["repetition"] > 0.8


def test_cap_hits_are_told_from_captions_that_ended(finetuned_captioner, miniworld_paths) -> None:
    """The fine-tuned captioner ends its short captions on its own; held to 2 new tokens,
    every caption hits the cap."""
    captioner = Captioner.from_pretrained(finetuned_captioner)
    images = [r.image for r in iter_shard(miniworld_paths.corpus, SHARD)][:8]
    inputs = captioner.input_builder()(images, "short")
    with torch.inference_mode():
        texts, capped = captioner.generate_with_ends(inputs, max_new_tokens=40)
        cut, all_capped = captioner.generate_with_ends(inputs, max_new_tokens=2)
    assert capped == [False] * 8, texts
    assert all_capped == [True] * 8 and all(len(t.split()) <= 2 for t in cut)


def _recaption(captioner: Captioner, miniworld_paths, count) -> tuple[pa.Table, RecaptionStats]:
    settings = GenerationSettings(batch_size=8)  # the default lengths: 32 short, 77 long
    return recaption_shard(
        captioner,
        miniworld_paths.corpus,
        SHARD,
        captioner_version="test",
        count_tokens=count,
        settings=settings,
    )


def _checks(table: pa.Table, miniworld_paths, count) -> dict[str, tuple[bool, str]]:
    expected = count_rows(miniworld_paths.corpus, SHARD)
    return validate_recaptions(table, expected, count, 0.05, CaptionCheckThresholds())


def test_the_fine_tuned_captioners_shard_passes(finetuned_captioner, miniworld_paths, count):
    table, stats = _recaption(
        Captioner.from_pretrained(finetuned_captioner), miniworld_paths, count
    )
    assert table.schema == SCHEMA
    results = _checks(table, miniworld_paths, count)
    assert all(ok for ok, _ in results.values()), [r for r in results.items() if not r[1][0]]
    rows = [r for r in table.to_pylist() if r["status"] == "ok"]
    for row in rows:
        for style in ("short", "long"):
            assert row[f"{style}_clip_tokens"] == count([row[f"recap_{style}"]])[0] <= 77
    summary = stats.facts_summary()
    assert summary["long_clip_tokens_mean"] > summary["short_clip_tokens_mean"]
    assert summary["long_clip_tokens_max"] == max(r["long_clip_tokens"] for r in rows)
    print(  # the figures of the report (pytest -s)
        {
            **summary,
            **{
                f"{s}_degenerate_rate": statistics.fmean(r[f"{s}_repetition"] > 0.5 for r in rows)
                for s in ("short", "long")
            },
        }
    )


def test_a_captioner_that_loops_fails_the_degeneration_check(
    finetuned_captioner, miniworld_paths, count, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Generation replaced by a loop of one phrase to the cap, decoded and fitted as usual."""
    captioner = Captioner.from_pretrained(finetuned_captioner)
    phrase = captioner.processor.tokenizer("a red circle and", add_special_tokens=False)
    generate = captioner.model.generate

    def looping(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = generate(*args, **kwargs)
        width = kwargs["generation_config"].max_new_tokens
        loop = torch.tensor((phrase["input_ids"] * width)[:width]).expand(len(out), -1)
        return torch.cat([out[:, : captioner.adapter.prompt_length(kwargs)], loop], dim=1)

    monkeypatch.setattr(captioner.model, "generate", looping)
    table, _ = _recaption(captioner, miniworld_paths, count)
    results = _checks(table, miniworld_paths, count)
    ok, message = results["degeneration_rate"]
    first_key = min(r["key"] for r in table.to_pylist() if r["status"] == "ok")
    assert not ok and f"'{first_key}'" in message, message  # names the worst rows
    assert not results["cap_hit_rate"][0]
    assert not results["unique_captions"][0]
    rows = table.to_pylist()
    assert all(r["long_hit_cap"] and r["long_repetition"] > 0.5 for r in rows)


def test_a_captioner_with_one_style_fails_short_differs_from_long(
    finetuned_captioner, miniworld_paths, count
) -> None:
    """A captioner whose long prompt is its short one writes the same caption twice."""
    captioner = Captioner.from_pretrained(finetuned_captioner)
    captioner.prefixes["long"] = captioner.prefixes["short"]
    table, _ = _recaption(captioner, miniworld_paths, count)
    results = _checks(table, miniworld_paths, count)
    ok, message = results["short_differs_from_long"]
    rows = [r for r in table.to_pylist() if r["status"] == "ok"]
    assert all(r["recap_short"] == r["recap_long"] for r in rows)
    assert not ok and f"{len(rows)} of {len(rows)} short captions" in message
    assert not results["style_leakage"][0]  # as long as the (same) long captions
    assert set(FACT_CHECKS) <= set(results)
