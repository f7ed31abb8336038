"""Caption facts and the checks on them: what a recaption's quality looks like without
ground truth (plain Python, no Dagster).

Per caption (:func:`caption_facts`): its CLIP-token count, whether generation hit the
``max_new_tokens`` cap instead of ending on its own, a repetition score, and whether it was
trimmed to the text encoder's 77-token context (at a sentence, else a clause, else a word
boundary: the trainer's tokenizer then has nothing left to cut). Per shard
(:func:`caption_checks`): rates of those facts against thresholds, each failure naming its
worst rows.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: CLIP's text context, start and end tokens included (Stable Diffusion's text encoders).
CLIP_CONTEXT = 77
#: Word n-gram sizes of :func:`repetition_score`.
REPETITION_NGRAMS = (2, 3)

TokenCounter = Callable[[list[str]], list[int]]

TRIM_SENTENCE, TRIM_CLAUSE, TRIM_WORD = "sentence", "clause", "word"

_WORD = re.compile(r"[a-z0-9']+")
# A boundary is punctuation followed by a space or the end (not "3.5" or "e.g.x").
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_CLAUSE_END = re.compile(r"[,;:](?=\s|$)")


def words(text: str) -> list[str]:
    """Lower-case words, punctuation dropped: what repetition and prefixes compare."""
    return _WORD.findall(text.lower())


def repetition_score(text: str, sizes: Sequence[int] = REPETITION_NGRAMS) -> float:
    """The largest, over ``sizes``, fraction of a caption's word n-grams that repeat an
    earlier one: 0 for a caption without repeats, near 1 for a loop ("a hat on a hat on a
    hat ..."). A caption shorter than ``n + 1`` words has no n-gram to repeat."""
    tokens = words(text)
    score = 0.0
    for n in sizes:
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        if grams:
            score = max(score, 1 - len(set(grams)) / len(grams))
    return score


def sentence_count(text: str) -> int:
    """Sentences in ``text``: its sentence ends followed by more words, plus one."""
    return 1 + sum(bool(words(text[m.end() :])) for m in _SENTENCE_END.finditer(text))


@dataclass(frozen=True)
class Fitted:
    """A caption fitted to the token limit: the text kept, its token count, and how it was
    trimmed (None: untouched)."""

    text: str
    tokens: int
    trim: str | None


def _cuts(text: str) -> dict[str, list[str]]:
    """Every prefix of ``text`` that ends at a boundary, per kind, shortest first: after a
    sentence's end mark, before a clause's mark, at a word's end."""
    sentences = [text[: m.end()] for m in _SENTENCE_END.finditer(text)]
    clauses = [text[: m.start()].rstrip() for m in _CLAUSE_END.finditer(text)]
    spaces = [m.start() for m in re.finditer(r"\s+", text.strip())]
    word_cuts = [text.strip()[:i].rstrip(",;:") for i in spaces]
    return {
        kind: [c for c in cuts if words(c)]
        for kind, cuts in (
            (TRIM_SENTENCE, sentences),
            (TRIM_CLAUSE, clauses),
            (TRIM_WORD, word_cuts),
        )
    }


def fit_captions(
    texts: Sequence[str], count_tokens: TokenCounter, limit: int = CLIP_CONTEXT
) -> list[Fitted]:
    """Each caption within ``limit`` tokens of ``count_tokens``: unchanged when it fits,
    else its longest prefix that fits and ends a sentence, else a clause, else a word (the
    rare run-on of more than ``limit`` tokens without a comma). Counted in one tokenizer call
    for the batch and one per caption that is too long."""
    counts = count_tokens(list(texts)) if texts else []
    fitted = []
    for text, count in zip(texts, counts, strict=True):
        if count <= limit:
            fitted.append(Fitted(text, count, None))
            continue
        cuts = _cuts(text)
        candidates = [(kind, cut) for kind in cuts for cut in cuts[kind]]
        sizes = count_tokens([cut for _, cut in candidates]) if candidates else []
        best = Fitted("", count_tokens([""])[0], TRIM_WORD)  # nothing fits: an empty caption
        for kind in (TRIM_SENTENCE, TRIM_CLAUSE, TRIM_WORD):
            fits = [
                (len(cut), cut, n)
                for (k, cut), n in zip(candidates, sizes, strict=True)
                if k == kind and n <= limit
            ]
            if fits:
                _, cut, n = max(fits)
                best = Fitted(cut, n, kind)
                break
        fitted.append(best)
    return fitted


def caption_facts(
    texts: Sequence[str],
    hit_cap: Sequence[bool],
    count_tokens: TokenCounter,
    limit: int = CLIP_CONTEXT,
) -> list[dict[str, Any]]:
    """One style's captions fitted to ``limit`` tokens, with their facts: ``caption``,
    ``clip_tokens`` (after trimming), ``hit_cap``, ``repetition`` and ``trim``."""
    fitted = fit_captions(texts, count_tokens, limit)
    return [
        {
            "caption": f.text,
            "clip_tokens": f.tokens,
            "hit_cap": bool(hit),
            "repetition": round(repetition_score(text), 4),
            "trim": f.trim,
        }
        for text, f, hit in zip(texts, fitted, hit_cap, strict=True)
    ]


# -- a shard's checks ----------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionCheckThresholds:
    """The limits of :func:`caption_checks`; the Dagster check config documents each one."""

    max_cap_hit_rate: float = 0.05
    max_repetition: float = 0.5
    max_degenerate_rate: float = 0.01
    min_unique_ratio: float = 0.5
    max_same_short_long_rate: float = 0.05
    max_short_begins_long_rate: float = 0.25
    max_style_leakage_rate: float = 0.1


def same_or_prefix(short: str, long: str) -> bool:
    """The styles collapsed: the captions are equal, or the long one's words begin the
    short one's (case and punctuation aside): the long style adds nothing."""
    a, b = words(short), words(long)
    return a[: len(b)] == b


def short_begins_long(short: str, long: str) -> bool:
    """The long caption is the short one continued: the short one's words begin it. Alone
    that is a fine pair ("a red square." / "a red square at the top left on grey."); most
    of a shard written so is one style with a tail."""
    a, b = words(short), words(long)
    return len(a) < len(b) and b[: len(a)] == a


def leaks_long_style(short_text: str, short_tokens: int, median_long_tokens: float) -> bool:
    """A short caption written in the long style: more than one sentence, or at least as
    many CLIP tokens as the shard's median long caption."""
    return sentence_count(short_text) > 1 or short_tokens >= median_long_tokens


def _worst(rows: Iterable[tuple[float, str]], n: int = 5) -> list[str]:
    """The keys of the ``n`` highest-scored rows, worst first (ties in key order)."""
    return [key for _, key in sorted(rows, key=lambda r: (-r[0], r[1]))[:n]]


def _rate(hits: int, total: int) -> float:
    return hits / total if total else 0.0


def caption_checks(
    rows: Sequence[Mapping[str, Any]], thresholds: CaptionCheckThresholds
) -> dict[str, tuple[bool, str]]:
    """The caption-fact checks of one shard's captioned rows (each with ``key``, and per
    style ``recap_<style>``, ``<style>_clip_tokens``, ``<style>_hit_cap`` and
    ``<style>_repetition``): name -> (passed, description naming the worst rows)."""
    t = thresholds
    n = len(rows)
    results: dict[str, tuple[bool, str]] = {}

    capped = {s: [r["key"] for r in rows if r[f"{s}_hit_cap"]] for s in ("short", "long")}
    worst = max(_rate(len(keys), n) for keys in capped.values())
    results["cap_hit_rate"] = (
        worst <= t.max_cap_hit_rate,
        "; ".join(
            f"{s}: {len(keys)} of {n} hit max_new_tokens ({_rate(len(keys), n):.1%}) {keys[:5]}"
            for s, keys in capped.items()
        )
        + f" (limit {t.max_cap_hit_rate:.1%})",
    )

    parts, passed = [], True
    for s in ("short", "long"):
        scored = [(r[f"{s}_repetition"] or 0.0, r["key"]) for r in rows]
        bad = [(score, key) for score, key in scored if score > t.max_repetition]
        rate = _rate(len(bad), n)
        passed &= rate <= t.max_degenerate_rate
        parts.append(
            f"{s}: {len(bad)} of {n} repeat over {t.max_repetition:.0%} of their word n-grams "
            f"({rate:.1%}) {_worst(bad)}"
        )
    results["degeneration_rate"] = (
        passed,
        "; ".join(parts) + f" (limit {t.max_degenerate_rate:.1%})",
    )

    parts, passed = [], True
    for s in ("short", "long"):
        counts = Counter(" ".join(words(r[f"recap_{s}"])) for r in rows)
        ratio = len(counts) / n if n else 1.0
        passed &= ratio >= t.min_unique_ratio
        common = [
            key
            for _, key in sorted(
                (-counts[" ".join(words(r[f"recap_{s}"]))], r["key"]) for r in rows
            )[:5]
        ]
        parts.append(f"{s}: {len(counts)} distinct of {n} ({ratio:.1%}), most repeated {common}")
    results["unique_captions"] = (
        passed,
        "; ".join(parts) + f" (at least {t.min_unique_ratio:.1%})",
    )

    same = [r["key"] for r in rows if same_or_prefix(r["recap_short"], r["recap_long"])]
    begins = [r["key"] for r in rows if short_begins_long(r["recap_short"], r["recap_long"])]
    rate, begins_rate = _rate(len(same), n), _rate(len(begins), n)
    results["short_differs_from_long"] = (
        rate <= t.max_same_short_long_rate and begins_rate <= t.max_short_begins_long_rate,
        f"{len(same)} of {n} long captions equal their short one or begin it ({rate:.1%}, "
        f"limit {t.max_same_short_long_rate:.1%}) {same[:5]}; {len(begins)} of {n} long "
        f"captions continue their short one ({begins_rate:.1%}, limit "
        f"{t.max_short_begins_long_rate:.1%}) {begins[:5]}",
    )

    median_long = statistics.median(r["long_clip_tokens"] or 0 for r in rows) if rows else 0.0
    leaks = [
        (r["short_clip_tokens"] or 0, r["key"])
        for r in rows
        if leaks_long_style(r["recap_short"], r["short_clip_tokens"] or 0, median_long)
    ]
    rate = _rate(len(leaks), n)
    results["style_leakage"] = (
        rate <= t.max_style_leakage_rate,
        f"{len(leaks)} of {n} short captions read as long ones: several sentences, or at "
        f"least the median long caption's {median_long:g} CLIP tokens ({rate:.1%}, limit "
        f"{t.max_style_leakage_rate:.1%}) {_worst(leaks)}",
    )
    return results
