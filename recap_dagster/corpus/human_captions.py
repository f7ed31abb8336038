"""The human-caption set: load it from its JSONL file and validate it (no Dagster here).

The file is JSON Lines beside its images: one object per line with ``key``, ``image``
(a path relative to the file), ``short`` and ``long`` captions and optional ``scene``
ground truth. It is stored as parquet with the image bytes inline so that downstream
training reads one self-contained file.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from recap_dagster.corpus.decoding import decode_image

SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("image", pa.binary()),
        pa.field("short", pa.string()),
        pa.field("long", pa.string()),
        pa.field("scene", pa.string()),  # JSON ground truth, "" when unknown
    ]
)
COLUMN_DESCRIPTIONS = {
    "key": "unique image key",
    "image": "encoded image bytes",
    "short": "SHORT human caption (one short sentence)",
    "long": "LONG human caption (1-2 detailed sentences)",
    "scene": "ground-truth scene as JSON (miniworld only)",
}
CLIP_MAX_TOKENS = 77


class HumanCaptionsError(ValueError):
    """The human-caption file cannot be read as a caption set at all."""


def human_captions_version(path: str | Path) -> str:
    """A content version of the human-caption set: SHA-256 (16 hex digits) of the JSONL
    file and of every image it names, so a changed caption or image changes it."""
    path = Path(path)
    if not path.is_file():
        raise HumanCaptionsError(f"human-caption file not found: {path}")
    digest = hashlib.sha256(path.read_bytes())
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            image = json.loads(line).get("image") if line.strip() else None
        except (json.JSONDecodeError, AttributeError):
            continue  # load_human_captions reports it with its line number
        image_path = path.parent / str(image) if image else None
        if image_path is not None and image_path.is_file():
            digest.update(image_path.read_bytes())
    return digest.hexdigest()[:16]


def load_human_captions(path: str | Path) -> pa.Table:
    """Read the JSONL file and its images into a table with ``SCHEMA``.

    Structural problems (missing file, bad JSON, missing fields) raise with the line
    number. Content problems (undecodable images, empty captions, duplicates) are kept
    in the table for the checks to report.
    """
    path = Path(path)
    if not path.is_file():
        raise HumanCaptionsError(f"human-caption file not found: {path}")
    rows: dict[str, list] = {name: [] for name in SCHEMA.names}
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise HumanCaptionsError(f"{path}:{number}: invalid JSON ({error})") from error
            missing = [k for k in ("key", "image", "short", "long") if k not in item]
            if missing:
                raise HumanCaptionsError(f"{path}:{number}: missing field(s) {missing}")
            image_path = path.parent / item["image"]
            rows["key"].append(str(item["key"]))
            rows["image"].append(image_path.read_bytes() if image_path.is_file() else None)
            rows["short"].append(item["short"] if isinstance(item["short"], str) else "")
            rows["long"].append(item["long"] if isinstance(item["long"], str) else "")
            scene = item.get("scene")
            rows["scene"].append(json.dumps(scene, sort_keys=True) if scene else "")
    return pa.table(rows, schema=SCHEMA)


@dataclass
class ValidationResult:
    """Outcome of one validation: passed or not, a sentence, the offending keys."""

    passed: bool
    description: str
    failing_keys: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)


def _result(name: str, failing: list[str], total: int) -> ValidationResult:
    if not failing:
        return ValidationResult(True, f"all {total} rows pass: {name}")
    shown = ", ".join(failing[:10]) + (" ..." if len(failing) > 10 else "")
    return ValidationResult(
        False, f"{len(failing)} of {total} rows fail: {name} ({shown})", failing
    )


def check_images_decode(table: pa.Table, max_pixels: int) -> ValidationResult:
    keys = table.column("key").to_pylist()
    failing = []
    for key, data in zip(keys, table.column("image").to_pylist(), strict=True):
        if decode_image(data, max_pixels=max_pixels).status != "ok":
            failing.append(key)
    return _result("every image decodes", failing, len(keys))


def check_captions_present(table: pa.Table) -> ValidationResult:
    failing = [
        key
        for key, short, long in zip(
            table.column("key").to_pylist(),
            table.column("short").to_pylist(),
            table.column("long").to_pylist(),
            strict=True,
        )
        if not (short or "").strip() or not (long or "").strip()
    ]
    return _result("non-empty short and long captions", failing, table.num_rows)


def check_long_caption_tokens(
    table: pa.Table, count_tokens: Callable[[list[str]], list[int]], limit: int = CLIP_MAX_TOKENS
) -> ValidationResult:
    keys = table.column("key").to_pylist()
    counts = count_tokens([c or "" for c in table.column("long").to_pylist()])
    failing = [key for key, n in zip(keys, counts, strict=True) if n > limit]
    result = _result(f"long captions within {limit} tokens", failing, len(keys))
    if counts:
        result.metadata = {"max_tokens": max(counts), "mean_tokens": sum(counts) / len(counts)}
    return result


def check_unique_keys(table: pa.Table) -> ValidationResult:
    counts = Counter(table.column("key").to_pylist())
    duplicates = sorted(k for k, n in counts.items() if n > 1)
    return _result("unique keys", duplicates, table.num_rows)


def check_min_rows(table: pa.Table, min_rows: int) -> ValidationResult:
    passed = table.num_rows >= min_rows
    return ValidationResult(
        passed,
        f"{table.num_rows} rows (need at least {min_rows})",
        metadata={"rows": table.num_rows, "min_rows": min_rows},
    )


def clip_token_counter(tokenizer_dir: str) -> Callable[[list[str]], list[int]]:
    """Count tokens (start/end included, no truncation) with the configured CLIP tokenizer."""
    from transformers import CLIPTokenizerFast

    tokenizer = CLIPTokenizerFast.from_pretrained(tokenizer_dir)

    def count(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]]

    return count
