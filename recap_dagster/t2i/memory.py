"""GPU memory of fine-tuning Stable Diffusion's UNet + CLIP text encoder, estimated on meta.

The models are built on the meta device (shapes only, nothing allocated) and the figures
follow what :mod:`recap_dagster.t2i.train` holds on each GPU (the VAE stays on the CPU:
the trainer reads cached latents):

- weights: the fp32 master weights of both models (a frozen one stays on the GPU too);
  under bf16/fp16 mixed precision autocast also caches a low-precision copy of every
  trained weight it casts (linear and conv weights and biases) for the whole forward
  (they are saved for the backward too);
- gradients: fp32, one per trained parameter, counted whole beside the activations
  (exact under gradient accumulation, an upper bound for one micro-batch per step);
- optimizer states: torch AdamW keeps ``exp_avg`` and ``exp_avg_sq`` in fp32; the
  default (foreach) implementation also makes one state-size temporary during
  ``step()`` (``_foreach_sqrt``), the fused one keeps a device ``step`` scalar per
  tensor instead; bitsandbytes AdamW8bit keeps both states as uint8 with one fp32
  absmax per 256-element block, and 32-bit states for tensors under 4,096 elements;
- EMA: one fp32 copy (diffusers' ``EMAModel``, one per trained model) on the main
  process's GPU, none between updates when offloaded; its foreach update makes one
  model-size temporary (and brings an offloaded shadow back for it);
- DDP: with several processes, its gradient buckets are about one more gradient-size
  buffer (``gradient_as_bucket_view`` off, the default): an approximation;
- activations: measured by running the training forward (text encoder, UNet, MSE loss)
  on meta tensors under :func:`torch.autograd.graph.saved_tensors_hooks`, summing the
  bytes of the tensors autograd saves for the backward; an estimate (see
  :func:`saved_activation_bytes`);
- a constant for the CUDA context and allocator (:data:`CUDA_OVERHEAD_BYTES`).

Nothing here imports Dagster.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from recap_dagster.t2i.model import gradient_checkpointing_on, set_gradient_checkpointing

GIB = 2**30
#: The CUDA context of a process that has loaded torch's kernels (lazily, CUDA >= 11.7):
#: about 0.5 GB on A100/H100 as ``nvidia-smi`` commonly reports right after
#: ``torch.cuda.init()`` and a first kernel (300-600 MB depending on the driver/toolkit).
CUDA_CONTEXT_BYTES = 512 * 2**20
#: cuBLAS/cuDNN workspaces and the caching allocator's fragmentation (reserved but not
#: allocated): a round allowance, commonly 0.3-1 GB in training loops like this one.
ALLOCATOR_SLACK_BYTES = 512 * 2**20
CUDA_OVERHEAD_BYTES = CUDA_CONTEXT_BYTES + ALLOCATOR_SLACK_BYTES

OPTIMIZERS = ("adamw", "adamw_fused", "adamw_8bit")  # TrainConfig.optimizer's choices
MIXED_PRECISIONS = ("no", "bf16", "fp16")
#: bitsandbytes' 8-bit optimizers: tensors smaller than this keep 32-bit states
#: (``min_8bit_size``), larger ones one fp32 absmax per block of this many elements.
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK = 256
#: Its two 256-entry fp32 quantization maps, shared by all tensors.
BNB_QMAP_BYTES = 2 * 256 * 4

# Modules diffusers / transformers hand to their checkpoint function one at a time when
# gradient checkpointing is on: the backward recomputes one of them at a time.
CHECKPOINTED_UNITS = ("ResnetBlock2D", "Transformer2DModel", "CLIPEncoderLayer")


@dataclass(frozen=True)
class TrainSetup:
    """The settings that change a fine-tune's memory (``TrainConfig`` + job fields)."""

    optimizer: str = "adamw"
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    use_ema: bool = False
    ema_offload: bool = False
    processes: int = 1
    train_unet: bool = True
    train_text_encoder: bool = True

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, not {self.optimizer!r}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISIONS}")
        if self.processes < 1:
            raise ValueError("processes must be >= 1")

    @property
    def low_precision(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mixed_precision)


