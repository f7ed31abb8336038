"""The human evaluation: the blind rating task, the rating app's answers (saved at once and
atomically, bad submissions refused), the figures against independent truths, and the
assets from the task to recap_report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import dagster as dg
import pytest
from rating_task import VARIANTS, expected_figures, make_task, wilson
from scipy import optimize, stats
from starlette.testclient import TestClient

from recap_dagster.evaluation import human, human_stats
from recap_dagster.evaluation.rating_app import create_app
from recap_dagster.evaluation.report import build_report
from recap_dagster.storage.root import Storage


def test_the_task_is_blind_paired_by_seed_and_shuffled(tmp_path: Path) -> None:
    store, task = make_task(tmp_path, prompts=3)
    assert task["variants"] == ["alttext", "recap_mix", "recap_short"]
    assert len(task["items"]) == 3  # the configured sample of the 4 prompts
    kinds = [q["kind"] for q in task["questions"]]
    assert kinds.count("success") == 3 * 3 and kinds.count("pair") == 3 * 2
    for item in task["items"].values():  # every variant's image of the same prompt and seed
        files = {parts[-1] for parts in item["images"].values()}
        assert files == {f"{item['prompt_index']:05d}_{item['seed']}.png"}
    # The same images and settings give the same task; another sample seed another one.
    again = human.build_task(human.read_image_indexes(store, VARIANTS, 0), human.TaskSettings(3))
    assert again == task
    other = human.build_task(
        human.read_image_indexes(store, VARIANTS, 0), human.TaskSettings(prompts=3, seed=5)
    )
    assert other["version"] != task["version"]
    # Sides are shuffled: alttext is not always on the same side.
    big = human.build_task(human.read_image_indexes(store, VARIANTS, 0), human.TaskSettings(4))
    assert {q["left"] == "alttext" for q in big["questions"] if q["kind"] == "pair"} == {
        True, False
    }  # fmt: skip

    client = TestClient(create_app(str(tmp_path)))
    first = client.get("/api/session", params={"rater": "ann"}).json()
    second = client.get("/api/session", params={"rater": "bob"}).json()
    assert client.get("/api/session", params={"rater": "ann"}).json() == first  # stable
    assert [q["id"] for q in first["questions"]] != [q["id"] for q in second["questions"]]
    assert sorted(q["id"] for q in first["questions"]) == sorted(q["id"] for q in task["questions"])
    # Nothing the page receives names a variant: not the session, not the page.
    text = json.dumps(first) + client.get("/").text
    assert not any(v in text for v in VARIANTS)
    pair = next(q for q in first["questions"] if q["kind"] == "pair")
    image = client.get(f"/api/image/{pair['id']}/1")
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    assert client.get(f"/api/image/{pair['id']}/2").status_code == 404


def test_answers_are_saved_at_once_and_bad_ones_change_nothing(tmp_path: Path) -> None:
    store, task = make_task(tmp_path)
    client = TestClient(create_app(str(tmp_path)))
    success = next(q for q in task["questions"] if q["kind"] == "success")
    pair = next(q for q in task["questions"] if q["kind"] == "pair")
    body = {"rater": "ann", "task_version": task["version"], "question": success["id"]}

    saved = client.post("/api/answers", json={**body, "answer": "yes"})
    assert saved.status_code == 201, saved.text
    path = Path(store.uri("human_eval", "answers", task["version"], "ann.json"))
    on_disk = path.read_bytes()
    assert json.loads(on_disk)["answers"][0]["answer"] == "yes"
    bad = [
        (409, {**body, "answer": "no"}),  # a second answer to the same question
        (404, {**body, "question": "q-nope", "answer": "yes"}),
        (422, {**body, "answer": "left"}),  # a pair's answer to a success question
        (422, {**body, "rater": "../evil", "answer": "yes"}),
        (422, {"rater": "ann", "question": pair["id"], "answer": "tie"}),  # no task version
        (409, {**body, "task_version": "older", "question": pair["id"], "answer": "tie"}),
    ]
    for status, payload in bad:
        response = client.post("/api/answers", json=payload)
        assert response.status_code == status, (payload, response.text)
        assert response.json()["error"]
    malformed = client.post("/api/answers", content=b"{not json")
    assert malformed.status_code == 400 and "JSON" in malformed.json()["error"]
    assert path.read_bytes() == on_disk  # nothing already saved was touched
    assert [p.name for p in path.parent.iterdir()] == ["ann.json"]  # no temp files left

    assert client.post("/api/answers", json={**body, "question": pair["id"], "answer": "tie"})
    session = client.get("/api/session", params={"rater": "ann"}).json()
    assert session["answered"] == [success["id"], pair["id"]]  # what a reload resumes from
    assert client.get("/api/session", params={"rater": "a b"}).status_code == 422


def test_answers_go_to_an_s3_root(s3_env: str) -> None:
    store, task = make_task(s3_env)
    client = TestClient(create_app(s3_env))
    question = task["questions"][0]
    response = client.post(
        "/api/answers",
        json={"rater": "ann", "task_version": task["version"], "question": question["id"],
              "answer": "left" if question["kind"] == "pair" else "no"},
    )  # fmt: skip
    assert response.status_code == 201, response.text
    assert human.read_answers(Storage(s3_env), task)["ann"][0]["question"] == question["id"]


def test_wilson_is_the_score_test_inverted() -> None:
    # The interval is where the score test does not reject: |p - x/n| = z sqrt(p(1-p)/n).
    z = stats.norm.ppf(0.975)
    for k, n in ((0, 10), (5, 10), (9, 12), (48, 100)):

        def score(p: float, k: int = k, n: int = n) -> float:
            return abs(k / n - p) - z * math.sqrt(p * (1 - p) / n)

        low = 0.0 if k == 0 else optimize.brentq(score, 1e-12, k / n - 1e-9)
        high = optimize.brentq(score, k / n + 1e-9, 1 - 1e-12)
        assert human_stats.wilson(k, n) == pytest.approx((low, high), abs=1e-9)
    assert human_stats.wilson(0, 0) == (None, None)


def test_kappas_match_their_textbook_examples() -> None:
    # Fleiss (1971) as worked on Wikipedia: 10 items, 14 raters, 5 categories: 0.210.
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0],
             [2, 2, 8, 1, 1], [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2],
             [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]  # fmt: skip
    assert human_stats.fleiss_kappa(table) == pytest.approx(0.20993, abs=1e-4)
    # Cohen: 50 items, yes/yes 20, yes/no 5, no/yes 10, no/no 15: 0.4.
    first = ["yes"] * 25 + ["no"] * 25
    second = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert human_stats.cohen_kappa(first, second) == pytest.approx(0.4)
    assert human_stats.fleiss_kappa([[2, 0], [2, 0]]) is None  # one category: undefined


def test_bootstrap_is_seeded_and_covers_the_mean() -> None:
    scores = [1, 0, 0.5, 1, 1, 0, 1, 0.5]
    prompts = [0, 0, 1, 1, 2, 2, 3, 3]
    raters = ["a", "b"] * 4
    first = human_stats.bootstrap_mean(scores, prompts, raters, seed=3)
    assert first == human_stats.bootstrap_mean(scores, prompts, raters, seed=3)
    assert first[0] < sum(scores) / len(scores) < first[1]
    assert human_stats.bootstrap_mean([1, 1], [0, 0], ["a", "a"]) == (1.0, 1.0)
    assert human_stats.bootstrap_mean([], [], []) == (None, None)


def _metric_report(objects: float) -> dict:
    overall = {"fid": 5.0, "fid_features": "random-conv", "object_accuracy": objects}
    return {"seed": 0, "overall": overall, "per_category": {}, "curve": [{"step": 1, "fid": 5.0}]}


def _answer_some(store: Storage, task: dict) -> list[tuple[str, str, str]]:
    """Two raters answer: every success question 'yes' for recap_mix, else by turns; every
    pair for the non-alttext side but ties on the first; both raters on the first 6."""
    given = []
    for rater, count in (("ann", 10), ("bob", 6)):
        for n, q in enumerate(task["questions"][:count]):
            if q["kind"] == "success":
                answer = "yes" if q["variant"] == "recap_mix" or n % 2 else "no"
            else:
                answer = "tie" if n == 0 else ("left" if q["right"] == "alttext" else "right")
            human.add_answer(store, task, rater, q["id"], answer)
            given.append((rater, q["id"], answer))
    return given


def test_assets_from_the_task_to_recap_report(tmp_path: Path) -> None:
    from recap_dagster.assets.human_eval import (
        human_eval_report,
        human_eval_task,
        human_ratings,
        observe_ratings_job,
    )
    from recap_dagster.assets.t2i import recap_report
    from recap_dagster.resources import DataSourcesResource, StorageResource

    store, _ = make_task(tmp_path)  # the images; the asset builds the task again
    for variant, objects in (("alttext", 0.2), ("recap_mix", 0.3)):
        report = json.dumps(_metric_report(objects))
        store.write_text(report, "reports", "metrics", variant, "seed-0.json")
    # No training corpus manifest here: the report says it read no recaptioned shard.
    sources = DataSourcesResource(
        shards_root=str(tmp_path), human_captions_path="", tokenizer_path=""
    )
    resources = {"storage": StorageResource(root=str(tmp_path)), "sources": sources}
    assets = [human_ratings, human_eval_task, human_eval_report, recap_report]
    # The job the deployments' schedule runs.
    observe = dg.Definitions(assets=assets, jobs=[observe_ratings_job], resources=resources)

    def observed_version(instance: dg.DagsterInstance) -> str:
        job = observe.resolve_job_def("observe_human_ratings")
        assert job.execute_in_process(instance=instance).success
        record = instance.get_latest_data_version_record(human_ratings.key)
        return record.event_log_entry.asset_observation.tags["dagster/data_version"]

    with dg.instance_for_test() as instance:
        result = dg.materialize(
            assets, selection=[human_eval_task.key, human_eval_report.key, recap_report.key],
            instance=instance, resources=resources,
            run_config={"ops": {"human_eval_task": {"config": {"prompts": 3}}}},
        )  # fmt: skip
        meta = result.asset_materializations_for_node("recap_report")[0].metadata
        assert "No human ratings yet" in meta["human_evaluation"].value
        assert (
            result.asset_materializations_for_node("human_eval_report")[0].metadata["unrated"].value
            == 15
        )
        empty = observed_version(instance)

        task = human.read_task(store)
        given = _answer_some(store, task)
        assert observed_version(instance) != empty  # new answers: a new observed version
        result = dg.materialize(
            assets, selection=[human_eval_report.key, recap_report.key],
            instance=instance, resources=resources,
        )  # fmt: skip
    report_meta = result.asset_materializations_for_node("human_eval_report")[0].metadata
    expected = expected_figures(task, given)
    rows = {r.data["variant"]: r.data for r in report_meta["table"].records}
    for variant, (rate, k, n) in expected["success"].items():
        assert rows[variant]["success_rate"] == pytest.approx(rate)
        assert (rows[variant]["success_low"], rows[variant]["success_high"]) == pytest.approx(
            wilson(k, n)
        )
    for variant, rate in expected["win"].items():
        assert rows[variant]["win_rate"] == pytest.approx(rate)
    assert report_meta["unrated"].value == expected["unrated"] == 15 - 10
    assert report_meta["raters"].value == 2 and report_meta["ratings"].value == 16
    assert "### Per category" in store.read_text("reports", "human_eval.md")
    categories = {r.data["category"] for r in report_meta["per_category"].records}
    assert categories == {item["category"] for item in task["items"].values()}
    recap = result.asset_materializations_for_node("recap_report")[0].metadata
    assert "win rate vs alttext" in recap["human_evaluation"].value
    assert "## Human evaluation" in store.read_text("reports", "recap_report.md")


def test_the_report_says_when_nothing_is_rated() -> None:
    reports = {"alttext": [_metric_report(0.2)], "recap_mix": [_metric_report(0.3)]}
    assert "No human ratings yet" in build_report(reports).markdown
    assert "No human ratings yet" in build_report(reports, human=None).human_markdown
