"""Cost of a base model's data version at Stable Diffusion 1.5 size: full hash vs quick.

Builds a pipeline directory with SD 1.5's published shapes (UNet2DConditionModel, the CLIP
ViT-L/14 text tower, AutoencoderKL; random init, ``save_pretrained`` as safetensors in
``unet/``, ``text_encoder/``, ``vae/``: about 4.3 GB in float32), then times
``model_fingerprint(dir, full=True)`` (SHA-256 of every weights byte, what every
observation of ``base_t2i_model`` paid before) against ``model_fingerprint(dir)`` (headers
plus sampled blocks of every tensor), twice each. Nothing is dropped from the page cache:
the first timing is as cold as the build left it (the kernel's count of bytes read from
storage is printed beside it), the second is warm. Bytes read are the kernel's count of
bytes this process read (``rchar`` of ``/proc/self/io``). Run:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fingerprint_sd.py [--keep DIR] [--dtype float16]
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from math import prod
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recap_dagster.storage.fingerprint import SAMPLE_BYTES, model_fingerprint  # noqa: E402
from recap_dagster.t2i.real_shapes import SD15_TEXT_ENCODER as TEXT_ENCODER  # noqa: E402
from recap_dagster.t2i.real_shapes import SD15_UNET as UNET  # noqa: E402
from recap_dagster.t2i.real_shapes import SD15_VAE as VAE  # noqa: E402

COMPONENTS = ("unet", "text_encoder", "vae")
MIN_FREE_FP32 = 15 * 10**9


def build(root: Path, dtype: torch.dtype) -> None:
    """Save each component in turn, freeing it before the next (peak RAM: one UNet)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    makers: dict[str, Callable[[], torch.nn.Module]] = {
        "unet": lambda: UNet2DConditionModel(**UNET),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER)),
        "vae": lambda: AutoencoderKL(**VAE),
    }
    torch.manual_seed(0)
    for name in COMPONENTS:
        start = time.perf_counter()
        module = makers[name]()
        if dtype != torch.float32:  # (a no-op cast still makes diffusers warn)
            module = module.to(dtype)
        module.save_pretrained(root / name, safe_serialization=True)
        del module
        gc.collect()
        print(f"  built {name} in {time.perf_counter() - start:.1f} s")


def tensors(path: Path) -> dict[str, dict]:
    """A safetensors file's header entries (no tensor data read)."""
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def io_counters() -> dict[str, int]:
    """This process's I/O counts: ``rchar`` (bytes read() returned), ``syscr`` (read
    calls), ``read_bytes`` (from storage, i.e. not from the page cache)."""
    try:
        text = Path("/proc/self/io").read_text()
    except OSError:
        return {}
    return {key: int(value) for key, value in (line.split(": ") for line in text.splitlines())}


def timed(label: str, function: Callable[[], str]) -> tuple[str, float, int]:
    before = io_counters()
    start = time.perf_counter()
    version = function()
    seconds = time.perf_counter() - start
    after = io_counters()
    read = after.get("rchar", 0) - before.get("rchar", 0)
    disk = after.get("read_bytes", 0) - before.get("read_bytes", 0)
    calls = after.get("syscr", 0) - before.get("syscr", 0)
    print(
        f"  {label:<13} {seconds:8.3f} s  read {read / 1e6:8.1f} MB in {calls:5d} read calls "
        f"(from storage {disk / 1e6:6.1f} MB)  -> {version}"
    )
    return version, seconds, read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, help="build here and keep (reused if present)")
    parser.add_argument("--dtype", choices=("float32", "float16"), default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    temp = None if args.keep else tempfile.mkdtemp(prefix="recap-fp-sd-")
    root = args.keep or Path(temp) / "sd15"
    try:
        if not (root.exists() and any(root.rglob("*.safetensors"))):
            free = shutil.disk_usage(root.parent if root.parent.exists() else ".").free
            dtype_name = args.dtype or ("float32" if free >= MIN_FREE_FP32 else "float16")
            if args.dtype is None and dtype_name == "float16":
                print(f"only {free / 1e9:.1f} GB free: building in float16")
            print(f"building an SD 1.5-sized pipeline ({dtype_name}) in {root}")
            build(root, getattr(torch, dtype_name))
        else:
            print(f"reusing {root}")

        files = sorted(root.rglob("*.safetensors"))
        print(f"\n{'file':<48} {'tensors':>8} {'params':>14} {'bytes':>15}")
        total_size = total_params = total_tensors = 0
        for path in files:
            header = tensors(path)
            params = sum(prod(entry["shape"]) for entry in header.values())
            size = path.stat().st_size
            dtypes = ",".join(sorted({entry["dtype"] for entry in header.values()}))
            rel = f"{path.relative_to(root)} ({dtypes})"
            print(f"{rel:<48} {len(header):>8} {params:>14,} {size:>15,}")
            total_size += size
            total_params += params
            total_tensors += len(header)
        print(f"{'total':<48} {total_tensors:>8} {total_params:>14,} {total_size:>15,}")
        dir_size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        print(f"directory size: {dir_size / 1e9:.3f} GB ({dir_size:,} bytes)")

        print(f"\nfingerprints (quick samples {SAMPLE_BYTES // 1024} KiB x 3 per tensor):")
        full = [timed(f"full, run {i}", lambda: model_fingerprint(root, full=True)) for i in (1, 2)]
        quick = [timed(f"quick, run {i}", lambda: model_fingerprint(root)) for i in (1, 2)]
        assert full[0][0] == full[1][0] and quick[0][0] == quick[1][0]
        best_full = min(seconds for _, seconds, _ in full)
        best_quick = min(seconds for _, seconds, _ in quick)
        print(
            f"\nquick reads {quick[1][2] / total_size:.3%} of the weights bytes; "
            f"warm speed-up {best_full / best_quick:,.0f}x "
            f"(full hash {total_size / best_full / 1e9:.2f} GB/s)"
        )
    finally:
        if temp:
            shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()
