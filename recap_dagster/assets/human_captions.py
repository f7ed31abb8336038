"""``human_captions``: the ~100 human-captioned images RECAP fine-tunes the captioner on."""

import dagster as dg

from recap_dagster.assets.inputs import caption_tokenizer, human_caption_file
from recap_dagster.assets.metadata import column_schema, sample_table, table_fingerprint
from recap_dagster.corpus import human_captions as core
from recap_dagster.orchestration.retries import TRANSIENT_RETRY_POLICY, retry_only_transient
from recap_dagster.resources import DataSourcesResource, StorageResource

OUTPUT_PARTS = ("human_captions", "human_captions.parquet")


@dg.asset(
    retry_policy=TRANSIENT_RETRY_POLICY,
    deps=[human_caption_file, caption_tokenizer],
    group_name="captioner",
    metadata={"dagster/column_schema": column_schema(core.SCHEMA, core.COLUMN_DESCRIPTIONS)},
    kinds={"parquet"},
    description="Human SHORT and LONG captions with their images, validated and stored as parquet.",
)
@retry_only_transient
def human_captions(
    context: dg.AssetExecutionContext, sources: DataSourcesResource, storage: StorageResource
) -> dg.MaterializeResult:
    table = core.load_human_captions(sources.human_captions_path)
    uri = storage.get().write_parquet(table, *OUTPUT_PARTS)
    context.log.info(f"wrote {table.num_rows} human captions to {uri}")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": table.num_rows,
            "dagster/column_schema": column_schema(table.schema, core.COLUMN_DESCRIPTIONS),
            "dagster/uri": dg.MetadataValue.path(uri),
            "source": dg.MetadataValue.path(sources.human_captions_path),
            "sample": sample_table(table, ["key", "short", "long"]),
        },
        data_version=dg.DataVersion(table_fingerprint(table)),
    )


def _stored(storage: StorageResource):
    return storage.get().read_parquet(*OUTPUT_PARTS)


def _check_result(result: core.ValidationResult) -> dg.AssetCheckResult:
    metadata = dict(result.metadata)
    if result.failing_keys:
        metadata["failing_keys"] = dg.MetadataValue.json(result.failing_keys[:100])
        metadata["failing_count"] = len(result.failing_keys)
    return dg.AssetCheckResult(
        passed=result.passed,
        description=result.description,
        metadata=metadata,
        severity=dg.AssetCheckSeverity.ERROR,
    )


@dg.asset_check(asset=human_captions, blocking=True, description="Every image decodes.")
def human_captions_images_decode(
    sources: DataSourcesResource, storage: StorageResource
) -> dg.AssetCheckResult:
    return _check_result(core.check_images_decode(_stored(storage), sources.max_image_pixels))


@dg.asset_check(
    asset=human_captions, blocking=True, description="Every row has a short and a long caption."
)
def human_captions_present(storage: StorageResource) -> dg.AssetCheckResult:
    return _check_result(core.check_captions_present(_stored(storage)))


@dg.asset_check(
    asset=human_captions,
    blocking=True,
    description="Long captions fit CLIP's 77-token context (configured tokenizer).",
)
def human_captions_long_within_77_tokens(
    sources: DataSourcesResource, storage: StorageResource
) -> dg.AssetCheckResult:
    counter = core.clip_token_counter(sources.tokenizer_path)
    return _check_result(core.check_long_caption_tokens(_stored(storage), counter))


@dg.asset_check(asset=human_captions, blocking=True, description="No duplicate keys.")
def human_captions_unique_keys(storage: StorageResource) -> dg.AssetCheckResult:
    return _check_result(core.check_unique_keys(_stored(storage)))


@dg.asset_check(
    asset=human_captions,
    blocking=True,
    description="At least the configured number of rows (DataSourcesResource.min_human_captions).",
)
def human_captions_min_rows(
    sources: DataSourcesResource, storage: StorageResource
) -> dg.AssetCheckResult:
    table = storage.get().read_parquet(*OUTPUT_PARTS, columns=["key"])
    return _check_result(core.check_min_rows(table, sources.min_human_captions))


human_captions_checks = [
    human_captions_images_decode,
    human_captions_present,
    human_captions_long_within_77_tokens,
    human_captions_unique_keys,
    human_captions_min_rows,
]
