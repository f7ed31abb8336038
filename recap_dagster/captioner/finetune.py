"""RECAP step 1: fine-tune a captioner on a few hundred (image, short, long) human captions."""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from PIL import Image, ImageOps

from recap_dagster.captioner.model import Captioner, dropout_state, restore_dropout
from recap_dagster.training.substrate import (
    Checkpoints,
    check_lr_scheduler,
    check_mixed_precision,
    lr_schedule,
    make_accelerator,
    seed_everything,
    setting,
)

MixedPrecision = Literal["no", "fp16", "bf16"]
SavedDtype = Literal["float32", "bfloat16", "float16"]


@dataclass
class CaptionExample:
    """One human-captioned image with both RECAP styles."""

    key: str
    image: Image.Image
    short: str
    long: str

    def caption(self, style: str) -> str:
        """The caption of ``style`` ("short" or "long")."""
        if style not in ("short", "long"):
            raise ValueError(f"unknown style {style!r}")
        return self.short if style == "short" else self.long

    def mirrored(self) -> CaptionExample:
        """The image mirrored left-right, with 'left' and 'right' swapped in both captions."""
        return CaptionExample(
            key=f"{self.key}#mirrored",
            image=ImageOps.mirror(self.image),
            short=swap_left_right(self.short),
            long=swap_left_right(self.long),
        )


_LEFT_RIGHT = re.compile(r"\b(left|right)(most)?\b", re.IGNORECASE)


def swap_left_right(text: str) -> str:
    """``text`` with every 'left' and 'right' (also '-most', any case) swapped: the caption
    of the mirrored image. Word-level on purpose, as MDETR does for its flips; a caption
    that uses 'right' for 'correct' gets it swapped too, which is why mirroring is opt-in."""

    def swap(match: re.Match[str]) -> str:
        word = match.group(1)
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():
            other = other.upper()
        elif word[0].isupper():
            other = other.capitalize()
        return other + (match.group(2) or "")

    return _LEFT_RIGHT.sub(swap, text)


@dataclass
class FineTuneConfig:
    """Paper defaults (RECAP §4): 300 steps, lr 4e-5, batch 64, dropout 0.1, 50/50 styles.

    ``batch_size`` is the effective batch; each step runs ``grad_accum_steps`` micro-batches
    of ``batch_size // grad_accum_steps``. ``max_grad_norm`` (not in the paper) clips the
    gradient norm; ``None`` disables clipping. ``train_vision_tower=False`` keeps the image
    encoder frozen and trains the rest (a common captioner fine-tune: 100 images are too
    few to improve a pretrained image encoder, and updating it costs the grounding).
    ``lr_scheduler`` is any ``transformers.get_scheduler`` name; the paper states no schedule,
    so the default keeps the rate constant after ``warmup_steps``. ``mirror`` (not in the
    paper) also trains on every image mirrored left-right, its captions' 'left' and 'right'
    swapped (:meth:`CaptionExample.mirrored`): twice the image-caption pairs from the same
    human captions. Off by default: it assumes captions and images without mirrored text
    (signs, logos) and without 'right' meaning 'correct'.
    """

    steps: int = setting(300, "Optimizer steps.")
    learning_rate: float = setting(4e-5, "Peak AdamW learning rate.")
    batch_size: int = setting(64, "Effective batch (image-caption pairs per step).")
    grad_accum_steps: int = setting(
        1, "Micro-batches per step (batch_size / this per forward); raise it when memory is short."
    )
    dropout: float = setting(0.1, "Dropout during fine-tuning.")
    long_fraction: float = setting(
        0.5, "Fraction of each batch trained on the LONG caption (50/50 in the paper)."
    )
    weight_decay: float = setting(0.0, "AdamW weight decay.")
    warmup_steps: int = setting(0, "Linear learning-rate warmup steps.")
    seed: int = setting(0, "Seed for sampling and initialisation.")
    mixed_precision: MixedPrecision = setting("no", "accelerate mixed precision: no, fp16, bf16.")
    max_grad_norm: float | None = setting(1.0, "Gradient norm clipping; None: off.")
    train_vision_tower: bool = setting(
        True, "Also update the image encoder (False: keep it frozen)."
    )
    lr_scheduler: str = setting(
        "constant_with_warmup",
        "LR schedule after the warmup: constant, constant_with_warmup, linear, cosine, "
        "cosine_with_min_lr (decays to 0 at the last step).",
    )
    saved_dtype: SavedDtype = setting(
        "float32",
        "dtype of the saved checkpoint's weights: float32, bfloat16 or float16. Training "
        "keeps fp32 master weights whatever dtype the base checkpoint was saved in.",
    )
    mirror: bool = setting(
        False,
        "Also train on every image mirrored left-right, with 'left' and 'right' swapped in "
        "its captions (twice the pairs; not in the paper). Leave off for data with text in "
        "the images or 'right' meaning 'correct'.",
    )

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError("steps must be >= 0")
        if self.batch_size < 1 or self.grad_accum_steps < 1:
            raise ValueError("batch_size and grad_accum_steps must be >= 1")
        if self.batch_size % self.grad_accum_steps:
            raise ValueError("batch_size must be a multiple of grad_accum_steps")
        if not 0.0 <= self.long_fraction <= 1.0:
            raise ValueError("long_fraction must be in [0, 1]")
        check_lr_scheduler(self.lr_scheduler)
        check_mixed_precision(self.mixed_precision)
        if self.saved_dtype not in get_args(SavedDtype):
            raise ValueError(
                f"saved_dtype must be one of {get_args(SavedDtype)}, got {self.saved_dtype!r}"
            )

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum_steps


