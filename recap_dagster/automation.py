"""Sensors, schedules and jobs."""


import dagster as dg

from recap_dagster.discovery import discover_new_shards
from recap_dagster.partitions import laion_shards_partitions
from recap_dagster.resources import DataSourcesResource


@dg.sensor(
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Lists the LAION source root and adds each newly completed shard as a partition.",
)
def laion_shard_sensor(
    context: dg.SensorEvaluationContext, sources: DataSourcesResource
) -> dg.SensorResult | dg.SkipReason:
    new_keys, cursor = discover_new_shards(sources.shards_root, context.cursor)
    if not new_keys:
        return dg.SensorResult(
            skip_reason=f"no new shards under {sources.shards_root}", cursor=cursor
        )
    context.log.info(f"{len(new_keys)} new shard(s): {new_keys[:5]}...")
    return dg.SensorResult(
        dynamic_partitions_requests=[laion_shards_partitions.build_add_request(new_keys)],
        cursor=cursor,
    )
