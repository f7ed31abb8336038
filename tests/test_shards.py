"""Shard I/O in img2dataset's format: round trips, bad samples, truncation, atomicity,
streaming, listing, S3 (moto server) and the DataLoader wrapper."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch.utils.data
from PIL import Image

from recap_dagster.corpus import listing, reading
from recap_dagster.corpus.dataset import ShardDataset, collate_records
from recap_dagster.corpus.listing import ShardInfo, list_shards, sample_key, shard_key
from recap_dagster.corpus.reading import ShardReadError, count_rows, iter_shard
from recap_dagster.miniworld.shard_writer import ShardRecord, write_shard
from recap_dagster.storage.fs import filesystem

IMG2DATASET_COLUMNS = [
    "metadata",
    "caption",
    "url",
    "key",
    "status",
    "error_message",
    "width",
    "height",
    "original_width",
    "original_height",
    "exif",
    "sha256",
]


def jpeg(seed: int, size: tuple[int, int] = (32, 24), quality: int = 90) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def good_record(shard: int, index: int, size: tuple[int, int] = (32, 24)) -> ShardRecord:
    return ShardRecord(
        key=sample_key(shard, index),
        image_bytes=jpeg(shard * 1000 + index, size),
        caption=f"alt text {index}",
        url=f"https://example.com/{shard}/{index}.jpg",
        metadata={"objects": [{"shape": "circle", "colour": "red"}], "index": index},
    )


def records_for(shard: int, n: int) -> list[ShardRecord]:
    return [good_record(shard, i) for i in range(n)]


def read_all(root: str, key: str, **kwargs) -> list[reading.LaionRecord]:
    return list(iter_shard(root, key, **kwargs))


# --------------------------------------------------------------------------- naming


def test_keys_follow_img2dataset():
    assert shard_key(3) == "00003"
    assert sample_key(3, 42) == "000030042"
    assert sample_key(12, 7, samples_per_shard=1000) == "00012007"


# --------------------------------------------------------------------------- round trips


def test_round_trip_webdataset(tmp_path):
    root = str(tmp_path / "laion")
    records = records_for(3, 6)
    records.insert(
        2,
        ShardRecord(
            key=sample_key(3, 99),
            image_bytes=None,
            caption="lost",
            url="https://example.com/404.jpg",
            metadata={"index": 99},
            status="failed_to_download",
            error_message="HTTP Error 404: Not Found",
        ),
    )
    stats = write_shard(root, 3, records)

    assert sorted(os.listdir(root)) == ["00003.parquet", "00003.tar", "00003_stats.json"]
    assert stats == json.loads((tmp_path / "laion" / "00003_stats.json").read_text())
    assert {k: stats[k] for k in ("count", "successes", "failed_to_download")} == {
        "count": 7,
        "successes": 6,
        "failed_to_download": 1,
    }
    assert stats["failed_to_resize"] == 0
    assert stats["status_dict"] == {"success": 6, "HTTP Error 404: Not Found": 1}
    assert stats["end_time"] >= stats["start_time"] and stats["duration"] >= 0

    # The tar holds only successes, members sorted by extension as webdataset writes them.
    with tarfile.open(os.path.join(root, "00003.tar")) as tar:
        names = tar.getnames()
        first_json = json.load(tar.extractfile(f"{sample_key(3, 0)}.json"))
    assert names[:3] == [f"{sample_key(3, 0)}.{ext}" for ext in ("jpg", "json", "txt")]
    assert len(names) == 18 and not any(sample_key(3, 99) in n for n in names)
    assert list(first_json) == IMG2DATASET_COLUMNS
    assert first_json["status"] == "success" and first_json["width"] == 32
    assert json.loads(first_json["metadata"]) == records[0].metadata

    table = pq.read_table(os.path.join(root, "00003.parquet"))
    assert table.column_names == IMG2DATASET_COLUMNS
    assert table.num_rows == 7
    assert table.column("status").to_pylist()[2] == "failed_to_download"
    assert count_rows(root, "00003") == 7

    got = read_all(root, "00003")
    assert [r.key for r in got] == [r.key for r in records if r.image_bytes] + [sample_key(3, 99)]
    for record, written in zip(got[:6], [r for r in records if r.image_bytes], strict=True):
        assert record.status == "ok" and record.error is None
        assert record.image.mode == "RGB" and record.image.size == (32, 24)
        assert (record.width, record.height) == (32, 24)
        assert record.alt_text == written.caption
        assert record.url == written.url
        assert record.metadata == written.metadata
    lost = got[-1]
    # img2dataset's own status and error, kept verbatim, and marked as not delivered.
    assert (lost.status, lost.image, lost.alt_text) == ("failed_to_download", None, "lost")
    assert lost.error == "HTTP Error 404: Not Found" and not lost.delivered
    assert all(r.delivered for r in got[:6])
    assert lost.metadata == {"index": 99}


def test_round_trip_parquet_format(tmp_path):
    root = str(tmp_path)
    records = records_for(0, 4)
    records[1] = ShardRecord(
        key=records[1].key,
        image_bytes=None,
        caption="gone",
        url="u",
        metadata={},
        status="success",  # no bytes: stored as a failed download, as img2dataset would
    )
    stats = write_shard(root, 0, records, output_format="parquet")
    assert sorted(os.listdir(root)) == ["00000.parquet", "00000_stats.json"]
    assert stats["successes"] == 3 and stats["failed_to_download"] == 1

    table = pq.read_table(os.path.join(root, "00000.parquet"))
    assert table.column_names == [*IMG2DATASET_COLUMNS, "jpg"]
    assert table.column("jpg").to_pylist()[0] == records[0].image_bytes
    assert table.column("jpg").to_pylist()[1] is None

    got = read_all(root, "00000")
    assert [r.key for r in got] == [r.key for r in records]  # row order, failures in place
    assert [r.status for r in got] == ["ok", "failed_to_download", "ok", "ok"]
    assert got[1].error == "no image bytes" and not got[1].delivered
    assert got[0].metadata == records[0].metadata and got[0].alt_text == "alt text 0"
    assert got[2].image.size == (32, 24)
    assert count_rows(root, "00000") == 4
    assert list_shards(root) == [ShardInfo("00000", "parquet", True)]


def test_decode_false_skips_decoding(tmp_path):
    write_shard(str(tmp_path), 1, [*records_for(1, 2), _bad(1, 2, b"not an image")])
    got = read_all(str(tmp_path), "00001", decode=False)
    assert [r.status for r in got] == ["ok", "ok", "ok"]
    assert all(r.image is None for r in got)
    assert got[0].width == 32  # from the stored metadata


def _bad(shard: int, index: int, data: bytes) -> ShardRecord:
    return ShardRecord(
        key=sample_key(shard, index),
        image_bytes=data,
        caption=f"bad {index}",
        url=f"https://example.com/bad/{index}",
        metadata={"bad": True},
    )


@pytest.mark.parametrize("output_format", ["webdataset", "parquet"])
def test_bad_images_keep_their_rows(tmp_path, output_format):
    root = str(tmp_path)
    good = jpeg(7, (40, 30))
    small = jpeg(8, (20, 20))
    records = [
        good_record(2, 0),
        _bad(2, 1, b""),  # zero bytes
        _bad(2, 2, b"<html>blocked</html>"),  # not an image
        _bad(2, 3, small[: len(small) // 2]),  # truncated
        _bad(2, 4, good),  # fine, but over the max_pixels we read with
        good_record(2, 5),
    ]
    write_shard(root, 2, records, output_format=output_format)
    got = read_all(root, "00002", max_pixels=40 * 30 - 1)
    assert [r.key for r in got] == [r.key for r in records]
    assert [r.status for r in got] == [
        "ok",
        "missing",
        "decode_error",
        "decode_error",
        "too_large",
        "ok",
    ]
    assert got[1].error == "no image bytes"
    assert got[2].error.startswith("UnidentifiedImageError")
    assert "truncated" in got[3].error.lower()
    assert (got[4].width, got[4].height) == (40, 30)
    assert all(r.alt_text == f"bad {i}" for i, r in enumerate(got[1:5], start=1))
    assert all(r.metadata == {"bad": True} for r in got[1:5])
    assert all(r.image is None for r in got[1:5])


# --------------------------------------------------------------------------- broken shards


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_bad_json_is_reported_and_image_still_decoded(tmp_path):
    root = tmp_path
    with tarfile.open(root / "00000.tar", "w") as tar:
        _add(tar, "a.jpg", jpeg(1))
        _add(tar, "a.json", b'{"url": "https://x/a", "caption": ')  # malformed
        _add(tar, "a.txt", b"alt a")
        _add(tar, "b.jpg", jpeg(2))
        _add(tar, "b.txt", b"alt b")  # no json at all
        _add(tar, "c.jpg", b"garbage")
        _add(tar, "c.json", b"[1, 2]")  # valid JSON, not an object
        _add(tar, "c.txt", b"alt c")
        _add(tar, "d.jpg", jpeg(3))
        _add(tar, "d.json", json.dumps({"url": "https://x/d", "width": 32}).encode())
        _add(tar, "d.txt", "caf\u00e9".encode())
    got = read_all(str(root), "00000")
    assert [r.key for r in got] == ["a", "b", "c", "d"]
    assert [r.status for r in got] == ["bad_metadata", "bad_metadata", "bad_metadata", "ok"]
    assert got[0].error.startswith("malformed .json: JSONDecodeError")
    assert got[0].image is not None and got[0].image.size == (32, 24)
    assert (got[0].alt_text, got[0].url, got[0].metadata) == ("alt a", None, {})
    assert got[1].error == "sample has no .json member" and got[1].image is not None
    assert got[2].error.startswith("malformed .json: expected an object, got list")
    assert "image decode_error: UnidentifiedImageError" in got[2].error
    assert got[2].image is None
    assert (got[3].url, got[3].alt_text) == ("https://x/d", "caf\u00e9")


def _first_member_offsets(tar_path: str) -> dict[str, int]:
    with tarfile.open(tar_path) as tar:
        return {m.name: m.offset for m in tar.getmembers()}


def test_truncated_tar_yields_complete_records_then_raises(tmp_path):
    root = str(tmp_path)
    records = records_for(4, 20)
    write_shard(root, 4, records)
    tar_path = os.path.join(root, "00004.tar")
    offsets = _first_member_offsets(tar_path)
    # Cut in the middle of sample 12's image data.
    cut = offsets[f"{sample_key(4, 12)}.jpg"] + 512 + 100
    with open(tar_path, "r+b") as handle:
        handle.truncate(cut)

    got = []
    with pytest.raises(ShardReadError) as excinfo:
        for record in iter_shard(root, "00004"):
            got.append(record)
    assert [r.key for r in got] == [r.key for r in records[:12]]
    assert all(r.status == "ok" for r in got)
    error = excinfo.value
    assert error.shard == os.path.join(root, "00004.tar")
    assert error.records_read == 12
    assert "truncated or corrupt after 12 complete samples" in str(error)
    assert "8 successful samples in 00004.parquet never came" in str(error)


def test_tar_cut_at_a_member_boundary_is_caught_by_the_parquet(tmp_path):
    root = str(tmp_path)
    records = records_for(5, 10)
    write_shard(root, 5, records)
    tar_path = os.path.join(root, "00005.tar")
    cut = _first_member_offsets(tar_path)[f"{sample_key(5, 6)}.jpg"]
    with open(tar_path, "r+b") as handle:
        handle.truncate(cut)  # tarfile itself ends silently here
    got = []
    with pytest.raises(ShardReadError, match="4 samples marked success in 00005.parquet"):
        for record in iter_shard(root, "00005"):
            got.append(record)
    assert [r.key for r in got] == [r.key for r in records[:6]]


def test_corrupt_parquet_format_shard(tmp_path):
    root = str(tmp_path)
    write_shard(root, 0, records_for(0, 3), output_format="parquet")
    path = os.path.join(root, "00000.parquet")
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) - 20)
    with pytest.raises(ShardReadError, match="parquet truncated or corrupt"):
        read_all(root, "00000")


def test_missing_shard(tmp_path):
    with pytest.raises(ShardReadError, match="no 00009.tar or 00009.parquet"):
        read_all(str(tmp_path), "00009")


# --------------------------------------------------------------------------- listing


def test_list_shards_local(tmp_path):
    root = str(tmp_path)
    for index in (0, 1, 2, 5):
        write_shard(root, index, records_for(index, 2))
    write_shard(root, 4, records_for(4, 2), output_format="parquet")
    write_shard(root, 3, records_for(3, 2))
    os.remove(os.path.join(root, "00003_stats.json"))  # as if still being written
    # Things that are not shards.
    os.mkdir(os.path.join(root, ".00007.tmp-abc"))
    (tmp_path / "README.md").write_text("hi")
    (tmp_path / "00008_stats.json").write_text("{}")
    (tmp_path / "00009.tar.tmp").write_text("")

    assert list_shards(root) == [
        ShardInfo("00000", "webdataset", True),
        ShardInfo("00001", "webdataset", True),
        ShardInfo("00002", "webdataset", True),
        ShardInfo("00003", "webdataset", False),
        ShardInfo("00004", "parquet", True),
        ShardInfo("00005", "webdataset", True),
    ]
    assert [s.key for s in list_shards(root, after="00002")] == ["00003", "00004", "00005"]
    assert list_shards(root, after="00005") == []
    assert list_shards(str(tmp_path / "does-not-exist")) == []


# --------------------------------------------------------------------------- atomicity


def _failing(records: list[ShardRecord], after: int) -> Iterator[ShardRecord]:
    for i, record in enumerate(records):
        if i == after:
            raise RuntimeError("source died")
        yield record


@pytest.mark.parametrize("output_format", ["webdataset", "parquet"])
def test_failed_write_leaves_nothing(tmp_path, output_format):
    root = str(tmp_path)
    with pytest.raises(RuntimeError, match="source died"):
        write_shard(root, 6, _failing(records_for(6, 10), after=5), output_format=output_format)
    assert os.listdir(root) == []  # no final names and no staging leftovers
    assert list_shards(root) == []


def test_failed_rewrite_keeps_the_previous_shard(tmp_path):
    root = str(tmp_path)
    write_shard(root, 6, records_for(6, 3))
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    duplicate = [*records_for(6, 3), good_record(6, 1)]
    with pytest.raises(ValueError, match="duplicate sample key"):
        write_shard(root, 6, duplicate)
    after = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    assert after == before
    assert len(read_all(root, "00006")) == 3


def test_invalid_key_is_refused(tmp_path):
    bad = ShardRecord(key="a.b", image_bytes=jpeg(0), caption="", url="", metadata={})
    with pytest.raises(ValueError, match="invalid sample key"):
        write_shard(str(tmp_path), 0, [bad])
    assert os.listdir(tmp_path) == []


def test_rewrite_as_parquet_removes_the_old_tar(tmp_path):
    root = str(tmp_path)
    write_shard(root, 1, records_for(1, 2))
    write_shard(root, 1, records_for(1, 3), output_format="parquet")
    assert sorted(os.listdir(root)) == ["00001.parquet", "00001_stats.json"]
    assert len(read_all(root, "00001")) == 3


# --------------------------------------------------------------------------- streaming


class CountingFile:
    """File proxy counting the bytes read through it."""

    def __init__(self, handle, counter: list[int]) -> None:
        self._handle = handle
        self._counter = counter

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        self._counter[0] += len(data)
        return data

    def readinto(self, buffer) -> int:
        n = self._handle.readinto(buffer)
        self._counter[0] += n or 0
        return n

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()


@pytest.mark.parametrize("output_format", ["webdataset", "parquet"])
def test_first_record_reads_a_small_part_of_a_big_shard(tmp_path, monkeypatch, output_format):
    root = str(tmp_path)
    # ~600 KB+ of incompressible 64x64 images, 500 rows -> 5 parquet row groups.
    records = [
        ShardRecord(
            key=sample_key(0, i),
            image_bytes=jpeg(i, (64, 64), quality=95),
            caption=f"c{i}",
            url=f"u{i}",
            metadata={},
        )
        for i in range(500)
    ]
    write_shard(root, 0, records, output_format=output_format)
    data_file = os.path.join(
        root, "00000.tar" if output_format == "webdataset" else "00000.parquet"
    )
    size = os.path.getsize(data_file)
    assert size > 2_000_000

    counter = [0]
    real_open = reading._open
    monkeypatch.setattr(
        reading, "_open", lambda fs, path: CountingFile(real_open(fs, path), counter)
    )
    stream = iter_shard(root, "00000")
    first = next(stream)
    stream.close()
    assert first.key == sample_key(0, 0) and first.status == "ok"
    limit = 0.01 if output_format == "webdataset" else 0.3
    assert 0 < counter[0] < limit * size, (counter[0], size)


# --------------------------------------------------------------------------- S3


def test_s3_round_trip_and_listing(s3_env, monkeypatch):
    root = f"{s3_env}/laion/"
    write_shard(root, 0, records_for(0, 3))
    write_shard(root, 1, records_for(1, 2), output_format="parquet")
    write_shard(root, 2, records_for(2, 2))
    write_shard(root, 3, records_for(3, 2))
    fs, _ = filesystem(s3_env)
    fs.rm_file(f"{s3_env}/laion/00003_stats.json")
    fs.pipe_file(f"{s3_env}/laion/nested/00009.tar", b"not listed: in a sub-folder")
    with pytest.raises(RuntimeError):  # a failed write leaves no object behind
        write_shard(root, 4, _failing(records_for(4, 5), after=3))
    fs.invalidate_cache()
    assert fs.glob(f"{s3_env}/laion/00004*") == []

    calls = []
    real_call = type(fs).call_s3

    def spy(self, method, *args, **kwargs):
        response = real_call(self, method, *args, **kwargs)
        calls.append((kwargs, [obj["Key"] for obj in response.get("Contents", [])]))
        return response

    with monkeypatch.context() as patch:
        patch.setattr(type(fs), "call_s3", spy)
        patch.setattr(listing, "_S3_PAGE_SIZE", 2)  # exercise pagination
        assert list_shards(root) == [
            ShardInfo("00000", "webdataset", True),
            ShardInfo("00001", "parquet", True),
            ShardInfo("00002", "webdataset", True),
            ShardInfo("00003", "webdataset", False),
        ]
        assert len(calls) == 6  # 11 objects, 2 per page

        calls.clear()
        assert list_shards(root, after="00001") == [
            ShardInfo("00002", "webdataset", True),
            ShardInfo("00003", "webdataset", False),
        ]
        # The server started after shard 00001: nothing of shards 0-1 was even listed.
        assert calls[0][0]["StartAfter"] == "laion/00001~"
        listed = [key for _, keys in calls for key in keys]
        assert listed == [
            "laion/00002.parquet",
            "laion/00002.tar",
            "laion/00002_stats.json",
            "laion/00003.parquet",
            "laion/00003.tar",
        ]

    got = read_all(root, "00000")
    assert [r.key for r in got] == [sample_key(0, i) for i in range(3)]
    assert all(r.status == "ok" and r.image.size == (32, 24) for r in got)
    assert got[1].metadata == records_for(0, 3)[1].metadata
    assert [r.status for r in read_all(root, "00001")] == ["ok", "ok"]
    assert count_rows(root, "00000") == 3 and count_rows(root, "00001") == 2


# --------------------------------------------------------------------------- DataLoader


def image_size(image: Image.Image) -> tuple[int, int]:
    return image.size


@pytest.mark.parametrize("shard_count", [3, 1])
def test_dataloader_workers_yield_every_record_once(tmp_path, shard_count):
    root = str(tmp_path)
    expected = []
    for index in range(shard_count):
        records = records_for(index, 7)
        records.append(_bad(index, 50, b""))
        write_shard(root, index, records)
        expected += [r.key for r in records]
    dataset = ShardDataset(root, [shard_key(i) for i in range(shard_count)], transform=image_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=4, num_workers=2, collate_fn=collate_records
    )
    seen = []
    for batch in loader:
        assert isinstance(batch, list) and len(batch) <= 4
        seen += [r.key for r in batch]
        for record in batch:
            assert record.image == ((32, 24) if record.status == "ok" else None)
    assert sorted(seen) == sorted(expected)
    assert len(seen) == len(set(seen))


def test_dataloader_reraises_shard_errors_as_themselves(tmp_path):
    root = str(tmp_path)
    write_shard(root, 0, records_for(0, 4))
    write_shard(root, 1, records_for(1, 4))
    tar_path = os.path.join(root, "00001.tar")
    with open(tar_path, "r+b") as handle:
        handle.truncate(os.path.getsize(tar_path) // 2)
    loader = torch.utils.data.DataLoader(
        ShardDataset(root, ["00000", "00001"]), num_workers=2, collate_fn=collate_records
    )
    with pytest.raises(ShardReadError, match="00001.tar: "):
        list(loader)


def test_dataset_without_workers_keeps_pil_images(tmp_path):
    write_shard(str(tmp_path), 0, records_for(0, 3))
    loader = torch.utils.data.DataLoader(
        ShardDataset(str(tmp_path), ["00000"]), batch_size=2, collate_fn=collate_records
    )
    batches = list(loader)
    assert [len(b) for b in batches] == [2, 1]
    assert all(isinstance(r.image, Image.Image) for b in batches for r in b)


def test_additional_columns_are_kept_as_img2dataset_keeps_them(tmp_path):
    """img2dataset's save_additional_columns: string columns in the parquet and the json
    (the miniworld keeps what each image truly shows there: the oracle's captions)."""
    from recap_dagster.t2i.training_data import require_captions, variant_captions

    records = records_for(0, 3)
    for i, record in enumerate(records):
        record.additional = {"true_short": f"short {i}", "true_long": None if i else "long 0"}
    write_shard(str(tmp_path), 0, records, additional_columns=("true_short", "true_long"))
    table = pq.read_table(tmp_path / "00000.parquet")
    assert table.column_names == ["true_short", "true_long", *IMG2DATASET_COLUMNS]
    assert table.column("true_long").to_pylist() == ["long 0", None, None]
    with tarfile.open(tmp_path / "00000.tar") as tar:
        meta = json.loads(tar.extractfile(f"{sample_key(0, 1)}.json").read())
    assert meta["true_short"] == "short 1"
    oracle = variant_captions(str(tmp_path / "storage"), "oracle", str(tmp_path))
    require_captions(oracle, "00000")
    assert oracle.read("00000")[sample_key(0, 0)] == ("short 0", "long 0")
    write_shard(str(tmp_path / "plain"), 0, records_for(0, 2))  # a corpus without them
    plain = variant_captions(str(tmp_path / "storage"), "oracle", str(tmp_path / "plain"))
    with pytest.raises(ValueError, match=r"has no column \['true_short', 'true_long'\]"):
        require_captions(plain, "00000")
