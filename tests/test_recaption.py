"""RECAP step 2's plain-Python core: recaption a shard, with and without DataLoader workers."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

from recap_dagster.captioner import Captioner
from recap_dagster.captioner.recaption import (
    SCHEMA,
    GenerationSettings,
    PrepareBatch,
    finished_stats,
    recaption_shard,
)
from recap_dagster.corpus.decoding import STATUS_OK
from recap_dagster.corpus.listing import sample_key
from recap_dagster.corpus.reading import iter_shard
from recap_dagster.miniworld.captions import vocabulary_texts
from recap_dagster.miniworld.shard_writer import ShardRecord, write_shard
from recap_dagster.miniworld.tiny_captioner import build_tiny_captioner

SHARD = "00000"


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (36, 36), (seed * 40 % 256, 90, 200)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shards_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One shard of 10 samples, three of them undecodable (empty, not an image, truncated)."""
    root = str(tmp_path_factory.mktemp("shards"))
    payloads = [_jpeg(i) for i in range(10)]
    payloads[2], payloads[5], payloads[9] = b"", b"<html>blocked</html>", payloads[9][:40]
    records = [
        ShardRecord(sample_key(0, i), data, f"alt {i}", f"https://x/{i}", {})
        for i, data in enumerate(payloads)
    ]
    write_shard(root, 0, records)
    return root


@pytest.fixture(scope="module")
def captioner_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("captioner")
    words = sorted({w for text in vocabulary_texts() for w in text.lower().split()})
    build_tiny_captioner("blip", directory, words=words, hidden_size=32, max_text_tokens=64)
    return directory


@pytest.fixture(scope="module")
def captioner(captioner_dir: Path) -> Captioner:
    return Captioner.from_pretrained(captioner_dir)


@pytest.mark.parametrize("workers", [0, 2])
def test_recaption_shard_captions_every_decodable_row(shards_root, captioner, workers) -> None:
    source = list(iter_shard(shards_root, SHARD))
    settings = GenerationSettings(
        batch_size=4, max_new_tokens_short=4, max_new_tokens_long=6, num_workers=workers
    )
    table, stats = recaption_shard(
        captioner, shards_root, SHARD, captioner_version="v1", settings=settings
    )
    assert table.schema == SCHEMA
    assert table.num_rows == stats.rows == len(source)
    rows = {row["key"]: row for row in table.to_pylist()}
    decoded = [r for r in source if r.status == STATUS_OK and r.image is not None]
    assert (stats.captioned, stats.undecodable) == (len(decoded), 3) == (7, 3)
    assert (stats.delivered, stats.not_delivered) == (10, 0)
    images = [r.image for r in decoded]
    for style in ("short", "long"):  # same as caption() with the style's settings
        expected = captioner.caption(images, style, **settings.generate_kwargs(style))
        assert [rows[r.key][f"recap_{style}"] for r in decoded] == expected
    for record in source:
        row = rows[record.key]
        if record.status == STATUS_OK and record.image is not None:
            assert row["recap_short"] is not None and row["status"] == STATUS_OK
        else:  # kept, with why, and no caption
            assert row["recap_short"] is None and row["status"] == record.status
    assert [row["key"] for row in table.to_pylist()] == sorted(rows)


def test_prepare_batch_runs_without_the_weights(shards_root, captioner) -> None:
    """The worker-side collate pickles without the model and builds the caption inputs."""
    records = list(iter_shard(shards_root, SHARD))[:4]  # record 2 does not decode
    prepare = pickle.loads(pickle.dumps(PrepareBatch(captioner.input_builder())))
    assert "model" not in vars(prepare.build)
    batch = prepare(records)
    assert batch.records == records and set(batch.inputs) == {"short", "long"}
    assert batch.decoded == [records[0], records[1], records[3]]
    images = [r.image for r in records if r.image is not None]
    assert len(images) == 3
    with torch.inference_mode():
        captions = captioner.generate_from(batch.inputs["short"], max_new_tokens=5)
    assert captions == captioner.caption(images, "short", max_new_tokens=5)
    assert PrepareBatch(captioner.input_builder())(records[2:3]).inputs == {}  # none decoded


