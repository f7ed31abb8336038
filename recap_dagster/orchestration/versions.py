"""What the instance knows of data versions: an asset's current one, and every shard
group's latest (one query for all groups)."""

from __future__ import annotations

import dagster as dg

DATA_VERSION_TAG = "dagster/data_version"
INPUT_VERSION_TAG = "dagster/input_data_version/{}"


def input_version_tag(key: dg.AssetKey) -> str:
    """The tag in which a materialization records the data version of input ``key``."""
    return INPUT_VERSION_TAG.format(key.to_user_string())


def current_data_version(instance: dg.DagsterInstance, key: dg.AssetKey) -> str | None:
    """The data version of ``key``'s latest materialization or observation (None: none)."""
    record = instance.get_latest_data_version_record(key)
    if record is None:
        return None
    event = record.asset_materialization or record.event_log_entry.asset_observation
    return event.tags.get(DATA_VERSION_TAG) if event is not None else None


def data_versions_by_group(instance: dg.DagsterInstance, key: dg.AssetKey) -> dict[str, str]:
    """group -> the data version of its latest materialization, for every materialized
    group, in one query (Dagster indexes only this tag by partition)."""
    by_partition = instance.event_log_storage.get_latest_tags_by_partition(
        key, dg.DagsterEventType.ASSET_MATERIALIZATION, [DATA_VERSION_TAG]
    )
    return {group: tags[DATA_VERSION_TAG] for group, tags in by_partition.items()}
