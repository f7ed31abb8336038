"""Comparing variants as distributions: intervals over training seeds, paired differences
against alttext and a verdict per metric (plain Python, no Dagster).

Input: every graded image row of every evaluated checkpoint, each with its variant's
training ``seed``, its ``prompt_index`` and ``image`` (the k-th image of the prompt, whose
noise seed every variant shares). One training run is one draw of the training noise, which
more prompts cannot average away; so a variant's value is its mean over seeds with a
t interval, and a difference against alttext is paired on (seed, prompt, image) and judged
twice: a t interval over the seeds' mean differences and a bootstrap that resamples seeds,
then prompts within each seed. A verdict needs both intervals on the same side of zero; the
three metrics share the 5% error rate (Bonferroni), and with a single seed nothing is
distinguishable: the seed-to-seed spread is unknown.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

BASELINE = "alttext"
#: The floor's row: the base model before any fine-tuning, evaluated like the variants.
FLOOR = "base"
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000


@dataclass(frozen=True)
class Judged:
    """A metric a verdict is given on: whether higher is better and the paper's relative
    change of RECAP over alt text (Table 1)."""

    name: str
    higher_is_better: bool
    paper_change: float


JUDGED = (
    Judged("object_accuracy", True, 0.07),
    Judged("count_error", False, -0.08),
    Judged("position_accuracy", True, 0.08),
)
BETTER, WORSE, NOT_DISTINGUISHABLE = "better", "worse", "not distinguishable"


@dataclass(frozen=True)
class Interval:
    """A mean with its two-sided interval (None where it cannot be computed: one value)."""

    mean: float
    low: float | None
    high: float | None
    n: int

    def excludes_zero(self) -> int:
        """+1 when the interval lies above zero, -1 below, 0 when it holds zero or is None."""
        if self.low is None or self.high is None:
            return 0
        return 1 if self.low > 0 else -1 if self.high < 0 else 0

    def holds(self, value: float) -> bool:
        return self.low is not None and self.high is not None and self.low <= value <= self.high

    def text(self, digits: int = 3) -> str:
        if self.low is None or self.high is None:
            return f"{self.mean:.{digits}f} (n={self.n})"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean of ``values`` with Student's t interval (no interval from a single value)."""
    if not values:
        raise ValueError("no values")
    array = np.asarray(values, dtype=np.float64)
    mean = float(array.mean())
    if len(array) < 2:
        return Interval(mean, None, None, len(array))
    half = float(stats.t.ppf(0.5 + confidence / 2, len(array) - 1) * stats.sem(array))
    return Interval(mean, mean - half, mean + half, len(array))


Key = tuple[int, int]  # (prompt_index, image)


def by_seed(rows: Iterable[Mapping], metric: str) -> dict[int, dict[Key, float]]:
    """Each training seed's graded values of ``metric`` by (prompt, image); missing and NaN
    values (a metric a prompt has none of) left out."""
    out: dict[int, dict[Key, float]] = defaultdict(dict)
    for row in rows:
        value = row.get(metric)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            out[int(row["seed"])][(int(row["prompt_index"]), int(row["image"]))] = float(value)
    return out


def seed_means(rows: Iterable[Mapping], metric: str) -> dict[int, float]:
    """Each training seed's mean of ``metric`` over its graded images."""
    return {s: float(np.mean(list(v.values()))) for s, v in sorted(by_seed(rows, metric).items())}


def paired_differences(
    rows: Iterable[Mapping], baseline_rows: Iterable[Mapping], metric: str
) -> dict[int, dict[int, list[float]]]:
    """``{seed: {prompt_index: [variant - baseline per image]}}`` over the (seed, prompt,
    image) both graded."""
    ours, theirs = by_seed(rows, metric), by_seed(baseline_rows, metric)
    out: dict[int, dict[int, list[float]]] = {}
    for seed in sorted(set(ours) & set(theirs)):
        per_prompt: dict[int, list[float]] = defaultdict(list)
        for key in sorted(set(ours[seed]) & set(theirs[seed])):
            per_prompt[key[0]].append(ours[seed][key] - theirs[seed][key])
        if per_prompt:
            out[seed] = dict(per_prompt)
    return out


def _seed_mean(per_prompt: Mapping[int, list[float]]) -> float:
    return float(np.mean([d for diffs in per_prompt.values() for d in diffs]))


