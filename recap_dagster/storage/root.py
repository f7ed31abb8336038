"""Where the pipeline's outputs live: a root that is a local folder or an ``s3://`` prefix.

Every output path is built from validated parts, so a partition key can never escape the
root. Every write is atomic: a killed run leaves either the previous file or nothing at
the final name, never a partial one.

- Files: written to a local temporary file first, then ``os.replace``-d into place (local)
  or uploaded in one ``put`` (S3, where an object appears only once its upload completes).
- Directories (model checkpoints): local ones are built beside the target and renamed into
  place; on S3, where a multi-object write cannot be atomic, the directory counts as
  finished only once its ``_SUCCESS`` marker is written, which happens last.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from recap_dagster.storage.fs import filesystem, is_local, replace_dir

SUCCESS_MARKER = "_SUCCESS"
_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.=+-]{0,199}$")


class StoragePathError(ValueError):
    """A path part (e.g. a partition key) that is empty or would escape the storage root."""


def validate_part(part: str) -> str:
    """Return ``part`` if it is a safe single path component, else raise StoragePathError."""
    if not isinstance(part, str) or not part:
        raise StoragePathError("empty path component")
    if part in {".", ".."} or "/" in part or "\\" in part or not _PART.match(part):
        raise StoragePathError(
            f"unsafe path component {part!r}: use letters, digits, '_', '-', '.', '=', '+' "
            "(no leading '.', no separators)"
        )
    return part


class Storage:
    """Paths and atomic reads/writes under one root (local folder or ``s3://bucket/prefix``)."""

    def __init__(self, root: str):
        if not root:
            raise StoragePathError("storage root is empty")
        if "://" not in root:
            root = str(Path(root).expanduser().resolve())
        self.root = root.rstrip("/")
        self.fs, self._root_path = filesystem(self.root)
        self.local = is_local(self.fs)

    def __repr__(self) -> str:
        return f"Storage({self.root!r})"

    # -- paths -------------------------------------------------------------------------
    def _fs_path(self, *parts: str) -> str:
        return "/".join([self._root_path, *(validate_part(p) for p in parts)])

    def uri(self, *parts: str) -> str:
        """Full local path or URI of ``parts`` under the root (validated)."""
        return "/".join([self.root, *(validate_part(p) for p in parts)])

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self._fs_path(*parts))

    def listdir(self, *parts: str) -> list[str]:
        """Names directly under ``parts`` (empty if it does not exist)."""
        path = self._fs_path(*parts) if parts else self._root_path
        if not self.fs.exists(path):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False))

    # -- files -------------------------------------------------------------------------
    @contextmanager
    def atomic_file(self, *parts: str) -> Iterator[str]:
        """Yield a local temp path to write; it replaces ``parts`` only if the block succeeds."""
        target = self._fs_path(*parts)
        if self.local:
            directory = os.path.dirname(target)
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", dir=directory)
            os.close(fd)
            try:
                yield tmp
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            with tempfile.TemporaryDirectory(prefix="recap-upload-") as tmpdir:
                tmp = os.path.join(tmpdir, os.path.basename(target))
                yield tmp
                self.fs.put_file(tmp, target)
                self.fs.invalidate_cache(os.path.dirname(target))

    def write_bytes(self, data: bytes, *parts: str) -> str:
        with self.atomic_file(*parts) as tmp:
            Path(tmp).write_bytes(data)
        return self.uri(*parts)

    def write_text(self, text: str, *parts: str) -> str:
        return self.write_bytes(text.encode("utf-8"), *parts)

    def read_bytes(self, *parts: str, start: int | None = None, end: int | None = None) -> bytes:
        """The file's bytes, or only ``[start, end)`` of them (one ranged read on S3)."""
        return self.fs.cat_file(self._fs_path(*parts), start=start, end=end)

    def download_file(self, local: str, *parts: str) -> str:
        """Copy the file ``parts`` to the local path ``local`` atomically (temp + rename)."""
        os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{os.path.basename(local)}.", dir=os.path.dirname(local)
        )
        os.close(fd)
        try:
            self.fs.get_file(self._fs_path(*parts), tmp)
            os.replace(tmp, local)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return local

    def read_text(self, *parts: str) -> str:
        return self.read_bytes(*parts).decode("utf-8")

    def write_parquet(self, table: pa.Table, *parts: str) -> str:
        with self.atomic_file(*parts) as tmp:
            pq.write_table(table, tmp)
        return self.uri(*parts)

    def read_parquet(self, *parts: str, columns: list[str] | None = None) -> pa.Table:
        with self.fs.open(self._fs_path(*parts), "rb") as handle:
            return pq.read_table(handle, columns=columns)

    def parquet_schema(self, *parts: str) -> pa.Schema:
        with self.fs.open(self._fs_path(*parts), "rb") as handle:
            return pq.read_schema(handle)

    def parquet_num_rows(self, *parts: str) -> int:
        with self.fs.open(self._fs_path(*parts), "rb") as handle:
            return pq.ParquetFile(handle).metadata.num_rows

    # -- directories (checkpoints) -------------------------------------------------------
    def dir_complete(self, *parts: str) -> bool:
        """True when the directory at ``parts`` was written to completion."""
        return self.fs.exists(self._fs_path(*parts, SUCCESS_MARKER))

    @contextmanager
    def atomic_dir(self, *parts: str) -> Iterator[str]:
        """Yield a local temp directory to fill; it replaces ``parts`` only on success."""
        with tempfile.TemporaryDirectory(prefix="recap-dir-") as staging_root:
            staging = os.path.join(staging_root, "out")
            os.makedirs(staging)
            yield staging
            self.publish_dir(staging, *parts)

    def publish_dir(self, local: str, *parts: str) -> str:
        """Put the finished local folder ``local`` at ``parts``, replacing what was there:
        moved in by renames locally (``local`` is consumed), uploaded with the ``_SUCCESS``
        marker last on S3."""
        target = self._fs_path(*parts)
        Path(local, SUCCESS_MARKER).write_text("")
        if self.local:
            replace_dir(local, target)
            return self.uri(*parts)
        marker = f"{target}/{SUCCESS_MARKER}"
        if self.fs.exists(target):
            # Unmark first so no reader sees old and new files mixed as "complete".
            if self.fs.exists(marker):
                self.fs.rm_file(marker)
            self.fs.rm(target, recursive=True)
        files = sorted(p for p in Path(local).rglob("*") if p.is_file())
        for path in files:
            if path.name != SUCCESS_MARKER:
                self.fs.put_file(str(path), f"{target}/{path.relative_to(local)}")
        self.fs.put_file(str(Path(local, SUCCESS_MARKER)), marker)
        self.fs.invalidate_cache(target)
        return self.uri(*parts)

    # A directory several machines write (a checkpoint of a multi-node run): one process
    # clears it, every node adds its files, then that process alone marks it complete.
    def _shared_staging(self, *parts: str) -> str:
        """Where the nodes gather a shared directory's files before it is complete: beside
        the target locally (renamed in at the end, as ``publish_dir`` does), the target
        itself on S3 (complete only once its ``_SUCCESS`` marker is written)."""
        target = self._fs_path(*parts)
        if not self.local:
            return target
        parent, name = os.path.split(target)
        return os.path.join(parent, f".{name}.shared")

    def begin_shared_dir(self, *parts: str) -> None:
        """Clear what a killed earlier attempt left of the shared directory ``parts``
        (call once, before any node adds to it): on S3 the target is unmarked first."""
        staging = self._shared_staging(*parts)
        if not self.local:
            self.remove_dir(*parts)
        elif os.path.exists(staging):
            shutil.rmtree(staging)

    def add_to_shared_dir(self, local: str, *parts: str) -> None:
        """Add the files of the local folder ``local`` (one node's share) to the shared
        directory ``parts``; it is not complete until ``finish_shared_dir``. Locally the
        files are moved, not copied (``local`` is consumed, as by ``publish_dir``): a
        real-size training state is 12 GB."""
        staging = self._shared_staging(*parts)
        for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
            if path.name == SUCCESS_MARKER:
                continue
            relative = str(path.relative_to(local))
            if self.local:
                destination = os.path.join(staging, relative)
                os.makedirs(os.path.dirname(destination), exist_ok=True)
                shutil.move(path, destination)
            else:
                self.fs.put_file(str(path), f"{staging}/{relative}")

    def finish_shared_dir(self, *parts: str) -> str:
        """Mark the shared directory ``parts`` complete once every node has added its
        files (call once): renamed into place locally, ``_SUCCESS`` written last on S3."""
        staging = self._shared_staging(*parts)
        if self.local:
            os.makedirs(staging, exist_ok=True)
            Path(staging, SUCCESS_MARKER).write_text("")
            replace_dir(staging, self._fs_path(*parts))
        else:
            self.fs.pipe_file(f"{staging}/{SUCCESS_MARKER}", b"")
            self.fs.invalidate_cache(staging)
        return self.uri(*parts)

    def remove_dir(self, *parts: str) -> None:
        """Delete the directory ``parts``: its ``_SUCCESS`` marker first, so that a
        half-deleted directory never counts as complete."""
        target = self._fs_path(*parts)
        marker = f"{target}/{SUCCESS_MARKER}"
        if self.fs.exists(marker):
            self.fs.rm_file(marker)
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)
        self.fs.invalidate_cache(os.path.dirname(target))

    @contextmanager
    def local_dir(self, *parts: str) -> Iterator[str]:
        """Yield a local path holding the finished directory ``parts`` (downloaded from S3)."""
        if not self.dir_complete(*parts):
            raise FileNotFoundError(f"{self.uri(*parts)} is missing or was not written completely")
        if self.local:
            yield self._fs_path(*parts)
            return
        with tempfile.TemporaryDirectory(prefix="recap-get-") as tmp:
            self.fs.get(self._fs_path(*parts), tmp, recursive=True)
            # fsspec puts the contents either in tmp or in tmp/<name> depending on version.
            inner = os.path.join(tmp, parts[-1])
            yield inner if os.path.isdir(inner) else tmp
