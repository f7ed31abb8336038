"""The rating page in a real browser: ``recap-dagster rate`` as a subprocess, headless
Debian Chromium, two raters answering with keys and clicks, one reloading mid-way and
resuming, and the report's figures equal to those counted by hand from their answers."""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest
from browser import REPO, chromium_page, screenshot
from rating_task import expected_figures, make_task, wilson

from recap_dagster.evaluation import human, human_stats
from recap_dagster.evaluation.report import build_report
from recap_dagster.orchestration.launcher import LaunchError, serve

KEYS = {"yes": "y", "no": "n", "left": "1", "right": "2", "tie": "t"}


def policy(question: dict, n: int) -> str:
    """What a simulated rater answers: recap_mix's images show the prompt, the others do
    by turns; in pairs the non-alttext image wins, but every third pair is a tie."""
    if question["kind"] == "success":
        return "yes" if question["variant"] == "recap_mix" or n % 2 else "no"
    if n % 3 == 0:
        return "tie"
    return "left" if question["right"] == "alttext" else "right"


def markdown_page(markdown: str) -> str:
    """The report's markdown (headings, paragraphs, pipe tables, inline images) as a small
    HTML page."""
    parts = []
    for block in markdown.split("\n\n"):
        heading = re.match(r"^(#{1,3}) (.*)$", block)
        image = re.match(r"^!\[([^]]*)\]\((data:image/png;base64,[A-Za-z0-9+/=]+)\)$", block)
        if heading:
            level = len(heading.group(1))
            parts.append(f"<h{level}>{html.escape(heading.group(2))}</h{level}>")
        elif image:
            parts.append(f'<img alt="{html.escape(image.group(1))}" src="{image.group(2)}">')
        elif block.startswith("|"):
            lines = [line.strip("|").split(" | ") for line in block.splitlines()]
            head = "".join(f"<th>{html.escape(c.strip())}</th>" for c in lines[0])
            body = "".join(
                "<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in row) + "</tr>"
                for row in lines[2:]
            )
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
        else:
            parts.append(f"<p>{html.escape(block)}</p>")
    style = (
        "body{font-family:system-ui,sans-serif;margin:2rem;max-width:70rem}"
        "td,th{border:1px solid #999;padding:.3rem .7rem}table{border-collapse:collapse}"
    )
    return f"<html><head><style>{style}</style></head><body>{''.join(parts)}</body></html>"


def metric_report(objects: float, fid: float) -> dict:
    """A variant's automatic metrics (what metric_reports writes), for the RECAP report."""
    overall = {"fid": fid, "fid_features": "random-conv", "object_accuracy": objects,
               "count_error": 1.2 - objects, "position_accuracy": objects / 2}  # fmt: skip
    curve = [{"step": s, "fid": fid + 100 / s, "object_accuracy": objects * s / 400}
             for s in (100, 200, 400)]  # fmt: skip
    return {"seed": 0, "overall": overall, "per_category": {}, "curve": curve}


