"""``laion_shards``: the raw corpus, one dynamic partition per group of img2dataset shards."""

import dagster as dg

from recap_dagster.corpus.reading import SHARD_COLUMNS
from recap_dagster.orchestration.partitions import shard_group_partitions

laion_shards = dg.AssetSpec(
    key="laion_shards",
    partitions_def=shard_group_partitions,
    group_name="corpus",
    kinds={"webdataset"},
    metadata={
        "dagster/column_schema": dg.TableSchema(
            columns=[
                dg.TableColumn(name, kind, description=text)
                for name, (kind, text) in SHARD_COLUMNS.items()
            ]
        )
    },
    description=(
        "LAION-style image/alt-text shards as img2dataset writes them (NNNNN.tar with "
        "key.jpg/.txt/.json, NNNNN.parquet, NNNNN_stats.json) under the configured source "
        "root. A partition is a group of up to 100 consecutive shards (00100-00199); the "
        "laion_shard_sensor adds them as shards appear."
    ),
)
