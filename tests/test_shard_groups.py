"""Shard groups: the partition unit (up to 100 consecutive shard ids)."""

from pathlib import Path

import pytest

from recap_dagster.corpus.shard_groups import (
    BOUNDED_LISTINGS_UP_TO,
    SHARDS_PER_GROUP,
    group_bounds,
    group_of,
    group_shards,
    groups_of,
    shards_of_groups,
)
from recap_dagster.storage.fs import filesystem


def test_group_keys_keep_the_shard_width() -> None:
    assert SHARDS_PER_GROUP == 100
    assert group_of("00000") == "00000-00099" and group_of("00199") == "00100-00199"
    assert group_of("123456") == "123400-123499"  # LAION-5B's six digits
    assert group_bounds("00100-00199") == ("00100", "00199")
    assert groups_of(["00250", "00007", "00001", "01000"]) == [
        "00000-00099",
        "00200-00299",
        "01000-01099",
    ]
    for bad in ("00100", "a-b", "001-00199"):
        with pytest.raises(ValueError, match="not a shard group key"):
            group_bounds(bad)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_group_shards_lists_only_its_complete_shards(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    root = str(tmp_path / "g") if where == "local" else f"{request.getfixturevalue('s3_env')}/g"
    fs, base = filesystem(root)
    fs.makedirs(base, exist_ok=True)
    shards = [98, 99, 100, 101, 150, 199, 200, 1500]
    fs.pipe({f"{base}/{i:05d}.tar": b"" for i in shards})
    fs.pipe({f"{base}/{i:05d}_stats.json": b"{}" for i in shards if i != 150})  # 150: writing
    assert group_shards(root, "00000-00099") == ["00098", "00099"]
    assert group_shards(root, "00100-00199") == ["00100", "00101", "00199"]
    assert group_shards(root, "00300-00399") == []
    few = ["01500-01599", "00100-00199"]  # listed group by group, bounded
    many = few + [f"{i * 100:05d}-{i * 100 + 99:05d}" for i in range(2, 12)]  # one listing
    assert len(many) > BOUNDED_LISTINGS_UP_TO >= len(few)
    expected = ["00100", "00101", "00199", "01500"]
    assert shards_of_groups(root, few) == expected
    assert shards_of_groups(root, many) == [*expected[:3], "00200", expected[3]]
