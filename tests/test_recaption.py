"""RECAP step 2's plain-Python core: recaption a shard, with and without DataLoader workers."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from PIL import Image

from recap_dagster.captioner import Captioner
from recap_dagster.captioner.recaption import (
    SCHEMA,
    GenerationSettings,
    PrepareBatch,
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
def captioner(tmp_path_factory: pytest.TempPathFactory) -> Captioner:
    directory = tmp_path_factory.mktemp("captioner")
    words = sorted({w for text in vocabulary_texts() for w in text.lower().split()})
    build_tiny_captioner("blip", directory, words=words, hidden_size=32, max_text_tokens=64)
    return Captioner.from_pretrained(directory)


@pytest.mark.parametrize("workers", [0, 2])
def test_recaption_shard_captions_every_decodable_row(shards_root, captioner, workers) -> None:
    source = list(iter_shard(shards_root, SHARD))
    settings = GenerationSettings(batch_size=4, max_new_tokens=6, num_workers=workers)
    table, stats = recaption_shard(
        captioner, shards_root, SHARD, captioner_version="v1", settings=settings
    )
    assert table.schema == SCHEMA
    assert table.num_rows == stats.rows == len(source)
    rows = {row["key"]: row for row in table.to_pylist()}
    decoded = [r for r in source if r.status == STATUS_OK and r.image is not None]
    assert (stats.captioned, stats.undecodable) == (len(decoded), 3) == (7, 3)
    assert (stats.delivered, stats.not_delivered) == (10, 0)
    expected = captioner.caption([r.image for r in decoded], "long", max_new_tokens=6)
    assert [rows[r.key]["recap_long"] for r in decoded] == expected  # same as caption()
    for record in source:
        row = rows[record.key]
        if record.status == STATUS_OK and record.image is not None:
            assert row["recap_short"] is not None and row["status"] == STATUS_OK
        else:  # kept, with why, and no caption
            assert row["recap_short"] is None and row["status"] == record.status
    assert [row["key"] for row in table.to_pylist()] == sorted(rows)


@pytest.fixture(scope="module")
def chat_captioner(tmp_path_factory: pytest.TempPathFactory) -> Captioner:
    """A tiny Qwen2.5-VL: its processor (chat template, image-only) goes to the workers."""
    directory = tmp_path_factory.mktemp("chat_captioner")
    words = sorted({w for text in vocabulary_texts() for w in text.lower().split()})
    build_tiny_captioner("qwen_vl", directory, words=words, hidden_size=32)
    return Captioner.from_pretrained(directory)


@pytest.mark.parametrize("family_fixture", ["captioner", "chat_captioner"])
def test_prepare_batch_runs_without_the_weights(
    shards_root, family_fixture: str, request: pytest.FixtureRequest
) -> None:
    """The worker-side collate pickles without the model and builds the caption inputs."""
    captioner: Captioner = request.getfixturevalue(family_fixture)
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
