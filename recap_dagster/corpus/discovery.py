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
from recap_dagster.storage.fs import filesystem, join


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