@dataclass(frozen=True)
class ActivationEstimate:
    """Activation bytes of one micro-batch: ``intercept + per_sample x micro_batch``."""

    intercept: int
    per_sample: int
    measured: dict[int, int] = field(default_factory=dict)  # micro-batch -> bytes

    def at(self, micro_batch: int) -> int:
        return self.intercept + self.per_sample * micro_batch if micro_batch > 0 else 0


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one training process holds on its GPU, per component."""

    parameters: int  # trained parameters (UNet + text encoder)
    weights: int
    autocast_weights: int
    gradients: int
    optimizer: int
    optimizer_step_temporary: int  # only during optimizer.step(), when activations are freed
    ema: int
    ema_update_temporary: int  # only during the EMA update, after the optimizer step
    ddp_buckets: int
    overhead: int
    activations: ActivationEstimate

    @property
    def static(self) -> int:
        """Everything but the activations and the optimizer step's temporary."""
        return (
            self.weights
            + self.autocast_weights
            + self.gradients
            + self.optimizer
            + self.ema
            + self.ddp_buckets
            + self.overhead
        )

    def total(self, micro_batch: int) -> int:
        """Peak bytes at ``micro_batch``: the end of the forward (activations and gradients
        both counted whole: exact under gradient accumulation, an upper bound for a single
        micro-batch, whose backward frees activations as gradients appear), or the optimizer
        step / EMA update (activations freed, their temporaries live), the largest."""
        # The autocast copies are gone by the optimizer step (the cache is cleared when the
        # forward's autocast region exits and the backward frees the saved ones).
        after = self.static - self.autocast_weights
        step_peak = after + max(self.optimizer_step_temporary, self.ema_update_temporary)
        return max(self.static + self.activations.at(micro_batch), step_peak)

    def components(self, micro_batch: int) -> dict[str, int]:
        return {
            "weights": self.weights,
            "autocast_weights": self.autocast_weights,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "optimizer_step_temporary": self.optimizer_step_temporary,
            "ema": self.ema,
            "ema_update_temporary": self.ema_update_temporary,
            "ddp_buckets": self.ddp_buckets,
            "overhead": self.overhead,
            "activations": self.activations.at(micro_batch),
            "total": self.total(micro_batch),
        }


