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


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: the name settings and records use."""
    return str(dtype).removeprefix("torch.")


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


#: What a ``processes`` setting means, for every step that runs one process per GPU.
PROCESSES_DESCRIPTION = (
    "Processes: 0 = one per GPU of the machine (pod), 1 on a CPU-only one; N > 0 = N (on CPU: "
    "N processes sharing the cores, as tests and benchmarks run them)."
)


def process_count(processes: int) -> int:
    """``processes`` resolved: 0 is one per visible GPU, at least one."""
    if processes < 0:
        raise ValueError(f"processes must be >= 0, got {processes}")
    return processes or max(1, torch.cuda.device_count())


def process_devices(device: torch.device, processes: int) -> list[torch.device]:
    """The device of each process of a step that runs ``processes`` (see
    :func:`process_count`) processes on ``device``: one GPU each on CUDA (an explicit
    ``cuda:N`` is that GPU alone), the CPU for all of them otherwise."""
    if device.type != "cuda":
        return [device] * max(1, processes)
    if device.index is not None:
        if processes > 1:
            raise ValueError(f"device {device} names one GPU; {processes} processes need 'cuda'")
        return [device]
    count = process_count(processes)
    if count > torch.cuda.device_count():
        raise ValueError(f"{count} processes asked for, {torch.cuda.device_count()} GPUs visible")
    return [torch.device("cuda", index) for index in range(count)]
