"""RECAP step 3 and the evaluation: one text-to-image checkpoint per caption variant,
metric reports per variant, and the side-by-side RECAP report."""

import json
import os
import tempfile
import uuid

import dagster as dg
from pydantic import Field

from recap_dagster import settings
from recap_dagster.assets.inputs import base_t2i_model, eval_prompt_file
from recap_dagster.assets.metadata import typed_table
from recap_dagster.assets.run_config import config_from_settings, settings_from_config
from recap_dagster.assets.training_corpus import training_corpus
from recap_dagster.captioner.recaption import OUTPUT_DIR as RECAPTIONED_DIR
from recap_dagster.corpus.human_captions import clip_token_counter
from recap_dagster.evaluation import caption_stats, human_stats
from recap_dagster.evaluation import evaluate as evaluation
from recap_dagster.evaluation import report as report_core
from recap_dagster.evaluation.comparison import FLOOR
from recap_dagster.evaluation.plots import image_grid, line_plot, markdown_image, markdown_table
from recap_dagster.orchestration.k8s_gpu import gpu_op_tags, training_gpus
from recap_dagster.orchestration.k8s_training import (
    NodeGroup,
    create_group,
    delete_group,
    group_name,
    node0_pod,
)
from recap_dagster.orchestration.partitions import (
    CAPTION_VARIANTS,
    variant_and_seed,
    variant_seed_partitions,
)
from recap_dagster.orchestration.pool_watchdog import GPU_POOL
from recap_dagster.orchestration.retries import TRANSIENT_RETRY_POLICY, retry_only_transient
from recap_dagster.orchestration.versions import current_data_version
from recap_dagster.resources import (
    ComputeResource,
    DataSourcesResource,
    ModelsResource,
    StorageResource,
    WorldResource,
)
from recap_dagster.storage.root import Storage
from recap_dagster.t2i import runs
from recap_dagster.t2i.manifest import MANIFEST_PARTS, read_manifest
from recap_dagster.t2i.model import load_pipeline, local_model_dir
from recap_dagster.t2i.sample import generate
from recap_dagster.t2i.train import CODE_VERSION as TRAINER_CODE_VERSION
from recap_dagster.t2i.train import (
    SNAPSHOTS_FILE,
    TrainConfig,
    TrainJob,
    launch_command,
    training_stream,
    write_job,
)
from recap_dagster.t2i.training_data import require_captions, variant_captions
from recap_dagster.training import devices

SD_DIR = ("checkpoints", "sd")
REPORT_JSON = ("reports", "recap_report.json")
SD_STATE_DIR = "sd_training"
LOCAL_LAUNCHER, K8S_LAUNCHER = "local", "k8s"


def run_parts(variant: str, seed: int) -> tuple[str, str]:
    """Where a variant-and-seed partition keeps its checkpoints, training state and
    reports, under their folders: ``<variant>/seed-<seed>``."""
    return variant, f"seed-{seed}"


SAMPLE_SEED = 1234
COMPARISON_NOTES = {
    "difference_t": "variant minus alttext, paired on seed, prompt and image",
    "difference_t_low": "t over seeds, Bonferroni-corrected for three metrics",
    "difference_bootstrap_low": "bootstrap over seeds then prompts, corrected likewise",
    "verdict": "better/worse only when both intervals exclude zero on the same side",
    "paper_difference": "the paper's relative change at alttext's value",
}
POSITION_NOTES = {
    "chance": "exact-cell accuracy of placement ignoring the text, given the objects drawn "
    "(the cells each asked-for kind occupies / 9)",
    "given_found": "position accuracy over images where every placed object was found",
    "relative_position": "GenEval's form: placed objects stand as the prompt's do",
    "above_chance": "accuracy minus chance above zero (95% t interval over judged_over)",
    "judged_over": "seeds; from one seed, its images (that run only, not the recipe)",
}
# Column descriptions of the report tables: what an empty cell and a delta column mean.
REPORT_COLUMN_NOTES = {
    **{m: "empty: not graded (the world has no image grader)" for m in report_core.IMAGE_COLUMNS},
    **{
        f"{m}_vs_{report_core.BASELINE}": f"relative change of {m} against {report_core.BASELINE}"
        for m, _, _ in report_core.COLUMNS
    },
}


