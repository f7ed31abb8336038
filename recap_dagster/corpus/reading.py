"""Read LAION-style shards in img2dataset's on-disk format (the miniworld writes them with
``recap_dagster.miniworld.shard_writer``).

Layout under a root (local folder or ``s3://`` prefix), per shard ``NNNNN``:

- ``output_format="webdataset"``: ``NNNNN.tar`` with ``{key}.jpg``, ``{key}.txt`` (alt text)
  and ``{key}.json`` (the sample's metadata) for every successfully downloaded sample, plus
  ``NNNNN.parquet`` with one row per sample *including* failed downloads.
- ``output_format="parquet"``: only ``NNNNN.parquet``, with the encoded image in a ``jpg``
  (binary) column, null for failed samples.
- ``NNNNN_stats.json``: img2dataset's per-shard stats. Written last, so its presence marks
  the shard complete.

Columns/json fields, in img2dataset's order: the additional input columns, ``caption``,
``url``, ``key``, ``status``, ``error_message``, ``width``, ``height``, ``original_width``,
``original_height``, ``exif``, ``sha256`` (and ``jpg`` in the parquet variant).

Extra metadata: the miniworld's ``write_shard`` stores ``ShardRecord.metadata`` as one
additional input column named ``metadata`` holding a JSON *string* (as img2dataset would
store a string column passed through ``save_additional_columns``); it appears as that
string in ``key.json`` too.
On read, ``LaionRecord.metadata`` is every field that is not one of img2dataset's own, with
a JSON-object ``metadata`` field decoded and merged in. So a record written with
``metadata=m`` reads back with ``metadata == m``, and a real LAION shard's extra columns
(``similarity``, ``punsafe``, ...) show up there as well.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from recap_dagster.corpus.decoding import (
    DEFAULT_MAX_PIXELS,
    STATUS_MISSING,
    STATUS_OK,
    DecodeResult,
    decode_image,
)
from recap_dagster.corpus.listing import SAMPLE_DIGITS
from recap_dagster.storage.fs import filesystem, is_local, join

# LaionRecord.status beyond decoding's vocabulary (ok, decode_error, too_large, missing).
STATUS_BAD_METADATA = "bad_metadata"

# img2dataset's statuses in the parquet/json "status" field.
SOURCE_SUCCESS = "success"
SOURCE_FAILED_TO_DOWNLOAD = "failed_to_download"
SOURCE_FAILED_TO_RESIZE = "failed_to_resize"

# The columns of img2dataset's NNNNN.parquet, one row per URL tried: (type, meaning).
SHARD_COLUMNS = {
    "caption": ("string", "the alt text"),
    "url": ("string", "where the image was downloaded from"),
    "key": ("string", "shard number and row number (NNNNNRRRR); names the tar's files"),
    "status": ("string", "success, failed_to_download or failed_to_resize"),
    "error_message": ("string", "why the download or resize failed"),
    "width": ("int", "stored image width"),
    "height": ("int", "stored image height"),
    "original_width": ("int", "width before resizing"),
    "original_height": ("int", "height before resizing"),
    "exif": ("string", "EXIF of the original, JSON"),
    "sha256": ("string", "hash of the original image bytes"),
}
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # img2dataset's encode_format choices
EXTRA_METADATA_FIELD = "metadata"
# Fields img2dataset writes itself; everything else in a row is "extra" metadata.
IMG2DATASET_FIELDS = frozenset(
    {
        "caption",
        "url",
        "key",
        "status",
        "error_message",
        "width",
        "height",
        "original_width",
        "original_height",
        "exif",
        "sha256",
        "md5",
        "txt",
        *IMAGE_EXTENSIONS,
    }
)

READ_BATCH_SIZE = 64
# Remote reads fetch this much at a time: large enough to amortise request latency, small
# enough that a reader's memory does not grow with shard size (s3fs's default is 50 MiB).
REMOTE_BLOCK_SIZE = 4 * 2**20


class ShardReadError(RuntimeError):
    """A shard could not be read to the end; raised after every readable record was yielded.

    Constructible from the message alone, so that DataLoader workers can re-raise it as
    itself in the main process (``shard``/``records_read`` then keep their defaults).
    """

    def __init__(self, message: str, *, shard: str = "", records_read: int = 0) -> None:
        super().__init__(message)
        self.shard = shard
        self.records_read = records_read


def _read_error(shard: str, detail: str, records_read: int) -> ShardReadError:
    message = f"{shard}: {detail} ({records_read} records read before the error)"
    return ShardReadError(message, shard=shard, records_read=records_read)


class _TarBroken(Exception):
    """Internal: the tar stream failed after ``complete`` whole samples."""

    def __init__(self, complete: int, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.complete = complete


# --------------------------------------------------------------------------------- reading


@dataclass
class LaionRecord:
    """A sample as read from a shard. ``delivered`` is False for a row img2dataset did not
    deliver (a dead URL, a failed resize): its ``status``/``error`` are then img2dataset's
    own (``failed_to_download``, "HTTP Error 404: Not Found"). For a delivered row they use
    decoding's vocabulary plus ``"bad_metadata"``. ``width``/``height`` are the decoded size
    (else the stored one). ``image`` is RGB (or whatever a ``ShardDataset`` transform made of
    it)."""

    key: str
    url: str | None
    alt_text: str
    metadata: dict
    image: Image.Image | None
    width: int | None
    height: int | None
    status: str
    error: str | None
    delivered: bool = True


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _extra_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    extra = {k: v for k, v in meta.items() if k not in IMG2DATASET_FIELDS}
    packed = extra.pop(EXTRA_METADATA_FIELD, None)
    if isinstance(packed, str):
        try:
            decoded = json.loads(packed)
        except ValueError:
            decoded = packed
        packed = decoded
    if isinstance(packed, dict):
        extra.update(packed)
    elif packed is not None:
        extra[EXTRA_METADATA_FIELD] = packed
    return extra


def _make_record(
    key: str,
    meta: dict[str, Any],
    alt_text: str,
    image_bytes: bytes | None,
    *,
    decode: bool,
    max_pixels: int,
    meta_error: str | None = None,
) -> LaionRecord:
    if decode:
        result = decode_image(image_bytes, max_pixels)
    elif image_bytes:
        result = DecodeResult(None, STATUS_OK, None, None, None)
    else:
        result = DecodeResult(None, STATUS_MISSING, "no image bytes", None, None)
    status, error = result.status, result.error
    source_status = meta.get("status")
    delivered = source_status in (None, SOURCE_SUCCESS)
    if not delivered:
        # img2dataset's own verdict, kept verbatim: a dead URL is not a decoding failure.
        status, error = str(source_status), str(meta.get("error_message") or "no image")
    if meta_error is not None:
        image_note = "" if status == STATUS_OK else f"; image {status}: {error}"
        status, error = STATUS_BAD_METADATA, meta_error + image_note
    stored_w, stored_h = _int_or_none(meta.get("width")), _int_or_none(meta.get("height"))
    url = meta.get("url")
    return LaionRecord(
        key=key,
        url=None if url is None else str(url),
        alt_text=alt_text,
        metadata=_extra_metadata(meta),
        image=result.image,
        width=result.width if result.width is not None else stored_w,
        height=result.height if result.height is not None else stored_h,
        status=status,
        error=error,
        delivered=delivered,
    )


def _record_from_sample(
    key: str, parts: dict[str, bytes], *, decode: bool, max_pixels: int
) -> LaionRecord:
    """A webdataset sample ({extension: bytes}) as a record; .txt/.json are the truth."""
    image_bytes = next((parts[ext] for ext in IMAGE_EXTENSIONS if ext in parts), None)
    meta: dict[str, Any] = {}
    meta_error = None
    raw = parts.get("json")
    if raw is None:
        meta_error = "sample has no .json member"
    else:
        try:
            parsed = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            meta_error = f"malformed .json: {type(exc).__name__}: {exc}"
        else:
            if isinstance(parsed, dict):
                meta = parsed
            else:
                meta_error = f"malformed .json: expected an object, got {type(parsed).__name__}"
    txt = parts.get("txt")
    alt_text = (
        txt.decode("utf-8", errors="replace") if txt is not None else str(meta.get("caption") or "")
    )
    return _make_record(
        key,
        meta,
        alt_text,
        image_bytes,
        decode=decode,
        max_pixels=max_pixels,
        meta_error=meta_error,
    )


def _split_member(name: str) -> tuple[str, str, str] | None:
    """(group id, sample key, extension) by the webdataset convention, or None."""
    directory, _, base = name.rpartition("/")
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    return f"{directory}/{stem}", stem, ext.lower()


def _tar_samples(fileobj: Any) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream (key, {extension: bytes}) groups of consecutive tar members.

    On a truncated/corrupt tar, raise _TarBroken after the last complete group; the group
    being read when the error hit is dropped, since it may be missing members.
    """
    group: str | None = None
    key = ""
    parts: dict[str, bytes] = {}
    complete = 0
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            while (member := tar.next()) is not None:
                # Stream mode keeps every TarInfo in tar.members; drop them to stay O(1).
                tar.members.clear()
                split = _split_member(member.name) if member.isfile() else None
                if split is None:
                    continue
                member_group, member_key, ext = split
                if member_group != group:
                    # A new group's header means the previous group is complete.
                    if group is not None:
                        complete += 1
                        yield key, parts
                    group, key, parts = member_group, member_key, {}
                handle = tar.extractfile(member)
                parts[ext] = handle.read() if handle is not None else b""
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise _TarBroken(complete, exc) from exc
    if group is not None:
        yield key, parts


