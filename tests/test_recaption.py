"""RECAP step 2's plain-Python core: recaption a shard, with and without DataLoader workers."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from recap_dagster.captioner import Captioner
from recap_dagster.captioner.recaption import (
    OUTPUT_DIR,
    SCHEMA,
    GenerationSettings,
    PrepareBatch,
    RecaptionJob,
    finished_stats,
    recaption_group,
    recaption_shard,
)
from recap_dagster.corpus import dataset as dataset_module
from recap_dagster.corpus.dataset import ShardBatch, ShardBatches
from recap_dagster.corpus.decoding import STATUS_OK
from recap_dagster.corpus.human_captions import clip_token_counter
from recap_dagster.corpus.listing import sample_key
from recap_dagster.corpus.reading import iter_shard
from recap_dagster.miniworld.captions import vocabulary_texts
from recap_dagster.miniworld.shard_writer import ShardRecord, write_shard
from recap_dagster.miniworld.tiny_captioner import build_tiny_captioner
from recap_dagster.storage.root import Storage

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


@pytest.fixture(scope="module")
def count(miniworld_paths):
    """Counts CLIP tokens with the miniworld's tokenizer (the text-to-image model's)."""
    return clip_token_counter(miniworld_paths.tokenizer)


@pytest.mark.parametrize("workers", [0, 2])
def test_recaption_shard_captions_every_decodable_row(
    shards_root, captioner, count, workers
) -> None:
    source = list(iter_shard(shards_root, SHARD))
    settings = GenerationSettings(
        batch_size=4, max_new_tokens_short=4, max_new_tokens_long=6, num_workers=workers
    )
    table, stats = recaption_shard(
        captioner, shards_root, SHARD, captioner_version="v1", count_tokens=count, settings=settings
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
            for style in ("short", "long"):  # a few words: within 77 tokens, not trimmed
                assert row[f"{style}_clip_tokens"] == count([row[f"recap_{style}"]])[0]
                assert row[f"{style}_hit_cap"] in (True, False) and row[f"{style}_trim"] is None
                assert 0 <= row[f"{style}_repetition"] <= 1
        else:  # kept, with why, and no caption (nor facts)
            assert row["recap_short"] is None and row["status"] == record.status
            assert row["short_clip_tokens"] is None and row["long_hit_cap"] is None
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
    batch = prepare(ShardBatch(SHARD, records, last=False, readers=1))
    assert [r.key for r in batch.batch.records] == [r.key for r in records]
    assert set(batch.inputs) == {"short", "long"}
    assert [r.key for r in batch.decoded] == [records[i].key for i in (0, 1, 3)]
    assert all(r.image is None for r in batch.batch.records)  # only inputs cross processes
    images = [r.image for r in records if r.image is not None]
    assert len(images) == 3
    with torch.inference_mode():
        captions = captioner.generate_from(batch.inputs["short"], max_new_tokens=5)
    assert captions == captioner.caption(images, "short", max_new_tokens=5)
    none_decoded = ShardBatch(SHARD, records[2:3], last=True, readers=1)
    assert PrepareBatch(captioner.input_builder())(none_decoded).inputs == {}


def test_a_finished_shard_is_reused_only_with_the_same_generation_record(
    shards_root, captioner, captioner_dir, count
) -> None:
    """The record holds the dtype and, per style, the prompt and the merged generation config
    (the checkpoint's own generation_config, the family's tokens, the settings); speed-only
    settings are not in it."""
    settings = GenerationSettings(batch_size=4, max_new_tokens_short=4, max_new_tokens_long=6)
    record = settings.record(captioner)
    table, _ = recaption_shard(
        captioner, shards_root, SHARD, captioner_version="v1", count_tokens=count, settings=settings
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


GROUP = [f"{i:05d}" for i in range(4)]


@pytest.fixture(scope="module")
def group_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Four shards of 5 samples; one sample of shard 1 does not decode."""
    root = str(tmp_path_factory.mktemp("group"))
    for shard in range(len(GROUP)):
        payloads = [_jpeg(shard * 5 + i) for i in range(5)]
        if shard == 1:
            payloads[3] = b"not an image"
        records = [
            ShardRecord(sample_key(shard, i), data, f"alt {shard}/{i}", f"https://x/{i}", {})
            for i, data in enumerate(payloads)
        ]
        write_shard(root, shard, records)
    return root


