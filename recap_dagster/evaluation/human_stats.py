"""The human evaluation's figures from the raters' answers (plain Python, no Dagster).

- Success rate per variant: the share of "yes" to "does this image show the prompt?",
  with a Wilson 95% interval. Wilson treats every rating as independent; ratings of one
  prompt or one rater correlate, so read it as a lower bound on the spread.
- Win rate against alttext per variant: a win counts 1, a tie 1/2, a loss 0 (so 0.5 is
  "as good as alttext"), averaged over the pair answers; its 95% interval is a
  percentile bootstrap that resamples prompts and raters (both with replacement, 2,000
  resamples, seeded), so it carries the correlation Wilson ignores.
- Agreement: Fleiss' kappa (the variable-raters form) on the success question over the
  questions two or more raters answered, and on the preference; Cohen's kappa too when
  there are exactly two raters.
- Unrated: the task's questions no rater has answered yet.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from recap_dagster.evaluation.human import BASELINE, CHOICES, PAIR, SUCCESS
from recap_dagster.evaluation.plots import markdown_table

#: Where the ``human_eval_report`` asset writes its figures (JSON) and table (markdown).
REPORT_PARTS = ("reports", "human_eval.json")
MARKDOWN_PARTS = ("reports", "human_eval.md")
Z95 = 1.959963984540054
RESAMPLES = 2000
#: What the paper measured (human study, successful generations) for the report's note.
PAPER_SUCCESS = {"alttext": 0.2925, "recap_mix": 0.4806}
NO_RATINGS = (
    "No human ratings yet: serve the rating page (`recap-dagster rate`), let raters answer, "
    "then observe `human_ratings` and materialize `human_eval_report` and `recap_report`."
)


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float | None, float | None]:
    """The Wilson score interval of ``successes`` out of ``n`` (None, None when n is 0)."""
    if n == 0:
        return None, None
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_mean(
    scores: Sequence[float],
    prompts: Sequence[object],
    raters: Sequence[object],
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float | None, float | None]:
    """95% percentile interval of the mean of ``scores`` when prompts and raters are
    resampled with replacement (each score weighted by how often its prompt and its rater
    were drawn)."""
    if not scores:
        return None, None
    prompt_ids = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
    rater_ids = {r: i for i, r in enumerate(dict.fromkeys(raters))}
    pi = np.array([prompt_ids[p] for p in prompts])
    ri = np.array([rater_ids[r] for r in raters])
    values = np.asarray(scores, dtype=float)
    rng = np.random.default_rng(seed)
    n_p, n_r = len(prompt_ids), len(rater_ids)
    prompt_draws = rng.multinomial(n_p, np.full(n_p, 1 / n_p), size=resamples)
    rater_draws = rng.multinomial(n_r, np.full(n_r, 1 / n_r), size=resamples)
    weights = prompt_draws[:, pi] * rater_draws[:, ri]
    totals = weights.sum(axis=1)
    means = (weights @ values)[totals > 0] / totals[totals > 0]
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def fleiss_kappa(counts: Sequence[Sequence[int]]) -> float | None:
    """Fleiss' kappa of per-item category counts (items may have different numbers of
    raters, each at least 2); None when undefined (no items, or one category only)."""
    table = np.asarray([row for row in counts if sum(row) >= 2], dtype=float)
    if table.size == 0:
        return None
    per_item = table.sum(axis=1)
    agreement = ((table * table).sum(axis=1) - per_item) / (per_item * (per_item - 1))
    shares = table.sum(axis=0) / per_item.sum()
    chance = float((shares * shares).sum())
    if chance >= 1.0:
        return None
    return float((agreement.mean() - chance) / (1 - chance))


def cohen_kappa(first: Sequence[str], second: Sequence[str]) -> float | None:
    """Cohen's kappa of two raters' labels of the same items (None when undefined)."""
    if not first:
        return None
    n = len(first)
    observed = sum(a == b for a, b in zip(first, second, strict=True)) / n
    ca, cb = Counter(first), Counter(second)
    chance = sum(ca[c] * cb[c] for c in set(ca) | set(cb)) / (n * n)
    if chance >= 1.0:
        return None
    return (observed - chance) / (1 - chance)


@dataclass
class Rating:
    """One answer resolved against the task: which variant it is about, and its score."""

    rater: str
    question: str
    kind: str
    variant: str  # success: the image's variant; pair: the variant against alttext
    category: str
    prompt_index: int
    answer: str
    score: float  # success: 1 yes / 0 no; pair: 1 win / 0.5 tie / 0 loss for ``variant``


def resolve(task: dict, answers: dict[str, list[dict]]) -> list[Rating]:
    """Every answer to a question of ``task`` as a ``Rating`` (answers to unknown questions
    are ignored: they belong to no image of this task)."""
    questions = {q["id"]: q for q in task["questions"]}
    ratings = []
    for rater, records in sorted(answers.items()):
        for record in records:
            question = questions.get(record["question"])
            if question is None or record["answer"] not in CHOICES[question["kind"]]:
                continue
            item = task["items"][question["item"]]
            if question["kind"] == SUCCESS:
                variant, score = question["variant"], float(record["answer"] == "yes")
            else:
                variant = question["left"] if question["right"] == BASELINE else question["right"]
                if record["answer"] == "tie":
                    score = 0.5
                else:
                    score = float(question[record["answer"]] == variant)
            ratings.append(
                Rating(rater, question["id"], question["kind"], variant, item["category"],
                       item["prompt_index"], record["answer"], score)
            )  # fmt: skip
    return ratings


def variant_rows(
    variants: Sequence[str], ratings: Sequence[Rating], *, seed: int = 0
) -> list[dict[str, object]]:
    """Success rate and win rate against alttext (with 95% intervals) per variant."""
    rows = []
    base_success = None
    for variant in variants:
        success = [r for r in ratings if r.kind == SUCCESS and r.variant == variant]
        pairs = [r for r in ratings if r.kind == PAIR and r.variant == variant]
        yes = sum(int(r.score) for r in success)
        rate = yes / len(success) if success else None
        low, high = wilson(yes, len(success))
        if variant == BASELINE:
            base_success = rate
        win = sum(r.score for r in pairs) / len(pairs) if pairs else None
        win_low, win_high = bootstrap_mean(
            [r.score for r in pairs],
            [r.prompt_index for r in pairs],
            [r.rater for r in pairs],
            seed=seed,
        )
        relative = (
            (rate - base_success) / base_success
            if rate is not None and base_success and variant != BASELINE
            else None
        )
        rows.append(
            {"variant": variant, "success_rate": rate, "success_low": low,
             "success_high": high, "success_ratings": len(success),
             "success_vs_alttext": relative, "win_rate": win, "win_low": win_low,
             "win_high": win_high, "pair_ratings": len(pairs)}
        )  # fmt: skip
    return rows


def agreement(task: dict, ratings: Sequence[Rating]) -> dict[str, object]:
    """Inter-rater agreement on the questions answered by two raters or more."""
    result: dict[str, object] = {}
    raters = sorted({r.rater for r in ratings})
    for kind, name in ((SUCCESS, "success"), (PAIR, "preference")):
        by_question: dict[str, dict[str, str]] = defaultdict(dict)
        for r in ratings:
            if r.kind == kind:
                by_question[r.question][r.rater] = r.answer
        shared = {q: a for q, a in by_question.items() if len(a) >= 2}
        counts = [[Counter(a.values())[c] for c in CHOICES[kind]] for a in shared.values()]
        result[f"{name}_items"] = len(shared)
        result[f"{name}_fleiss_kappa"] = fleiss_kappa(counts)
        if len(raters) == 2:
            both = [a for a in shared.values()]
            result[f"{name}_cohen_kappa"] = cohen_kappa(
                [a[raters[0]] for a in both], [a[raters[1]] for a in both]
            )
    return result


def human_report(task: dict, answers: dict[str, list[dict]], *, seed: int = 0) -> dict[str, object]:
    """The human evaluation's figures (JSON-able): per variant, per category and variant,
    agreement, counts and what is still unrated."""
    ratings = resolve(task, answers)
    variants = task["variants"]
    categories = sorted({item["category"] for item in task["items"].values()})
    per_category = []
    for category in categories:
        subset = [r for r in ratings if r.category == category]
        for row in variant_rows(variants, subset, seed=seed):
            per_category.append({"category": category, **row})
    answered = {r.question for r in ratings}
    return {
        "task_version": task["version"],
        "baseline": BASELINE,
        "raters": sorted({r.rater for r in ratings}),
        "ratings": len(ratings),
        "questions": len(task["questions"]),
        "unrated": sum(q["id"] not in answered for q in task["questions"]),
        "rows": variant_rows(variants, ratings, seed=seed),
        "per_category": per_category,
        "agreement": agreement(task, ratings),
    }


def _interval(value: object, low: object, high: object) -> str:
    if value is None:
        return "-"
    return f"{value:.1%} [{low:.1%}, {high:.1%}]"


def category_markdown(report: dict) -> str:
    """Success and win rates per category and variant (empty when nothing is rated)."""
    rows = [
        [row["category"], row["variant"],
         _interval(row["success_rate"], row["success_low"], row["success_high"]),
         "-" if row["variant"] == BASELINE
         else _interval(row["win_rate"], row["win_low"], row["win_high"])]
        for row in report.get("per_category", [])
        if row["success_ratings"] or row["pair_ratings"]
    ]  # fmt: skip
    if not rows:
        return ""
    header = ["category", "variant", "success rate (95% CI)", f"win rate vs {BASELINE}"]
    return "### Per category\n\n" + markdown_table(header, rows)


def human_markdown(report: dict | None) -> str:
    """The human study as the paper shows it: a row per variant, success rate and win rate
    against alttext with 95% intervals; says so when nothing was rated yet."""
    lines = ["## Human evaluation (paper: successful generations 29.25% alttext, 48.06% "
             "RECAP Mix)"]  # fmt: skip
    if not report or not report.get("ratings"):
        unrated = f" ({report['questions']} questions to rate)" if report else ""
        return "\n\n".join([*lines, NO_RATINGS + unrated])
    rows = []
    for row in report["rows"]:
        change = row["success_vs_alttext"]
        success = _interval(row["success_rate"], row["success_low"], row["success_high"])
        rows.append(
            [row["variant"], success + (f" ({change:+.1%})" if change is not None else ""),
             "-" if row["variant"] == BASELINE
             else _interval(row["win_rate"], row["win_low"], row["win_high"]),
             f"{row['success_ratings']} / {row['pair_ratings']}"]
        )  # fmt: skip
    table = markdown_table(
        ["variant", "success rate (95% CI)", f"win rate vs {BASELINE} (95% CI)",
         "ratings (success / pairs)"], rows
    )  # fmt: skip
    agree = report["agreement"]
    kappa = agree.get("success_fleiss_kappa")
    notes = [
        f"{report['ratings']} answers from {len(report['raters'])} rater(s); "
        f"{report['unrated']} of {report['questions']} questions still unrated.",
        "Success: share of images rated as showing the prompt (Wilson 95% interval). Win "
        f"rate: against {BASELINE}'s image for the same prompt and seed, a tie counting "
        "half (0.5 = on par); 95% bootstrap interval over prompts and raters.",
        "Agreement on the success question (Fleiss' kappa over the "
        f"{agree.get('success_items', 0)} question(s) two or more raters answered): "
        + ("n/a" if kappa is None else f"{kappa:.2f}")
        + ".",
    ]
    return "\n\n".join([*lines, table, *notes])
