"""The RECAP report: variants side by side (paper Table 1) as means over training seeds
with intervals, each against alttext with a verdict, position against its chance level,
and metric-vs-steps (Figure 5).

Plain Python: takes the metric reports (JSON dicts) and graded rows of every variant and
seed, and returns markdown, tables and PNG figures.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image

from recap_dagster.evaluation import comparison
from recap_dagster.evaluation.comparison import Interval, MetricComparison, t_interval
from recap_dagster.evaluation.human_stats import human_markdown
from recap_dagster.evaluation.metrics import MetricReport, all_placed_found
from recap_dagster.evaluation.plots import image_grid, line_plot, markdown_image, markdown_table
from recap_dagster.evaluation.world import EvalPrompt
from recap_dagster.t2i.training_data import ORACLE

# (metric, label, higher is better)
COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("fid", "FID", False),
    ("clip_score", "CLIP score", True),
    ("object_accuracy", "object acc.", True),
    ("count_error", "counting err.", False),
    ("count_accuracy", "counting acc.", True),
    ("position_accuracy", "position acc.", True),
    ("all_correct", "all correct", True),
    ("kid", "KID", False),
)
BASELINE = comparison.BASELINE
MIX = "recap_mix"
FLOOR = comparison.FLOOR
IMAGE_COLUMNS = ("object_accuracy", "count_error", "count_accuracy", "position_accuracy",
                 "all_correct")  # fmt: skip
#: What a table shows for a metric the world could not grade (no detector configured).
NOT_GRADED = "not graded"


def category_grids(
    images: Sequence[Image.Image], prompts: Sequence[EvalPrompt], per_category: int = 16
) -> dict[str, bytes]:
    """A sample grid (PNG) per prompt category."""
    by_category: dict[str, list[Image.Image]] = defaultdict(list)
    for image, prompt in zip(images, prompts, strict=True):
        if len(by_category[prompt.category]) < per_category:
            by_category[prompt.category].append(image)
    return {c: image_grid(imgs, columns=8, cell=64) for c, imgs in sorted(by_category.items())}


def graded(overall: dict) -> bool:
    """Did the world grade any image (False: no image grader, e.g. no detector)?"""
    return any(overall.get(n) is not None for n in IMAGE_COLUMNS)


def category_rows(report: MetricReport) -> list[dict[str, object]]:
    """Overall and per-category image metrics, one dict per row (None: not graded)."""
    rows = [{"category": "overall", **{n: report.overall.get(n) for n in IMAGE_COLUMNS}}]
    for category, values in sorted(report.per_category.items()):
        rows.append({"category": category, **{n: values.get(n) for n in IMAGE_COLUMNS}})
    return rows


def category_table(report: MetricReport) -> str:
    empty = "-" if graded(report.overall) else NOT_GRADED
    rows = [[_fmt(v, empty) for v in row.values()] for row in category_rows(report)]
    extra = f"\n\nFID ({report.overall['fid_features']}): {report.overall['fid']:.3f}"
    if "clip_score" in report.overall:
        extra += f"; CLIP score: {report.overall['clip_score']:.3f}"
    if not graded(report.overall):
        extra += "\n\nImages were not graded: the world has no image grader configured."
    return markdown_table(["category", *IMAGE_COLUMNS], rows) + extra


def prompt_rows(report: MetricReport, limit: int = 60) -> list[dict[str, object]]:
    """The first ``limit`` graded images: prompt, category, scores and what was detected."""
    return [
        {
            "prompt": r["prompt"],
            "category": r["category"],
            **{c: r.get(c) for c in ("object_accuracy", "count_error", "position_accuracy")},
            "detected": r.get("detected", ""),
        }
        for r in report.rows[:limit]
    ]


def prompt_table(report: MetricReport, limit: int = 60) -> str:
    empty = "-" if graded(report.overall) else NOT_GRADED
    return markdown_table(
        ["prompt", "category", "objects", "count err", "position", "detected"],
        [[_fmt(v, empty) for v in row.values()] for row in prompt_rows(report, limit)],
    )


def _fmt(value: object, empty: str = "-") -> object:
    return empty if value is None else value


def relative_delta(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return (value - base) / abs(base)


def _interval_text(mean: float | None, low: float | None, high: float | None) -> str:
    if mean is None:
        return NOT_GRADED
    return f"{mean:.3f}" if low is None or high is None else f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def rows_markdown(rows: Sequence[dict[str, object]]) -> str:
    """Table 1 as markdown from ``BuiltReport.rows`` (or the typed table's records): each
    metric's mean over seeds with its 95% interval and its relative change against
    alttext in parentheses."""
    labels = {metric: label for metric, label, _ in COLUMNS}
    metrics = [m for m in labels if rows and m in rows[0]]
    cells = []
    for row in rows:
        line: list[object] = [row["variant"], row.get("seeds", 1)]
        for metric in metrics:
            delta = row.get(f"{metric}_vs_{BASELINE}")
            low, high = row.get(f"{metric}_low"), row.get(f"{metric}_high")
            text = _interval_text(row.get(metric), low, high)  # type: ignore[arg-type]
            line.append(text + (f" ({delta:+.1%})" if isinstance(delta, float) else ""))
        cells.append(line)
    return markdown_table(["variant", "seeds", *(labels[m] for m in metrics)], cells)


def comparison_markdown(results: Sequence[MetricComparison]) -> str:
    """Each variant against alttext per judged metric: the paired difference's intervals,
    the verdict and whether the paper's change is within them."""
    if not results:
        return "No comparison: no variant shares a graded seed with alttext."
    cells = [
        [r.variant, r.metric, r.seeds, r.baseline.text(), r.value.text(),
         r.difference_t.text(), r.difference_bootstrap.text(), f"**{r.verdict}**",
         f"{r.paper_difference:+.3f}", "yes" if r.consistent_with_paper else "no"]
        for r in results
    ]  # fmt: skip
    header = ["variant", "metric", "seeds", "alttext (95%)", "variant (95%)",
              "difference, t over seeds", "difference, bootstrap seeds then prompts",
              "verdict", "paper's change", "paper within both"]  # fmt: skip
    return "\n\n".join(
        [
            "## Against alttext",
            "Differences are paired on training seed, prompt and image; their intervals are "
            f"{1 - (1 - comparison.CONFIDENCE) / len(comparison.JUDGED):.1%} (95% shared by "
            "the three metrics, Bonferroni). A verdict needs both intervals on one side of "
            "zero; one seed never suffices. Paper's change: its relative change (Table 1: "
            "object accuracy +7%, counting error -8%, position accuracy +8%) at alttext's "
            "value.",
            markdown_table(header, cells),
        ]
    )


def position_rows(rows_by_variant: dict[str, Sequence[dict]]) -> list[dict[str, object]]:
    """Per variant: position accuracy beside its chance level (placement ignoring the text,
    given what was drawn), the ratio, position given the objects found and the relation
    form, each a mean over seeds; and whether accuracy minus chance is above zero: a t
    interval over the seeds' excess, or, from one seed, over its images (``judged_over``:
    that run's placement, not the recipe's, whose seeds vary more)."""
    out = []
    for variant, rows in rows_by_variant.items():
        accuracy = comparison.seed_means(rows, "position_accuracy")
        chance = comparison.seed_means(rows, "position_chance")
        if not accuracy:
            continue
        given = comparison.seed_means(all_placed_found(rows), "position_accuracy")
        relative = comparison.seed_means(rows, "relative_position")
        common = sorted(set(accuracy) & set(chance))
        if len(common) > 1:
            judged_over = "seeds"
            excess: Interval | None = t_interval([accuracy[s] - chance[s] for s in common])
        else:
            judged_over = "images (one seed)"
            hits, chances = (
                comparison.by_seed(rows, m) for m in ("position_accuracy", "position_chance")
            )
            per_image = [
                hits[s][key] - chances[s][key]
                for s in hits
                for key in hits[s].keys() & chances[s].keys()
            ]
            excess = t_interval(per_image) if per_image else None
        mean_acc = _mean(accuracy)
        mean_chance = _mean(chance)
        out.append(
            {
                "variant": variant,
                "seeds": len(accuracy),
                "position_accuracy": mean_acc,
                "chance": mean_chance,
                "times_chance": None if not mean_chance else round(mean_acc / mean_chance, 2),
                "given_found": _mean(given),
                "relative_position": _mean(relative),
                "above_chance": None
                if excess is None or excess.low is None
                else excess.excludes_zero() > 0,
                "judged_over": judged_over,
            }
        )
    return out


def _mean(values: dict[int, float]) -> float | None:
    return round(sum(values.values()) / len(values), 4) if values else None


def position_markdown(rows: Sequence[dict[str, object]]) -> str:
    if not rows:
        return "No position prompts were graded."
    cells = [[_fmt(v, NOT_GRADED) for v in row.values()] for row in rows]
    at_chance = [str(r["variant"]) for r in rows if r["above_chance"] is False]
    unjudged = [str(r["variant"]) for r in rows if r["above_chance"] is None]
    notes = []
    if at_chance:
        notes.append(f"At chance (accuracy minus chance not above zero): {', '.join(at_chance)}.")
    if unjudged:
        notes.append(f"Not judged (too few images): {', '.join(unjudged)}.")
    if not notes:
        notes.append("Every variant places objects above chance.")
    above = {str(r["variant"]): r["above_chance"] for r in rows}
    if above.get(MIX) is False and above.get(ORACLE) is True:
        notes.append(
            f"{MIX} sits at chance while {ORACLE} (trained on the true descriptions) does "
            "not: the recaptions' positions do not teach placement that the true ones do."
        )
    elif above.get(MIX) is False and above.get(ORACLE) is False:
        notes.append(
            f"{ORACLE} sits at chance too: this model does not learn placement from any "
            "captions, so the report cannot say whether RECAP's positions help."
        )
    note = " ".join(notes)
    return "\n\n".join(
        [
            "## Position against chance",
            "Chance: the exact-cell accuracy of placement that ignores the text, given the "
            "objects drawn (the cells each asked-for kind occupies / 9 on a 3x3 grid: extra "
            "copies raise it); given found: accuracy over "
            "images where every placed object was found; relative position: GenEval's form, "
            "the placed objects stand as the prompt's do (left/right, above/below).",
            markdown_table(list(rows[0]), cells),
            note,
        ]
    )


@dataclass
class BuiltReport:
    table: dict  # {variant: {metric: mean over seeds}}
    rows: list[dict[str, object]]  # per variant: seeds, means, intervals, deltas vs alttext
    table_markdown: str
    markdown: str
    figures: dict[str, bytes] = field(default_factory=dict)
    mix_deltas: dict[str, float] = field(default_factory=dict)
    human_markdown: str = ""  # the human study's table, or that nothing is rated yet
    captions_markdown: str = ""  # the training captions' figures beside the metrics
    comparisons: list[dict[str, object]] = field(default_factory=list)  # MetricComparison rows
    positions: list[dict[str, object]] = field(default_factory=list)


def captions_markdown(caption_rows: Sequence[dict], table: dict, shards_read: int) -> str:
    """The training corpus's caption figures per variant (:mod:`caption_stats`) next to
    the metrics they led to."""
    if not caption_rows:
        return "No caption statistics: no recaptioned shard of the training corpus was read."
    header = ["variant", "captions", "CLIP tokens mean / p95", "over 77", "cap hits",
              "degenerate", "caption CLIP score", "object acc.", "CLIP score (images)"]  # fmt: skip
    cells = []
    for row in caption_rows:
        metrics = table.get(row["variant"], {})
        cells.append(
            [
                row["variant"],
                row["captions"],
                f"{_fmt(row['clip_tokens_mean'])} / {_fmt(row['clip_tokens_p95'])}",
                *(_fmt(row[k]) for k in ("over_context_rate", "cap_hit_rate", "degenerate_rate")),
                _fmt(row["caption_clip_score"]),
                _fmt(metrics.get("object_accuracy"), NOT_GRADED),
                _fmt(metrics.get("clip_score")),
            ]
        )
    return "\n\n".join(
        [
            "## The captions behind the metrics",
            f"What each fine-tune read, over {shards_read} recaptioned shard(s) of its training "
            "corpus (rates are fractions of captions; caption CLIP score: the shards' scored "
            "samples against their images).",
            markdown_table(header, cells),
        ]
    )


def _variant_rows(reports: dict[str, list[dict]], columns: Sequence[tuple[str, str, bool]]):
    """Per variant: each metric's mean over its seeds' reports, with a 95% t interval."""
    base = {m: _seed_interval(reports[BASELINE], m) for m, _, _ in columns}
    table, rows = {}, []
    for variant, seed_reports in reports.items():
        row: dict[str, object] = {"variant": variant, "seeds": len(seed_reports)}
        values = {}
        for metric, _, _ in columns:
            interval = _seed_interval(seed_reports, metric)
            values[metric] = None if interval is None else round(interval.mean, 4)
            row[metric] = values[metric]
            row[f"{metric}_low"] = None if interval is None else interval.low
            row[f"{metric}_high"] = None if interval is None else interval.high
        for metric, _, _ in columns:
            reference = base[metric]
            delta = (
                relative_delta(values[metric], reference.mean)
                if variant != BASELINE and reference is not None
                else None
            )
            row[f"{metric}_vs_{BASELINE}"] = None if delta is None else round(delta, 4)
        table[variant] = values
        rows.append(row)
    return table, rows


def _seed_interval(seed_reports: Sequence[dict], metric: str) -> Interval | None:
    values = [r["overall"][metric] for r in seed_reports if r["overall"].get(metric) is not None]
    return t_interval(values) if values else None


def _mean_curves(reports: dict[str, list[dict]], metric: str) -> dict[str, tuple[list, list]]:
    """Each variant's ``metric`` per snapshot step, the mean over its seeds."""
    series = {}
    for variant, seed_reports in reports.items():
        by_step: dict[int, list[float]] = defaultdict(list)
        for report in seed_reports:
            for point in report.get("curve", []):
                if point.get(metric) is not None:
                    by_step[point["step"]].append(point[metric])
        if by_step:
            steps = sorted(by_step)
            series[variant] = (steps, [sum(by_step[s]) / len(by_step[s]) for s in steps])
    return series


def build_report(
    reports: dict[str, list[dict]],
    rows: dict[str, list[dict]] | None = None,
    *,
    human: dict | None = None,
    caption_rows: Sequence[dict] = (),
    shards_read: int = 0,
) -> BuiltReport:
    """Table 1 over training seeds (``reports``: each variant's metric reports, one per
    seed; means with 95% intervals and relative deltas vs alttext), each variant against
    alttext with a verdict per metric and position against chance (``rows``: each
    variant's graded rows over its seeds, :mod:`comparison`), the human study beside it
    (``human``: the human_eval_report's figures; None: not built yet), the training
    captions' figures (``caption_rows``: :func:`caption_stats.stats_rows`) and Figure 5
    curves (means over seeds)."""
    if BASELINE not in reports:
        raise ValueError(f"the report needs {BASELINE}'s metric reports as its baseline")
    rows = rows or {}
    columns = [
        c for c in COLUMNS if any(c[0] in r["overall"] for rs in reports.values() for r in rs)
    ]
    table, variant_rows = _variant_rows(reports, columns)
    table_markdown = rows_markdown(variant_rows)
    # The floor is a reference row, not a variant a verdict is given on.
    fine_tunes = {v: r for v, r in rows.items() if v != FLOOR}
    results = comparison.compare_variants(fine_tunes) if BASELINE in fine_tunes else []
    positions = position_rows(rows)
    figures = {}
    for metric, label, filename in (
        ("fid", "FID", "recap_fid_vs_steps.png"),
        ("object_accuracy", "object accuracy", "recap_object_accuracy_vs_steps.png"),
    ):
        figures[filename] = line_plot(
            _mean_curves(reports, metric),
            title=f"{label} vs training steps (mean over seeds)",
            xlabel="step",
            ylabel=label,
        )
    mix_deltas = {}
    if MIX in table:
        for judged in comparison.JUDGED:
            delta = relative_delta(table[MIX].get(judged.name), table[BASELINE].get(judged.name))
            if delta is not None:
                mix_deltas[judged.name] = round(delta, 4)
    fid_features = reports[BASELINE][0]["overall"].get("fid_features", "")
    human_section = human_markdown(human)
    captions_section = captions_markdown(caption_rows, table, shards_read)
    markdown = "\n\n".join(
        [
            "# RECAP report",
            "Each value is the mean over the variant's training seeds with its 95% t "
            "interval (none from one seed); relative change against `alttext` in "
            "parentheses. `base`: the base model before fine-tuning (the floor). FID and "
            "KID compare generated with real images on the same "
            f"features ({fid_features}); KID is unbiased at small sample sizes.",
            table_markdown,
            comparison_markdown(results),
            position_markdown(positions),
            human_section,
            captions_section,
            "## Metrics vs training steps (paper, Figure 5)",
            *(markdown_image(png, name) for name, png in figures.items()),
        ]
    )
    return BuiltReport(
        table, variant_rows, table_markdown, markdown, figures, mix_deltas, human_section,
        captions_section, [r.row() for r in results], positions,
    )  # fmt: skip


@dataclass
class Verdict:
    passed: bool
    severity: str  # "warn": not shown either way; "error": recap_mix is worse
    description: str
    metadata: dict


def mix_beats_alttext(comparisons: Sequence[dict]) -> Verdict:
    """The verdicts of recap_mix against alttext (``BuiltReport.comparisons``): passes when
    it is better on all three metrics; an error when it is worse on any; a warning when
    any is not distinguishable (or not graded, or missing)."""
    mine = {r["metric"]: r for r in comparisons if r["variant"] == MIX}
    verdicts = {j.name: mine[j.name]["verdict"] if j.name in mine else NOT_GRADED
                for j in comparison.JUDGED}  # fmt: skip
    parts = []
    for metric, verdict in verdicts.items():
        if metric in mine:
            row = mine[metric]
            low, high = row["difference_t_low"], row["difference_t_high"]
            spread = "" if low is None else f" [{low:+.3f}, {high:+.3f}]"
            parts.append(
                f"{metric}: {verdict} ({row['difference_t']:+.3f}{spread} over "
                f"{row['seeds']} seed(s), paper {row['paper_difference']:+.3f})"
            )
        else:
            parts.append(f"{metric}: {NOT_GRADED}")
    worse = [m for m, v in verdicts.items() if v == comparison.WORSE]
    passed = all(v == comparison.BETTER for v in verdicts.values())
    if passed:
        head = "recap_mix is better than alttext on all three"
    elif worse:
        head = f"recap_mix is WORSE than alttext on {', '.join(worse)}"
    else:
        head = "recap_mix is not shown better than alttext on all three"
    return Verdict(
        passed,
        "error" if worse else "warn",
        f"{head}: " + "; ".join(parts),
        {"verdicts": verdicts, "comparison": mine},
    )