def test_two_raters_rate_in_chromium_and_the_report_counts_them(tmp_path: Path) -> None:
    root = tmp_path / "storage"
    store, task = make_task(root, prompts=3)
    questions = {q["id"]: q for q in task["questions"]}
    given: list[tuple[str, str, str]] = []
    command = ["-m", "recap_dagster.cli", "rate", "--storage-root", str(root)]
    log = tmp_path / "rate.log"
    server = serve(
        "python", command, REPO, {"PYTHONPATH": str(REPO)}, log, timeout=60,
        address_flags=("--host", "--port"), ready_path="/api/health",
    )  # fmt: skip
    try:
        with server as url, chromium_page(tmp_path / "profile", width=1200, height=900) as page:

            def shown() -> str | None:
                return page.locator("#question").get_attribute("data-question")

            def answer(rater: str, count: int, use_keys: bool) -> None:
                for _ in range(count):
                    qid = shown()
                    assert qid in questions
                    choice = policy(questions[qid], len(given))
                    if use_keys:
                        page.keyboard.press(KEYS[choice])
                    else:
                        page.click(f"button[data-answer={choice}]")
                    given.append((rater, qid, choice))
                    # Wait on the page, not a clock: the next question (or the end) shows.
                    page.wait_for_function(
                        "qid => document.querySelector('#question').dataset.question !== qid"
                        " || !document.querySelector('#done').classList.contains('hidden')",
                        arg=qid,
                    )

            # Rater 1 signs in on the page, answers by keys and clicks, then reloads.
            page.goto(url)
            page.fill("#rater", "ann")
            page.press("#rater", "Enter")
            page.wait_for_selector("#question[data-question]")
            answer("ann", 3, use_keys=True)
            answer("ann", 2, use_keys=False)
            while questions[shown()]["kind"] != "pair":  # show a side-by-side question
                answer("ann", 1, use_keys=True)
            page.wait_for_function(
                "() => [...document.querySelectorAll('#images img')]"
                ".every(i => i.complete && i.naturalWidth > 0)"
            )
            rating_shot = screenshot(page, "human_eval_rating_page")
            before = shown()
            page.reload()
            page.wait_for_selector("#question[data-question]")
            assert shown() == before  # resumed at the first question not yet answered
            done = len(given)
            assert f"{done} of {len(questions)} answered" in page.inner_text("#progress")
            answer("ann", 2, use_keys=False)

            # A duplicate submission is refused and loses nothing.
            first = next(qid for rater, qid, _ in given if rater == "ann")
            saved = store.read_bytes(*human.ANSWERS_DIR, task["version"], "ann.json")
            response = page.request.post(
                f"{url}/api/answers",
                data={"rater": "ann", "task_version": task["version"], "question": first,
                      "answer": "no" if questions[first]["kind"] == "success" else "tie"},
            )  # fmt: skip
            assert response.status == 409 and "already answered" in response.json()["error"]
            assert store.read_bytes(*human.ANSWERS_DIR, task["version"], "ann.json") == saved

            # Rater 2 comes by link and answers with keys only.
            page.goto(f"{url}/?rater=bob")
            page.wait_for_selector("#question[data-question]")
            answer("bob", 6, use_keys=True)

            # Every answer was written at once, in the order given.
            answers = human.read_answers(store, task)
            for rater in ("ann", "bob"):
                recorded = [(a["question"], a["answer"]) for a in answers[rater]]
                assert recorded == [(q, a) for r, q, a in given if r == rater]

            report = human_stats.human_report(task, answers)
            expected = expected_figures(task, given)
            rows = {row["variant"]: row for row in report["rows"]}
            for variant, (rate, k, n) in expected["success"].items():
                assert rows[variant]["success_rate"] == pytest.approx(rate)
                low, high = wilson(k, n)
                assert (rows[variant]["success_low"], rows[variant]["success_high"]) == (
                    pytest.approx((low, high))
                )
            for variant, rate in expected["win"].items():
                assert rows[variant]["win_rate"] == pytest.approx(rate)
            assert report["unrated"] == expected["unrated"]
            assert report["ratings"] == len(given) and report["raters"] == ["ann", "bob"]

            # The RECAP report as recap_report builds it: Table 1, then the human study.
            automatic = {"alttext": [metric_report(0.4, 30.0)], "recap_short": [metric_report(
                0.45, 28.0)], "recap_mix": [metric_report(0.5, 27.0)]}  # fmt: skip
            built = build_report(automatic, human=report)
            assert "win rate vs alttext" in built.human_markdown in built.markdown
            page.set_content(markdown_page(built.markdown))
            report_shot = screenshot(page, "human_eval_report", full_page=True)
    except LaunchError as err:  # the server did not start: say why
        pytest.fail(f"{err}:\n{log.read_text() if log.exists() else ''}")
    assert rating_shot.stat().st_size > 0 and report_shot.stat().st_size > 0
