"""The RECAP report: variants side by side (paper Table 1) and metric-vs-steps (Figure 5).

Plain Python: takes the per-variant metric reports (JSON dicts) and returns markdown, a
table and PNG figures.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image

from recap_dagster.evaluation.human_stats import human_markdown
from recap_dagster.evaluation.metrics import MetricReport
from recap_dagster.evaluation.plots import image_grid, line_plot, markdown_image, markdown_table
from recap_dagster.evaluation.world import EvalPrompt

# (metric, label, higher is better)
COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("fid", "FID", False),
    ("clip_score", "CLIP score", True),
    ("object_accuracy", "object acc.", True),
    ("count_error", "counting err.", False),
    ("count_accuracy", "counting acc.", True),
    ("position_accuracy", "position acc.", True),
    ("all_correct", "all correct", True),
)
# The paper's relative improvements of RECAP over alt text (Table 1).
PAPER_MARGINS = {"object_accuracy": 0.07, "count_error": -0.08, "position_accuracy": 0.08}
BASELINE = "alttext"
MIX = "recap_mix"
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


def rows_markdown(rows: Sequence[dict[str, object]]) -> str:
    """Table 1 as markdown from ``BuiltReport.rows`` (or the typed table's records): each
    metric with its relative change against alttext in parentheses."""
    labels = {metric: label for metric, label, _ in COLUMNS}
    metrics = [m for m in labels if rows and m in rows[0]]
    cells = []
    for row in rows:
        line: list[object] = [row["variant"]]
        for metric in metrics:
            value, delta = row.get(metric), row.get(f"{metric}_vs_{BASELINE}")
            text = NOT_GRADED if value is None else f"{value:.3f}"
            line.append(text + (f" ({delta:+.1%})" if isinstance(delta, float) else ""))
        cells.append(line)
    return markdown_table(["variant", *(labels[m] for m in metrics)], cells)


@dataclass
class BuiltReport:
    table: dict  # {variant: {metric: value}}
    rows: list[dict[str, object]]  # per variant: metrics, then relative deltas vs alttext
    table_markdown: str
    markdown: str
    figures: dict[str, bytes] = field(default_factory=dict)
    mix_deltas: dict[str, float] = field(default_factory=dict)
    human_markdown: str = ""  # the human study's table, or that nothing is rated yet
    captions_markdown: str = ""  # the training captions' figures beside the metrics


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


def build_report(
    reports: dict[str, dict],
    human: dict | None = None,
    caption_rows: Sequence[dict] = (),
    shards_read: int = 0,
) -> BuiltReport:
    """Table 1 (values and relative deltas vs alttext), the human study beside it
    (``human``: the human_eval_report's figures; None: not built yet), the training
    captions' figures (``caption_rows``: :func:`caption_stats.stats_rows`) and Figure 5
    curves."""
    base = reports[BASELINE]["overall"]
    columns = [c for c in COLUMNS if any(c[0] in r["overall"] for r in reports.values())]
    table = {v: {m: r["overall"].get(m) for m, _, _ in columns} for v, r in reports.items()}
    rows = []
    for variant, values in table.items():
        deltas = {
            f"{metric}_vs_{BASELINE}": None if delta is None else round(delta, 4)
            for metric, _, _ in columns
            for delta in [
                relative_delta(values.get(metric), base.get(metric))
                if variant != BASELINE
                else None
            ]
        }
        rows.append({"variant": variant, **{m: values.get(m) for m, _, _ in columns}, **deltas})
    table_markdown = rows_markdown(rows)

    figures = {}
    for metric, label, filename in (
        ("fid", "FID", "recap_fid_vs_steps.png"),
        ("object_accuracy", "object accuracy", "recap_object_accuracy_vs_steps.png"),
    ):
        points = {
            v: [(p["step"], p[metric]) for p in r.get("curve", []) if p.get(metric) is not None]
            for v, r in reports.items()
        }
        series = {v: ([s for s, _ in ps], [y for _, y in ps]) for v, ps in points.items() if ps}
        figures[filename] = line_plot(
            series, title=f"{label} vs training steps", xlabel="step", ylabel=label
        )
    mix_deltas = {}
    if MIX in table:
        for metric in PAPER_MARGINS:
            delta = relative_delta(table[MIX].get(metric), base.get(metric))
            if delta is not None:
                mix_deltas[metric] = round(delta, 4)
    fid_features = base.get("fid_features", "")
    human_section = human_markdown(human)
    captions_section = captions_markdown(caption_rows, table, shards_read)
    markdown = "\n\n".join(
        [
            "# RECAP report",
            "Relative change against `alttext` in parentheses (paper, Table 1: object "
            "accuracy +7%, counting error -8%, position accuracy +8% for RECAP).",
            table_markdown,
            f"FID features: {fid_features}.",
            human_section,
            captions_section,
            "## Metrics vs training steps (paper, Figure 5)",
            *(markdown_image(png, name) for name, png in figures.items()),
        ]
    )
    return BuiltReport(
        table, rows, table_markdown, markdown, figures, mix_deltas, human_section, captions_section
    )


@dataclass
class Verdict:
    passed: bool
    description: str
    metadata: dict


def _comparison(result: dict) -> str:
    mix, base = result["mix"], result["alttext"]
    if mix is None or base is None:
        return NOT_GRADED
    if result["delta"] is None:
        change = f"{mix - base:+.3f} absolute; alttext at 0, no relative change"
    else:
        change = f"{result['delta']:+.1%}"
    return f"{mix:.3f} vs {base:.3f} ({change}, paper {result['paper_margin']:+.0%})"


def mix_beats_alttext(table: dict) -> Verdict:
    """Does recap_mix beat alttext on object accuracy, counting error and position?"""
    if MIX not in table or BASELINE not in table:
        return Verdict(False, "recap_mix or alttext missing from the report", {})
    results = {}
    for metric, margin in PAPER_MARGINS.items():
        mix, base = table[MIX].get(metric), table[BASELINE].get(metric)
        better = mix is not None and base is not None and (mix < base if margin < 0 else mix > base)
        delta = relative_delta(mix, base)
        # With alttext at 0 any gain is an unbounded relative gain.
        meets = delta is not None and (delta <= margin if margin < 0 else delta >= margin)
        paper = better if delta is None else meets
        results[metric] = {"mix": mix, "alttext": base, "delta": delta, "beats": better,
                           "paper_margin": margin, "meets_paper_margin": paper}  # fmt: skip
    passed = all(r["beats"] for r in results.values())
    parts = [f"{m}: {_comparison(r)}" for m, r in results.items()]
    head = (
        "recap_mix beats alttext on all three"
        if passed
        else "recap_mix does NOT beat alttext on all three"
    )
    return Verdict(passed, f"{head}: " + "; ".join(parts), {"comparison": results})
