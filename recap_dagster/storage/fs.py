"""fsspec access to local folders and ``s3://`` URIs.

Credentials are never passed in config: s3fs/botocore read ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and ``AWS_REGION`` from the
environment. ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) points at a non-AWS S3 API
server such as MinIO or a loopback moto server.
"""

from __future__ import annotations

import os
import shutil
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem


def storage_options_for(url: str) -> dict:
    """fsspec options for ``url``, taken from the environment only."""
    if url.startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        options: dict = {}
        if endpoint:
            options["endpoint_url"] = endpoint
        return options
    return {}


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(fs, path)`` for a local path or URI; ``path`` is in the filesystem's form."""
    fs, path = fsspec.core.url_to_fs(url, **storage_options_for(url))
    return fs, path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(url: str, *parts: str) -> str:
    """Join path parts onto a local path or URI with forward slashes."""
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def replace_dir(staging: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Put the finished local folder ``staging`` at ``target``, replacing what was there.

    Readers see either the old folder or the new one, never a mix: ``staging`` is first
    moved beside ``target`` (possibly across filesystems), then swapped in by renames.
    """
    target = os.fspath(target)
    parent = os.path.dirname(target) or "."
    name = os.path.basename(target)
    os.makedirs(parent, exist_ok=True)
    incoming = os.path.join(parent, f".{name}.in-{uuid.uuid4().hex}")
    shutil.move(os.fspath(staging), incoming)
    old = None
    if os.path.exists(target):
        old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex}")
        os.replace(target, old)
    os.replace(incoming, target)
    if old:
        shutil.rmtree(old, ignore_errors=True)
