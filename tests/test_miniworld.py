"""Miniworld generation: img2dataset layout, determinism, caching, disjoint splits, prompts."""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from recap_dagster.miniworld import generate as gen
from recap_dagster.miniworld.__main__ import main
from recap_dagster.miniworld.captions import grade_caption, parse_caption
from recap_dagster.miniworld.generate import (
    CATEGORIES,
    MiniworldConfig,
    MiniworldPaths,
    generate_miniworld,
    read_eval_prompts,
    read_jsonl,
    read_manifest,
)
from recap_dagster.miniworld.scenes import Scene, scene_from_requirements

SMALL = MiniworldConfig(
    seed=3,
    shards=2,
    images_per_shard=50,
    human_captions=20,
    human_heldout=10,
    pretrain_images=60,
    eval_prompts_per_category=12,
)
IMG2DATASET_COLUMNS = [
    "caption", "url", "key", "status", "error_message", "width", "height",
    "original_width", "original_height", "exif", "sha256",
]  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> MiniworldPaths:
    return generate_miniworld(str(tmp_path_factory.mktemp("world")), SMALL)


def _tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]


def _pixel_hash(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as image:
        return hashlib.sha256(np.asarray(image.convert("RGB")).tobytes()).hexdigest()


def _corpus(world: MiniworldPaths) -> list[tuple[str, bytes, str, dict]]:
    """(key, jpg, txt, json) for every sample of every shard."""
    samples = []
    for shard in sorted(Path(world.corpus).glob("*.tar")):
        parts: dict[str, dict[str, bytes]] = {}
        for name, data in _tar_members(shard):
            key, ext = name.split(".", 1)
            parts.setdefault(key, {})[ext] = data
        for key, p in parts.items():
            samples.append((key, p["jpg"], p["txt"].decode(), json.loads(p["json"])))
    return samples


def _human_images(path: str) -> list[bytes]:
    rows = read_jsonl(path)
    return [(Path(path).parent / row["image"]).read_bytes() for row in rows]


# ------------------------------------------------------------------------------- layout


def test_layout_is_img2datasets(world: MiniworldPaths) -> None:
    corpus = Path(world.corpus)
    names = sorted(p.name for p in corpus.iterdir())
    assert names == [
        "00000.parquet", "00000.tar", "00000_stats.json",
        "00001.parquet", "00001.tar", "00001_stats.json",
    ]  # fmt: skip
    for shard in range(SMALL.shards):
        members = [name for name, _ in _tar_members(corpus / f"{shard:05d}.tar")]
        keys = [f"{shard:05d}{i:02d}" for i in range(SMALL.images_per_shard)]
        assert members == [f"{k}.{ext}" for k in keys for ext in ("jpg", "json", "txt")]
        table = pq.read_table(corpus / f"{shard:05d}.parquet")
        assert table.column_names[-len(IMG2DATASET_COLUMNS) :] == IMG2DATASET_COLUMNS
        assert table.column("key").to_pylist() == keys
        assert set(table.column("status").to_pylist()) == {"success"}
        stats = json.loads((corpus / f"{shard:05d}_stats.json").read_text())
        assert stats["count"] == stats["successes"] == SMALL.images_per_shard
        assert stats["status_dict"] == {"success": SMALL.images_per_shard}


def test_corpus_samples(world: MiniworldPaths) -> None:
    samples = _corpus(world)
    assert len(samples) == SMALL.shards * SMALL.images_per_shard
    for key, jpg, txt, meta in samples:
        if "corrupt" in json.loads(meta["metadata"]):
            continue  # see test_broken_samples
        with Image.open(io.BytesIO(jpg)) as image:
            assert image.format == "JPEG" and image.size == (SMALL.image_size,) * 2
        assert meta["key"] == key and meta["caption"] == txt
        assert meta["url"].startswith("https://") and meta["status"] == "success"
        assert meta["width"] == meta["height"] == SMALL.image_size
        assert meta["sha256"] == hashlib.sha256(jpg).hexdigest()
        scene = Scene.from_dict(json.loads(meta["metadata"])["scene"])
        assert 1 <= len(scene.objects) <= 4
        assert not parse_caption(txt).placements()  # alt text never gives positions
    assert len({url for *_, meta in samples for url in [meta["url"]]}) == len(samples)


def test_shard_reader_sees_scene(world: MiniworldPaths) -> None:
    from recap_dagster.corpus.reading import iter_shard

    records = list(iter_shard(world.corpus, "00001"))
    assert len(records) == SMALL.images_per_shard
    for r in records:
        assert (r.status == "ok" and r.image is not None) == ("corrupt" not in r.metadata)
    Scene.from_dict(records[0].metadata["scene"])


def test_broken_samples(world: MiniworldPaths) -> None:
    """Corrupt bytes in "success" rows: at least one per shard of >= 50, a mix of kinds, and
    the shard reader reports each with a non-ok status and an error, keeping the row."""
    from recap_dagster.corpus.reading import iter_shard

    kinds = Counter()
    for shard in range(SMALL.shards):
        expected = gen.broken_samples(SMALL, shard)
        assert len(expected) >= 1
        records = list(iter_shard(world.corpus, f"{shard:05d}"))
        broken = {r.key: r for r in records if r.status != "ok"}
        keys = {f"{shard:05d}{i:02d}": kind for i, kind in expected.items()}
        assert set(broken) == set(keys)
        for key, record in broken.items():
            assert record.metadata["corrupt"] == keys[key] and record.image is None
            assert record.status in ("decode_error", "missing") and record.error
            kinds[keys[key]] += 1
        table = pq.read_table(Path(world.corpus) / f"{shard:05d}.parquet").to_pylist()
        assert {row["status"] for row in table} == {"success"}  # the source trusted the bytes
    assert set(kinds) == {"truncated_jpeg", "empty"}  # two shards: kinds rotate per shard
    assert read_manifest(world.root)["counts"]["broken_images"] == sum(kinds.values())  # type: ignore[index]

    many = gen.broken_samples(replace(SMALL, images_per_shard=3000), 0)
    assert len(many) == 6 and set(many.values()) == set(gen.BROKEN_KINDS)
    assert gen.broken_samples(replace(SMALL, images_per_shard=49), 0) == {}
    assert gen.broken_samples(replace(SMALL, broken_fraction=0.0), 0) == {}
    assert gen.broken_samples(SMALL, 1) == gen.broken_samples(SMALL, 1)


def test_alt_text_is_web_like_in_corpus(world: MiniworldPaths) -> None:
    outcome = Counter()
    for _, _, txt, meta in _corpus(world):
        scene = Scene.from_dict(json.loads(meta["metadata"])["scene"])
        kinds = set(parse_caption(txt).kinds())
        outcome["none" if not kinds else "true" if kinds <= set(scene.kinds()) else "wrong"] += 1
    total = sum(outcome.values())
    assert 0.3 <= outcome["none"] / total <= 0.7
    assert 0.15 <= outcome["true"] / total <= 0.55
    assert outcome["wrong"] > 0


def test_human_captions(world: MiniworldPaths) -> None:
    for path, count, prefix in [
        (world.human_captions, SMALL.human_captions, "human"),
        (world.human_captions_heldout, SMALL.human_heldout, "heldout"),
    ]:
        rows = read_jsonl(path)
        assert len(rows) == count
        for row in rows:
            assert set(row) == {"key", "image", "short", "long", "scene"}
            assert row["key"].startswith(prefix) and row["image"] == f"images/{row['key']}.png"
            assert (Path(path).parent / row["image"]).is_file()
            scene = Scene.from_dict(row["scene"])
            assert grade_caption(row["long"], scene)["exact"]
            assert grade_caption(row["short"], scene)["counts_exact"]
    # the human-caption module of the project reads the file as it is written here
    from recap_dagster.corpus.human_captions import load_human_captions

    table = load_human_captions(world.human_captions)
    assert table.num_rows == SMALL.human_captions and None not in table.column("image").to_pylist()


def test_captioner_pretrain(world: MiniworldPaths) -> None:
    table = pq.read_table(world.captioner_pretrain)
    assert table.column_names == ["key", "image", "caption", "scene"]
    assert table.num_rows == SMALL.pretrain_images
    for row in table.to_pylist():
        scene = Scene.from_dict(json.loads(row["scene"]))
        if row["caption"] not in ("shapes", "geometric shapes"):
            assert set(parse_caption(row["caption"]).kinds()) == set(scene.kinds())
        with Image.open(io.BytesIO(row["image"])) as image:
            assert image.format == "PNG"


def test_splits_are_disjoint(world: MiniworldPaths) -> None:
    corpus = {
        _pixel_hash(jpg)
        for _, jpg, _, meta in _corpus(world)
        if "corrupt" not in json.loads(meta["metadata"])
    }
    human = {_pixel_hash(b) for b in _human_images(world.human_captions)}
    heldout = {_pixel_hash(b) for b in _human_images(world.human_captions_heldout)}
    pretrain_images = pq.read_table(world.captioner_pretrain)["image"].to_pylist()
    pretrain = {_pixel_hash(b) for b in pretrain_images}
    sets = [corpus, human, heldout, pretrain]
    assert [len(s) for s in sets] == [100 - 2, 20, 10, 60]  # one broken sample per shard
    for i, a in enumerate(sets):
        for b in sets[i + 1 :]:
            assert not a & b
    # The corpus JPEGs are lossy, so compare the scenes too (with their backgrounds).
    corpus_scenes = {json.dumps(json.loads(m["metadata"])["scene"]) for *_, m in _corpus(world)}
    human_scenes = {
        json.dumps(Scene.from_dict(r["scene"]).to_dict())
        for p in (world.human_captions, world.human_captions_heldout)
        for r in read_jsonl(p)
    }
    assert not corpus_scenes & human_scenes


def test_eval_prompts(world: MiniworldPaths) -> None:
    """Validation (to tune on) and test (to report on) prompts: each category full where the
    world has enough distinct prompts, and no test prompt asks what a validation one asks."""
    validation = read_eval_prompts(world.validation_prompts)
    prompts = read_eval_prompts(world.eval_prompts)
    by_category = Counter(p.category for p in validation)
    assert set(by_category) == set(CATEGORIES)
    assert all(n == SMALL.eval_prompts_per_category for n in by_category.values())
    tested = Counter(p.category for p in prompts)
    assert tested["single_object"] == 18 - 12  # the kinds validation left
    assert all(tested[c] == 12 for c in CATEGORIES if c != "single_object")
    asked = {frozenset(p.requirements) for p in validation}
    assert not asked & {frozenset(p.requirements) for p in prompts}
    assert not {p.prompt for p in validation} & {p.prompt for p in prompts}
    assert len({(p.category, p.prompt) for p in prompts}) == len(prompts)
    rng = random.Random(0)
    for p in prompts + validation:
        assert p.requirements
        scene = scene_from_requirements(p.requirements, rng)
        grade = grade_caption(p.prompt, scene)
        assert grade["counts_exact"], p
        cells = [r.cell for r in p.requirements]
        assert (p.category == "position") == all(c is not None for c in cells)
        if p.category == "position":
            assert grade["exact"], p
        if p.category == "counting":
            assert any(r.count > 1 for r in p.requirements)
        if p.category == "colours":
            assert len({r.shape for r in p.requirements}) == 1
            assert len({r.colour for r in p.requirements}) == 2
    single = gen.make_eval_prompts(0, 100)
    assert sum(p.category == "single_object" for p in single) == 18  # every kind once


def test_tokenizer_covers_the_world(world: MiniworldPaths) -> None:
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(world.tokenizer)
    rows = read_jsonl(world.human_captions) + read_jsonl(world.human_captions_heldout)
    assert max(len(tok(r["long"]).input_ids) for r in rows) <= 77
    manifest = read_manifest(world.root)
    assert manifest is not None and manifest["counts"]["tokenizer_vocab"] == len(tok)


# ------------------------------------------------------------------- determinism, cache


def test_deterministic(world: MiniworldPaths, tmp_path: Path) -> None:
    again = generate_miniworld(str(tmp_path / "again"), SMALL)
    for shard in ("00000", "00001"):
        assert _tar_members(Path(world.corpus) / f"{shard}.tar") == _tar_members(
            Path(again.corpus) / f"{shard}.tar"
        )
        assert pq.read_table(Path(world.corpus) / f"{shard}.parquet").equals(
            pq.read_table(Path(again.corpus) / f"{shard}.parquet")
        )
    for attr in ("human_captions", "human_captions_heldout", "eval_prompts", "captioner_pretrain"):
        assert Path(getattr(world, attr)).read_bytes() == Path(getattr(again, attr)).read_bytes()
    assert _human_images(world.human_captions) == _human_images(again.human_captions)
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        assert (Path(world.tokenizer) / name).read_bytes() == (
            Path(again.tokenizer) / name
        ).read_bytes()
    assert Path(world.manifest).read_bytes() == Path(again.manifest).read_bytes()

    other = generate_miniworld(str(tmp_path / "other"), replace(SMALL, seed=4))
    assert (
        read_manifest(other.root)["content_sha256"]
        != read_manifest(world.root)[  # type: ignore[index]
            "content_sha256"
        ]
    )


def test_cached_and_invalidated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = replace(SMALL, images_per_shard=10, pretrain_images=10, eval_prompts_per_category=3)
    paths = generate_miniworld(str(tmp_path), config)
    stamp = Path(paths.manifest).stat().st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("should have been cached")

    with monkeypatch.context() as patch:
        patch.setattr("recap_dagster.miniworld.shard_writer.write_shard", boom)
        assert generate_miniworld(str(tmp_path), config) == paths
    assert Path(paths.manifest).stat().st_mtime_ns == stamp

    # A different config regenerates and leaves no stale shard behind.
    smaller = replace(config, shards=1)
    generate_miniworld(str(tmp_path), smaller)
    assert not (Path(paths.corpus) / "00001.tar").exists()
    assert read_manifest(tmp_path)["config"]["shards"] == 1  # type: ignore[index]

    # A run killed midway leaves no manifest, so the next call regenerates.
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr("recap_dagster.miniworld.tokenizer.train_clip_tokenizer", killed)
        with pytest.raises(KeyboardInterrupt):
            generate_miniworld(str(tmp_path), config)
    assert not Path(paths.manifest).exists()
    generate_miniworld(str(tmp_path), config)
    assert read_manifest(tmp_path)["config"] == gen.asdict(config)  # type: ignore[index]


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--out", str(tmp_path), "--seed", "9", "--shards", "1", "--images-per-shard", "5"]
    argv += ["--human-captions", "3", "--human-heldout", "2", "--pretrain-images", "4"]
    argv += ["--eval-prompts-per-category", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "laion") in out and "miniworld ready in" in out
    manifest = read_manifest(tmp_path)
    assert manifest is not None and manifest["config"]["seed"] == 9
    assert manifest["counts"]["corpus_images"] == 5


def test_validation_prompts_must_not_be_test_prompts(world: MiniworldPaths, tmp_path) -> None:
    """Evaluating on validation prompts (to tune) refuses a set that shares a prompt with
    the test set the report is on."""
    from recap_dagster.evaluation.evaluate import read_prompts
    from recap_dagster.miniworld.world import MiniworldWorld

    the_world = MiniworldWorld()
    test, validation = world.eval_prompts, world.validation_prompts
    assert read_prompts(the_world, "test", test, validation) == the_world.read_eval_prompts(test)
    assert len(read_prompts(the_world, "validation", test, validation)) > 0
    leaky = tmp_path / "leaky.jsonl"
    leaky.write_text(Path(validation).read_text() + Path(test).read_text().splitlines()[0] + "\n")
    with pytest.raises(ValueError, match="1 validation prompt\\(s\\) are test prompts too"):
        read_prompts(the_world, "validation", test, str(leaky))
    with pytest.raises(ValueError, match="no validation prompts"):
        read_prompts(the_world, "validation", test, "")
    with pytest.raises(ValueError, match="prompt_set must be"):
        read_prompts(the_world, "train", test, validation)
