"""``recaptioned_shards``: RECAP step 2, every LAION shard recaptioned in both styles."""

import hashlib
import json
from collections.abc import Iterator

import dagster as dg
from pydantic import Field

from recap_dagster.assets.agreement import agreement_metadata
from recap_dagster.assets.captioner import (
    CHECKPOINT_PARTS,
    captioner_checkpoint,
    read_checkpoint_version,
)
from recap_dagster.assets.corpus import laion_shards
from recap_dagster.assets.inputs import caption_tokenizer
from recap_dagster.assets.metadata import column_schema, sample_table
from recap_dagster.assets.run_config import with_run_defaults
from recap_dagster.captioner import recaption as core
from recap_dagster.captioner.caption_facts import CaptionCheckThresholds
from recap_dagster.captioner.recaption import output_parts
from recap_dagster.corpus.human_captions import clip_token_counter
from recap_dagster.corpus.reading import count_rows
from recap_dagster.corpus.shard_groups import (
    group_output_version,
    group_shards,
    shards_of_groups,
)
from recap_dagster.evaluation.agreement import (
    DEFAULT_SAMPLE_ROWS,
    judge_clip_vs_alt_text,
    read_shard_agreement,
)
from recap_dagster.evaluation.plots import markdown_table
from recap_dagster.orchestration.k8s_gpu import gpu_op_tags
from recap_dagster.orchestration.partitions import shard_group_partitions
from recap_dagster.orchestration.pool_watchdog import GPU_POOL
from recap_dagster.orchestration.retries import TRANSIENT_RETRY_POLICY, retry_only_transient
from recap_dagster.resources import (
    ComputeResource,
    DataSourcesResource,
    ModelsResource,
    StorageResource,
)
from recap_dagster.storage.root import Storage
from recap_dagster.training import devices
from recap_dagster.training.per_device import used_devices


class _RecaptionConfig(dg.Config):
    batch_size: int = Field(
        default=64, description="Images per generate() call (speed only: not recorded)."
    )
    num_workers: int = Field(
        default=1,
        description="DataLoader workers decoding images while the model generates (speed only).",
    )
    max_new_tokens_short: int = Field(
        default=32, description="Short caption length limit in tokens (a runaway stops here)."
    )
    max_new_tokens_long: int = Field(
        default=77, description="Long caption length limit in tokens (CLIP's context)."
    )
    num_beams: int = Field(default=1, description="Beam search width (1 = greedy).")
    no_repeat_ngram_size: int = Field(
        default=core.DEFAULT_NO_REPEAT_NGRAM_SIZE,
        description="Repetition guard: no token n-gram of this size appears twice in a caption "
        "(stops loops such as 'a hat on top of a hat ...'); 0 turns it off.",
    )
    repetition_penalty: float = Field(
        default=1.0, description="generate()'s repetition_penalty (1.0 = none)."
    )
    processes: int = Field(default=0, description=devices.PROCESSES_DESCRIPTION)
    clip_sample_rows: int = Field(
        default=DEFAULT_SAMPLE_ROWS,
        description="Rows of each shard scored for image-text agreement with the CLIP model "
        "of models.clip (alt text, short and long caption against the image); 0 = none.",
    )
    examples_per_band: int = Field(
        default=3,
        description="Scored images shown in the 'examples' metadata from each of the best, "
        "median and worst of the group by the recaptions' CLIP score.",
    )
    reuse_finished_shards: bool = Field(
        default=True,
        description="Keep a shard's output when this captioner checkpoint already wrote it with "
        "the same generation record: dtype, prompts, merged generation config (a run resumed "
        "after a kill goes on where it stopped); "
        "false recaptions every shard of the run.",
    )


RecaptionConfig = with_run_defaults(_RecaptionConfig, "recaptioned_shards")


