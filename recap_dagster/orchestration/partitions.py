"""Partitions: one dynamic partition per group of LAION shards, one static partition per
caption variant."""

import dagster as dg

# Keys are shard groups ("00100-00199", recap_dagster.corpus.shard_groups): LAION-5B's 585,000
# shards make 5,850 partitions, well under the 100,000 Dagster advises per asset.
shard_group_partitions = dg.DynamicPartitionsDefinition(name="laion_shard_groups")

CAPTION_VARIANTS = ("alttext", "recap_short", "recap_long", "recap_mix")
caption_variants_partitions = dg.StaticPartitionsDefinition(list(CAPTION_VARIANTS))
