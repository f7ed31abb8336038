"""The human evaluation, like the paper's study: a blind rating task built from the
evaluation's images, the raters' answers as an observed input, and their figures.

The core is ``recap_dagster.evaluation.human`` (task, answers) and ``human_stats``
(figures); the page raters use is ``recap-dagster rate``.
"""

import json

import dagster as dg

from recap_dagster.assets.metadata import typed_table
from recap_dagster.assets.run_config import config_from_settings, settings_from_config
from recap_dagster.assets.t2i import metric_reports
from recap_dagster.evaluation import human, human_stats
from recap_dagster.orchestration.partitions import CAPTION_VARIANTS
from recap_dagster.orchestration.retries import TRANSIENT_RETRY_POLICY, retry_only_transient
from recap_dagster.resources import StorageResource

ROW_NOTES = {
    "success_rate": "share of 'yes' to 'does this image show the prompt?'",
    "success_low": "Wilson 95% interval, lower end",
    "success_high": "Wilson 95% interval, upper end",
    "success_vs_alttext": "relative change of the success rate against alttext",
    "win_rate": "against alttext's image of the same prompt and seed; a tie counts half",
    "win_low": "bootstrap (prompts and raters) 95% interval, lower end",
    "win_high": "bootstrap (prompts and raters) 95% interval, upper end",
}

HumanEvalTaskConfig = config_from_settings(
    human.TaskSettings,
    "HumanEvalTaskConfig",
    "Which test prompts the rating task asks about (TaskSettings).",
    op="human_eval_task",
)


@dg.asset(
    retry_policy=TRANSIENT_RETRY_POLICY,
    deps=[metric_reports],
    group_name="evaluation",
    kinds={"json"},
    description="The blind rating task of the human evaluation: for a sample of test "
    "prompts, every variant's image of the same prompt and seed, asked about as 'does "
    "this image show the prompt?' and, beside alttext's, 'which shows it better?'. "
    "Raters answer it on the page `recap-dagster rate` serves.",
)
@retry_only_transient
def human_eval_task(
    context: dg.AssetExecutionContext,
    config: HumanEvalTaskConfig,  # type: ignore[valid-type]
    storage: StorageResource,
) -> dg.MaterializeResult:
    store = storage.get()
    settings = settings_from_config(human.TaskSettings, config)
    indexes = human.read_image_indexes(store, CAPTION_VARIANTS, settings.training_seed)
    task = human.build_task(indexes, settings)
    uri = human.write_task(store, task)
    context.log.info(f"rating task {task['version']}: {len(task['questions'])} questions")
    items = list(task["items"].values())
    return dg.MaterializeResult(
        metadata={
            "dagster/uri": dg.MetadataValue.path(uri),
            "version": task["version"],
            "variants": ", ".join(task["variants"]),
            "items": len(items),
            "questions": len(task["questions"]),
            "prompts": typed_table(
                [
                    {"prompt": i["prompt"], "category": i["category"], "seed": i["seed"]}
                    for i in items[:60]
                ]
            ),  # fmt: skip
        },
        data_version=dg.DataVersion(task["version"]),
    )


@dg.observable_source_asset(
    group_name="evaluation",
    description="The raters' answers to the current rating task (one JSON file per rater "
    "under human_eval/answers/<task version>/, written by the rating page). Version: a "
    "hash of every answer, so new answers make human_eval_report stale.",
)
def human_ratings(storage: StorageResource) -> dg.ObserveResult:
    store = storage.get()
    task = human.read_task(store)
    answers = human.read_answers(store, task) if task else {}
    return dg.ObserveResult(
        data_version=dg.DataVersion(human.answers_version(store)),
        metadata={
            "raters": len(answers),
            "answers": sum(len(a) for a in answers.values()),
            "task_version": task["version"] if task else "",
        },
    )


@dg.asset(
    retry_policy=TRANSIENT_RETRY_POLICY,
    deps=[human_eval_task, human_ratings],
    group_name="evaluation",
    kinds={"markdown"},
    description="The human evaluation's figures: success rate per variant (Wilson 95%), "
    "win rate against alttext (ties count half; bootstrap 95% over prompts and raters), "
    "per category, inter-rater agreement (Fleiss' kappa) and the questions still unrated.",
)
@retry_only_transient
def human_eval_report(
    context: dg.AssetExecutionContext, storage: StorageResource
) -> dg.MaterializeResult:
    store = storage.get()
    task = human.read_task(store)
    if task is None:
        raise ValueError("no rating task: materialize human_eval_task first")
    report = human_stats.human_report(task, human.read_answers(store, task))
    markdown = "\n\n".join(
        part
        for part in (human_stats.human_markdown(report), human_stats.category_markdown(report))
        if part
    )
    store.write_text(json.dumps(report, indent=2), *human_stats.REPORT_PARTS)
    store.write_text(markdown, *human_stats.MARKDOWN_PARTS)
    context.log.info("\n" + markdown)
    agreement = report["agreement"]
    return dg.MaterializeResult(
        metadata={
            "dagster/uri": dg.MetadataValue.path(store.uri(*human_stats.MARKDOWN_PARTS)),
            "report": dg.MetadataValue.md(markdown),
            "table": typed_table(report["rows"], ROW_NOTES),
            "per_category": typed_table(report["per_category"], ROW_NOTES),
            "raters": len(report["raters"]),
            "ratings": report["ratings"],
            "unrated": report["unrated"],
            "questions": report["questions"],
            **{k: v for k, v in agreement.items() if k.endswith("kappa") and isinstance(v, float)},
        }
    )


HUMAN_EVAL_SOURCES = [human_ratings]

#: Observes the answers: a new answer makes human_eval_report (and recap_report) stale.
observe_ratings_job = dg.define_asset_job(
    "observe_human_ratings",
    selection=dg.AssetSelection.keys(human_ratings.key),
    description="Observe the raters' answers to the current rating task.",
)
observe_ratings_schedule = dg.ScheduleDefinition(
    job=observe_ratings_job,
    cron_schedule="*/15 * * * *",
    # Off until a study runs: between studies there is nothing new to observe.
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Observes the raters' answers every 15 minutes; turn it on for a study.",
)
