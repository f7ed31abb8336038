"""laion_shard_sensor: discovers complete shards on local disk and on a real S3 server."""

from __future__ import annotations

import io
from pathlib import Path

import dagster as dg
import pytest
from PIL import Image

from recap_dagster.corpus.discovery import DiscoveryCursor, discover_new_shards
from recap_dagster.miniworld.shard_writer import ShardRecord, write_shard
from recap_dagster.orchestration.automation import laion_shard_sensor
from recap_dagster.orchestration.partitions import shard_group_partitions
from recap_dagster.resources import DataSourcesResource
from recap_dagster.storage.fs import filesystem, join

LAION_SHARDS = dg.AssetKey("laion_shards")


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _write(root: str, index: int, n: int = 3) -> None:
    records = [
        ShardRecord(
            key=f"{index:05d}{i:04d}",
            image_bytes=_jpeg(),
            caption="red square",
            url=f"https://example.com/{index}/{i}.jpg",
            metadata={},
        )
        for i in range(n)
    ]
    write_shard(root, index, records)


def _tick(instance: dg.DagsterInstance, root: str, cursor: str | None) -> dg.SensorResult:
    context = dg.build_sensor_context(
        instance=instance,
        cursor=cursor,
        resources={
            "sources": DataSourcesResource(
                shards_root=root, human_captions_path="unused", tokenizer_path="unused"
            )
        },
    )
    result = laion_shard_sensor(context)
    assert isinstance(result, dg.SensorResult)
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def _added(result: dg.SensorResult) -> list[str]:
    return [k for r in result.dynamic_partitions_requests or [] for k in r.partition_keys]


def _observed(result: dg.SensorResult) -> dict[str, tuple]:
    """laion_shards' observations by group: shards, first and last, rows, delivered."""
    found = {}
    for event in result.asset_events or []:
        assert isinstance(event, dg.AssetObservation) and event.asset_key == LAION_SHARDS
        meta = {k: v.value if hasattr(v, "value") else v for k, v in event.metadata.items()}
        assert meta["bytes"] > 0 and meta["not_delivered"] == 0
        found[event.partition] = (
            meta["shards"], meta["first_shard"], meta["last_shard"],
            meta["dagster/row_count"], meta["delivered"],
        )  # fmt: skip
    return found


def _exercise_sensor(root: str) -> None:
    for index in range(3):
        _write(root, index)
    # A shard still being written: tar present, no _stats.json yet.
    fs, path = filesystem(join(root, "00003.tar"))
    with fs.open(path, "wb") as handle:
        handle.write(b"")
    with dg.instance_for_test() as instance:
        first = _tick(instance, root, None)
        assert _added(first) == ["00000-00099"]  # one group holds the three shards
        assert _observed(first) == {"00000-00099": (3, "00000", "00002", 9, 9)}
        assert DiscoveryCursor.loads(first.cursor).pending == ["00003"]

        second = _tick(instance, root, first.cursor)
        assert _added(second) == [] and second.skip_reason

        _write(root, 3)  # the pending shard completes
        _write(root, 4)
        third = _tick(instance, root, second.cursor)
        assert _added(third) == []  # their group is registered already
        # A group that grew is observed whole (its partition page shows all five shards).
        assert _observed(third) == {"00000-00099": (5, "00000", "00004", 15, 15)}
        assert [r.run_key for r in third.run_requests] == []  # no captioner yet
        _write(root, 100)  # the first shard of the next group
        fourth = _tick(instance, root, third.cursor)
        assert _added(fourth) == ["00100-00199"]
        assert instance.get_dynamic_partitions(shard_group_partitions.name) == [
            "00000-00099",
            "00100-00199",
        ]
        assert DiscoveryCursor.loads(fourth.cursor) == DiscoveryCursor(after="00100", pending=[])


def test_sensor_local(tmp_path: Path) -> None:
    _exercise_sensor(str(tmp_path / "laion"))


def test_sensor_s3(s3_env: str) -> None:
    _exercise_sensor(f"{s3_env}/laion")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_cursor_skips_known_shards_among_thousands(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """With thousands of shards, a tick only looks at keys after the cursor."""
    root = str(tmp_path / "many") if where == "local" else f"{request.getfixturevalue('s3_env')}/m"
    fs, base = filesystem(root)
    fs.makedirs(base, exist_ok=True)
    count = 3000 if where == "local" else 600
    if where == "local":
        for index in range(count):
            Path(base, f"{index:05d}.tar").write_bytes(b"")
            Path(base, f"{index:05d}_stats.json").write_text("{}")
    else:
        fs.pipe({f"{base}/{i:05d}.tar": b"" for i in range(count)})
        fs.pipe({f"{base}/{i:05d}_stats.json": b"{}" for i in range(count)})
    keys, cursor = discover_new_shards(root, None)
    assert len(keys) == count
    keys, cursor = discover_new_shards(root, DiscoveryCursor(after=f"{count - 2:05d}").dumps())
    assert keys == [f"{count - 1:05d}"]
    assert DiscoveryCursor.loads(cursor).after == f"{count - 1:05d}"
