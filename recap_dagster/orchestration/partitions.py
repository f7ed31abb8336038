"""Partitions: one dynamic partition per group of LAION shards; one static partition per
caption variant and training seed for the fine-tunes and their evaluations."""

from __future__ import annotations

import dagster as dg

from recap_dagster import settings
from recap_dagster.t2i.training_data import VARIANTS

# Keys are shard groups ("00100-00199", recap_dagster.corpus.shard_groups): LAION-5B's 585,000
# shards make 5,850 partitions, well under the 100,000 Dagster advises per asset.
shard_group_partitions = dg.DynamicPartitionsDefinition(name="laion_shard_groups")

# alttext, the three RECAP variants and the oracle (true descriptions: the ceiling).
CAPTION_VARIANTS = VARIANTS
caption_variants_partitions = dg.StaticPartitionsDefinition(list(CAPTION_VARIANTS))

# One training run is one draw of the training noise: a comparison needs several per
# variant. Keys are "<seed>|<variant>" (Dagster orders the dimensions by name).
VARIANT, SEED = "variant", "seed"
variant_seed_partitions = dg.MultiPartitionsDefinition(
    {
        VARIANT: caption_variants_partitions,
        SEED: dg.StaticPartitionsDefinition([str(s) for s in settings.training_seeds()]),
    }
)


def variant_seed_key(variant: str, seed: int) -> dg.MultiPartitionKey:
    """The partition of ``variant``'s fine-tune with training seed ``seed``."""
    return dg.MultiPartitionKey({VARIANT: variant, SEED: str(seed)})


def variant_and_seed(context: dg.AssetExecutionContext) -> tuple[str, int]:
    """The (variant, training seed) of a run of one variant-and-seed partition."""
    key = context.partition_key
    if not isinstance(key, dg.MultiPartitionKey):  # a plain "<seed>|<variant>" string
        key = variant_seed_partitions.get_partition_key_from_str(key)
    keys = key.keys_by_dimension
    return keys[VARIANT], int(keys[SEED])
