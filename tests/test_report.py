"""The RECAP report core: Table 1 over seeds with intervals, the comparison against alttext
with verdicts, position against chance, Figure 5 curves and the mix-vs-alttext verdict."""

from __future__ import annotations

import numpy as np

from recap_dagster.evaluation.report import build_report, mix_beats_alttext, relative_delta


def _report(seed: int, objects: float, count_error: float, position: float, fid: float) -> dict:
    overall = {"fid": fid, "kid": fid / 100, "fid_features": "random-conv",
               "object_accuracy": objects, "count_error": count_error,
               "position_accuracy": position}  # fmt: skip
    curve = [
        {"step": s, "fid": fid + 1 / s, "object_accuracy": objects * s / 200} for s in (100, 200)
    ]
    return {"seed": seed, "overall": overall, "per_category": {}, "curve": curve}


def _rows(variant: str, seed: int, objects: float, count: float, placed: float) -> list[dict]:
    """100 prompts x 2 images: object accuracy and position as Bernoulli draws (paired noise:
    the same uniform draws for every variant), counting error a constant."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(100):
        for k in range(2):
            u, v = rng.random(), rng.random()
            found = float(u < objects)
            rows.append({"variant": variant, "seed": seed, "prompt_index": p, "image": k,
                         "object_accuracy": found, "count_error": count,
                         "position_accuracy": float(found and v < placed),
                         "position_found": found, "position_chance": found / 9,
                         "relative_position": found})  # fmt: skip
    return rows


def _world(gain: float) -> tuple[dict, dict]:
    figures = {"alttext": (0.2, 1.0, 0.1), "recap_mix": (0.2 + gain, 1.0 - gain, 0.1 + gain)}
    reports = {v: [_report(s, o + 0.01 * s, c, p, 5.0 - s) for s in range(5)]
               for v, (o, c, p) in figures.items()}  # fmt: skip
    rows = {v: [r for s in range(5) for r in _rows(v, s, o + 0.01 * s, c, p)]
            for v, (o, c, p) in figures.items()}  # fmt: skip
    return reports, rows


def test_table_over_seeds_comparison_position_and_figures() -> None:
    reports, rows = _world(gain=0.4)
    reports["base"] = [_report(0, 0.1, 1.2, 0.0, 9.0)]  # the floor: one evaluation
    rows["base"] = _rows("base", 0, 0.1, 1.2, 0.0)
    built = build_report(reports, rows)
    by_variant = {r["variant"]: r for r in built.rows}
    assert by_variant["base"]["seeds"] == 1 and by_variant["base"]["object_accuracy"] == 0.1
    assert "base" not in {c["variant"] for c in built.comparisons}  # a row, not a verdict
    mix = by_variant["recap_mix"]
    assert mix["seeds"] == 5 and mix["object_accuracy"] == 0.62
    assert mix["object_accuracy_low"] < 0.62 < mix["object_accuracy_high"]  # t over 5 seeds
    assert mix["object_accuracy_vs_alttext"] == round((0.62 - 0.22) / 0.22, 4)
    assert "| recap_mix | 5 | 3.000 [" in built.table_markdown
    verdicts = {(c["variant"], c["metric"]): c["verdict"] for c in built.comparisons}
    assert verdicts[("recap_mix", "object_accuracy")] == "better"
    assert verdicts[("recap_mix", "count_error")] == "better"  # lower is better
    assert "## Against alttext" in built.markdown and "**better**" in built.markdown
    position = {p["variant"]: p for p in built.positions}
    assert position["recap_mix"]["chance"] is not None and position["recap_mix"]["above_chance"]
    # One evaluation: judged over its images (it never places the object: below chance).
    assert position["base"]["judged_over"] == "images (one seed)"
    assert position["recap_mix"]["judged_over"] == "seeds"
    assert position["base"]["above_chance"] is False
    at_chance = next(line for line in built.markdown.splitlines() if "At chance" in line)
    assert "base" in at_chance and "recap_mix" not in at_chance
    assert set(built.figures) == {"recap_fid_vs_steps.png", "recap_object_accuracy_vs_steps.png"}
    assert all(png.startswith(b"\x89PNG") for png in built.figures.values())
    assert "clip_score" not in built.table["alttext"]  # columns nobody measured are left out


def test_the_report_says_when_recap_mix_places_at_chance_and_the_oracle_does_not() -> None:
    reports, rows = _world(gain=0.0)
    for variant, placed in (("recap_mix", 0.0), ("oracle", 0.9)):
        reports[variant] = [_report(0, 0.5, 1.0, placed, 5.0)]
        rows[variant] = _rows(variant, 0, 0.5, 1.0, placed)
    built = build_report(reports, rows)
    position = {p["variant"]: p for p in built.positions}
    assert position["oracle"]["above_chance"] and position["recap_mix"]["above_chance"] is False
    assert "recap_mix sits at chance while oracle" in built.markdown
    rows["oracle"] = _rows("oracle", 0, 0.5, 1.0, 0.0)
    assert "oracle sits at chance too" in build_report(reports, rows).markdown


def test_the_check_passes_on_better_warns_on_indistinct_and_fails_on_worse() -> None:
    better = mix_beats_alttext(build_report(*_world(gain=0.4)).comparisons)
    assert better.passed and better.severity == "warn"
    assert "better than alttext on all three" in better.description
    same = mix_beats_alttext(build_report(*_world(gain=0.0)).comparisons)
    assert not same.passed and same.severity == "warn" and "not distinguishable" in same.description
    worse = mix_beats_alttext(build_report(*_world(gain=-0.15)).comparisons)
    assert not worse.passed and worse.severity == "error" and "WORSE" in worse.description
    assert not mix_beats_alttext([]).passed  # recap_mix missing: not graded


def test_one_seed_has_no_interval_and_no_verdict() -> None:
    reports, rows = _world(gain=0.4)
    one = {v: r[:1] for v, r in reports.items()}
    one_rows = {v: [row for row in r if row["seed"] == 0] for v, r in rows.items()}
    built = build_report(one, one_rows)
    assert {c["verdict"] for c in built.comparisons} == {"not distinguishable"}
    assert built.rows[0]["object_accuracy_low"] is None
    assert relative_delta(0.025, 0.0) is None


def test_ungraded_images_show_as_not_graded() -> None:
    """A world without an image grader (no detector): the metrics are None, the tables say
    "not graded" and nothing crashes."""
    from recap_dagster.evaluation.metrics import MetricReport, summarize
    from recap_dagster.evaluation.report import category_table, prompt_table
    from recap_dagster.evaluation.world import ungraded_image

    rows = [{"prompt": f"p{i}", "category": "counting", **ungraded_image()} for i in range(3)]
    overall, per_category = summarize(rows)
    assert overall["n"] == 3 and overall["object_accuracy"] is None
    report = MetricReport({**overall, "fid": 1.0, "fid_features": "x"}, per_category, rows)
    assert "not graded" in category_table(report)
    assert "not graded" in prompt_table(report)

    ungraded = {"fid": 5.0, "fid_features": "x", "object_accuracy": None, "count_error": None,
                "position_accuracy": None}  # fmt: skip
    curve = [{"step": 1, "fid": 5.0, "object_accuracy": None}]
    reports = {v: [{"seed": 0, "overall": ungraded, "curve": curve}]
               for v in ("alttext", "recap_mix")}  # fmt: skip
    graded_rows = {v: [{"seed": 0, "prompt_index": 0, "image": 0, **ungraded_image()}]
                   for v in reports}  # fmt: skip
    built = build_report(reports, graded_rows)
    assert "not graded" in built.table_markdown and built.mix_deltas == {}
    assert built.comparisons == [] and "No comparison" in built.markdown
    verdict = mix_beats_alttext(built.comparisons)
    assert not verdict.passed and "not graded" in verdict.description
