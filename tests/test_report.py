"""The RECAP report core: Table 1 with deltas, Figure 5 curves, the mix-vs-alttext verdict."""

from __future__ import annotations

from recap_dagster.evaluation.report import build_report, mix_beats_alttext, relative_delta


def _report(objects: float, count_error: float, position: float, fid: float) -> dict:
    overall = {
        "fid": fid,
        "fid_features": "random-conv",
        "object_accuracy": objects,
        "count_error": count_error,
        "position_accuracy": position,
    }
    curve = [
        {"step": s, "fid": fid + 1 / s, "object_accuracy": objects * s / 200} for s in (100, 200)
    ]
    return {"overall": overall, "per_category": {}, "curve": curve}


def test_table_deltas_and_figures() -> None:
    built = build_report(
        {"alttext": _report(0.2, 1.0, 0.1, 5.0), "recap_mix": _report(0.3, 0.9, 0.1, 4.0)}
    )
    assert (
        "| recap_mix | 4.000 (-20.0%) | 0.300 (+50.0%) | 0.900 (-10.0%) |" in built.table_markdown
    )
    assert built.mix_deltas == {
        "object_accuracy": 0.5,
        "count_error": -0.1,
        "position_accuracy": 0.0,
    }
    assert set(built.figures) == {"recap_fid_vs_steps.png", "recap_object_accuracy_vs_steps.png"}
    assert all(png.startswith(b"\x89PNG") for png in built.figures.values())
    assert "clip_score" not in built.table["alttext"]  # columns nobody measured are left out


def test_verdict_needs_all_three_metrics() -> None:
    table = {
        "alttext": {"object_accuracy": 0.2, "count_error": 1.0, "position_accuracy": 0.1},
        "recap_mix": {"object_accuracy": 0.3, "count_error": 0.95, "position_accuracy": 0.1},
    }
    verdict = mix_beats_alttext(table)
    assert not verdict.passed  # position is a tie
    comparison = verdict.metadata["comparison"]
    assert comparison["object_accuracy"]["meets_paper_margin"]
    assert (
        comparison["count_error"]["beats"] and not comparison["count_error"]["meets_paper_margin"]
    )
    assert "does NOT beat" in verdict.description and "+50.0%" in verdict.description

    table["recap_mix"]["position_accuracy"] = 0.2
    assert mix_beats_alttext(table).passed
    assert not mix_beats_alttext({"alttext": table["alttext"]}).passed


def test_verdict_with_alttext_at_zero() -> None:
    table = {
        "alttext": {"object_accuracy": 0.1, "count_error": 1.1, "position_accuracy": 0.0},
        "recap_mix": {"object_accuracy": 0.3, "count_error": 1.0, "position_accuracy": 0.025},
    }
    assert relative_delta(0.025, 0.0) is None
    verdict = mix_beats_alttext(table)
    position = verdict.metadata["comparison"]["position_accuracy"]
    assert verdict.passed and position["beats"] and position["meets_paper_margin"]
    assert "0.025 vs 0.000 (+0.025 absolute; alttext at 0" in verdict.description
    table["recap_mix"]["position_accuracy"] = 0.0
    assert not mix_beats_alttext(table).passed


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
    reports = {v: {"overall": ungraded, "curve": curve} for v in ("alttext", "recap_mix")}
    built = build_report(reports)
    assert "not graded" in built.table_markdown and built.mix_deltas == {}
    verdict = mix_beats_alttext(built.table)
    assert not verdict.passed and "not graded" in verdict.description
