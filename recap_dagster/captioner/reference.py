"""RECAP step 1 judged on real data: held-out human captions as references (no Dagster).

No world grades real captions, but a held-out human-captioned set is there in production
too. The base and the fine-tuned captioner caption its images in each style; their captions
are scored against the human caption of that style with reference metrics from
``torchmetrics.text``, all of which run offline (no download, no nltk):

- ``bleu``: corpus BLEU-4 with add-one smoothing (Lin & Och, 2004): short captions often
  share no 4-gram with their reference, and unsmoothed BLEU would then be 0;
- ``rouge_l``: ROUGE-L F-measure (longest common subsequence), averaged over captions;
- ``chrf``: corpus chrF (character n-gram F-score; robust to inflections and word order).

With a CLIP model configured, each caption is also scored against its image
(:mod:`recap_dagster.evaluation.agreement`; long captions per sentence), and so are the
human captions themselves, as the ceiling to read the captioners' scores against.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recap_dagster.captioner.finetune import CaptionExample
from recap_dagster.corpus.decoding import decode_image
from recap_dagster.corpus.human_captions import load_human_captions

STYLES = ("short", "long")
REFERENCE_METRICS = ("bleu", "rouge_l", "chrf")
#: Column descriptions of :func:`reference_rows`' table.
COLUMN_NOTES = {
    "style": "caption style",
    "captioner": "base, fine-tuned, or human (the held-out references themselves)",
    "bleu": "corpus BLEU-4 against the human caption (smoothed), 0-1",
    "rouge_l": "ROUGE-L F-measure against the human caption, mean, 0-1",
    "chrf": "corpus chrF against the human caption, 0-1",
    "clip_score": "CLIP score against the image (long: mean over sentences); empty: no CLIP "
    "model configured",
    "words": "mean caption length in words",
}


def load_heldout(path: str | Path) -> list[CaptionExample]:
    """The rows of a held-out human-caption JSONL file with a decodable image (ground truth
    not needed); broken rows are left out, the file's own problems raise."""
    examples = []
    for row in load_human_captions(path).to_pylist():
        decoded = decode_image(row["image"])
        if decoded.image is not None and row["short"] and row["long"]:
            examples.append(CaptionExample(row["key"], decoded.image, row["short"], row["long"]))
    return examples


def reference_scores(candidates: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """BLEU, ROUGE-L and chrF of ``candidates`` against one reference each (0-1)."""
    from torchmetrics.functional.text import bleu_score, chrf_score, rouge_score

    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} references")
    if not candidates:
        raise ValueError("no captions to score")
    preds = [c or "" for c in candidates]
    targets = [[r] for r in references]
    rouge = rouge_score(preds, list(references), rouge_keys="rougeL")
    return {
        "bleu": float(bleu_score(preds, targets, n_gram=4, smooth=True)),
        "rouge_l": float(rouge["rougeL_fmeasure"]),
        "chrf": float(chrf_score(preds, targets)),
    }


def clip_scores(scorer: Any, images: Sequence[Any], texts: Sequence[str], style: str) -> float:
    """Mean CLIP score of ``texts`` against ``images`` (long captions per sentence)."""
    score = scorer.score_long if style == "long" else scorer.score_pairs
    values = score(list(images), list(texts))
    return sum(values) / len(values) if values else float("nan")


def judge_captioner(
    captioner: Any,
    examples: Sequence[CaptionExample],
    *,
    scorer: Any | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 77,
) -> dict[str, dict[str, Any]]:
    """Caption ``examples`` in each style; per style the reference metrics against the
    human caption, ``clip_score`` (None without ``scorer``, a
    :class:`~recap_dagster.evaluation.agreement.ClipScorer`), ``words`` and ``n``."""
    images = [e.image for e in examples]
    results: dict[str, dict[str, Any]] = {}
    for style in STYLES:
        captions = captioner.caption(
            images, style, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
        results[style] = {
            **reference_scores(captions, [e.caption(style) for e in examples]),
            "clip_score": None if scorer is None else clip_scores(scorer, images, captions, style),
            "words": sum(len(c.split()) for c in captions) / max(1, len(captions)),
            "n": len(captions),
        }
    return results


def judge_references(examples: Sequence[CaptionExample], scorer: Any) -> dict[str, float]:
    """Per style, the mean CLIP score of the human captions against their images."""
    images = [e.image for e in examples]
    return {s: clip_scores(scorer, images, [e.caption(s) for e in examples], s) for s in STYLES}


def reference_rows(
    base: dict[str, dict[str, Any]],
    fine_tuned: dict[str, dict[str, Any]],
    human_clip: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """A table: style x {base, fine-tuned} (x human with ``human_clip``) x metric."""
    rows: list[dict[str, Any]] = []
    for style in STYLES:
        for label, results in (("base", base), ("fine-tuned", fine_tuned)):
            metrics = results[style]
            rows.append(
                {
                    "style": style,
                    "captioner": label,
                    **{m: metrics[m] for m in REFERENCE_METRICS},
                    "clip_score": metrics["clip_score"],
                    "words": metrics["words"],
                }
            )
        if human_clip is not None:
            rows.append(
                {
                    "style": style,
                    "captioner": "human",
                    **dict.fromkeys(REFERENCE_METRICS),
                    "clip_score": human_clip[style],
                    "words": None,
                }
            )
    return rows
