"""Generate the miniworld: a LAION-like corpus, human captions, pretraining data, eval prompts
and a CLIP tokenizer, all from one seed.

Layout under ``out_dir``::

    laion/                      img2dataset webdataset shards (NNNNN.tar/.parquet/_stats.json);
                                ``broken_fraction`` of the samples have corrupt bytes (see
                                :func:`broken_samples`)
    human_captions/             captions.jsonl + images/{key}.png (fine-tuning set)
    human_captions_heldout/     same format, disjoint images (caption-quality measurement)
    captioner_pretrain/pretrain.parquet   png bytes + terse caption + scene (base captioner)
    eval_prompts.jsonl          PromptTruth rows: the test prompts the report is on
    validation_prompts.jsonl    PromptTruth rows: the prompts to tune on, disjoint from test
    tokenizer/                  CLIP-style BPE (CLIPTokenizer.from_pretrained loads it)
    manifest.json               config, counts, content hash; written last

Every item draws from its own ``random.Random`` seeded by (base seed, domain, index), so
items do not depend on generation order and the domains (corpus, human, held-out, pretrain)
never share a seed. Generation is cached: a manifest with the same config and version
means the files are there and complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from itertools import combinations
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from recap_dagster.miniworld.captions import (
    alt_text,
    long_caption,
    prompt_text,
    short_caption,
    terse_caption,
    vocabulary_texts,
)
from recap_dagster.miniworld.scenes import (
    COLOURS,
    GRID,
    SHAPES,
    PromptTruth,
    Requirement,
    Scene,
    render,
    sample_scene,
)
from recap_dagster.t2i.training_data import ORACLE_COLUMNS
from recap_dagster.training.substrate import setting

# Bump when the generated content changes for the same config, so caches are invalidated.
MINIWORLD_VERSION = 3  # 2: broken_fraction (corrupt image bytes); 3: validation prompts
CATEGORIES = ("single_object", "two_objects", "counting", "colours", "position")

PRETRAIN_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("image", pa.binary()),  # PNG
        pa.field("caption", pa.string()),  # terse, PaLI-like
        pa.field("scene", pa.string()),  # Scene.to_dict() as JSON
    ]
)


@dataclass
class MiniworldConfig:
    """What to generate. Equal configs give byte-identical images and captions."""

    seed: int = setting(0, "Seed of every generated scene, caption and image.")
    shards: int = setting(4, "LAION-style corpus shards (img2dataset webdataset layout).")
    images_per_shard: int = setting(1000, "Corpus images per shard.")
    image_size: int = setting(32, "Image side in pixels.")
    human_captions: int = setting(100, "Human-captioned images (RECAP step 1's training set).")
    human_heldout: int = setting(50, "Held-out human-captioned images (caption quality).")
    pretrain_images: int = setting(4000, "Images of the base captioner's pretraining set.")
    eval_prompts_per_category: int = setting(40, "Evaluation prompts per category.")
    jpeg_quality: int = setting(95, "JPEG quality of the corpus images.")
    # A real scrape has samples whose bytes are corrupt although the row says "success":
    # they exercise the recaptioning stage's per-row status/error path.
    broken_fraction: float = setting(0.002, "Corpus samples written with corrupt bytes.")

    @classmethod
    def from_dict(cls, data: dict) -> MiniworldConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class MiniworldPaths:
    """Where a generated miniworld lives."""

    root: str
    corpus: str  # img2dataset root (shards)
    human_captions: str  # captions.jsonl
    human_captions_heldout: str  # captions.jsonl
    captioner_pretrain: str  # pretrain.parquet
    eval_prompts: str  # eval_prompts.jsonl (test)
    validation_prompts: str  # validation_prompts.jsonl
    tokenizer: str  # directory
    manifest: str  # manifest.json

    @classmethod
    def under(cls, out_dir: str | os.PathLike) -> MiniworldPaths:
        root = Path(out_dir)
        return cls(
            root=str(root),
            corpus=str(root / "laion"),
            human_captions=str(root / "human_captions" / "captions.jsonl"),
            human_captions_heldout=str(root / "human_captions_heldout" / "captions.jsonl"),
            captioner_pretrain=str(root / "captioner_pretrain" / "pretrain.parquet"),
            eval_prompts=str(root / "eval_prompts.jsonl"),
            validation_prompts=str(root / "validation_prompts.jsonl"),
            tokenizer=str(root / "tokenizer"),
            manifest=str(root / "manifest.json"),
        )

    def outputs(self) -> list[Path]:
        """Everything generation writes besides the manifest (removed before regenerating)."""
        return [
            Path(self.corpus),
            Path(self.human_captions).parent,
            Path(self.human_captions_heldout).parent,
            Path(self.captioner_pretrain).parent,
            Path(self.eval_prompts),
            Path(self.validation_prompts),
            Path(self.tokenizer),
        ]


# --------------------------------------------------------------------------------------
# Items
# --------------------------------------------------------------------------------------


def item_seed(base: int, domain: str, index: int) -> int:
    """A 64-bit seed for one item, independent of every other item and domain."""
    digest = hashlib.blake2b(f"{base}/{domain}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _encode(image, fmt: str, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format=fmt)
    return buffer.getvalue()


def _scene_and_image(rng: random.Random, size: int) -> tuple[Scene, object]:
    scene = sample_scene(rng)
    return scene, render(scene, size=size, seed=rng.getrandbits(32))


_HOSTS = (
    "cdn.example.com",
    "images.example.org",
    "static.example.net",
    "media.example-shop.com",
    "i.example-blog.net",
    "assets.example.io",
)


def _fake_url(rng: random.Random, alt: str) -> str:
    """A plausible image URL; often slugged from the alt text, as CMSs do."""
    slug = re.sub(r"[^a-z0-9]+", "-", alt.lower()).strip("-")[:40] or "image"
    if rng.random() < 0.4:
        slug = f"{rng.getrandbits(48):012x}"
    year, month = rng.randint(2012, 2023), rng.randint(1, 12)
    host = rng.choice(_HOSTS)
    ext = rng.choice(["jpg", "jpg", "jpeg", "png", "webp"])
    return f"https://{host}/uploads/{year}/{month:02d}/{slug}-{rng.randint(1, 9999)}.{ext}"


BROKEN_KINDS = ("truncated_jpeg", "empty", "not_an_image")
# What a scraper gets back instead of an image: an error page served with a 200.
_NOT_AN_IMAGE = (
    b"<!DOCTYPE html>\n<html><head><title>403 Forbidden</title></head>"
    b"<body><h1>Forbidden</h1><p>Hotlinking is not allowed.</p></body></html>\n"
)


def broken_samples(config: MiniworldConfig, shard: int) -> dict[int, str]:
    """In-shard index -> kind of corruption, for the shard's broken samples (deterministic).

    ``round(broken_fraction * images_per_shard)`` samples, but at least one in a shard of 50
    or more images whenever the fraction is positive, so small corpora exercise the path too.
    Kinds rotate with the shard, so even one sample per shard gives a mix across shards.
    """
    n = config.images_per_shard
    if config.broken_fraction <= 0 or n == 0:
        return {}
    wanted = round(config.broken_fraction * n)
    if n >= 50:
        wanted = max(1, wanted)
    rng = random.Random(item_seed(config.seed, f"broken/{shard}", 0))
    indices = sorted(rng.sample(range(n), min(wanted, n)))
    return {i: BROKEN_KINDS[(shard + j) % len(BROKEN_KINDS)] for j, i in enumerate(indices)}


def _corrupt(jpeg: bytes, kind: str) -> bytes:
    if kind == "truncated_jpeg":
        # Cut in the scan data: the header (size) still reads, decoding fails.
        return jpeg[: len(jpeg) * 3 // 4]
    if kind == "empty":
        return b""
    if kind == "not_an_image":
        return _NOT_AN_IMAGE
    raise ValueError(f"unknown corruption {kind!r}")


def _corpus_records(config: MiniworldConfig, shard: int, hasher) -> Iterator:
    from recap_dagster.corpus.listing import sample_key
    from recap_dagster.miniworld.shard_writer import ShardRecord

    broken = broken_samples(config, shard)
    for index in range(config.images_per_shard):
        rng = random.Random(item_seed(config.seed, f"laion/{shard}", index))
        scene, image = _scene_and_image(rng, config.image_size)
        alt = alt_text(scene, rng)
        url = _fake_url(rng, alt)
        key = sample_key(shard, index, config.images_per_shard)
        jpeg = _encode(image, "JPEG", config.jpeg_quality)
        metadata: dict = {"scene": scene.to_dict()}
        size: int | None = config.image_size
        if index in broken:
            # Written as a "success" row, as a scraper that trusted the HTTP status would;
            # the size is left to the writer's header probe (None where there is no header).
            jpeg = _corrupt(jpeg, broken[index])
            metadata["corrupt"] = broken[index]
            size = None
        # What the image truly shows, for the oracle fine-tune (the ceiling): an rng of its
        # own, so the image, alt text and URL are what they were without it.
        truth_rng = random.Random(item_seed(config.seed, f"truth/{shard}", index))
        short_column, long_column = ORACLE_COLUMNS
        truth = {short_column: short_caption(scene, truth_rng),
                 long_column: long_caption(scene, truth_rng)}  # fmt: skip
        hasher.update(key.encode() + jpeg + alt.encode() + url.encode())
        hasher.update("".join(truth.values()).encode())
        yield ShardRecord(
            key=key,
            image_bytes=jpeg,
            caption=alt,
            url=url,
            metadata=metadata,
            width=size,
            height=size,
            additional=truth,
        )


def _write_human_set(
    path: Path, prefix: str, count: int, config: MiniworldConfig, hasher
) -> list[dict]:
    """captions.jsonl + images/{key}.png; returns the rows."""
    images = path.parent / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        rng = random.Random(item_seed(config.seed, prefix, index))
        scene, image = _scene_and_image(rng, config.image_size)
        key = f"{prefix}{index:05d}"
        png = _encode(image, "PNG")
        (images / f"{key}.png").write_bytes(png)
        row = {
            "key": key,
            "image": f"images/{key}.png",
            "short": short_caption(scene, rng),
            "long": long_caption(scene, rng),
            "scene": scene.to_dict(),
        }
        hasher.update(png + json.dumps(row, sort_keys=True).encode())
        rows.append(row)
    _write_jsonl(path, rows)
    return rows


def _write_pretrain(path: Path, config: MiniworldConfig, hasher) -> list[str]:
    """The base captioner's pretraining parquet; returns the captions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: dict[str, list] = {name: [] for name in PRETRAIN_SCHEMA.names}
    for index in range(config.pretrain_images):
        rng = random.Random(item_seed(config.seed, "pretrain", index))
        scene, image = _scene_and_image(rng, config.image_size)
        png = _encode(image, "PNG")
        caption = terse_caption(scene, rng)
        scene_json = json.dumps(scene.to_dict(), sort_keys=True)
        hasher.update(png + caption.encode() + scene_json.encode())
        columns["key"].append(f"pretrain{index:06d}")
        columns["image"].append(png)
        columns["caption"].append(caption)
        columns["scene"].append(scene_json)
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(pa.table(columns, schema=PRETRAIN_SCHEMA), tmp)
    os.replace(tmp, path)
    return columns["caption"]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, sort_keys=True) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------
