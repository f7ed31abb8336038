"""``recaptioned_shards``: RECAP step 2, every LAION shard recaptioned in both styles."""

import dagster as dg
from pydantic import Field

from recap_dagster import recaption as core
from recap_dagster.assets.captioner import (
    CHECKPOINT_PARTS,
    captioner_checkpoint,
    read_checkpoint_version,
)
from recap_dagster.assets.corpus import laion_shards
from recap_dagster.assets.metadata import column_schema, sample_table
from recap_dagster.captioner import Captioner
from recap_dagster.human_captions import clip_token_counter
from recap_dagster.partitions import laion_shards_partitions
from recap_dagster.plots import markdown_table
from recap_dagster.resources import ComputeResource, DataSourcesResource, StorageResource
from recap_dagster.retries import TRANSIENT_RETRY_POLICY, retry_only_transient
from recap_dagster.shards import count_rows
from recap_dagster.storage import Storage

OUTPUT_DIR = "recaptioned"
SHARDS_PER_RUN = 8


def output_parts(shard: str) -> tuple[str, str]:
    return (OUTPUT_DIR, f"{shard}.parquet")


class RecaptionConfig(dg.Config):
    batch_size: int = Field(default=64, description="Images per generate() call.")
    max_new_tokens: int = Field(default=77, description="Caption length limit in tokens.")
    num_beams: int = Field(default=1, description="Beam search width (1 = greedy).")
    num_workers: int = Field(
        default=1, description="DataLoader workers decoding images while the model generates."
    )


@dg.asset(
    retry_policy=TRANSIENT_RETRY_POLICY,
    partitions_def=laion_shards_partitions,
    deps=[laion_shards, captioner_checkpoint],
    pool="gpu",
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=SHARDS_PER_RUN),
    group_name="recaption",
    kinds={"pytorch", "parquet"},
    tags={"recap/gpu": "1"},
    description="One parquet file per LAION shard with RECAP short and long captions beside "
    "the alt text. Backfills run several shards per run and load the captioner once per run.",
)
@retry_only_transient
def recaptioned_shards(
    context: dg.AssetExecutionContext,
    config: RecaptionConfig,
    compute: ComputeResource,
    sources: DataSourcesResource,
    storage: StorageResource,
) -> dg.MaterializeResult:
    store = storage.get()
    settings = core.GenerationSettings(
        batch_size=config.batch_size,
        max_new_tokens=config.max_new_tokens,
        num_beams=config.num_beams,
        num_workers=config.num_workers,
    )
    shards = list(context.partition_keys)
    total = core.RecaptionStats()
    per_shard = []
    last_table = None
    with store.local_dir(*CHECKPOINT_PARTS) as checkpoint:
        version = read_checkpoint_version(checkpoint)
        captioner = Captioner.from_pretrained(
            checkpoint, device=compute.torch_device(), dtype=compute.torch_dtype()
        )
        context.log.info(f"captioner {version} loaded once for {len(shards)} shard(s)")
        for shard in shards:
            table, stats = core.recaption_shard(
                captioner,
                sources.shards_root,
                shard,
                captioner_version=version,
                settings=settings,
                max_pixels=sources.max_image_pixels,
            )
            uri = store.write_parquet(table, *output_parts(shard))
            context.log.info(
                f"shard {shard}: {stats.rows} rows, {stats.failed} failed, "
                f"{stats.images_per_second:.1f} images/s -> {uri}"
            )
            total.merge(stats)
            last_table = table
            per_shard.append(
                [shard, stats.rows, stats.failed, round(stats.images_per_second, 1), uri]
            )
    metadata = {
        "dagster/row_count": total.rows,
        "dagster/column_schema": column_schema(core.SCHEMA, core.COLUMN_DESCRIPTIONS),
        "shards": len(shards),
        "failures": total.failed,
        "failure_fraction": round(total.failure_fraction, 5),
        "failures_by_status": dg.MetadataValue.json(total.failures_by_status),
        "images_per_second": round(total.images_per_second, 2),
        "captioner_version": version,
        "generation": dg.MetadataValue.json(settings.__dict__),
        **total.length_summary(),
        "per_shard": dg.MetadataValue.md(
            markdown_table(["shard", "rows", "failed", "images/s", "uri"], per_shard)
        ),
    }
    if last_table is not None:
        metadata["sample"] = sample_table(
            last_table, ["key", "alt_text", "recap_short", "recap_long"]
        )
    return dg.MaterializeResult(metadata=metadata)


class RecaptionCheckConfig(dg.Config):
    max_failure_fraction: float = Field(
        default=0.05, description="Blocking: at most this fraction of rows may fail to decode."
    )