def meta_models(
    unet_config: dict[str, Any], text_config: dict[str, Any]
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``UNet2DConditionModel(**unet_config)`` and ``CLIPTextModel`` on the meta device."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    return unet, text_encoder


def parameter_count(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def optimizer_state_bytes(parameters: Iterable[torch.Tensor], optimizer: str) -> int:
    """Bytes of the optimizer's persistent state for ``parameters`` (fp32 parameters)."""
    tensors = list(parameters)
    if optimizer in ("adamw", "adamw_fused"):
        states = sum(2 * 4 * p.numel() for p in tensors)
        # The fused kernel keeps each tensor's step count on the device (a float32 scalar);
        # the foreach one keeps it on the CPU.
        return states + (4 * len(tensors) if optimizer == "adamw_fused" else 0)
    if optimizer == "adamw_8bit":
        total = BNB_QMAP_BYTES
        for p in tensors:
            n = p.numel()
            if n < BNB_MIN_8BIT_SIZE:
                total += 2 * 4 * n
            else:
                total += 2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK)
        return total
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, not {optimizer!r}")


def optimizer_step_temporary_bytes(groups: Iterable[Iterable[torch.Tensor]], optimizer: str) -> int:
    """Peak temporary of one ``optimizer.step()``: the foreach AdamW's ``_foreach_sqrt`` of
    a parameter group's ``exp_avg_sq`` (groups are stepped one after the other, so the
    largest group's); the fused kernels work in place."""
    if optimizer == "adamw":
        return max((sum(4 * p.numel() for p in group) for group in groups), default=0)
    return 0


class _FlashLikeAttention(torch.autograd.Function):
    """``scaled_dot_product_attention`` as CUDA's flash / memory-efficient kernels save it:
    q, k, v, the output and a float32 log-sum-exp per query (not the attention matrix the
    math fallback, which the meta device would run, saves). Forward shapes only."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *mask: Any):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse, *mask)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:  # never run: meta measurement only
        raise NotImplementedError("shape-only attention")


def _flash_like_sdpa(query, key, value, attn_mask=None, *args: Any, **kwargs: Any):
    mask = attn_mask if attn_mask is not None else kwargs.get("attn_mask")
    if isinstance(mask, torch.Tensor):  # the memory-efficient kernel saves its bias too
        return _FlashLikeAttention.apply(query, key, value, mask)
    return _FlashLikeAttention.apply(query, key, value)


_LOW_PRECISION_OPS = {
    F.linear,
    F.conv1d,
    F.conv2d,
    torch.matmul,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.bmm,
    torch.Tensor.bmm,
    torch.baddbmm,
    torch.addmm,
    torch.mm,
}
_FLOAT32_OPS = {
    F.group_norm,
    F.layer_norm,
    F.softmax,
    torch.softmax,
    torch.Tensor.softmax,
    F.log_softmax,
    F.mse_loss,
}


class _EmulatedAutocast(torch.overrides.TorchFunctionMode):
    """CUDA autocast's casts at the Python level, above autograd, as the real one sits
    above it in the dispatcher (autocast does not run on the meta device): matmul-like ops
    in ``dtype``, normalisations, softmax and the loss in float32, the rest as they come.
    Casts of trained parameters are cached per forward as autocast's weight cache does."""

    def __init__(self, dtype: torch.dtype, parameters: set[int]) -> None:
        super().__init__()
        self.dtype = dtype
        self.parameters = parameters
        self.cache: dict[int, torch.Tensor] = {}  # parameter id -> its cast copy
        self.copy_ids: set[int] = set()

    def _cast(self, value: Any, dtype: torch.dtype) -> Any:
        if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
            return value
        if value.dtype == dtype:
            return value
        if id(value) in self.parameters and value.requires_grad:  # autocast caches these
            if id(value) not in self.cache:
                self.cache[id(value)] = value.to(dtype)
                self.copy_ids.add(id(self.cache[id(value)]))
            return self.cache[id(value)]
        return value.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LOW_PRECISION_OPS:
            dtype = self.dtype
        elif func in _FLOAT32_OPS:
            dtype = torch.float32
        else:
            return func(*args, **kwargs)
        args = tuple(self._cast(a, dtype) for a in args)
        kwargs = {k: self._cast(v, dtype) for k, v in kwargs.items()}
        return func(*args, **kwargs)


@contextlib.contextmanager
def _patched_sdpa() -> Iterator[None]:
    # diffusers' and transformers' attention call F.scaled_dot_product_attention by
    # attribute at call time, so patching the module attribute reaches both.
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _flash_like_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@dataclass(frozen=True)
class SavedBytes:
    """One measured forward: activation bytes saved for the backward (parameters and
    autocast's weight copies excluded), the bytes of those copies, and the largest
    checkpointed unit's own saved bytes (what the backward recomputes at once)."""

    activations: int
    autocast_weights: int
    largest_unit: int


def _grad_flags(module: torch.nn.Module) -> list[bool]:
    return [p.requires_grad for p in module.parameters()]


def _set_checkpointing(unet: Any, text_encoder: Any, on: bool, text_on: bool | None = None) -> None:
    set_gradient_checkpointing(unet, on)
    set_gradient_checkpointing(text_encoder, on if text_on is None else text_on)


def saved_activation_bytes(
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module,
    *,
    micro_batch: int,
    gradient_checkpointing: bool = False,
    mixed_precision: str = "no",
    train_unet: bool = True,
    train_text_encoder: bool = True,
) -> SavedBytes:
    """Run the trainer's forward on meta tensors and sum what autograd saves.

    As the trainer: a model not trained has no gradients, a text encoder not trained
    runs under ``no_grad``. The modules' modes, gradient flags and checkpointing are
    restored afterwards.

    Saved tensors are deduplicated by the tensor whose storage they view (a saved view
    keeps its whole base alive), parameters are left out (counted as weights). It is an
    estimate: transient buffers inside kernels, the backward's gradient tensors and the
    allocator's rounding are not in it; attention is counted as the flash kernels save it.
    """
    low = TrainSetup(mixed_precision=mixed_precision).low_precision
    before = [(m, m.training, _grad_flags(m)) for m in (unet, text_encoder)]
    was_checkpointing = [gradient_checkpointing_on(m) for m in (unet, text_encoder)]
    unet.requires_grad_(train_unet).train()
    text_encoder.requires_grad_(train_text_encoder).train()
    params = {id(p) for m in (unet, text_encoder) for p in m.parameters()}
    saved: dict[int, int] = {}
    keep: list[torch.Tensor] = []  # keeps ids unique while counting
    unit_bytes: list[int] = []
    running = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        base = tensor._base if tensor._base is not None else tensor
        copy = emulated is not None and id(base) in emulated.copy_ids
        if id(base) not in params and not copy and id(base) not in saved:
            size = base.untyped_storage().nbytes()
            saved[id(base)] = size
            running[0] += size
            keep.append(base)
        return tensor

    hooks = []
    if not gradient_checkpointing:
        # Each checkpointable unit's own saved bytes, for the recompute peak.
        starts: list[int] = []
        for module in (*unet.modules(), *text_encoder.modules()):
            if type(module).__name__ in CHECKPOINTED_UNITS:
                hooks.append(module.register_forward_pre_hook(lambda *_: starts.append(running[0])))
                hooks.append(
                    module.register_forward_hook(
                        lambda *_: unit_bytes.append(running[0] - starts.pop())
                    )
                )
    config = unet.config
    size = int(config.sample_size)
    length = int(text_encoder.config.max_position_embeddings)
    # Meta normally; real modules (CPU) measure the same way, which the tests compare.
    device = next(unet.parameters()).device
    ids = torch.zeros(micro_batch, length, dtype=torch.long, device=device)
    noisy = torch.zeros(micro_batch, int(config.in_channels), size, size, device=device)
    timesteps = torch.zeros(micro_batch, dtype=torch.long, device=device)
    emulated = _EmulatedAutocast(low, params) if low is not None else None
    _set_checkpointing(unet, text_encoder, gradient_checkpointing)
    try:
        with (
            _patched_sdpa(),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            emulated if emulated is not None else contextlib.nullcontext(),
        ):
            with contextlib.nullcontext() if train_text_encoder else torch.no_grad():
                hidden = text_encoder(ids, return_dict=False)[0]
            pred = unet(noisy, timesteps, hidden, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), torch.zeros_like(pred, dtype=torch.float32))
    finally:
        for hook in hooks:
            hook.remove()
        for module, training, flags in before:
            module.train(training)
            for parameter, flag in zip(module.parameters(), flags, strict=True):
                parameter.requires_grad_(flag)
        _set_checkpointing(unet, text_encoder, *was_checkpointing)
    del loss
    cached = emulated.cache.values() if emulated is not None else ()
    return SavedBytes(
        activations=sum(saved.values()),
        autocast_weights=sum(c.numel() * c.element_size() for c in cached),
        largest_unit=max(unit_bytes, default=0),
    )


