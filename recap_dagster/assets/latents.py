"""``t2i_latents``: the base model's VAE latents of every shard group, with their check."""

from collections.abc import Iterator

import dagster as dg
from pydantic import Field

from recap_dagster.assets.corpus import laion_shards
from recap_dagster.assets.inputs import base_t2i_model
from recap_dagster.assets.recaption import RECAPTION_GATE, recaptioned_shards
from recap_dagster.assets.run_config import with_run_defaults
from recap_dagster.captioner.recaption import output_parts
from recap_dagster.corpus.decoding import STATUS_OK
from recap_dagster.corpus.shard_groups import group_output_version, group_shards
from recap_dagster.orchestration.gates import held_groups, held_message
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
from recap_dagster.t2i import latents as latent_cache
from recap_dagster.t2i.model import local_model_dir
from recap_dagster.training import devices
from recap_dagster.training.per_device import used_devices

VAE_VERSION_TAG = "recap/vae_version"


class _LatentCacheConfig(dg.Config):
    batch_size: int = Field(default=64, description="Images per VAE forward pass.")
    dtype: str = Field(
        default="float32",
        description="Stored latent dtype: float32, float16 or bfloat16 (half the bytes; at "
        "SD 1.x's 512 px a float32 latent with its std is 128 KB). Training reads float32.",
    )
    num_workers: int = Field(
        default=1,
        description="DataLoader workers per process decoding, resizing and cropping images "
        "while the VAE encodes.",
    )
    processes: int = Field(default=0, description=devices.PROCESSES_DESCRIPTION)
    reuse_existing: bool = Field(
        default=True,
        description="Keep a shard's latents already cached for this VAE (a killed run goes "
        "on where it stopped); off: encode every shard of the group again.",
    )


LatentCacheConfig = with_run_defaults(_LatentCacheConfig, "t2i_latents")


def hold_back_failed_groups(instance: dg.DagsterInstance, groups: list[str], what: str) -> None:
    """Raise, naming check, group and shard, when a blocking check of the groups' recaptions
    failed or has not run on them (Dagster blocks only within the run of the check)."""
    held = held_groups(instance, RECAPTION_GATE, groups)
    if held:
        raise dg.Failure(
            description=held_message(
                held,
                what=what,
                hint="Fix the shards and recaption their groups, or leave the groups out of "
                "training by name (training_corpus' exclude_groups).",
            ),
            metadata={"held_groups": dg.MetadataValue.json([h.line() for h in held[:100]])},
            allow_retries=False,
        )