@dg.asset(
    retry_policy=TRANSIENT_RETRY_POLICY,
    partitions_def=shard_group_partitions,
    deps=[laion_shards, captioner_checkpoint, caption_tokenizer],
    pool=GPU_POOL,
    op_tags=gpu_op_tags(),
    # A partition is a group of up to 100 shards: one run, one model load per group. No
    # backfill_policy: without one a backfill runs each group alone, tagged with its
    # partition (a policy's single-partition "range" runs record the partitioned checks'
    # results without their group in Dagster 1.13, which the gate would then not find).
    group_name="recaption",
    code_version=core.CODE_VERSION,
    metadata={"dagster/column_schema": column_schema(core.SCHEMA, core.COLUMN_DESCRIPTIONS)},
    kinds={"pytorch", "parquet"},
    tags={"recap/gpu": "1"},
    description="One parquet file per LAION shard with RECAP short and long captions beside "
    "the alt text. A partition is a group of up to 100 shards, recaptioned in one run with "
    "one model load; shards this captioner already wrote with the same generation record "
    "(dtype, prompts, merged generation config) are kept.",
)
@retry_only_transient
def recaptioned_shards(
    context: dg.AssetExecutionContext,
    config: RecaptionConfig,
    compute: ComputeResource,
    sources: DataSourcesResource,
    storage: StorageResource,
    models: ModelsResource,
) -> dg.MaterializeResult:
    store = storage.get()
    settings = core.GenerationSettings(
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        max_new_tokens_short=config.max_new_tokens_short,
        max_new_tokens_long=config.max_new_tokens_long,
        num_beams=config.num_beams,
        no_repeat_ngram_size=config.no_repeat_ngram_size,
        repetition_penalty=config.repetition_penalty,
    )
    shards = shards_of_groups(sources.shards_root, context.partition_keys)
    on = used_devices(devices.process_devices(compute.torch_device(), config.processes), shards)
    with store.local_dir(*CHECKPOINT_PARTS) as checkpoint:
        version = read_checkpoint_version(checkpoint)
        job = core.RecaptionJob(
            checkpoint=checkpoint,
            captioner_version=version,
            shards_root=sources.shards_root,
            storage_root=store.root,
            settings=settings,
            tokenizer_path=sources.tokenizer_path,
            dtype=compute.torch_dtype(),
            max_pixels=sources.max_image_pixels,
            reuse_finished_shards=config.reuse_finished_shards,
        )
        context.log.info(
            f"captioner {version}: {len(shards)} shard(s) of "
            f"{', '.join(context.partition_keys)} on {len(on)} process(es) "
            f"({', '.join(str(d) for d in on)}), one model load each"
        )
        result = core.recaption_group(
            job,
            shards,
            on,
            on_event=lambda event: context.log.info(_progress_line(event)),
            cpu=compute.cpu_share(),
        )
    total, captioned = result.total, result.captioned
    generation = result.generation
    record = json.loads(generation)
    per_shard = [
        [line["shard"], line["rows"], line["not_delivered"], line["undecodable"]]
        + [line["images_per_second"], line["rank"], line["uri"]]
        for line in result.per_shard
    ]
    metadata = {
        "dagster/row_count": total.rows,
        "dagster/column_schema": column_schema(core.SCHEMA, core.COLUMN_DESCRIPTIONS),
        "shards": len(shards),
        "shards_kept": dg.MetadataValue.json(result.kept),
        "processes": len(on),
        "delivered": total.delivered,
        "not_delivered": total.not_delivered,
        "not_delivered_by_status": dg.MetadataValue.json(total.not_delivered_by_status),
        "undecodable": total.undecodable,
        "undecodable_by_status": dg.MetadataValue.json(total.undecodable_by_status),
        "failure_fraction": round(total.failure_fraction, 5),
        "images_per_second": round(captioned.images_per_second, 2),
        "captioner_version": version,
        "generation": dg.MetadataValue.json(record),
        "speed_settings": dg.MetadataValue.json(
            {"batch_size": settings.batch_size, "num_workers": settings.num_workers}
        ),
        "dtype": record["dtype"],
        **total.length_summary(),
        **total.facts_summary(),
        "per_shard": dg.MetadataValue.md(
            markdown_table(
                ["shard", "rows", "not delivered", "undecodable", "images/s", "process", "uri"],
                per_shard,
            )
        ),
    }
    if result.sample is not None:
        metadata["sample"] = sample_table(
            result.sample, ["key", "alt_text", "recap_short", "recap_long"]
        )
    # Scored after the group is written: a CLIP failure costs the scores, not the captions.
    metadata |= agreement_metadata(
        store,
        sources.shards_root,
        shards,
        models.clip,
        fingerprint=f"{version}|{hashlib.sha256(generation.encode()).hexdigest()[:16]}",
        sample_rows=config.clip_sample_rows,
        examples_per_band=config.examples_per_band,
        device=compute.torch_device(),
        max_pixels=sources.max_image_pixels,
    )
    return dg.MaterializeResult(
        metadata=metadata,
        data_version=dg.DataVersion(group_output_version(version, generation, shards)),
    )


