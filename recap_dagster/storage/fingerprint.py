"""Content fingerprints used as Dagster data versions."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath

VERSION_FILE = "RECAP_VERSION"

#: The weights files a model fingerprint covers (config and tokenizer files are left out).
WEIGHTS_PATTERNS: tuple[str, ...] = ("*.safetensors",)
#: Bytes read at the start, middle and end of each tensor in quick mode; a tensor of up to
#: three times this is read whole.
SAMPLE_BYTES = 16 * 1024
#: The safetensors library rejects larger headers; a bigger length means a foreign file.
_MAX_HEADER_BYTES = 100_000_000
#: Digest prefixes: versions from different modes can never be equal.
QUICK_PREFIX = "q-"
ETAG_PREFIX = "qe-"


class WeightsFormatError(ValueError):
    """A weights file that quick mode cannot read as safetensors (foreign, truncated, corrupt)."""


def model_fingerprint(
    directory: str | os.PathLike[str],
    *,
    full: bool = False,
    patterns: tuple[str, ...] = WEIGHTS_PATTERNS,
) -> str:
    """Data version of the weights under a local directory or an ``s3://`` prefix.

    - ``full=True``: the SHA-256 of every weights byte (``weights_fingerprint``; on S3 the
      objects are streamed and give the same value as a local copy). Exact, but reads
      everything: gigabytes for a Stable Diffusion pipeline.
    - quick, local (``"q-…"``): per ``*.safetensors`` file its relative path, size, header
      (names, dtypes, shapes, offsets, ``__metadata__``) and ``SAMPLE_BYTES`` at the start,
      middle and end of *every tensor*: 24 MB (0.6%) of Stable Diffusion 1.5's 4.3 GB.
    - quick, S3 (``"qe-…"``): relative path, size and ETag of each object, from one listing;
      nothing is downloaded. S3 gives a new ETag whenever an object's content changes.

    Limit of quick local mode: a change confined to bytes outside the samples (a few edited
    values, rows of a tensor that training never touched) goes unnoticed. A fine-tune changes
    every value of each tensor it trains, so sampling every tensor catches it even when only
    some layers were trained; use ``full=True`` when an exact version matters. mtimes are not
    used: a copy of the directory keeps its version. A weights file that is not valid
    safetensors raises ``WeightsFormatError`` naming it (no silent fall back to a full read).
    """
    text = os.fspath(directory)
    if "://" in text:
        # Deferred: plain local paths need no fsspec.
        from recap_dagster.storage.fs import filesystem, is_local

        fs, path = filesystem(text)
        if not is_local(fs):
            return _remote_fingerprint(fs, path, text, full, patterns)
        text = path
    if full:
        return weights_fingerprint(text, patterns)
    return _quick_local(Path(text), patterns)


def weights_fingerprint(directory: str | Path, patterns: tuple[str, ...] = WEIGHTS_PATTERNS) -> str:
    """SHA-256 (first 16 hex digits) over every weights file under ``directory``.

    Config and tokenizer files are left out on purpose: the version changes exactly when
    the weights do.
    """
    root = Path(directory)
    files = _local_files(root, patterns)
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(root)).encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def content_fingerprint(path: str | Path) -> str:
    """SHA-256 (first 16 hex digits) of a file, or of every file under a directory (with
    its relative path)."""
    root = Path(path)
    if root.is_file():
        files, base = [root], root.parent
    elif root.is_dir():
        files, base = sorted(p for p in root.rglob("*") if p.is_file()), root
    else:
        raise FileNotFoundError(f"not found: {root}")
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(base)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


# -- quick mode, local ---------------------------------------------------------------------
def _local_files(root: Path, patterns: tuple[str, ...]) -> list[Path]:
    files = sorted({p for pattern in patterns for p in root.rglob(pattern)})
    if not files:
        raise FileNotFoundError(f"no weights ({', '.join(patterns)}) under {root}")
    return files


def _quick_local(root: Path, patterns: tuple[str, ...]) -> str:
    # The scheme and sample size are hashed too: changing either gives new versions
    # rather than reusing old ones for different bytes.
    digest = hashlib.sha256(f"recap-quick-v1\0{SAMPLE_BYTES}\0".encode())
    for path in _local_files(root, patterns):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(root).as_posix()}\0{size}\0".encode())
        # Unbuffered: each read fetches exactly the sampled bytes, not an 8 KiB buffer more.
        with path.open("rb", buffering=0) as handle:
            header, spans = _read_header(handle, size, path)
            digest.update(header)
            for start, stop in _sample_ranges(spans, len(header)):
                handle.seek(start)
                data = _read_exactly(handle, stop - start, path)
                digest.update(start.to_bytes(8, "little"))
                digest.update(data)
    return QUICK_PREFIX + digest.hexdigest()[:16]


def _read_header(handle, size: int, path: Path) -> tuple[bytes, list[tuple[int, int]]]:
    """The raw header (8-byte length + JSON) and each tensor's ``(begin, end)`` in the data
    section; raises WeightsFormatError unless the file is well-formed safetensors."""

    def bad(why: str) -> WeightsFormatError:
        return WeightsFormatError(f"{path}: not a valid safetensors file ({why})")

    if size < 8:
        raise bad(f"{size} bytes, shorter than the 8-byte header length")
    prefix = _read_exactly(handle, 8, path)
    length = int.from_bytes(prefix, "little")
    if length > min(_MAX_HEADER_BYTES, size - 8):
        raise bad(f"header length {length} does not fit a {size}-byte file")
    raw = _read_exactly(handle, length, path)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise bad(f"header is not JSON: {error}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    data_len = size - 8 - length
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len
            or not isinstance(info.get("dtype"), str)
            or not isinstance(info.get("shape"), list)
        ):
            raise bad(f"bad entry for tensor {name!r}: {info!r}"[:300])
        spans.append((offsets[0], offsets[1]))
    # safetensors requires the tensors to fill the data section exactly, so a truncated
    # or appended-to file fails here.
    end = max((stop for _, stop in spans), default=0)
    if end != data_len:
        raise bad(f"tensors end at byte {end} of a {data_len}-byte data section")
    return prefix + raw, spans


def _sample_ranges(spans: list[tuple[int, int]], data_start: int) -> list[tuple[int, int]]:
    """File ranges to read: each tensor whole if small, else ``SAMPLE_BYTES`` at its start,
    middle and end; touching ranges are merged so runs of small tensors cost one read."""
    ranges = []
    for begin, end in spans:
        if end - begin <= 3 * SAMPLE_BYTES:
            ranges.append((begin, end))
        else:
            middle = begin + (end - begin - SAMPLE_BYTES) // 2
            ranges += [
                (begin, begin + SAMPLE_BYTES),
                (middle, middle + SAMPLE_BYTES),
                (end - SAMPLE_BYTES, end),
            ]
    merged: list[list[int]] = []
    for begin, end in sorted(r for r in ranges if r[1] > r[0]):
        if merged and begin <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([begin, end])
    return [(data_start + begin, data_start + end) for begin, end in merged]


def _read_exactly(handle, count: int, path: Path) -> bytes:
    chunks, left = [], count
    while left:
        chunk = handle.read(left)
        if not chunk:
            raise WeightsFormatError(f"{path}: ended early (changed while being read?)")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# -- remote (s3://) ------------------------------------------------------------------------
def _remote_fingerprint(fs, path: str, uri: str, full: bool, patterns: tuple[str, ...]) -> str:
    root = path.rstrip("/")
    # A long-lived process (the code server) must see the objects as they are now.
    fs.invalidate_cache(root)
    found = fs.find(root, detail=True)
    entries = {}
    for name, info in found.items():
        rel = name[len(root) + 1 :] if name.startswith(root + "/") else None
        # PurePath.match matches from the right, as rglob(pattern) does under the root.
        if rel and any(PurePosixPath(rel).match(pattern) for pattern in patterns):
            entries[rel] = info
    if not entries:
        raise FileNotFoundError(f"no weights ({', '.join(patterns)}) under {uri}")
    # Sorted by path components, as Path sorting does locally, so full mode matches
    # ``weights_fingerprint`` of a local copy.
    names = sorted(entries, key=lambda rel: rel.split("/"))
    if full:
        digest = hashlib.sha256()
        for rel in names:
            digest.update(rel.encode())
            with fs.open(f"{root}/{rel}", "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        return digest.hexdigest()[:16]
    digest = hashlib.sha256(b"recap-etag-v1\0")
    for rel in names:
        info = entries[rel]
        etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
        if not etag:
            raise ValueError(f"{uri}/{rel}: the listing gives no ETag; use full=True")
        digest.update(f"{rel}\0{info['size']}\0{etag}\n".encode())
    return ETAG_PREFIX + digest.hexdigest()[:16]


def config_key(data: object) -> str:
    """A stable 16-hex-digit hash of a JSON-able config (key order aside): the cache key
    of a recipe's build."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