def test_a_finished_shard_is_reused_only_with_the_same_generation_record(
    shards_root, captioner, captioner_dir
) -> None:
    """The record holds the dtype and, per style, the prompt and the merged generation config
    (the checkpoint's own generation_config, the family's tokens, the settings); speed-only
    settings are not in it."""
    settings = GenerationSettings(batch_size=4, max_new_tokens_short=4, max_new_tokens_long=6)
    record = settings.record(captioner)
    table, _ = recaption_shard(
        captioner, shards_root, SHARD, captioner_version="v1", settings=settings
    )
    assert set(table.column("generation").to_pylist()) == {record}
    parsed = json.loads(record)
    assert parsed["dtype"] == "float32"
    long = parsed["styles"]["long"]
    assert long["prompt"] == captioner.prefix("long")
    text_config = captioner.model.config.text_config
    assert (
        long["generation_config"]
        | {
            "max_new_tokens": 6,
            "no_repeat_ngram_size": 8,
            "eos_token_id": text_config.sep_token_id,  # BLIP's own end token, merged in
        }
        == long["generation_config"]
    )
    assert parsed["styles"]["short"]["generation_config"]["max_new_tokens"] == 4

    faster = GenerationSettings(
        batch_size=64, num_workers=2, max_new_tokens_short=4, max_new_tokens_long=6
    )
    assert faster.record(captioner) == record
    assert finished_stats(table, "v1", faster.record(captioner)) is not None
    assert finished_stats(table, "v2", record) is None  # another captioner
    for other in (
        GenerationSettings(max_new_tokens_short=4, max_new_tokens_long=7),
        GenerationSettings(max_new_tokens_short=4, max_new_tokens_long=6, no_repeat_ngram_size=0),
        GenerationSettings(max_new_tokens_short=4, max_new_tokens_long=6, num_beams=2),
    ):
        assert finished_stats(table, "v1", other.record(captioner)) is None, other
    bf16 = Captioner.from_pretrained(captioner_dir, dtype=torch.bfloat16)
    assert json.loads(settings.record(bf16))["dtype"] == "bfloat16"
    assert finished_stats(table, "v1", settings.record(bf16)) is None
    # A value the checkpoint's own generation_config.json sets is part of the record.
    own = Captioner.from_pretrained(captioner_dir)
    own.model.generation_config.length_penalty = 2.0
    assert (
        json.loads(settings.record(own))["styles"]["long"]["generation_config"]["length_penalty"]
        == 2.0
    )
    assert finished_stats(table, "v1", settings.record(own)) is None


def _repeated_ngrams(ids: list[int], n: int) -> int:
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) - len(set(grams))


def test_the_repetition_guard_stops_loops(shards_root, captioner) -> None:
    """An untrained captioner loops; with the guard no token n-gram comes twice."""
    images = [r.image for r in iter_shard(shards_root, SHARD) if r.image is not None][:4]
    build = captioner.input_builder()
    tokens = captioner.processor.tokenizer
    with torch.inference_mode():
        unguarded = captioner.generate_from(
            build(images, "long"), max_new_tokens=24, no_repeat_ngram_size=0
        )
        guarded = captioner.generate_from(
            build(images, "long"), max_new_tokens=24, no_repeat_ngram_size=2
        )
    ids = [tokens(text, add_special_tokens=False)["input_ids"] for text in (*unguarded, *guarded)]
    assert sum(_repeated_ngrams(row, 2) for row in ids[: len(images)]) > 0  # it does loop
    assert [_repeated_ngrams(row, 2) for row in ids[len(images) :]] == [0] * len(images)