def activation_estimate(
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module,
    *,
    gradient_checkpointing: bool = False,
    mixed_precision: str = "no",
    train_unet: bool = True,
    train_text_encoder: bool = True,
) -> ActivationEstimate:
    """Activation bytes as a line in the micro-batch, from measurements at 1 and 2.

    With checkpointing the peak adds the largest unit recomputed in the backward (its own
    saved bytes, measured without checkpointing at the same micro-batch)."""
    measured: dict[int, int] = {}
    for micro_batch in (1, 2):
        kwargs = {
            "micro_batch": micro_batch,
            "mixed_precision": mixed_precision,
            "train_unet": train_unet,
            "train_text_encoder": train_text_encoder,
        }
        plain = saved_activation_bytes(unet, text_encoder, **kwargs)
        if gradient_checkpointing:
            kept = saved_activation_bytes(unet, text_encoder, gradient_checkpointing=True, **kwargs)
            measured[micro_batch] = kept.activations + plain.largest_unit
        else:
            measured[micro_batch] = plain.activations
    slope = measured[2] - measured[1]
    return ActivationEstimate(intercept=measured[1] - slope, per_sample=slope, measured=measured)


def autocast_weight_bytes(
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module,
    mixed_precision: str,
    *,
    train_unet: bool = True,
    train_text_encoder: bool = True,
) -> int:
    """Bytes of the low-precision copies of trained weights autocast caches in one
    forward (0 in fp32)."""
    if TrainSetup(mixed_precision=mixed_precision).low_precision is None:
        return 0
    return saved_activation_bytes(
        unet,
        text_encoder,
        micro_batch=1,
        mixed_precision=mixed_precision,
        train_unet=train_unet,
        train_text_encoder=train_text_encoder,
    ).autocast_weights


