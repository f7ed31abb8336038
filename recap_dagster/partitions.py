"""Partitions: one dynamic partition per LAION shard, one static partition per caption variant."""

import dagster as dg

laion_shards_partitions = dg.DynamicPartitionsDefinition(name="laion_shards")

CAPTION_VARIANTS = ("alttext", "recap_short", "recap_long", "recap_mix")
caption_variants_partitions = dg.StaticPartitionsDefinition(list(CAPTION_VARIANTS))