def _open(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    if is_local(fs):
        return fs.open(path, "rb")
    return fs.open(path, "rb", block_size=REMOTE_BLOCK_SIZE)


def _parquet_rows(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[dict[str, Any]]:
    """Stream rows of a parquet file batch by batch (one row group in memory at a time)."""
    with _open(fs, path) as handle:
        # pre_buffer (pyarrow's default) would fetch every row group up front.
        parquet = pq.ParquetFile(handle, pre_buffer=False)
        for batch in parquet.iter_batches(batch_size=READ_BATCH_SIZE):
            yield from batch.to_pylist()


Select = Callable[[int], bool]


def _iter_webdataset(
    fs: fsspec.AbstractFileSystem,
    root: str,
    root_url: str,
    key: str,
    tar_handle: Any,
    *,
    decode: bool,
    max_pixels: int,
    select: Select | None,
) -> Iterator[LaionRecord]:
    shard = join(root_url, f"{key}.tar")
    seen: set[str] = set()
    index = 0
    failure: _TarBroken | None = None
    with tar_handle:
        try:
            for sample_key_, parts in _tar_samples(tar_handle):
                seen.add(sample_key_)
                if select is None or select(index):
                    yield _record_from_sample(
                        sample_key_, parts, decode=decode, max_pixels=max_pixels
                    )
                index += 1
        except _TarBroken as exc:
            failure = exc
    # Failed downloads live only in the parquet file; they come after the tar's samples.
    lost = 0
    parquet_error: Exception | None = None
    try:
        for row in _parquet_rows(fs, f"{root}/{key}.parquet"):
            row_key = str(row.get("key"))
            if row_key in seen:
                continue
            if row.get("status") == SOURCE_SUCCESS:
                lost += 1  # the tar should have had it
                continue
            if select is None or select(index):
                alt_text = str(row.get("caption") or "")
                yield _make_record(
                    row_key, row, alt_text, None, decode=decode, max_pixels=max_pixels
                )
            index += 1
    except FileNotFoundError:
        pass  # a bare tar is still a valid webdataset shard
    except (pa.ArrowException, OSError, ValueError) as exc:
        parquet_error = exc
    if failure is not None:
        lost_note = f"; {lost} successful samples in {key}.parquet never came" if lost else ""
        detail = (
            f"tar truncated or corrupt after {failure.complete} complete samples ({failure}); "
            f"the sample being read was dropped{lost_note}"
        )
        raise _read_error(shard, detail, index) from failure.__cause__
    if parquet_error is not None:
        detail = (
            f"unreadable parquet ({type(parquet_error).__name__}: {parquet_error}); failed "
            "downloads listed only there are missing"
        )
        raise _read_error(join(root_url, f"{key}.parquet"), detail, index) from parquet_error
    if lost:
        detail = (
            f"{lost} samples marked success in {key}.parquet are missing from the tar "
            "(truncated at a member boundary?)"
        )
        raise _read_error(shard, detail, index)


def _iter_parquet(
    fs: fsspec.AbstractFileSystem,
    root: str,
    root_url: str,
    key: str,
    *,
    decode: bool,
    max_pixels: int,
    select: Select | None,
) -> Iterator[LaionRecord]:
    shard = join(root_url, f"{key}.parquet")
    index = 0
    try:
        for row in _parquet_rows(fs, f"{root}/{key}.parquet"):
            if select is None or select(index):
                image_bytes = next(
                    (row[ext] for ext in IMAGE_EXTENSIONS if row.get(ext) is not None), None
                )
                alt_text = str(row.get("caption") or row.get("txt") or "")
                row_key = str(row.get("key") or f"{key}{index:0{SAMPLE_DIGITS}d}")
                yield _make_record(
                    row_key, row, alt_text, image_bytes, decode=decode, max_pixels=max_pixels
                )
            index += 1
    except FileNotFoundError as exc:
        raise _read_error(shard, f"no {key}.tar or {key}.parquet", index) from exc
    except (pa.ArrowException, OSError, ValueError) as exc:
        detail = f"parquet truncated or corrupt ({type(exc).__name__}: {exc})"
        raise _read_error(shard, detail, index) from exc


def iter_shard_selected(
    root_url: str,
    key: str,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    decode: bool = True,
    select: Select | None = None,
) -> Iterator[LaionRecord]:
    """``iter_shard`` that only builds (and decodes) records whose index passes ``select``."""
    fs, root = filesystem(root_url)
    root = root.rstrip("/")
    try:
        tar_handle = _open(fs, f"{root}/{key}.tar")
    except FileNotFoundError:
        yield from _iter_parquet(
            fs, root, root_url, key, decode=decode, max_pixels=max_pixels, select=select
        )
        return
    yield from _iter_webdataset(
        fs, root, root_url, key, tar_handle, decode=decode, max_pixels=max_pixels, select=select
    )


def iter_shard(
    root_url: str, key: str, *, max_pixels: int = DEFAULT_MAX_PIXELS, decode: bool = True
) -> Iterator[LaionRecord]:
    """Stream a shard's records (webdataset tar if present, else the parquet variant).

    Every sample comes out, including ones without a usable image (status/error say why);
    in webdataset shards, failed downloads (parquet rows absent from the tar) come last.
    A truncated/corrupt shard raises ``ShardReadError`` after all complete records.
    With ``decode=False`` images are not decoded: ``image`` is None and ``status`` is
    ``"ok"``/``"missing"`` by presence of bytes (or ``"bad_metadata"``).
    """
    return iter_shard_selected(root_url, key, max_pixels=max_pixels, decode=decode)


def count_rows(root_url: str, key: str) -> int:
    """Number of samples in a shard, from the parquet footer (streams the tar if no parquet)."""
    fs, root = filesystem(root_url)
    try:
        with _open(fs, f"{root.rstrip('/')}/{key}.parquet") as handle:
            return pq.ParquetFile(handle).metadata.num_rows
    except FileNotFoundError:
        return sum(1 for _ in iter_shard_selected(root_url, key, decode=False))
