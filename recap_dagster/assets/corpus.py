"""``laion_shards``: the raw corpus, one dynamic partition per img2dataset shard."""

import dagster as dg

from recap_dagster.partitions import laion_shards_partitions

laion_shards = dg.AssetSpec(
    key="laion_shards",
    partitions_def=laion_shards_partitions,
    group_name="corpus",
    kinds={"webdataset"},
    description=(
        "LAION-style image/alt-text shards as img2dataset writes them (NNNNN.tar with "
        "key.jpg/.txt/.json, NNNNN.parquet, NNNNN_stats.json) under the configured source "
        "root. Partitions are added by the laion_shard_sensor as shards appear."
    ),
)