# Evaluation prompts
# --------------------------------------------------------------------------------------


def _kinds() -> list[tuple[str, str]]:
    return [(c, s) for c in COLOURS for s in SHAPES]


def _prompt_candidates(category: str, rng: random.Random, wanted: int) -> list[tuple]:
    """Requirement tuples for one category, distinct, in a seeded order."""
    kinds = _kinds()
    if category == "single_object":
        options = [(Requirement(c, s),) for c, s in kinds]
    elif category == "two_objects":
        options = [(Requirement(*a), Requirement(*b)) for a, b in combinations(kinds, 2)]
    elif category == "colours":
        # Attribute binding: the same shape in two colours ("a red circle and a blue circle").
        options = [
            (Requirement(c1, s), Requirement(c2, s))
            for s in SHAPES
            for c1, c2 in combinations(COLOURS, 2)
        ]
    elif category == "counting":
        single = [(Requirement(c, s, n),) for c, s in kinds for n in (2, 3)]
        pairs = [
            (Requirement(*a, n), Requirement(*b, m))
            for a, b in combinations(kinds, 2)
            for n, m in ((2, 1), (1, 2), (3, 1), (2, 2))
        ]
        rng.shuffle(single)
        rng.shuffle(pairs)
        # Mostly one kind ("three green triangles"), the rest two kinds with counts.
        n_single = min(len(single), -(-wanted * 3 // 5))
        return single[:n_single] + pairs[: max(0, wanted - n_single)]
    elif category == "position":
        cells = [(r, c) for r in range(GRID) for c in range(GRID)]
        options = [
            (Requirement(*a, 1, p), Requirement(*b, 1, q))
            for a, b in combinations(kinds, 2)
            for p, q in combinations(cells, 2)
        ]
    else:
        raise ValueError(f"unknown category {category!r}")
    for i, option in enumerate(options):
        # Random order within the prompt, so neither kind is always named first.
        if len(option) > 1 and rng.random() < 0.5:
            options[i] = option[::-1]
    return rng.sample(options, min(wanted, len(options)))


def make_eval_prompts(
    seed: int, per_category: int, *, domain: str = "eval", exclude: Sequence[PromptTruth] = ()
) -> list[PromptTruth]:
    """Distinct GenEval-like prompts with their truth, ``per_category`` per category (fewer
    where the miniworld has fewer distinct prompts: 18 single objects), none asking for
    what a prompt of ``exclude`` asks for (the same requirements in any order)."""
    taken = {frozenset(p.requirements) for p in exclude}
    prompts = []
    for category in CATEGORIES:
        rng = random.Random(item_seed(seed, f"{domain}/{category}", 0))
        seen: set[str] = set()
        candidates = _prompt_candidates(category, rng, per_category + len(taken))
        for requirements in candidates:
            if frozenset(requirements) in taken:
                continue
            text = prompt_text(requirements, category, rng)
            if text not in seen and len(seen) < per_category:
                seen.add(text)
                prompts.append(PromptTruth(text, category, tuple(requirements)))
    return prompts


def make_prompt_sets(seed: int, per_category: int) -> tuple[list[PromptTruth], list[PromptTruth]]:
    """(validation, test): two disjoint prompt sets. Validation is the set the miniworld's
    profiles were tuned on (the single set before the split, drawn the same way); test
    asks for nothing validation asks for, so a report on it was never tuned on. The
    miniworld has 18 single objects, all in validation at the default size: test then has
    no single-object prompts."""
    validation = make_eval_prompts(seed, per_category)
    return validation, make_eval_prompts(seed, per_category, domain="test", exclude=validation)


# --------------------------------------------------------------------------------------
# Loading helpers
# --------------------------------------------------------------------------------------


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def read_eval_prompts(path: str | os.PathLike) -> list[PromptTruth]:
    return [PromptTruth.from_dict(row) for row in read_jsonl(path)]


def read_manifest(out_dir: str | os.PathLike) -> dict | None:
    """The manifest of a complete miniworld under ``out_dir``, or None."""
    path = Path(MiniworldPaths.under(out_dir).manifest)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------


def _language_sample(seed: int, count: int) -> list[str]:
    """Extra captions in every style, so the tokenizer sees the whole language's wording."""
    texts = []
    for index in range(count):
        rng = random.Random(item_seed(seed, "language", index))
        scene = sample_scene(rng)
        texts += [short_caption(scene, rng), long_caption(scene, rng), alt_text(scene, rng)]
    return texts


def _cached(paths: MiniworldPaths, config: MiniworldConfig) -> bool:
    manifest = read_manifest(paths.root)
    return (
        manifest is not None
        and manifest.get("version") == MINIWORLD_VERSION
        and manifest.get("config") == asdict(config)
        and all(p.exists() for p in paths.outputs())
    )


def generate_miniworld(
    out_dir: str, config: MiniworldConfig, *, force: bool = False
) -> MiniworldPaths:
    """Generate (or reuse) the miniworld under ``out_dir``; see the module docstring."""
    paths = MiniworldPaths.under(out_dir)
    if not force and _cached(paths, config):
        return paths
    # Imported here: a cache hit should not pay for torch/transformers imports.
    from recap_dagster.miniworld.shard_writer import write_shard
    from recap_dagster.miniworld.tokenizer import train_clip_tokenizer

    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    # Un-mark first: a run killed from here on leaves no manifest, hence no false cache hit.
    Path(paths.manifest).unlink(missing_ok=True)
    for output in paths.outputs():
        if output.is_dir():
            shutil.rmtree(output)
        else:
            output.unlink(missing_ok=True)

    hasher = hashlib.sha256()
    texts: list[str] = []
    stats = []
    for shard in range(config.shards):
        records = list(_corpus_records(config, shard, hasher))
        texts += [r.caption for r in records]
        stats.append(
            write_shard(
                paths.corpus, shard, records, output_format="webdataset",
                additional_columns=ORACLE_COLUMNS,
            )
        )  # fmt: skip

    human = _write_human_set(
        Path(paths.human_captions), "human", config.human_captions, config, hasher
    )
    heldout = _write_human_set(
        Path(paths.human_captions_heldout), "heldout", config.human_heldout, config, hasher
    )
    texts += [row[k] for row in human + heldout for k in ("short", "long")]
    texts += _write_pretrain(Path(paths.captioner_pretrain), config, hasher)

    validation, prompts = make_prompt_sets(config.seed, config.eval_prompts_per_category)
    _write_jsonl(Path(paths.eval_prompts), [p.to_dict() for p in prompts])
    _write_jsonl(Path(paths.validation_prompts), [p.to_dict() for p in validation])
    hasher.update(Path(paths.eval_prompts).read_bytes())
    hasher.update(Path(paths.validation_prompts).read_bytes())
    texts += [p.prompt for p in prompts + validation]

    texts += vocabulary_texts() + _language_sample(config.seed, 1000)
    train_clip_tokenizer(texts, paths.tokenizer)
    hasher.update((Path(paths.tokenizer) / "tokenizer.json").read_bytes())
    vocab = json.loads((Path(paths.tokenizer) / "vocab.json").read_text(encoding="utf-8"))

    per_category = {c: sum(1 for p in prompts if p.category == c) for c in CATEGORIES}
    validation_per_category = {c: sum(1 for p in validation if p.category == c) for c in CATEGORIES}
    manifest = {
        "version": MINIWORLD_VERSION,
        "config": asdict(config),
        "content_sha256": hasher.hexdigest(),
        "counts": {
            "shards": config.shards,
            "corpus_images": sum(s["successes"] for s in stats),
            "broken_images": sum(len(broken_samples(config, i)) for i in range(config.shards)),
            "human_captions": len(human),
            "human_heldout": len(heldout),
            "pretrain_images": config.pretrain_images,
            "eval_prompts": per_category,
            "validation_prompts": validation_per_category,
            "tokenizer_vocab": len(vocab),
        },
        "layout": {
            k: os.path.relpath(v, paths.root) for k, v in asdict(paths).items() if k != "root"
        },
    }
    tmp = Path(paths.manifest + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, paths.manifest)
    return paths