def _progress_line(event: dict) -> str:
    """A process's event as a log line: its start, or a shard written or kept."""
    if "shard" not in event:
        return f"process {event['rank']} on {event['device']}: {event['shards']} shard(s)"
    speed = event["images_per_second"]
    if speed == "kept":
        return f"shard {event['shard']}: kept, this captioner already wrote {event['uri']}"
    return (
        f"shard {event['shard']}: {event['rows']} rows, {event['not_delivered']} not delivered "
        f"by img2dataset, {event['undecodable']} undecodable, {speed} images/s "
        f"(process {event['rank']}) -> {event['uri']}"
    )


_LIMITS = CaptionCheckThresholds()


class _RecaptionCheckConfig(dg.Config):
    max_failure_fraction: float = Field(
        default=0.05,
        description="Blocking: at most this fraction of a shard's delivered images may fail to "
        "decode. Rows img2dataset did not deliver (dead URLs, 10-50% of real LAION) don't count.",
    )
    max_cap_hit_rate: float = Field(
        default=_LIMITS.max_cap_hit_rate,
        description="Warning: at most this fraction of a shard's captions, in either style, may "
        "hit max_new_tokens instead of ending on their own (runaways, captions cut mid-thought).",
    )
    max_repetition: float = Field(
        default=_LIMITS.max_repetition,
        description="A caption is degenerate when more than this fraction of its word 2- or "
        "3-grams repeat an earlier one (miniworld human captions: at most 0.25; a loop: near 1).",
    )
    max_degenerate_rate: float = Field(
        default=_LIMITS.max_degenerate_rate,
        description="Blocking: at most this fraction of a shard's captions, in either style, may "
        "be degenerate (see max_repetition).",
    )
    min_unique_ratio: float = Field(
        default=_LIMITS.min_unique_ratio,
        description="Warning: at least this fraction of a shard's captions, per style, must be "
        "distinct (case and punctuation aside): fewer means one caption for many images.",
    )
    max_same_short_long_rate: float = Field(
        default=_LIMITS.max_same_short_long_rate,
        description="Blocking: at most this fraction of a shard's rows may have a long caption "
        "equal to the short one or a word prefix of it: the styles collapsed.",
    )
    max_short_begins_long_rate: float = Field(
        default=_LIMITS.max_short_begins_long_rate,
        description="Blocking: at most this fraction of a shard's rows may have a long caption "
        "that continues the short one word for word (the default miniworld captioner: 9%; its "
        "human captions: 0%): beyond it the long style is the short one with a tail.",
    )
    max_style_leakage_rate: float = Field(
        default=_LIMITS.max_style_leakage_rate,
        description="Warning: at most this fraction of a shard's short captions may read as "
        "long ones: more than one sentence, or at least as many CLIP tokens as the shard's "
        "median long caption.",
    )

    max_clip_deficit: float = Field(
        default=0.0,
        description="Warning: each RECAP style's mean CLIP score over the group's scored sample "
        "(models.clip) may fall at most this many points below the alt text's.",
    )

    def thresholds(self) -> CaptionCheckThresholds:
        """The caption-fact thresholds as the core takes them."""
        return CaptionCheckThresholds(
            max_cap_hit_rate=self.max_cap_hit_rate,
            max_repetition=self.max_repetition,
            max_degenerate_rate=self.max_degenerate_rate,
            min_unique_ratio=self.min_unique_ratio,
            max_same_short_long_rate=self.max_same_short_long_rate,
            max_short_begins_long_rate=self.max_short_begins_long_rate,
            max_style_leakage_rate=self.max_style_leakage_rate,
        )


RecaptionCheckConfig = with_run_defaults(_RecaptionCheckConfig, "recaptioned_shards_checks")

