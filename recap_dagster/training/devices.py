"""Device, dtype and mixed-precision choices: CUDA when present, CPU otherwise."""

from __future__ import annotations

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Inference dtype: ``auto`` is bfloat16 on CUDA with bf16 support, float32 otherwise."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(
            f"unknown dtype {name!r}; choose auto or one of {sorted(_DTYPES)}"
        ) from None


def resolve_mixed_precision(name: str, device: torch.device) -> str:
    """accelerate's mixed_precision: ``auto`` is bf16 on capable CUDA, "no" on CPU."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "no"
    if name not in {"no", "fp16", "bf16"}:
        raise ValueError(f"unknown mixed precision {name!r}; choose auto, no, fp16 or bf16")
    return name