def bootstrap_interval(
    differences: Mapping[int, Mapping[int, list[float]]],
    confidence: float = CONFIDENCE,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """Percentile interval of the mean difference, resampling seeds, then prompts within
    each drawn seed (a prompt keeps its images together: they share the prompt's error)."""
    seeds = sorted(differences)
    if not seeds:
        raise ValueError("no paired rows")
    point = float(np.mean([_seed_mean(differences[s]) for s in seeds]))
    # Per seed: each prompt's summed difference and image count, for fast resampled means.
    sums = [np.array([sum(d) for d in differences[s].values()]) for s in seeds]
    counts = [np.array([len(d) for d in differences[s].values()]) for s in seeds]
    rng = np.random.default_rng(seed)
    draws = np.empty(resamples)
    for b in range(resamples):
        means = []
        for s in rng.integers(0, len(seeds), len(seeds)):
            picked = rng.integers(0, len(sums[s]), len(sums[s]))
            means.append(sums[s][picked].sum() / counts[s][picked].sum())
        draws[b] = np.mean(means)
    alpha = 1 - confidence
    low, high = np.quantile(draws, [alpha / 2, 1 - alpha / 2])
    return Interval(point, float(low), float(high), len(seeds))


@dataclass(frozen=True)
class MetricComparison:
    """One variant against the baseline on one judged metric."""

    variant: str
    metric: str
    seeds: int
    value: Interval  # the variant's mean over seeds (95%)
    baseline: Interval
    difference_t: Interval  # paired, t over the seeds' mean differences (corrected)
    difference_bootstrap: Interval  # paired, seeds then prompts (corrected)
    verdict: str
    paper_difference: float  # the paper's relative change at this baseline, in metric units
    consistent_with_paper: bool  # both corrected intervals hold the paper's difference

    def row(self) -> dict[str, object]:
        """A flat table row (typed-table and JSON friendly)."""
        out: dict[str, object] = {"variant": self.variant, "metric": self.metric,
                                  "seeds": self.seeds}  # fmt: skip
        for name in ("value", "baseline", "difference_t", "difference_bootstrap"):
            interval = asdict(getattr(self, name))
            out |= {f"{name}": interval["mean"], f"{name}_low": interval["low"],
                    f"{name}_high": interval["high"]}  # fmt: skip
        return out | {"verdict": self.verdict, "paper_difference": self.paper_difference,
                      "consistent_with_paper": self.consistent_with_paper}  # fmt: skip


def judge(difference_t: Interval, difference_bootstrap: Interval, higher: bool) -> str:
    """Better or worse only when both intervals exclude zero on the same side."""
    sides = {difference_t.excludes_zero(), difference_bootstrap.excludes_zero()}
    if len(sides) != 1 or 0 in sides:
        return NOT_DISTINGUISHABLE
    improves = (sides.pop() > 0) == higher
    return BETTER if improves else WORSE


def compare_variants(
    rows_by_variant: Mapping[str, Sequence[Mapping]],
    *,
    baseline: str = BASELINE,
    judged: Sequence[Judged] = JUDGED,
    confidence: float = CONFIDENCE,
) -> list[MetricComparison]:
    """Every other variant against ``baseline`` on each judged metric the rows grade.
    Intervals on differences are Bonferroni-corrected over ``judged``."""
    if baseline not in rows_by_variant:
        raise ValueError(f"no rows of the baseline {baseline!r}")
    corrected = 1 - (1 - confidence) / len(judged)
    base_rows = rows_by_variant[baseline]
    out = []
    for variant, rows in rows_by_variant.items():
        if variant == baseline:
            continue
        for metric in judged:
            differences = paired_differences(rows, base_rows, metric.name)
            if not differences:
                continue  # not graded (no detector) or no seed in common
            seed_diffs = [_seed_mean(differences[s]) for s in sorted(differences)]
            value = t_interval(list(seed_means(rows, metric.name).values()), confidence)
            base = t_interval(list(seed_means(base_rows, metric.name).values()), confidence)
            by_t = t_interval(seed_diffs, corrected)
            by_bootstrap = bootstrap_interval(differences, corrected)
            paper = metric.paper_change * abs(base.mean)
            out.append(
                MetricComparison(
                    variant=variant,
                    metric=metric.name,
                    seeds=len(differences),
                    value=value,
                    baseline=base,
                    difference_t=by_t,
                    difference_bootstrap=by_bootstrap,
                    verdict=judge(by_t, by_bootstrap, metric.higher_is_better),
                    paper_difference=paper,
                    consistent_with_paper=by_t.holds(paper) and by_bootstrap.holds(paper),
                )
            )
    return out