def _checked_shards(context: dg.AssetCheckExecutionContext, store: Storage) -> list[str]:
    """The shards of this run, or every recaptioned shard when run on its own (e.g. in CI)."""
    if context.has_partition_key or context.has_partition_key_range:
        return list(context.partition_keys)
    registered = context.instance.get_dynamic_partitions(laion_shards_partitions.name)
    return [s for s in registered if store.exists(*output_parts(s))]


def _evaluate(
    context: dg.AssetCheckExecutionContext,
    storage: StorageResource,
    sources: DataSourcesResource,
    with_tokens: bool = False,
) -> tuple[list[str], dict[str, dict[str, tuple[bool, str]]], dict[str, tuple[int, int]]]:
    store = storage.get()
    counter = clip_token_counter(sources.tokenizer_path) if with_tokens else None
    shards = _checked_shards(context, store)
    results, failures = {}, {}
    for shard in shards:
        if not store.exists(*output_parts(shard)):
            results[shard] = {"exists": (False, f"{store.uri(*output_parts(shard))} is missing")}
            continue
        table = store.read_parquet(*output_parts(shard))
        expected = count_rows(sources.shards_root, shard)
        results[shard] = core.validate_recaptions(table, expected, counter)
        failed = sum(s != "ok" for s in table.column("status").to_pylist())
        failures[shard] = (failed, table.num_rows)
    return shards, results, failures


def _summarise(
    shards: list[str], results: dict, names: tuple[str, ...], severity: dg.AssetCheckSeverity
) -> dg.AssetCheckResult:
    failing = [
        f"{shard}: {desc}"
        for shard in shards
        for name, (passed, desc) in results[shard].items()
        if (name in names or name == "exists") and not passed
    ]
    return dg.AssetCheckResult(
        passed=not failing,
        severity=severity,
        description=(f"{len(shards)} shard(s) pass" if not failing else "; ".join(failing[:10])),
        metadata={"shards_checked": len(shards), "failing": dg.MetadataValue.json(failing[:100])},
    )


@dg.asset_check(
    asset=recaptioned_shards,
    blocking=True,
    description="Every shard has the full schema and one row per source row.",
)
def recaptioned_schema_and_rows(
    context: dg.AssetCheckExecutionContext,
    storage: StorageResource,
    sources: DataSourcesResource,
) -> dg.AssetCheckResult:
    shards, results, _ = _evaluate(context, storage, sources)
    return _summarise(shards, results, ("schema", "row_count"), dg.AssetCheckSeverity.ERROR)


@dg.asset_check(
    asset=recaptioned_shards,
    blocking=True,
    description="No decoded image has an empty short or long caption.",
)
def recaptioned_no_empty_captions(
    context: dg.AssetCheckExecutionContext,
    storage: StorageResource,
    sources: DataSourcesResource,
) -> dg.AssetCheckResult:
    shards, results, _ = _evaluate(context, storage, sources)
    return _summarise(shards, results, ("no_empty_captions",), dg.AssetCheckSeverity.ERROR)


@dg.asset_check(
    asset=recaptioned_shards,
    blocking=True,
    description="Fraction of rows whose image failed to decode stays under the threshold.",
)
def recaptioned_failure_fraction(
    context: dg.AssetCheckExecutionContext,
    config: RecaptionCheckConfig,
    storage: StorageResource,
    sources: DataSourcesResource,
) -> dg.AssetCheckResult:
    shards, results, failures = _evaluate(context, storage, sources)
    failed = sum(f for f, _ in failures.values())
    rows = sum(n for _, n in failures.values())
    fraction = failed / rows if rows else 0.0
    over = [s for s, (f, n) in failures.items() if n and f / n > config.max_failure_fraction]
    missing = [s for s in shards if s not in failures]
    return dg.AssetCheckResult(
        passed=not over and not missing,
        severity=dg.AssetCheckSeverity.ERROR,
        description=f"{failed} of {rows} rows failed ({fraction:.2%}); limit "
        f"{config.max_failure_fraction:.2%} per shard"
        + (f"; over the limit: {over[:10]}" if over else "")
        + (f"; missing: {missing[:10]}" if missing else ""),
        metadata={"failed_rows": failed, "rows": rows, "failure_fraction": fraction},
    )


@dg.asset_check(
    asset=recaptioned_shards,
    description="Long captions fit CLIP's 77-token context (warning only).",
)
def recaptioned_long_within_77_tokens(
    context: dg.AssetCheckExecutionContext,
    storage: StorageResource,
    sources: DataSourcesResource,
) -> dg.AssetCheckResult:
    shards, results, _ = _evaluate(context, storage, sources, with_tokens=True)
    return _summarise(shards, results, ("long_within_77_tokens",), dg.AssetCheckSeverity.WARN)


recaptioned_shards_checks = [
    recaptioned_schema_and_rows,
    recaptioned_no_empty_captions,
    recaptioned_failure_fraction,
    recaptioned_long_within_77_tokens,
]