@dg.asset(
    retry_policy=TRANSIENT_RETRY_POLICY,
    partitions_def=shard_group_partitions,
    # The recaptions come first: their blocking checks decide whether the group is used.
    deps=[laion_shards, recaptioned_shards, base_t2i_model],
    # One run per group in a backfill, like recaptioned_shards (no backfill_policy).
    pool=GPU_POOL,
    op_tags=gpu_op_tags(),
    group_name="text_to_image",
    code_version=latent_cache.CODE_VERSION,
    kinds={"pytorch", "safetensors"},
    tags={"recap/gpu": "1"},
    description="The base model's VAE latents of every decodable image of a shard group, "
    "encoded once at the model's training resolution (resize + center crop), one "
    "safetensors file per shard under t2i_latents/<VAE version>/. Every caption variant "
    "trains from it. Runs only on groups whose recaptions passed their blocking checks.",
)
@retry_only_transient
def t2i_latents(
    context: dg.AssetExecutionContext,
    config: LatentCacheConfig,
    models: ModelsResource,
    compute: ComputeResource,
    sources: DataSourcesResource,
    storage: StorageResource,
) -> dg.MaterializeResult:
    group = context.partition_key
    hold_back_failed_groups(context.instance, [group], f"t2i_latents of {group}")
    store = storage.get()
    shards = group_shards(sources.shards_root, group)
    if not shards:
        raise ValueError(f"shard group {group} has no complete shard under {sources.shards_root}")
    base = local_model_dir(models.base_t2i)
    vae_version = latent_cache.latent_vae_version(base)
    resolution = latent_cache.training_resolution(base)
    on = used_devices(devices.process_devices(compute.torch_device(), config.processes), shards)
    job = latent_cache.LatentJob(
        base_model=base,
        storage_root=store.root,
        shards_root=sources.shards_root,
        batch_size=config.batch_size,
        dtype=config.dtype,
        reuse_existing=config.reuse_existing,
        num_workers=config.num_workers,
    )
    context.log.info(f"{len(shards)} shard(s) on {len(on)} process(es): {', '.join(map(str, on))}")
    stats = latent_cache.cache_group(
        job,
        shards,
        on,
        on_event=lambda e: context.log.info(
            f"latents of shard {e['shard']} ({e['done']}/{e['of']} of process {e['rank']})"
        ),
        cpu=compute.cpu_share(),
    )
    return dg.MaterializeResult(
        metadata={
            "dagster/uri": dg.MetadataValue.path(store.uri(latent_cache.LATENTS_DIR, vae_version)),
            "vae_version": vae_version,
            "resolution": resolution,
            "rows": stats.rows,
            "rows_without_image": stats.skipped,
            "images_per_second": round(stats.images_per_second, 1),
            "bytes_written": stats.bytes_written,
            "shards_written": len(stats.shards_written),
            "shards_kept": dg.MetadataValue.json(stats.shards_kept),
            "processes": len(on),
        },
        data_version=dg.DataVersion(
            group_output_version(vae_version, f"{resolution} {config.dtype}", shards)
        ),
        tags={VAE_VERSION_TAG: vae_version},
    )


def latest_vae_version(instance: dg.DagsterInstance, group: str) -> str:
    """The VAE version the group's latest latents were encoded with."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=t2i_latents.key, asset_partitions=[group]), limit=1
    ).records
    if not records:
        raise ValueError(f"t2i_latents of {group} was never materialized")
    return records[0].asset_materialization.tags[VAE_VERSION_TAG]


@dg.multi_asset_check(
    specs=[
        dg.AssetCheckSpec(
            "latents_match_decodable_images",
            asset=t2i_latents,
            blocking=True,
            partitions_def=shard_group_partitions,
            description="Every shard of the group has one latent per decodable image (the "
            "recaptioned rows with status ok), no more, no fewer.",
        )
    ],
    description="The latent cache's checks, per shard group.",
)
def t2i_latents_checks(
    context: dg.AssetCheckExecutionContext,
    sources: DataSourcesResource,
    storage: StorageResource,
) -> Iterator[dg.AssetCheckResult]:
    group = context.partition_key
    store = storage.get()
    vae_version = latest_vae_version(context.instance, group)
    shards = group_shards(sources.shards_root, group)
    failing = []
    for shard in shards:
        if not latent_cache.has_latent_shard(store, vae_version, shard):
            failing.append(f"{shard}: no latents for VAE {vae_version}")
            continue
        rows = store.read_parquet(*output_parts(shard), columns=["key", "status"]).to_pylist()
        decodable = [row["key"] for row in rows if row["status"] == STATUS_OK]
        ok, text = latent_cache.compare_keys(
            latent_cache.latent_keys(store, vae_version, shard), decodable
        )
        if not ok:
            failing.append(f"{shard}: {text}")
    yield dg.AssetCheckResult(
        check_name="latents_match_decodable_images",
        asset_key=t2i_latents.key,
        passed=not failing,
        severity=dg.AssetCheckSeverity.ERROR,
        description=f"{len(shards)} shard(s) match" if not failing else "; ".join(failing[:10]),
        metadata={"shards_checked": len(shards), "failing": dg.MetadataValue.json(failing[:100])},
    )


LATENTS_GATE = [spec.key for spec in t2i_latents_checks.check_specs if spec.blocking]
