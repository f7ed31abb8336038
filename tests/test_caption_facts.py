"""Caption facts without ground truth: trimming to CLIP's 77 tokens, cap hits, repetition,
and the shard checks on them, through the real recaption path (the miniworld's fine-tuned
captioner passes; captioners that loop or write one caption for both styles fail)."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import pyarrow as pa
import pytest
import torch
from PIL import Image

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
    short_begins_long,
)
from recap_dagster.captioner.recaption import (
    SCHEMA,
    STYLES,
    GenerationSettings,
    RecaptionStats,
    recaption_shard,
    validate_recaptions,
)
from recap_dagster.corpus.human_captions import clip_token_counter, load_human_captions
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
    assert same_or_prefix("A red circle.", "a red circle")
    assert same_or_prefix("a red circle at the top", "A red circle")
    assert not same_or_prefix("A red circle.", "a red circle at the top, left")
    assert short_begins_long("A red circle.", "a red circle at the top, left")
    assert not short_begins_long("a red circle", "a red circle.")
    assert not same_or_prefix("a red circle", "one red circle at the top")
    assert not short_begins_long("a red circle", "one red circle at the top")
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


def _failed(results: dict[str, tuple[bool, str]]) -> set[str]:
    return {name for name, (ok, _) in results.items() if not ok}


def _scripted(
    captioner: Captioner, monkeypatch: pytest.MonkeyPatch, write: Callable[[str, int], str]
) -> None:
    """Make the model's ``generate`` write ``write(style, row)`` for each row (the style
    told by the prompt), then its end token unless the text fills ``max_new_tokens``;
    decoding, cap detection, trimming, facts and checks run as they do for any captioner."""
    tokenizer = captioner.processor.tokenizer
    build = captioner.input_builder()
    prompts = {s: build([Image.new("RGB", (8, 8))], s)["input_ids"][0].tolist() for s in STYLES}
    rows_seen = dict.fromkeys(STYLES, 0)

    def generate(**kwargs):  # type: ignore[no-untyped-def]
        config, ids = kwargs["generation_config"], kwargs["input_ids"]
        style = next(s for s, prompt in prompts.items() if ids[0].tolist() == prompt)
        end = (
            config.eos_token_id if isinstance(config.eos_token_id, int) else config.eos_token_id[0]
        )
        rows = []
        for _ in range(len(ids)):
            text = write(style, rows_seen[style])
            rows_seen[style] += 1
            new = tokenizer(text, add_special_tokens=False)["input_ids"][: config.max_new_tokens]
            rows.append(new + [end] if len(new) < config.max_new_tokens else new)
        width = max(map(len, rows))
        body = [row + [config.pad_token_id] * (width - len(row)) for row in rows]
        prompt = ids[:, : captioner.adapter.prompt_length(kwargs)]
        return torch.cat([prompt, torch.tensor(body, dtype=ids.dtype)], dim=1)

    monkeypatch.setattr(captioner.model, "generate", generate)


@pytest.fixture(scope="module")
def human(miniworld_paths) -> list[dict[str, str]]:
    """The miniworld's human captions: what a good fine-tuned captioner writes like."""
    return load_human_captions(miniworld_paths.human_captions).select(["short", "long"]).to_pylist()


def test_captions_written_like_the_human_ones_pass(
    finetuned_captioner, miniworld_paths, count, human, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A captioner writing each image a human-like short and long caption of its own passes
    every check: no false alarms on the captions RECAP fine-tunes towards."""
    captioner = Captioner.from_pretrained(finetuned_captioner)
    _scripted(captioner, monkeypatch, lambda style, row: human[row][style])
    table, _ = _recaption(captioner, miniworld_paths, count)
    results = _checks(table, miniworld_paths, count)
    assert set(FACT_CHECKS) <= set(results) and not _failed(results), results
    rows = table.to_pylist()
    assert not any(r["short_hit_cap"] or r["long_hit_cap"] for r in rows)  # each one ended


def test_a_captioner_that_loops_fails_the_degeneration_check(
    finetuned_captioner, miniworld_paths, count, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every caption a loop of one phrase up to the cap."""
    captioner = Captioner.from_pretrained(finetuned_captioner)
    phrase = {"short": "red circles and", "long": "blue squares beside"}
    _scripted(captioner, monkeypatch, lambda style, row: f"{row} {phrase[style]} " * 40)
    table, _ = _recaption(captioner, miniworld_paths, count)
    results = _checks(table, miniworld_paths, count)
    ok, message = results["degeneration_rate"]
    rows = table.to_pylist()
    assert not ok and f"'{rows[0]['key']}'" in message, message  # names the worst rows
    assert _failed(results) == {"degeneration_rate", "cap_hit_rate"}, results
    assert all(r["long_hit_cap"] and r["long_repetition"] > 0.5 for r in rows)


def test_a_captioner_with_one_style_fails_short_differs_from_long(
    finetuned_captioner, miniworld_paths, count, human, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Human-like short captions, and the same caption again for the long style."""
    captioner = Captioner.from_pretrained(finetuned_captioner)
    _scripted(captioner, monkeypatch, lambda style, row: human[row]["short"])
    table, _ = _recaption(captioner, miniworld_paths, count)
    results = _checks(table, miniworld_paths, count)
    ok, message = results["short_differs_from_long"]
    rows = table.to_pylist()
    assert all(r["recap_short"] == r["recap_long"] for r in rows)
    assert not ok and f"{len(rows)} of {len(rows)} long captions equal" in message
    assert rows[0]["key"] in message
    # As long as the (same) long captions, so the short style also reads as the long one.
    assert _failed(results) == {"short_differs_from_long", "style_leakage"}, results


def test_the_quick_fine_tuned_captioner_is_caught_collapsing(
    finetuned_captioner, miniworld_paths, count
) -> None:
    """The miniworld's quick fine-tune (40 steps on the toy base) writes one caption for
    every image, the same in both styles: it ends its captions and does not loop, but the
    distinctness and style checks see the collapse (the quick profile therefore lets
    short_differs_from_long only report)."""
    table, stats = _recaption(
        Captioner.from_pretrained(finetuned_captioner), miniworld_paths, count
    )
    assert table.schema == SCHEMA
    results = _checks(table, miniworld_paths, count)
    assert _failed(results) == {"unique_captions", "short_differs_from_long", "style_leakage"}
    rows = [r for r in table.to_pylist() if r["status"] == "ok"]
    for row in rows:
        for style in STYLES:
            assert row[f"{style}_clip_tokens"] == count([row[f"recap_{style}"]])[0] <= 77
    summary = stats.facts_summary()
    assert summary["long_clip_tokens_max"] == max(r["long_clip_tokens"] for r in rows)
    assert summary["short_cap_hit_rate"] == summary["long_cap_hit_rate"] == 0.0
    degenerate = {
        f"{s}_degenerate_rate": statistics.fmean(r[f"{s}_repetition"] > 0.5 for r in rows)
        for s in STYLES
    }
    print({**summary, **degenerate})  # the figures of the report (pytest -s)
