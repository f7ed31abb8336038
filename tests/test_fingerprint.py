"""Weights fingerprints: quick (sampled safetensors / S3 ETags) against full (every byte)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from recap_dagster.storage.fingerprint import (
    SAMPLE_BYTES,
    WeightsFormatError,
    model_fingerprint,
    weights_fingerprint,
)
from recap_dagster.storage.fs import filesystem

UNET = "unet/diffusion_pytorch_model.safetensors"
TEXT = "text_encoder/model.safetensors"


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A two-component model: a 4 MiB tensor (sampled, not read whole), four 256 KiB layers
    and small tensors (read whole), plus a config that is not weights."""
    gen = torch.Generator().manual_seed(0)
    root = tmp_path / "model"
    (root / "unet").mkdir(parents=True)
    (root / "text_encoder").mkdir()
    unet = {"big": torch.randn(1024, 1024, generator=gen), "bias": torch.randn(8, generator=gen)}
    unet |= {f"layers.{i}": torch.randn(256, 256, generator=gen) for i in range(4)}
    save_file(unet, root / UNET)
    text = {"embed": torch.randn(100, 64, generator=gen), "norm": torch.ones(64)}
    save_file(text, root / TEXT, metadata={"format": "pt"})
    (root / "unet" / "config.json").write_text('{"sample_size": 8}')
    return root


def edit(path: Path, **changes: torch.Tensor) -> None:
    """Rewrite a safetensors file with some tensors replaced."""
    tensors = load_file(path)
    save_file({**tensors, **changes}, path)


def test_quick_is_stable_across_calls_copies_and_mtimes(model: Path, tmp_path: Path) -> None:
    version = model_fingerprint(model)
    assert version.startswith("q-") and len(version) == 18
    assert model_fingerprint(model) == version
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    for path in copy.rglob("*.safetensors"):
        os.utime(path, (1, 1))  # a copy's mtime differs: it must not matter
    assert model_fingerprint(copy) == version
    assert model_fingerprint(f"file://{model}") == version


def test_quick_differs_from_full(model: Path) -> None:
    quick, full = model_fingerprint(model), model_fingerprint(model, full=True)
    assert full == weights_fingerprint(model)  # the full hash is the existing one
    assert quick != full and not full.startswith("q")


