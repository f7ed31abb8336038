"""Content fingerprints used as Dagster data versions."""

from __future__ import annotations

import hashlib
from pathlib import Path

VERSION_FILE = "RECAP_VERSION"


def weights_fingerprint(
    directory: str | Path, patterns: tuple[str, ...] = ("*.safetensors",)
) -> str:
    """SHA-256 (first 16 hex digits) over every weights file under ``directory``.

    Config and tokenizer files are left out on purpose: the version changes exactly when
    the weights do.
    """
    root = Path(directory)
    files = sorted({p for pattern in patterns for p in root.rglob(pattern)})
    if not files:
        raise FileNotFoundError(f"no weights ({', '.join(patterns)}) under {root}")
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
