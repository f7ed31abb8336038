"""Shard discovery for the sensor: which complete shards are new since the last tick.

The cursor records the highest shard key listed so far plus the keys that were listed
while still being written (no ``_stats.json`` yet). A tick lists only keys after the
cursor (S3 ``StartAfter``), and re-checks the few pending ones, so it stays fast with
many thousands of shards.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from recap_dagster.corpus.listing import list_shards
from recap_dagster.corpus.shard_groups import group_of, group_shards
from recap_dagster.storage.fs import filesystem, is_local, join


@dataclass
class DiscoveryCursor:
    after: str | None = None
    pending: list[str] = field(default_factory=list)

    def dumps(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def loads(cls, text: str | None) -> DiscoveryCursor:
        if not text:
            return cls()
        data = json.loads(text)
        return cls(after=data.get("after"), pending=list(data.get("pending", [])))


def _is_complete(root_url: str, key: str) -> bool:
    fs, path = filesystem(join(root_url, f"{key}_stats.json"))
    return fs.exists(path)


def discover_new_shards(root_url: str, cursor_text: str | None) -> tuple[list[str], str]:
    """Return (complete shard keys not reported before, new cursor text)."""
    cursor = DiscoveryCursor.loads(cursor_text)
    listed = list_shards(root_url, after=cursor.after)
    new = [info.key for info in listed if info.complete]
    still_pending = [info.key for info in listed if not info.complete]
    for key in cursor.pending:
        if _is_complete(root_url, key):
            new.append(key)
        else:
            still_pending.append(key)
    seen = [info.key for info in listed] + ([cursor.after] if cursor.after else [])
    after = max(seen, default=None)
    next_cursor = DiscoveryCursor(after=after, pending=sorted(set(still_pending)))
    return sorted(set(new)), next_cursor.dumps()


def defer_shards(cursor_text: str, shards: list[str]) -> str:
    """The cursor with ``shards`` reported again by the next tick (they join the pending
    keys, which every tick re-checks): for shards whose group is being written now."""
    cursor = DiscoveryCursor.loads(cursor_text)
    cursor.pending = sorted(set(cursor.pending) | set(shards))
    return cursor.dumps()


@dataclass(frozen=True)
class GroupObservation:
    """What a shard group holds, from img2dataset's ``_stats.json`` files and file sizes."""

    shards: list[str]
    rows: int  # samples img2dataset tried (its "count")
    delivered: int  # images it downloaded ("successes")
    bytes: int  # the shards' .tar and .parquet files
    unreadable_stats: list[str] = field(default_factory=list)


def observe_groups(
    root_url: str, new_shards: list[str], known_groups: set[str]
) -> dict[str, GroupObservation]:
    """An observation of every group with new shards. A new group is described by its new
    shards; a known one that grew is listed again (one bounded listing) so the observation
    covers the whole group. Stats files are fetched in one batch (concurrently on S3)."""
    by_group: dict[str, list[str]] = {}
    for shard in new_shards:
        by_group.setdefault(group_of(shard), []).append(shard)
    for group in by_group.keys() & known_groups:
        by_group[group] = group_shards(root_url, group)
    fs, root = filesystem(root_url)
    root = root.rstrip("/")
    shards = [shard for members in by_group.values() for shard in members]
    stats = fs.cat([f"{root}/{s}_stats.json" for s in shards], on_error="return")
    data_files = [f"{root}/{s}{suffix}" for s in shards for suffix in (".tar", ".parquet")]
    sizes = _sizes(fs, data_files)
    observations = {}
    for group, members in sorted(by_group.items()):
        rows = delivered = size = 0
        unreadable = []
        for shard in members:
            blob = stats.get(f"{root}/{shard}_stats.json")
            try:
                parsed = json.loads(blob) if isinstance(blob, bytes) else None
                rows += int(parsed["count"])
                delivered += int(parsed["successes"])
            except (TypeError, KeyError, ValueError):
                unreadable.append(shard)
            size += sum(sizes.get(f"{root}/{shard}{suffix}", 0) for suffix in (".tar", ".parquet"))
        observations[group] = GroupObservation(sorted(members), rows, delivered, size, unreadable)
    return observations


def _sizes(fs, paths: list[str]) -> dict[str, int]:
    """Sizes of the files among ``paths`` that exist (a webdataset shard has a .tar and a
    .parquet, a parquet-format one only the .parquet). On S3 one concurrent batch when all
    exist, else one request per file."""
    if not is_local(fs):
        try:
            return dict(zip(paths, (int(size) for size in fs.sizes(paths)), strict=True))
        except FileNotFoundError:
            pass
    sizes = {}
    for path in paths:
        try:
            sizes[path] = int(fs.size(path))
        except FileNotFoundError:
            continue
    return sizes