def test_a_value_at_the_middle_of_a_large_tensor(model: Path) -> None:
    """The 4 MiB tensor is sampled (more than 3 sample blocks), its middle among them."""
    big = load_file(model / UNET)["big"]
    assert big.numel() * 4 > 3 * SAMPLE_BYTES
    before = model_fingerprint(model)
    changed = big.clone()
    changed.view(-1)[big.numel() // 2] += 1.0
    edit(model / UNET, big=changed)
    assert model_fingerprint(model) != before


def test_a_value_of_a_small_tensor(model: Path) -> None:
    """``bias`` (32 bytes) is read whole."""
    before = model_fingerprint(model)
    bias = load_file(model / UNET)["bias"].clone()
    bias[3] = 0.5
    edit(model / UNET, bias=bias)
    assert model_fingerprint(model) != before


def test_a_fine_tune_of_every_value_and_of_one_layer(model: Path) -> None:
    tensors = load_file(model / UNET)
    before = model_fingerprint(model)
    # One layer trained, the rest frozen: caught because every tensor is sampled.
    edit(model / UNET, **{"layers.2": tensors["layers.2"] + 1e-4})
    one_layer = model_fingerprint(model)
    assert one_layer != before
    # A full fine-tune (every value moves a little).
    edit(model / UNET, **{name: t * (1 + 1e-6) for name, t in tensors.items()})
    assert model_fingerprint(model) not in {before, one_layer}


def test_the_documented_limit_a_value_outside_the_samples(model: Path) -> None:
    """One value a quarter into the 4 MiB tensor lies in no sample: quick mode misses it,
    the full hash does not (this is why ``full=True`` exists)."""
    big = load_file(model / UNET)["big"]
    quick, full = model_fingerprint(model), model_fingerprint(model, full=True)
    changed = big.clone()
    changed.view(-1)[big.numel() // 4] += 1.0
    edit(model / UNET, big=changed)
    assert model_fingerprint(model) == quick
    assert model_fingerprint(model, full=True) != full


def test_dtype_and_shape_changes_with_the_same_bytes(model: Path) -> None:
    big = load_file(model / UNET)["big"]
    before = model_fingerprint(model)
    edit(model / UNET, big=big.view(torch.int32))  # same bytes, another dtype
    as_int = model_fingerprint(model)
    edit(model / UNET, big=big.reshape(2048, 512))  # same bytes, another shape
    assert len({before, as_int, model_fingerprint(model)}) == 3


def test_files_added_renamed_and_non_weights(model: Path) -> None:
    before = model_fingerprint(model)
    (model / "unet" / "config.json").write_text('{"sample_size": 16}')
    (model / "README.md").write_text("not weights")
    assert model_fingerprint(model) == before  # configs are not weights
    extra = model / "vae" / "diffusion_pytorch_model.safetensors"
    extra.parent.mkdir()
    save_file({"w": torch.zeros(4)}, extra)
    added = model_fingerprint(model)
    assert added != before
    (model / TEXT).rename(model / "text_encoder" / "renamed.safetensors")
    assert model_fingerprint(model) not in {before, added}


def test_quick_reads_samples_only(model: Path) -> None:
    """Measured with the kernel's count of bytes this process read (Linux)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/io")

    def bytes_read() -> int:
        counters = dict(
            line.split(": ") for line in Path("/proc/self/io").read_text().split("\n") if line
        )
        return int(counters["rchar"])

    total = sum(p.stat().st_size for p in model.rglob("*.safetensors"))
    start = bytes_read()
    model_fingerprint(model)
    quick = bytes_read() - start
    start = bytes_read()
    model_fingerprint(model, full=True)
    full = bytes_read() - start
    assert full >= total
    # Headers, small tensors whole, 3 samples of each large tensor (+ slack for /proc).
    assert quick < 1_000_000 < total


@pytest.mark.parametrize(
    "content",
    [
        b"not a safetensors file at all",
        (10**9).to_bytes(8, "little") + b"{}",  # header length past the end
        (5).to_bytes(8, "little") + b"{oops",  # header is not JSON
        b"\x07",  # shorter than the length prefix
    ],
)
def test_a_non_safetensors_file_is_named(model: Path, content: bytes) -> None:
    bad = model / "unet" / "broken.safetensors"
    bad.write_bytes(content)
    with pytest.raises(WeightsFormatError, match="broken.safetensors"):
        model_fingerprint(model)
    model_fingerprint(model, full=True)  # the full hash reads bytes, it does not parse


def test_a_truncated_file_is_named(model: Path) -> None:
    path = model / UNET
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(WeightsFormatError, match="diffusion_pytorch_model.safetensors"):
        model_fingerprint(model)


def test_no_weights(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no weights"):
        model_fingerprint(tmp_path)
    with pytest.raises(FileNotFoundError, match="no weights"):
        model_fingerprint(tmp_path / "missing", full=True)


# -- S3 -----------------------------------------------------------------------------------
def upload(local: Path, uri: str) -> None:
    fs, path = filesystem(uri)
    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.put_file(str(file), f"{path}/{file.relative_to(local).as_posix()}")
    fs.put_file(str(local / UNET), f"{path}-other/x.safetensors")  # a sibling prefix


def test_s3_quick_lists_etags_and_downloads_nothing(
    model: Path, s3_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import s3fs

    uri = f"{s3_env}/models/base"
    upload(model, uri)

    def no_download(*args, **kwargs):
        raise AssertionError("quick mode must not read objects")

    with monkeypatch.context() as patch:
        for method in ("_open", "_cat_file", "_get_file"):
            patch.setattr(s3fs.S3FileSystem, method, no_download)
        version = model_fingerprint(uri)
        assert version.startswith("qe-") and model_fingerprint(uri + "/") == version

    # Another copy of the same bytes lists the same sizes and (single-part) ETags.
    upload(model, f"{s3_env}/models/copy")
    assert model_fingerprint(f"{s3_env}/models/copy") == version
    # A config or marker is not weights.
    fs, path = filesystem(uri)
    fs.pipe_file(f"{path}/_SUCCESS", b"")
    assert model_fingerprint(uri) == version


def test_s3_quick_sees_a_replaced_object(model: Path, s3_env: str) -> None:
    import boto3

    uri = f"{s3_env}/base"
    upload(model, uri)
    before = model_fingerprint(uri)
    # Replace the object behind the filesystem's back (another writer): the same size,
    # one value changed where no local sample would look.
    tensors = load_file(model / UNET)
    tensors["big"].view(-1)[tensors["big"].numel() // 4] += 1.0
    save_file(tensors, model / UNET)
    bucket = s3_env.removeprefix("s3://")
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).put_object(
        Bucket=bucket, Key=f"base/{UNET}", Body=(model / UNET).read_bytes()
    )
    assert model_fingerprint(uri) != before


def test_s3_full_equals_the_local_full_hash(model: Path, s3_env: str) -> None:
    uri = f"{s3_env}/base"
    upload(model, uri)
    assert model_fingerprint(uri, full=True) == weights_fingerprint(model)
    with pytest.raises(FileNotFoundError, match="no weights"):
        model_fingerprint(f"{s3_env}/nothing-here")