# name -> (what it judges in validate_recaptions, blocking, description)
CHECKS = {
    "recaptioned_schema_and_rows": (
        ("schema", "row_count"),
        True,
        "Every shard has the full schema and one row per source row.",
    ),
    "recaptioned_no_empty_captions": (
        ("no_empty_captions",),
        True,
        "No decoded image has an empty short or long caption.",
    ),
    "recaptioned_failure_fraction": (
        ("failure_fraction",),
        True,
        "Fraction of delivered images that failed to decode stays under the threshold "
        "(rows img2dataset did not deliver are counted apart).",
    ),
    "recaptioned_long_within_77_tokens": (
        ("long_within_77_tokens",),
        False,
        "Long captions fit CLIP's 77-token context (warning only).",
    ),
    "recaptioned_degeneration": (
        ("degeneration_rate",),
        True,
        "Few captions are degenerate: more of their word 2/3-grams repeat than max_repetition.",
    ),
    "recaptioned_short_differs_from_long": (
        ("short_differs_from_long",),
        True,
        "Short and long captions differ: few rows where the long one equals or begins the short "
        "one, and not most where it only continues it.",
    ),
    "recaptioned_cap_hit_rate": (
        ("cap_hit_rate",),
        False,
        "Few captions hit max_new_tokens instead of ending on their own (warning only).",
    ),
    "recaptioned_unique_captions": (
        ("unique_captions",),
        False,
        "Most captions of a shard are distinct, per style (warning only).",
    ),
    "recaptioned_style_leakage": (
        ("style_leakage",),
        False,
        "Few short captions read as long ones: several sentences, or as many CLIP tokens as "
        "the shard's median long caption (warning only).",
    ),
    "recaptioned_clip_vs_alt_text": (
        (),
        False,
        "The recaptions agree with their images at least as well as the alt text: each style's "
        "mean CLIP score over the group's scored sample (models.clip) is not below the alt "
        "text's by more than max_clip_deficit (warning only: CLIP scores favour short texts).",
    ),
}


@dg.multi_asset_check(
    specs=[
        dg.AssetCheckSpec(
            name,
            asset=recaptioned_shards,
            blocking=blocking,
            description=text,
            # One result per shard group: the UI shows each group's verdict, and the gate
            # (orchestration/gates.py) holds back exactly the groups that failed.
            partitions_def=shard_group_partitions,
        )
        for name, (_, blocking, text) in CHECKS.items()
    ],
    description="The recaptioned shards' checks, per shard group; each shard is read once for "
    "all of them. Blocking ones hold the group back from the latent cache and training.",
)
def recaptioned_shards_checks(
    context: dg.AssetCheckExecutionContext,
    config: RecaptionCheckConfig,
    storage: StorageResource,
    sources: DataSourcesResource,
    models: ModelsResource,
) -> Iterator[dg.AssetCheckResult]:
    store = storage.get()
    counter = clip_token_counter(sources.tokenizer_path)
    shards = group_shards(sources.shards_root, context.partition_key)
    failing: dict[str, list[str]] = {name: [] for name in CHECKS}
    for shard in shards:
        if not store.exists(*output_parts(shard)):
            for name in CHECKS:
                failing[name].append(f"{shard}: {store.uri(*output_parts(shard))} is missing")
            continue
        results = core.validate_recaptions(
            store.read_parquet(*output_parts(shard)),
            count_rows(sources.shards_root, shard),
            counter,
            config.max_failure_fraction,
            config.thresholds(),
        )
        for name, (judged, _, _) in CHECKS.items():
            failing[name] += [
                f"{shard}: {desc}"
                for key, (ok, desc) in results.items()
                if key in judged and not ok
            ]
    clip_failing, clip_found = _clip_vs_alt_text(
        store, shards, models.clip, config.max_clip_deficit
    )
    failing["recaptioned_clip_vs_alt_text"] += clip_failing
    for name, (_, blocking, _) in CHECKS.items():
        found = failing[name]
        yield dg.AssetCheckResult(
            check_name=name,
            asset_key=recaptioned_shards.key,
            passed=not found,
            severity=dg.AssetCheckSeverity.ERROR if blocking else dg.AssetCheckSeverity.WARN,
            description=(
                "; ".join(found[:10])
                if found
                else clip_found
                if name == "recaptioned_clip_vs_alt_text"
                else f"{len(shards)} shard(s) pass"
            ),
            metadata={"shards_checked": len(shards), "failing": dg.MetadataValue.json(found[:100])},
        )


def _clip_vs_alt_text(
    store: Storage, shards: list[str], clip: str, deficit: float
) -> tuple[list[str], str]:
    """The CLIP check on the group's stored scores: what fails it, and what it found."""
    if not clip:
        return [], "not judged: no CLIP model configured (models.clip)"
    stored = {shard: read_shard_agreement(store, shard) for shard in shards}
    missing = [f"{shard}: no CLIP scores" for shard, found in stored.items() if found is None]
    ok, description = judge_clip_vs_alt_text([s[0] for s in stored.values() if s], deficit)
    return missing + ([] if ok else [description]), description


#: The checks whose failure holds a group back from the latent cache and training.
RECAPTION_GATE = [spec.key for spec in recaptioned_shards_checks.check_specs if spec.blocking]