def sample_batches(num_examples: int, config: FineTuneConfig) -> Iterator[list[tuple[int, str]]]:
    """Endless (example index, style) batches, deterministic given ``config.seed``.

    Examples are drawn as consecutive copies of the set, each copy reshuffled, so every image
    is seen equally often (the paper trains over copies of its 100 images). Within a batch,
    ``round(long_fraction * batch_size)`` pairs are long and the rest short, in random order.
    """
    rng = random.Random(config.seed)
    pool: list[int] = []
    n_long = round(config.long_fraction * config.batch_size)
    while True:
        while len(pool) < config.batch_size:
            order = list(range(num_examples))
            rng.shuffle(order)
            pool += order
        indices, pool = pool[: config.batch_size], pool[config.batch_size :]
        styles = ["long"] * n_long + ["short"] * (config.batch_size - n_long)
        rng.shuffle(styles)
        yield list(zip(indices, styles, strict=True))


def training_examples(
    examples: Sequence[CaptionExample], config: FineTuneConfig
) -> list[CaptionExample]:
    """The examples one fine-tune samples from: ``examples``, then their mirrored copies when
    ``config.mirror`` is set."""
    examples = list(examples)
    return examples + [e.mirrored() for e in examples] if config.mirror else examples


def master_weights_in_fp32(model: torch.nn.Module) -> None:
    """Upcast ``model`` in place to fp32 when any floating weight is not.

    Published checkpoints are often saved in bf16 (PaliGemma's configs say so), and
    transformers loads that dtype by default. AdamW on bf16 weights rounds RECAP's updates
    away (in bf16, 0.02 + 4e-5 == 0.02), so training keeps fp32 masters; ``mixed_precision``
    still runs the forward pass in bf16/fp16 through accelerate's autocast.
    """
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
        model.float()


def fine_tune(
    captioner: Captioner,
    examples: Sequence[CaptionExample],
    config: FineTuneConfig,
    *,
    on_step: Callable[[int, float], None] | None = None,
    checkpoints: Checkpoints | None = None,
    checkpoint_every: int = 0,
) -> list[float]:
    """Fine-tune ``captioner`` in place on ``examples``; returns the loss of every step.

    Each step draws ``config.batch_size`` (image, style) pairs (see :func:`sample_batches`)
    from :func:`training_examples` and learns ``caption | image, style prefix`` with AdamW
    through accelerate (device placement, gradient accumulation, mixed precision). Dropout
    is ``config.dropout`` while training and restored afterwards; the model is left in eval
    mode on the accelerator's device, in fp32 (:func:`master_weights_in_fp32`).
    ``on_step(step, loss)`` is called after every optimizer step (1-based step).
    With ``config.train_vision_tower`` False the image encoder gets no updates; its
    ``requires_grad`` flags are restored afterwards. With ``checkpoints`` the training
    state is saved every ``checkpoint_every`` steps and a new call resumes from the latest.
    """
    if not examples:
        raise ValueError("fine_tune needs at least one example")
    examples = training_examples(examples, config)
    seed_everything(config.seed)
    accelerator = make_accelerator(config.mixed_precision, config.grad_accum_steps)
    saved_dropout = dropout_state(captioner.model)
    captioner.set_dropout(config.dropout)
    frozen = [] if config.train_vision_tower else list(captioner.vision_tower().parameters())
    saved_requires_grad = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    master_weights_in_fp32(captioner.model)

    params = [p for p in captioner.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    model, optimizer = accelerator.prepare(captioner.model, optimizer)
    # Stepped by hand once per optimizer step: accelerate's scheduler wrapper would step it
    # once per process and per micro-batch bookkeeping, not per RECAP step.
    scheduler = lr_schedule(
        config.lr_scheduler, optimizer, warmup_steps=config.warmup_steps, total_steps=config.steps
    )
    accelerator.register_for_checkpointing(scheduler)

    micro = config.micro_batch_size
    batches = sample_batches(len(examples), config)
    losses: list[float] = []
    start_step = 0
    latest = checkpoints.latest(config.steps) if checkpoints is not None else None
    if latest is not None:
        checkpoints.load(accelerator, latest)
        start_step, losses = latest.step, list(latest.meta["losses"])
        for _ in range(start_step):  # the data order resumes where it stopped
            next(batches)
    model.train()
    try:
        for step in range(start_step + 1, config.steps + 1):
            pairs = next(batches)
            step_loss = 0.0
            for start in range(0, len(pairs), micro):
                chunk = pairs[start : start + micro]
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        loss = captioner.loss_with(
                            model,
                            [examples[i].image for i, _ in chunk],
                            [examples[i].caption(style) for i, style in chunk],
                            [style for _, style in chunk],
                        )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and config.max_grad_norm is not None:
                        accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                step_loss += loss.detach().float().item() / config.grad_accum_steps
            scheduler.step()
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"non-finite loss {step_loss} at step {step}")
            losses.append(step_loss)
            if on_step is not None:
                on_step(step, step_loss)
            if checkpoints is not None and checkpoint_every and step % checkpoint_every == 0:
                checkpoints.save(accelerator, step, {"losses": losses})
    finally:
        captioner.model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        captioner.model.eval()
        restore_dropout(saved_dropout)
        for p, flag in zip(frozen, saved_requires_grad, strict=True):
            p.requires_grad_(flag)
        accelerator.free_memory()
    return losses