def estimate(
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module,
    setup: TrainSetup,
    *,
    activations: ActivationEstimate | None = None,
    autocast_weights: int | None = None,
) -> MemoryEstimate:
    """Per-component GPU bytes of one training process fine-tuning both models.

    ``activations`` / ``autocast_weights``, when given, are reused measurements for the
    same checkpointing and precision (they cost a few meta forwards each)."""
    flags = {"train_unet": setup.train_unet, "train_text_encoder": setup.train_text_encoder}
    groups = [
        list(model.parameters())
        for model, on in ((unet, setup.train_unet), (text_encoder, setup.train_text_encoder))
        if on
    ]
    trained = [p for group in groups for p in group]
    count = sum(p.numel() for p in trained)
    # Frozen models stay on the GPU too (fp32, as the trainer loads them).
    weights = 4 * parameter_count(unet, text_encoder)
    gradients = 4 * count
    if autocast_weights is None:
        autocast_weights = autocast_weight_bytes(unet, text_encoder, setup.mixed_precision, **flags)
    if activations is None:
        activations = activation_estimate(
            unet,
            text_encoder,
            gradient_checkpointing=setup.gradient_checkpointing,
            mixed_precision=setup.mixed_precision,
            **flags,
        )
    ema = 4 * count if setup.use_ema else 0
    # One EMAModel per trained model, updated one after the other: its foreach step makes
    # a shadow-size temporary (``_foreach_sub``), and an offloaded shadow is on the GPU for
    # its update too. So the largest model's, once or twice.
    largest = 4 * max((sum(p.numel() for p in group) for group in groups), default=0)
    ema_update = (largest * (2 if setup.ema_offload else 1)) if setup.use_ema else 0
    return MemoryEstimate(
        parameters=count,
        weights=weights,
        autocast_weights=autocast_weights,
        gradients=gradients,
        optimizer=optimizer_state_bytes(trained, setup.optimizer),
        optimizer_step_temporary=optimizer_step_temporary_bytes(groups, setup.optimizer),
        ema=0 if setup.ema_offload else ema,
        ema_update_temporary=ema_update,
        ddp_buckets=gradients if setup.processes > 1 else 0,
        overhead=CUDA_OVERHEAD_BYTES,
        activations=activations,
    )


def largest_micro_batch(estimate: MemoryEstimate, capacity_bytes: int) -> int:
    """The largest micro-batch whose estimated peak fits ``capacity_bytes`` (0: none)."""
    if estimate.total(1) > capacity_bytes:
        return 0
    slope = max(estimate.activations.per_sample, 1)
    room = capacity_bytes - estimate.static - estimate.activations.intercept
    micro_batch = max(1, room // slope)
    # The line is exact for total(); step back over any rounding at the edge.
    while micro_batch > 1 and estimate.total(micro_batch) > capacity_bytes:
        micro_batch -= 1
    return int(micro_batch)


def largest_micro_batch_for(
    config: Any,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module,
    processes: int,
    device: torch.device,
    *,
    mixed_precision: str = "no",
) -> int:
    """The trainer's automatic micro-batch bound: the largest that fits ``device``'s free
    memory by this estimate, for a ``TrainConfig`` and its (CPU-loaded) models.

    Meta copies are built from the models' configs (nothing allocated, the models are not
    run); checkpointing is read off the models, where the trainer has set it. fp32 unless
    ``mixed_precision`` says otherwise (bf16 only lowers the estimate)."""
    from transformers import CLIPTextModel

    with torch.device("meta"):
        meta_unet = type(unet).from_config(unet.config)
        meta_text = CLIPTextModel(text_encoder.config)
    checkpointing = gradient_checkpointing_on(unet) or gradient_checkpointing_on(text_encoder)
    setup = TrainSetup(
        optimizer=config.optimizer,
        mixed_precision=mixed_precision,
        gradient_checkpointing=checkpointing,
        use_ema=config.use_ema,
        ema_offload=config.ema_offload,
        processes=processes,
        train_unet=config.train_unet,
        train_text_encoder=config.train_text_encoder,
    )
    free, _ = torch.cuda.mem_get_info(device)
    return largest_micro_batch(estimate(meta_unet, meta_text, setup), free)
