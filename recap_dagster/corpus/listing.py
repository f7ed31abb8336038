"""Which img2dataset shards exist under a root (local folder or ``s3://`` prefix), and
img2dataset's shard and sample names.

A shard ``NNNNN`` is a ``NNNNN.tar`` (webdataset) or only a ``NNNNN.parquet`` (the parquet
format); its ``NNNNN_stats.json``, written last, marks it complete. On S3 the listing starts
server-side after a given shard, so discovering new shards never lists the whole corpus.
"""

from __future__ import annotations

import operator
import os
import re
from dataclasses import dataclass
from typing import Any

import fsspec

from recap_dagster.storage.fs import filesystem, is_local

FORMAT_WEBDATASET = "webdataset"
FORMAT_PARQUET = "parquet"
FORMATS = (FORMAT_WEBDATASET, FORMAT_PARQUET)

SHARD_DIGITS = 5  # img2dataset's default oom_shard_count
SAMPLE_DIGITS = 4  # ceil(log10(number_sample_per_shard=10_000)), img2dataset's default

_S3_PAGE_SIZE = 1000  # ListObjectsV2's maximum page

_SHARD_FILE = re.compile(r"^(\d+)(\.tar|\.parquet|_stats\.json)$")


# --------------------------------------------------------------------------------- naming


def shard_key(index: int) -> str:
    """img2dataset's shard name: the index zero-padded to 5 digits (``3 -> "00003"``)."""
    return f"{index:0{SHARD_DIGITS}d}"


def sample_key(shard_index: int, index: int, samples_per_shard: int = 10_000) -> str:
    """img2dataset's sample key: shard index then in-shard index, zero-padded (``"000030042"``)."""
    digits = max(1, len(str(samples_per_shard - 1)))
    return f"{shard_index * 10**digits + index:0{SHARD_DIGITS + digits}d}"


# --------------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class ShardInfo:
    """A shard found under a root; ``complete`` iff its ``_stats.json`` exists."""

    key: str
    format: str
    complete: bool


def _after(key: str, after: str) -> bool:
    if key.isdigit() and after.isdigit():
        return int(key) > int(after)
    return key > after


def _surely_outside(name: str, after: str | None, until: str | None) -> bool:
    """Whether ``name`` is a file of a shard outside (after, until], by a string comparison
    of same-width keys; a name it cannot judge is kept for the exact check."""
    for bound, outside in ((after, operator.le), (until, operator.gt)):
        if bound is None:
            continue
        width = len(bound)
        key = name[:width]
        if len(name) > width and name[width] in "._" and key.isdigit() and outside(key, bound):
            return True
    return False


def _list_s3_names(
    fs: fsspec.AbstractFileSystem, root: str, after: str | None, until: str | None = None
) -> list[str]:
    """Object names directly under ``root``, starting after shard ``after`` (server-side)
    and, with ``until``, stopping at the first page past shard ``until``."""
    bucket, _, prefix = root.partition("/")
    prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    kwargs: dict[str, Any] = {
        "Bucket": bucket,
        "Prefix": prefix,
        "Delimiter": "/",  # shards sit directly under the root; don't walk sub-folders
        "MaxKeys": _S3_PAGE_SIZE,
    }
    if after is not None:
        # "~" sorts after ".", "_" and every digit, so the listing starts right after all of
        # shard `after`'s objects (keys are fixed-width, as img2dataset writes them).
        kwargs["StartAfter"] = f"{prefix}{after}~"
    names: list[str] = []
    while True:
        response = fs.call_s3("list_objects_v2", **kwargs)
        names.extend(obj["Key"][len(prefix) :] for obj in response.get("Contents", []))
        if not response.get("IsTruncated") or (until is not None and names[-1] > f"{until}~"):
            return names
        kwargs["ContinuationToken"] = response["NextContinuationToken"]


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    try:
        import s3fs
    except ImportError:  # pragma: no cover - s3fs is a dependency
        return False
    return isinstance(fs, s3fs.S3FileSystem)


def _list_names(
    fs: fsspec.AbstractFileSystem, root: str, after: str | None, until: str | None = None
) -> list[str]:
    if is_local(fs):
        try:
            with os.scandir(root) as entries:
                return [entry.name for entry in entries if entry.is_file()]
        except FileNotFoundError:
            return []
    if _is_s3(fs):
        return _list_s3_names(fs, root, after, until)
    try:
        return [path.rstrip("/").rsplit("/", 1)[-1] for path in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return []


def list_shards(
    root_url: str, after: str | None = None, until: str | None = None
) -> list[ShardInfo]:
    """Shards under ``root_url`` sorted by key; only keys after ``after`` and up to ``until``
    (inclusive) when given.

    A key with a ``.tar`` is webdataset, with only a ``.parquet`` it is the parquet format.
    On S3 the listing starts server-side after ``after`` (ListObjectsV2 ``StartAfter``).
    """
    fs, root = filesystem(root_url)
    found: dict[str, set[str]] = {}
    for name in _list_names(fs, root.rstrip("/"), after, until):
        if _surely_outside(name, after, until):
            continue  # cheap: a local listing holds every shard of the corpus
        match = _SHARD_FILE.match(name)
        if match:
            found.setdefault(match.group(1), set()).add(match.group(2))
    infos = []
    for key, suffixes in found.items():
        if (after is not None and not _after(key, after)) or (
            until is not None and _after(key, until)
        ):
            continue
        if ".tar" in suffixes:
            fmt = FORMAT_WEBDATASET
        elif ".parquet" in suffixes:
            fmt = FORMAT_PARQUET
        else:
            continue  # a stats file without data is nothing we can read
        infos.append(ShardInfo(key=key, format=fmt, complete="_stats.json" in suffixes))
    return sorted(infos, key=lambda info: (int(info.key), info.key))
