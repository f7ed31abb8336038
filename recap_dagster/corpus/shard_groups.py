"""Shard groups: the unit that Dagster partitions a LAION corpus by.

One Dagster partition per shard would mean 230,000 (LAION-2B) to 585,000 (LAION-5B)
partitions: past the 100,000 Dagster advises, and every run over a range of dynamic
partitions resolves the range against all of them when it is created (measured in the
README: 0.5-1 s per run at 100,000). A group is up to ``SHARDS_PER_GROUP`` consecutive
shard ids, keyed by its first and last id (``00100-00199``), and is recaptioned in one run
with one model load; outputs, resume and row statuses stay per shard.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from recap_dagster.corpus.listing import list_shards

SHARDS_PER_GROUP = 100
# Up to this many groups are listed one by one (bounded listings); more, the root at once.
BOUNDED_LISTINGS_UP_TO = 8


def group_of(shard: str, size: int = SHARDS_PER_GROUP) -> str:
    """The group holding ``shard`` (a numeric img2dataset key), named at the key's width."""
    first = int(shard) // size * size
    width = len(shard)
    return f"{first:0{width}d}-{first + size - 1:0{width}d}"


def group_bounds(group: str) -> tuple[str, str]:
    """(first, last) shard keys of ``group``."""
    first, sep, last = group.partition("-")
    if not (sep and first.isdigit() and last.isdigit() and len(first) == len(last)):
        raise ValueError(f"not a shard group key (like 00100-00199): {group!r}")
    return first, last


def groups_of(shards: Iterable[str], size: int = SHARDS_PER_GROUP) -> list[str]:
    """The groups of ``shards``, in shard order, each once."""
    return sorted(
        {group_of(shard, size) for shard in shards}, key=lambda group: int(group_bounds(group)[0])
    )


def group_shards(root_url: str, group: str) -> list[str]:
    """The complete shards of ``group`` under ``root_url``; the listing starts at the group
    (S3 ``StartAfter``) and stops after it."""
    first, last = group_bounds(group)
    before = f"{int(first) - 1:0{len(first)}d}" if int(first) > 0 else None
    return [info.key for info in list_shards(root_url, after=before, until=last) if info.complete]


def shards_of_groups(root_url: str, groups: Iterable[str]) -> list[str]:
    """The complete shards of every group in ``groups``, in shard order: a run's few groups
    each by a listing bounded to the group (on S3 a page or two, not the whole corpus), many
    groups by one listing of the root."""
    wanted = sorted(set(groups), key=lambda group: int(group_bounds(group)[0]))
    if len(wanted) <= BOUNDED_LISTINGS_UP_TO:
        return [shard for group in wanted for shard in group_shards(root_url, group)]
    members = set(wanted)
    return [
        info.key
        for info in list_shards(root_url)
        if info.complete and group_of(info.key) in members
    ]


def group_output_version(model_version: str, settings: str, shards: Iterable[str]) -> str:
    """Data version of a group's output: ``<model version>.<hash>``, the model that made it
    first, so that one indexed query of every group's data version tells which groups a
    given model made; the hash covers the settings and the shards (a shard that joins the
    group changes it)."""
    digest = hashlib.sha256(settings.encode())
    for shard in sorted(shards):
        digest.update(f"\n{shard}".encode())
    return f"{model_version}.{digest.hexdigest()[:16]}"


def made_by(data_version: str | None, model_version: str) -> bool:
    """Whether a ``group_output_version`` came from ``model_version``."""
    return bool(data_version) and data_version.startswith(f"{model_version}.")