SDFineTuneConfig = config_from_settings(
    TrainConfig,
    "SDFineTuneConfig",
    "RECAP step 3: the trainer's settings (TrainConfig) plus how the step runs it.",
    op="sd_checkpoints",
    exclude=("seed",),  # the partition's
    processes=(int, Field(default=0, description=devices.PROCESSES_DESCRIPTION)),
    dataloader_workers=(
        int,
        Field(default=1, description="DataLoader workers per process (reading, tokenizing)."),
    ),
    sample_prompts=(int, Field(default=16, description="Prompts in the sample grid.")),
    new_run=(
        bool,
        Field(
            default=False,
            description="Start a new run on the current manifest even if a run with these "
            "settings is unfinished (its state is kept, listed under other_runs).",
        ),
    ),
    remove_runs=(
        list[str],
        Field(
            default=[],
            description="Run ids (from other_runs) whose training states to delete before "
            "training. Nothing else is ever deleted but a run's own older checkpoints.",
        ),
    ),
    nodes=(
        int,
        Field(
            default=1,
            description="Machines the run spans (torchrun nodes, `processes` processes each; "
            "the effective batch is split over all). More than 1 needs launcher k8s.",
        ),
    ),
    launcher=(
        str,
        Field(
            default=LOCAL_LAUNCHER,
            description="local: torchrun on this machine (a Pipes subprocess); k8s: one pod "
            "per node in DAGSTER_K8S_NAMESPACE from DAGSTER_CURRENT_IMAGE, `processes` GPUs "
            "each (0: RECAP_K8S_TRAINING_GPUS), node 0 through Pipes, the others an indexed "
            "Job, meeting through a headless Service (deploy/k8s/README.md).",
        ),
    ),
)


