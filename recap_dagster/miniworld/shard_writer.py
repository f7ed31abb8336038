"""Write LAION-style shards in img2dataset's on-disk format (the miniworld's corpus, tests'
fixtures); :mod:`recap_dagster.corpus.reading` documents the format and reads it back."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import ExifTags, Image

from recap_dagster.corpus.listing import FORMAT_PARQUET, FORMAT_WEBDATASET, FORMATS, shard_key
from recap_dagster.corpus.reading import (
    EXTRA_METADATA_FIELD,
    SOURCE_FAILED_TO_DOWNLOAD,
    SOURCE_FAILED_TO_RESIZE,
    SOURCE_SUCCESS,
)
from recap_dagster.storage.fs import filesystem, is_local

PARQUET_ROWS_PER_GROUP = 100  # img2dataset's BufferedParquetWriter flushes every 100 samples


@dataclass
class ShardRecord:
    """One sample to write. ``metadata`` must be JSON-serialisable (see module docstring)."""

    key: str
    image_bytes: bytes | None
    caption: str
    url: str
    metadata: dict
    width: int | None = None
    height: int | None = None
    status: str = SOURCE_SUCCESS
    error_message: str | None = None
    #: img2dataset's ``save_additional_columns``: input columns kept beside the caption.
    additional: dict[str, str | None] = field(default_factory=dict)


def _schema(output_format: str, additional: Sequence[str] = ()) -> pa.Schema:
    # img2dataset puts the input's additional columns first.
    fields = [pa.field(name, pa.string()) for name in additional]
    fields += [
        pa.field(EXTRA_METADATA_FIELD, pa.string()),
        pa.field("caption", pa.string()),
        pa.field("url", pa.string()),
        pa.field("key", pa.string()),
        pa.field("status", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("original_width", pa.int32()),
        pa.field("original_height", pa.int32()),
        pa.field("exif", pa.string()),
        pa.field("sha256", pa.string()),
    ]
    if output_format == FORMAT_PARQUET:
        fields.append(pa.field("jpg", pa.binary()))
    return pa.schema(fields)


def _probe(image_bytes: bytes) -> tuple[int | None, int | None, str | None]:
    """Header size and EXIF (as img2dataset's JSON string of tag -> str) without decoding."""
    try:
        with Image.open(io.BytesIO(image_bytes)) as image:
            width, height = image.size
            exif = {
                ExifTags.TAGS.get(tag, str(tag)): str(value).strip()
                for tag, value in image.getexif().items()
            }
        return width, height, json.dumps(exif)
    except Exception:  # bad bytes are written as given; the reader reports them
        return None, None, None


def _check_key(key: str, seen: set[str]) -> None:
    # webdataset groups tar members by the name up to the first dot, so a key with a dot or
    # slash, or a repeated key, would silently merge or split samples.
    if not key or "." in key or "/" in key:
        raise ValueError(f"invalid sample key {key!r}: must be non-empty, without '.' or '/'")
    if key in seen:
        raise ValueError(f"duplicate sample key {key!r}")
    seen.add(key)


def _row(
    record: ShardRecord, output_format: str, additional: Sequence[str] = ()
) -> tuple[dict[str, Any], bytes | None]:
    """The parquet row / json metadata for a record, and the image bytes to store (if any)."""
    status, error = record.status, record.error_message
    image_bytes = record.image_bytes
    if status == SOURCE_SUCCESS and image_bytes is None:
        # img2dataset never writes a success without an image; keep the format consistent.
        status, error = SOURCE_FAILED_TO_DOWNLOAD, error or "no image bytes"
    if status != SOURCE_SUCCESS:
        image_bytes = None  # img2dataset stores no image for failed samples
    width, height, exif, digest = record.width, record.height, None, None
    if image_bytes is not None:
        probed_w, probed_h, exif = _probe(image_bytes)
        width = probed_w if width is None else width
        height = probed_h if height is None else height
        digest = hashlib.sha256(image_bytes).hexdigest()
    row: dict[str, Any] = {
        **{name: record.additional.get(name) for name in additional},
        EXTRA_METADATA_FIELD: None if record.metadata is None else json.dumps(record.metadata),
        "caption": record.caption,
        "url": record.url,
        "key": record.key,
        "status": status,
        "error_message": error,
        "width": width,
        "height": height,
        "original_width": width,
        "original_height": height,
        "exif": exif,
        "sha256": digest,
    }
    if output_format == FORMAT_PARQUET:
        row["jpg"] = image_bytes
    return row, image_bytes


def _add_tar_member(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    # Same member attributes as webdataset's TarWriter, which img2dataset uses.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)
    info.mode = 0o444
    info.uname = info.gname = "bigdata"
    tar.addfile(info, io.BytesIO(data))


def _fsync(path: str) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _stage_files(
    staging: str,
    name: str,
    records: Iterable[ShardRecord],
    output_format: str,
    additional: Sequence[str] = (),
) -> tuple[dict[str, str], Counter, Counter]:
    """Write the data files into ``staging``.

    Returns ({suffix: staged path}, img2dataset's status_dict, counts per row status).
    """
    schema = _schema(output_format, additional)
    paths = {".parquet": os.path.join(staging, f"{name}.parquet")}
    if output_format == FORMAT_WEBDATASET:
        paths[".tar"] = os.path.join(staging, f"{name}.tar")
    counts: Counter = Counter()
    status_dict: Counter = Counter()
    seen: set[str] = set()
    buffer: list[dict[str, Any]] = []
    with ExitStack() as stack:
        writer = stack.enter_context(pq.ParquetWriter(paths[".parquet"], schema))
        tar = stack.enter_context(tarfile.open(paths[".tar"], "w")) if ".tar" in paths else None
        for record in records:
            _check_key(record.key, seen)
            row, image_bytes = _row(record, output_format, additional)
            status = row["status"]
            counts[status] += 1
            # img2dataset counts successes as "success" and failures by their error message
            status_dict[status if status == SOURCE_SUCCESS else row["error_message"] or status] += 1
            if tar is not None and image_bytes is not None:
                now = time.time()
                # sorted extensions, as webdataset's TarWriter writes them
                meta_json = json.dumps(row, indent=4).encode()
                _add_tar_member(tar, f"{record.key}.jpg", image_bytes, now)
                _add_tar_member(tar, f"{record.key}.json", meta_json, now)
                caption = "" if record.caption is None else str(record.caption)
                _add_tar_member(tar, f"{record.key}.txt", caption.encode(), now)
            buffer.append(row)
            if len(buffer) >= PARQUET_ROWS_PER_GROUP:
                writer.write_table(pa.Table.from_pylist(buffer, schema=schema))
                buffer.clear()
        if buffer:
            writer.write_table(pa.Table.from_pylist(buffer, schema=schema))
    for path in paths.values():
        _fsync(path)
    return paths, status_dict, counts


def _commit(
    fs: fsspec.AbstractFileSystem,
    root: str,
    name: str,
    staged: dict[str, str],
    stats_bytes: bytes,
    staging: str,
) -> None:
    """Move staged files to their final names; the stats file goes last."""
    stats_path = f"{root}/{name}_stats.json"
    stale = [f"{root}/{name}{suffix}" for suffix in (".tar",) if suffix not in staged]
    if is_local(fs):
        # Un-mark a previously complete shard before replacing its data files.
        for path in [stats_path, *stale]:
            with suppress(FileNotFoundError):
                os.remove(path)
        for suffix in (".tar", ".parquet"):
            if suffix in staged:
                os.replace(staged[suffix], f"{root}/{name}{suffix}")
        staged_stats = os.path.join(staging, f"{name}_stats.json")
        with open(staged_stats, "wb") as handle:
            handle.write(stats_bytes)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staged_stats, stats_path)
        return
    # Object stores: whole-object uploads (put_file aborts a failed multipart upload, unlike
    # a streamed file whose __exit__ would commit whatever was written).
    for path in [stats_path, *stale]:
        with suppress(FileNotFoundError):
            fs.rm_file(path)
    for suffix in (".tar", ".parquet"):
        if suffix in staged:
            fs.put_file(staged[suffix], f"{root}/{name}{suffix}")
    fs.pipe_file(stats_path, stats_bytes)
    fs.invalidate_cache(root)


def write_shard(
    root_url: str,
    shard_index: int,
    records: Iterable[ShardRecord],
    output_format: str = FORMAT_WEBDATASET,
    additional_columns: Sequence[str] = (),
) -> dict:
    """Write one shard as img2dataset does, atomically; return its stats dict.

    Records stream through (memory does not grow with shard size). Nothing appears at the
    final names unless the whole shard was written; ``_stats.json`` is written last.
    A ``"success"`` record without image bytes is stored as ``"failed_to_download"``; a
    record with any other status keeps its row but no image, as img2dataset does.
    ``additional_columns``: string columns taken from each record's ``additional`` (as
    img2dataset's ``save_additional_columns`` keeps input columns).
    """
    if output_format not in FORMATS:
        raise ValueError(f"output_format must be one of {FORMATS}, got {output_format!r}")
    fs, root = filesystem(root_url)
    root = root.rstrip("/")
    name = shard_key(shard_index)
    if is_local(fs):
        os.makedirs(root, exist_ok=True)
        # A hidden folder beside the final files: same filesystem, so os.replace is atomic,
        # and list_shards ignores it if a crash leaves it behind.
        staging = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root)
    else:
        staging = tempfile.mkdtemp(prefix=f"recap-shard-{name}-")
    try:
        start = time.time()
        staged, status_dict, counts = _stage_files(
            staging, name, records, output_format, additional_columns
        )
        end = time.time()
        stats = {
            "count": sum(counts.values()),
            "successes": counts[SOURCE_SUCCESS],
            "failed_to_download": counts[SOURCE_FAILED_TO_DOWNLOAD],
            "failed_to_resize": counts[SOURCE_FAILED_TO_RESIZE],
            "duration": end - start,
            "start_time": start,
            "end_time": end,
            "status_dict": dict(status_dict),
        }
        _commit(fs, root, name, staged, json.dumps(stats, indent=4).encode(), staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return stats
