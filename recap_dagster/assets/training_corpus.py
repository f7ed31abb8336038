"""``training_corpus``: the manifest of shards a fine-tune reads, between the shard groups
and the trainer (see ``t2i/manifest.py`` for why it exists)."""

import dagster as dg
from pydantic import Field

from recap_dagster.assets.captioner import captioner_checkpoint
from recap_dagster.assets.inputs import base_t2i_model
from recap_dagster.assets.latents import LATENTS_GATE, hold_back_failed_groups, t2i_latents
from recap_dagster.assets.recaption import recaptioned_shards
from recap_dagster.captioner.recaption import OUTPUT_DIR as RECAPTIONED_DIR
from recap_dagster.corpus.shard_groups import made_by
from recap_dagster.orchestration.gates import held_groups, held_message
from recap_dagster.orchestration.partitions import shard_group_partitions
from recap_dagster.orchestration.versions import current_data_version, data_versions_by_group
from recap_dagster.resources import DataSourcesResource, ModelsResource, StorageResource
from recap_dagster.t2i import manifest as core
from recap_dagster.t2i.latents import latent_vae_version
from recap_dagster.t2i.model import local_model_dir


class TrainingCorpusConfig(dg.Config):
    exclude_groups: list[str] = Field(
        default=[],
        description="Shard groups to leave out of training on purpose, by key (00100-00199), "
        "e.g. groups whose blocking checks failed. Without this, a group whose blocking check "
        "failed stops training.",
    )


@dg.asset(
    deps=[
        dg.AssetDep(recaptioned_shards, partition_mapping=dg.AllPartitionMapping()),
        dg.AssetDep(t2i_latents, partition_mapping=dg.AllPartitionMapping()),
        # Direct edges: Dagster compares versions across these at any corpus size.
        captioner_checkpoint,
        base_t2i_model,
    ],
    group_name="text_to_image",
    code_version=core.CODE_VERSION,
    kinds={"json"},
    description="Which shards every caption variant trains on: the shard groups recaptioned "
    "by the current captioner and encoded by the current base model's VAE whose blocking "
    "checks passed, less the groups excluded by name. Its version is derived from those "
    "groups' versions, so a new captioner, VAE or base model makes the fine-tunes stale at "
    "any number of groups.",
)
def training_corpus(
    context: dg.AssetExecutionContext,
    config: TrainingCorpusConfig,
    sources: DataSourcesResource,
    storage: StorageResource,
    models: ModelsResource,
) -> dg.MaterializeResult:
    instance = context.instance
    registered = instance.get_dynamic_partitions(shard_group_partitions.name)
    unknown = sorted(set(config.exclude_groups) - set(registered))
    if unknown:
        raise ValueError(f"exclude_groups names unknown shard groups: {unknown[:10]}")
    captioner = current_data_version(instance, captioner_checkpoint.key)
    if captioner is None:
        raise ValueError("training_corpus needs a materialized captioner_checkpoint")
    # The VAE the fine-tunes will read latents of (a quick fingerprint: headers and samples).
    vae = latent_vae_version(local_model_dir(models.base_t2i))

    # Every group's latest data versions, one query per asset; each names its model first.
    recaptions = data_versions_by_group(instance, recaptioned_shards.key)
    latents = data_versions_by_group(instance, t2i_latents.key)
    excluded = set(config.exclude_groups)
    candidates = [group for group in registered if group not in excluded]
    captioned = [group for group in candidates if made_by(recaptions.get(group), captioner)]
    # A group whose recaptions failed a blocking check stops training (its latents were
    # held back too, so it must not pass for merely "pending").
    hold_back_failed_groups(instance, captioned, "training_corpus")
    ready = {
        group: core.GroupVersions(recaptions[group], latents[group])
        for group in captioned
        if made_by(latents.get(group), vae)
    }
    pending = [group for group in candidates if group not in ready]
    held = held_groups(instance, LATENTS_GATE, sorted(ready))
    if held:
        raise dg.Failure(
            description=held_message(
                held,
                what="training_corpus",
                hint="Re-materialize t2i_latents of these groups, or exclude them by name.",
            ),
            allow_retries=False,
        )
    store = storage.get()
    manifest = core.build_manifest(
        store,
        sources.shards_root,
        captioner_version=captioner,
        vae_version=vae,
        groups=ready,
        recaptioned_dir=RECAPTIONED_DIR,
        excluded_groups=sorted(excluded),
        pending_groups=pending,
    )
    uri = core.write_manifest(store, manifest)
    context.log.info(
        f"training corpus {manifest.version}: {len(manifest.groups)} group(s), "
        f"{len(manifest.shards)} shard(s); {len(pending)} group(s) pending, "
        f"{len(excluded)} excluded"
    )
    return dg.MaterializeResult(
        metadata={
            "dagster/uri": dg.MetadataValue.path(uri),
            "groups": len(manifest.groups),
            "shards": len(manifest.shards),
            "pending_groups": len(pending),
            "pending_groups_first": dg.MetadataValue.json(pending[:20]),
            "pending_shards": len(manifest.pending_shards),
            "excluded_groups": dg.MetadataValue.json(sorted(excluded)),
            "captioner_version": captioner,
            "base_model_version": current_data_version(instance, base_t2i_model.key) or "",
            "vae_version": manifest.vae_version,
        },
        data_version=dg.DataVersion(manifest.version),
    )