@dg.asset(
    retry_policy=TRANSIENT_RETRY_POLICY,
    partitions_def=variant_seed_partitions,
    # The shard groups reach training through training_corpus, whose version changes with
    # theirs; the prompts give the sample grid.
    deps=[training_corpus, base_t2i_model, eval_prompt_file],
    pool=GPU_POOL,
    op_tags=gpu_op_tags(training=True),
    group_name="text_to_image",
    code_version=TRAINER_CODE_VERSION,
    kinds={"pytorch", "diffusers"},
    tags={"recap/gpu": "1"},
    description="The base text-to-image model fine-tuned on the shards of training_corpus with one "
    "caption variant (alttext, recap_short, recap_long, recap_mix = 50/50 per sample; oracle: "
    "the true descriptions, where the world knows them: the ceiling) and "
    "one training seed (the partition: variant x seed, RECAP_TRAINING_SEEDS), by "
    "the standalone trainer (torchrun, `processes` processes) launched through Dagster "
    "Pipes. Streams the latent cache; resumes from its training state under the storage "
    "root after an interruption, on any machine.",
)
@retry_only_transient
def sd_checkpoints(
    context: dg.AssetExecutionContext,
    config: SDFineTuneConfig,  # type: ignore[valid-type]
    models: ModelsResource,
    compute: ComputeResource,
    sources: DataSourcesResource,
    storage: StorageResource,
    world: WorldResource,
    pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.MaterializeResult:
    variant, seed = variant_and_seed(context)
    run_dir = run_parts(variant, seed)
    store = storage.get()
    corpus = read_manifest(store)
    shards = corpus.shards
    base = local_model_dir(models.base_t2i)
    # The version the observation (or the miniworld's build) recorded: no second hash of
    # gigabytes of weights per run.
    base_version = current_data_version(context.instance, base_t2i_model.key)
    if base_version is None:
        raise ValueError("base_t2i_model has no observed version: observe it first")
    train_config = settings_from_config(TrainConfig, config, seed=seed)
    if config.launcher not in (LOCAL_LAUNCHER, K8S_LAUNCHER):
        raise ValueError(f"launcher must be {LOCAL_LAUNCHER} or {K8S_LAUNCHER}")
    if config.nodes < 1 or (config.nodes > 1 and config.launcher != K8S_LAUNCHER):
        raise ValueError("nodes must be 1, or more with launcher k8s (other machines' pods)")
    on_k8s = config.launcher == K8S_LAUNCHER
    # A k8s node's processes are its pod's GPUs, not this (orchestrating) pod's devices.
    processes = (config.processes or training_gpus()) if on_k8s else None
    processes = processes or devices.process_count(config.processes)
    captions = variant_captions(store.root, variant, sources.shards_root, RECAPTIONED_DIR)
    if shards:
        require_captions(captions, shards[0])
    job = TrainJob(
        base_model=base,
        base_version=base_version,
        storage_root=store.root,
        state_parts=(SD_STATE_DIR, *run_dir),
        snapshot_parts=(*SD_DIR, *run_dir),
        data=training_stream(
            train_config,
            base_model=base,
            latents_root=store.root,
            vae_version=corpus.vae_version,
            shards=shards,
            captions=captions,
        ),
        config=train_config,
        mixed_precision=compute.training_precision(),
        num_workers=config.dataloader_workers,
        snapshot_meta={"variant": variant, "seed": seed},
    )
    removed = runs.remove_runs(store, job, config.remove_runs) if config.remove_runs else []
    choice = runs.choose_run(store, job, new_run=config.new_run)
    job = choice.job
    context.log.info(
        f"{variant} seed {seed}: {choice.message}; {processes} process(es) on each of "
        f"{config.nodes} node(s)"
    )
    if on_k8s:
        _train_on_kubernetes(context, job, processes, config.nodes)
    else:
        _train_here(context, job, processes, compute, pipes_subprocess_client)
    run = json.loads(store.read_text(SD_STATE_DIR, *run_dir, "last_run.json"))
    snapshots = json.loads(store.read_text(*SD_DIR, *run_dir, SNAPSHOTS_FILE))

    truths = world.get().read_eval_prompts(sources.eval_prompts_path)[: config.sample_prompts]
    with store.local_dir(*SD_DIR, *run_dir, "final") as local:
        pipe = load_pipeline(local, device=compute.torch_device(), dtype=compute.torch_dtype())
    samples = generate(pipe, [t.prompt for t in truths], [SAMPLE_SEED] * len(truths))
    grid = image_grid(samples, columns=8, cell=64)
    store.write_bytes(grid, "reports", f"sd_{variant}_seed{seed}_samples.png")
    loss_png = line_plot(
        {variant: run["losses"]},
        title=f"fine-tuning loss ({variant}, seed {seed})",
        xlabel="step",
        ylabel="loss",
        smooth=20,
    )
    store.write_bytes(loss_png, "reports", f"sd_{variant}_seed{seed}_loss.png")
    final_version = snapshots[-1]["version"]
    return dg.MaterializeResult(
        metadata={
            "dagster/uri": dg.MetadataValue.path(store.uri(*SD_DIR, *run_dir, "final")),
            "variant": variant,
            "seed": seed,
            "version": final_version,
            "training_shards": len(job.data.shards),
            "shards_waiting_for_next_run": len(set(shards) - set(job.data.shards)),
            "run_id": job.fingerprint(),
            "run": choice.action,
            "run_message": choice.message,
            "extended_from_step": run["extended_from_step"],
            "micro_batch_size": run["micro_batch_size"],
            # Kept until asked for (remove_runs): a retry never deletes another run's state.
            "other_runs": typed_table([r.row() for r in choice.others]),
            "removed_runs": dg.MetadataValue.json(removed),
            "training_corpus": corpus.version,
            "steps": train_config.steps,
            "processes": run["processes"],  # over all nodes
            "nodes": run.get("nodes", 1),  # absent from runs before several nodes
            "resumed_from_step": run["resumed_from_step"],
            "train_seconds": run["train_seconds"],
            "first_step_seconds": run["first_step_seconds"],
            "samples_per_second": run["samples_per_second"],
            "final_loss": run["final_loss"],
            # Prompts the tokenizer cut to the text encoder's context (0 when the recaptions'
            # 77-token trimming held): reported, not silent.
            "truncated_prompts": run["truncated_prompts"],
            "snapshots": dg.MetadataValue.json(snapshots),
            "loss_curve": dg.MetadataValue.md(markdown_image(loss_png, "loss")),
            "samples": dg.MetadataValue.md(
                markdown_image(grid, "samples")
                + "\n\n"
                + markdown_table(["#", "prompt"], [[i, t.prompt] for i, t in enumerate(truths)])
            ),
        },
        data_version=dg.DataVersion(final_version),
    )


def _train_here(
    context: dg.AssetExecutionContext,
    job: TrainJob,
    processes: int,
    compute: ComputeResource,
    pipes_subprocess_client: dg.PipesSubprocessClient,
) -> None:
    """torchrun on this machine, one node, through Pipes."""
    with tempfile.TemporaryDirectory(prefix="recap-sd-job-") as tmp:
        job_file = write_job(job, tmp)
        # torchrun would set one thread per process: they share this step's threads.
        pipes_subprocess_client.run(
            context=context,
            command=launch_command(job_file, processes),
            env=compute.launch_env(processes),
        )


def _train_on_kubernetes(
    context: dg.AssetExecutionContext, job: TrainJob, processes: int, nodes: int
) -> None:
    """One pod per node: node 0 through Pipes (its logs carry the trainer's messages), the
    others an indexed Job created beside it and deleted after, whatever the outcome (a
    retry starts a whole new group, which resumes from the last checkpoint)."""
    import kubernetes
    from dagster_k8s import PipesK8sClient

    # One attempt's pods must never meet another's (a retry is a new group with new pods
    # and a new rendezvous id): the run id, then a fresh suffix per attempt.
    group = NodeGroup(
        name=group_name(
            "recap-sd",
            "-".join(run_parts(*variant_and_seed(context))),
            context.run_id[:8],
            uuid.uuid4().hex[:6],
        ),
        namespace=os.environ.get("DAGSTER_K8S_NAMESPACE", "default"),
        image=os.environ["DAGSTER_CURRENT_IMAGE"],
        nodes=nodes,
        gpus=processes,
    )
    # The step pod's service account in a cluster, else a kubeconfig (KUBECONFIG); a
    # client of its own, so no process-wide default configuration is changed.
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
        api = kubernetes.client.ApiClient(configuration)
    except kubernetes.config.ConfigException:
        api = kubernetes.config.new_client_from_config(config_file=os.environ.get("KUBECONFIG"))
    create_group(api, group, job.to_json())
    try:
        meta, spec = node0_pod(group)
        PipesK8sClient().run(
            context=context, namespace=group.namespace, base_pod_meta=meta, base_pod_spec=spec
        )
    finally:
        delete_group(api, group)


MetricReportConfig = config_from_settings(
    evaluation.EvalSettings,
    "MetricReportConfig",
    "How a variant is evaluated (EvalSettings).",
    op="metric_reports",
)


#: What every evaluation asset is: a retried step on a GPU of the pool.
EVALUATION_ASSET = {
    "retry_policy": TRANSIENT_RETRY_POLICY,
    "pool": GPU_POOL,
    "op_tags": gpu_op_tags(),
    "group_name": "evaluation",
    "kinds": {"pytorch", "torchmetrics"},
    "tags": {"recap/gpu": "1"},
}


@dg.asset(
    **EVALUATION_ASSET,
    partitions_def=variant_seed_partitions,
    # FID's reference images are the training corpus' own.
    deps=[sd_checkpoints, eval_prompt_file, training_corpus],
    description="FID and KID, CLIP score (when configured), object accuracy, counting error "
    "and position accuracy (against chance, given found, relative) of one variant's "
    "fine-tune with one training seed on held-out prompts, overall and per category, for "
    "the final checkpoint and every snapshot; every graded image saved as parquet.",
)
@retry_only_transient
def metric_reports(
    context: dg.AssetExecutionContext,
    config: MetricReportConfig,
    models: ModelsResource,
    compute: ComputeResource,
    sources: DataSourcesResource,
    storage: StorageResource,
    world: WorldResource,
) -> dg.MaterializeResult:
    variant, seed = variant_and_seed(context)
    where = {"checkpoint_parts": (*SD_DIR, *run_parts(variant, seed))}
    return _evaluate(
        context, config, models, compute, sources, storage, world, variant, seed, where
    )


@dg.asset(
    **EVALUATION_ASSET,
    deps=[base_t2i_model, eval_prompt_file, training_corpus],
    description="The floor: the base text-to-image model before any fine-tuning, evaluated "
    "as each variant is (the same settings, prompts and noise seeds); the RECAP report's "
    "`base` row, which tells 'RECAP helps' from 'the fine-tune taught nothing'.",
)
@retry_only_transient
def base_metric_report(
    context: dg.AssetExecutionContext,
    config: MetricReportConfig,
    models: ModelsResource,
    compute: ComputeResource,
    sources: DataSourcesResource,
    storage: StorageResource,
    world: WorldResource,
) -> dg.MaterializeResult:
    version = current_data_version(context.instance, base_t2i_model.key)
    if version is None:
        raise ValueError("base_t2i_model has no observed version: observe it first")
    where = {"base_model": (local_model_dir(models.base_t2i), version)}
    return _evaluate(context, config, models, compute, sources, storage, world, FLOOR, 0, where)


def _evaluate(
    context: dg.AssetExecutionContext,
    config: dg.Config,
    models: ModelsResource,
    compute: ComputeResource,
    sources: DataSourcesResource,
    storage: StorageResource,
    world: WorldResource,
    variant: str,
    seed: int,
    where: dict,
) -> dg.MaterializeResult:
    """One model's evaluation (``where``: its checkpoints or the base model) and its
    metadata."""
    store = storage.get()
    the_world = world.get()
    eval_settings = settings_from_config(evaluation.EvalSettings, config)
    prompts = evaluation.read_prompts(
        the_world,
        eval_settings.prompt_set,
        sources.eval_prompts_path,
        sources.validation_prompts_path,
    )
    result = evaluation.evaluate_variant(
        store,
        variant,
        seed,
        **where,
        world=the_world,
        prompts=prompts,
        shards_root=sources.shards_root,
        shards=read_manifest(store).shards,
        device=compute.torch_device(),
        dtype=compute.torch_dtype(),
        settings=eval_settings,
        clip_model=models.clip or None,
        log=context.log.info,
        between_steps=compute.rebalancer(),
    )
    overall = result.report.overall
    return dg.MaterializeResult(
        metadata={
            "dagster/uri": dg.MetadataValue.path(store.uri(*result.report_parts)),
            "graded_rows": dg.MetadataValue.path(store.uri(*result.rows_parts)),
            "world": the_world.name,
            "variant": variant,
            "seed": seed,
            "prompt_set": eval_settings.prompt_set,
            **{k: v for k, v in overall.items() if isinstance(v, float | int)},
            "fid_features": overall["fid_features"],
            "metrics": typed_table(report_core.category_rows(result.report), REPORT_COLUMN_NOTES),
            "per_prompt": typed_table(report_core.prompt_rows(result.report), REPORT_COLUMN_NOTES),
            "samples_by_category": dg.MetadataValue.md(
                "\n\n".join(
                    f"**{c}**\n\n{markdown_image(png, c)}" for c, png in result.grids.items()
                )
            ),
        }
    )


def read_evaluations(store: Storage) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """Every metric report on record (variant -> one per training seed) and its graded rows
    (variant -> rows over its seeds); a seed's rows only where its report exists."""
    reports: dict[str, list[dict]] = {}
    rows: dict[str, list[dict]] = {}
    for variant in (FLOOR, *CAPTION_VARIANTS):
        # The base model has no training seed: its one evaluation is filed under seed 0.
        for seed in [0] if variant == FLOOR else settings.training_seeds():
            if not store.exists(*evaluation.report_parts(variant, seed)):
                continue
            reports.setdefault(variant, []).append(
                json.loads(store.read_text(*evaluation.report_parts(variant, seed)))
            )
            if store.exists(*evaluation.rows_parts(variant, seed)):
                table = store.read_parquet(*evaluation.rows_parts(variant, seed))
                rows.setdefault(variant, []).extend(table.to_pylist())
    return reports, rows


@dg.asset(
    retry_policy=TRANSIENT_RETRY_POLICY,
    # By key: assets/human_eval.py builds on metric_reports from this module.
    deps=[metric_reports, base_metric_report, dg.AssetKey("human_eval_report")],
    group_name="evaluation",
    kinds={"markdown"},
    description="All variants side by side like the paper's Table 1, as means over training "
    "seeds with 95% intervals; each against alttext with paired intervals and a verdict per "
    "metric; position against chance; the human study beside them (or that nothing is "
    "rated yet) and metric-versus-steps curves like its Figure 5.",
)
@retry_only_transient
def recap_report(
    context: dg.AssetExecutionContext, storage: StorageResource, sources: DataSourcesResource
) -> dg.MaterializeResult:
    store = storage.get()
    reports, rows = read_evaluations(store)
    if "alttext" not in reports:
        raise ValueError("recap_report needs the alttext metric report as its baseline")
    human = (
        json.loads(store.read_text(*human_stats.REPORT_PARTS))
        if store.exists(*human_stats.REPORT_PARTS)
        else None
    )
    caption_rows: list[dict] = []
    shards_read = 0
    if store.exists(*MANIFEST_PARTS):  # the training corpus the fine-tunes read
        columns, shards_read = caption_stats.corpus_caption_stats(
            store, read_manifest(store).shards, clip_token_counter(sources.tokenizer_path)
        )
        caption_rows = caption_stats.stats_rows(columns, list(reports))
    built = report_core.build_report(
        reports, rows, human=human, caption_rows=caption_rows, shards_read=shards_read
    )
    store.write_text(built.markdown, "reports", "recap_report.md")
    document = {"table": built.table, "comparison": built.comparisons, "position": built.positions}
    store.write_text(json.dumps(document, indent=2), *REPORT_JSON)
    for name, png in built.figures.items():
        store.write_bytes(png, "reports", name)
    context.log.info("\n" + built.table_markdown)
    return dg.MaterializeResult(
        metadata={
            "dagster/uri": dg.MetadataValue.path(store.uri("reports", "recap_report.md")),
            "table": typed_table(built.rows, REPORT_COLUMN_NOTES),
            "against_alttext": typed_table(built.comparisons, COMPARISON_NOTES),
            "position": typed_table(built.positions, POSITION_NOTES),
            "figures": dg.MetadataValue.md(
                "\n\n".join(markdown_image(png, name) for name, png in built.figures.items())
            ),
            "variants": len(reports),
            "seeds": dg.MetadataValue.json({v: len(r) for v, r in reports.items()}),
            "human_evaluation": dg.MetadataValue.md(built.human_markdown),
            "captions": typed_table(caption_rows, caption_stats.STATS_COLUMNS),
            "captions_shards_read": shards_read,
            "human_ratings": (human or {}).get("ratings", 0),
            **{f"mix_vs_alttext_{k}": v for k, v in built.mix_deltas.items()},
        }
    )


@dg.asset_check(
    asset=recap_report,
    description="recap_mix against alttext on object accuracy, counting error and position "
    "accuracy, paired over seeds and prompts: passes when better on all three, warns when "
    "any is not distinguishable, fails (error) when it is worse on any.",
)
def recap_mix_beats_alttext(storage: StorageResource) -> dg.AssetCheckResult:
    document = json.loads(storage.get().read_text(*REPORT_JSON))
    verdict = report_core.mix_beats_alttext(document["comparison"])
    return dg.AssetCheckResult(
        passed=verdict.passed,
        severity=dg.AssetCheckSeverity.ERROR
        if verdict.severity == "error"
        else dg.AssetCheckSeverity.WARN,
        description=verdict.description,
        metadata=verdict.metadata,
    )