def test_each_worker_reads_only_its_share(group_root, monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker 1 of 2 reads shards 1 and 3 alone; with fewer shards than workers, each reads
    its own records of every shard, and a shard is complete after one last batch per reader."""
    opened: list[str] = []
    real = dataset_module.iter_shard_selected

    def recording(root_url, key, **kwargs):  # type: ignore[no-untyped-def]
        opened.append(key)
        return real(root_url, key, **kwargs)

    monkeypatch.setattr(dataset_module, "iter_shard_selected", recording)
    worker = SimpleNamespace(num_workers=2, id=1)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: worker)
    batches = list(ShardBatches(group_root, GROUP, batch_size=2))
    assert opened == ["00001", "00003"]
    assert [(b.shard, len(b.records), b.last) for b in batches] == [
        ("00001", 2, False), ("00001", 2, False), ("00001", 1, True),
        ("00003", 2, False), ("00003", 2, False), ("00003", 1, True),
    ]  # fmt: skip
    split = list(ShardBatches(group_root, GROUP[:1], batch_size=8))
    assert [(b.shard, [r.key for r in b.records], b.last, b.readers) for b in split] == [
        ("00000", [sample_key(0, 1), sample_key(0, 3)], True, 2)
    ]


def _outputs(root: str) -> dict[str, list[dict]]:
    store = Storage(root)
    return {
        name.removesuffix(".parquet"): store.read_parquet(OUTPUT_DIR, name).to_pylist()
        for name in sorted(store.listdir(OUTPUT_DIR))
    }


def test_two_processes_write_what_one_writes(
    group_root, captioner_dir, miniworld_paths, tmp_path: Path, s3_env: str
) -> None:
    """A group recaptioned by 2 CPU processes (spawned, as on 2 GPUs) into S3 (the loopback
    server) writes the same files as one process writes locally, and a rerun keeps every
    shard."""
    settings = GenerationSettings(
        batch_size=2, num_workers=1, max_new_tokens_short=4, max_new_tokens_long=6
    )
    roots = {1: str(tmp_path / "p1"), 2: f"{s3_env}/p2"}
    results = {}
    # Each of 2 processes on this 2-core machine runs 1 thread; so does the baseline, since
    # another thread count sums in another order and a random model's near-ties can flip.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for processes, root in roots.items():
        job = RecaptionJob(
            checkpoint=str(captioner_dir),
            captioner_version="v1",
            shards_root=group_root,
            storage_root=root,
            settings=settings,
            tokenizer_path=miniworld_paths.tokenizer,
        )
        events: list[dict] = []
        results[processes] = recaption_group(
            job, GROUP, [torch.device("cpu")] * processes, on_event=events.append
        )
        assert sorted(e["shard"] for e in events if "shard" in e) == GROUP
        assert {e["rank"] for e in events} == set(range(processes))
    torch.set_num_threads(threads)
    one, two = _outputs(roots[1]), _outputs(roots[2])
    assert sorted(one) == GROUP and one == two
    assert [line["rank"] for line in results[2].per_shard] == [0, 1, 0, 1]  # round-robin
    for result in results.values():
        assert (result.total.rows, result.total.captioned, result.total.undecodable) == (20, 19, 1)
        assert result.kept == []
    again = recaption_group(job, GROUP, [torch.device("cpu")] * 2)
    assert again.kept == GROUP and again.captioned.rows == 0
    assert _outputs(roots[2]) == two
