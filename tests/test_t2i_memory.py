"""The meta-device memory estimate of SD fine-tuning, on a tiny UNet + CLIP text encoder."""

from __future__ import annotations

import pytest
import torch

from recap_dagster.t2i.memory import (
    BNB_MIN_8BIT_SIZE,
    BNB_QMAP_BYTES,
    CUDA_OVERHEAD_BYTES,
    ActivationEstimate,
    TrainSetup,
    activation_estimate,
    autocast_weight_bytes,
    estimate,
    largest_micro_batch,
    largest_micro_batch_for,
    meta_models,
    optimizer_state_bytes,
    parameter_count,
    saved_activation_bytes,
)
from recap_dagster.t2i.real_shapes import TINY_TEXT_ENCODER, TINY_UNET


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, torch.nn.Module]:
    return meta_models(TINY_UNET, TINY_TEXT_ENCODER)


@pytest.fixture(scope="module")
def fp32_line(tiny) -> ActivationEstimate:
    """Activations in fp32 without checkpointing (measured once: a few meta forwards)."""
    return activation_estimate(*tiny)


def test_models_are_on_meta_and_static_bytes_follow_the_parameter_count(tiny, fp32_line) -> None:
    unet, text_encoder = tiny
    assert all(p.is_meta for m in tiny for p in m.parameters())
    count = parameter_count(unet, text_encoder)
    plain = estimate(unet, text_encoder, TrainSetup(), activations=fp32_line)
    assert plain.parameters == count
    assert plain.weights == plain.gradients == 4 * count
    assert plain.optimizer == 8 * count  # exp_avg + exp_avg_sq, fp32
    # foreach's sqrt of exp_avg_sq, one parameter group (model) at a time
    largest = max(parameter_count(unet), parameter_count(text_encoder))
    assert plain.optimizer_step_temporary == 4 * largest
    assert plain.ema == plain.ema_update_temporary == plain.ddp_buckets == 0
    assert plain.autocast_weights == 0
    assert plain.overhead == CUDA_OVERHEAD_BYTES

    # The same activations serve every setup with checkpointing off, in fp32.
    line = plain.activations
    ema = estimate(unet, text_encoder, TrainSetup(use_ema=True, processes=2), activations=line)
    assert ema.ema == 4 * count and ema.ddp_buckets == ema.gradients
    assert ema.static == plain.static + 8 * count
    assert ema.ema_update_temporary == 4 * largest  # one model's EMAModel foreach step
    offloaded = estimate(
        unet, text_encoder, TrainSetup(use_ema=True, ema_offload=True), activations=line
    )
    # Off the GPU between updates; on it (plus the temporary) during one.
    assert offloaded.ema == 0 and offloaded.ema_update_temporary == 8 * largest
    fused = estimate(unet, text_encoder, TrainSetup(optimizer="adamw_fused"), activations=line)
    tensors = len(list(unet.parameters())) + len(list(text_encoder.parameters()))
    assert fused.optimizer == 8 * count + 4 * tensors and fused.optimizer_step_temporary == 0


@pytest.mark.parametrize("fused", [False, True])
def test_adamw_state_bytes_match_torch(fused: bool) -> None:
    """One real AdamW step on CPU holds exactly the bytes the estimate counts."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.GELU(), torch.nn.Linear(300, 7))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
    model(torch.randn(4, 64)).square().mean().backward()
    optimizer.step()
    held = sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for key, value in state.items()
        if fused or key != "step"  # unfused AdamW keeps its step count on the CPU
    )
    name = "adamw_fused" if fused else "adamw"
    assert held == optimizer_state_bytes(model.parameters(), name)


def test_8bit_states_are_a_quarter_of_fp32_plus_block_scales(tiny) -> None:
    small = torch.empty(BNB_MIN_8BIT_SIZE - 1, device="meta")
    large = torch.empty(BNB_MIN_8BIT_SIZE + 1, device="meta")
    # Small tensors keep 32-bit states; large ones 1 byte per state + one fp32 absmax per
    # 256-element block and state.
    assert optimizer_state_bytes([small], "adamw_8bit") == 8 * small.numel() + BNB_QMAP_BYTES
    blocks = (large.numel() + 255) // 256
    assert optimizer_state_bytes([large], "adamw_8bit") == (
        2 * large.numel() + 2 * 4 * blocks + BNB_QMAP_BYTES
    )
    params = [p for m in tiny for p in m.parameters()]
    ratio = optimizer_state_bytes(params, "adamw_8bit") / optimizer_state_bytes(params, "adamw")
    assert 0.25 < ratio < 0.3


def test_checkpointing_reduces_activations(tiny, fp32_line) -> None:
    for precision in ("no", "bf16"):
        plain = (
            fp32_line if precision == "no" else activation_estimate(*tiny, mixed_precision="bf16")
        )
        kept = activation_estimate(*tiny, gradient_checkpointing=True, mixed_precision=precision)
        assert 0 < kept.per_sample < plain.per_sample / 2
        assert kept.at(4) < plain.at(4)


def test_activations_grow_linearly_with_the_micro_batch(tiny, fp32_line) -> None:
    line = fp32_line
    assert line.per_sample > 0
    measured = saved_activation_bytes(*tiny, micro_batch=4).activations
    assert measured == pytest.approx(line.intercept + 4 * line.per_sample, rel=0.01)


def test_meta_measurement_matches_a_real_cpu_forward(request: pytest.FixtureRequest) -> None:
    """Meta tensors propagate the shapes a real forward saves: same bytes on CPU."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    # One thread: on a shared 2-core machine more made this tiny forward 30x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_ENCODER))
    meta_unet, meta_text = meta_models(TINY_UNET, TINY_TEXT_ENCODER)
    for checkpointing in (False, True):
        real = saved_activation_bytes(
            unet, text_encoder, micro_batch=2, gradient_checkpointing=checkpointing
        )
        meta = saved_activation_bytes(
            meta_unet, meta_text, micro_batch=2, gradient_checkpointing=checkpointing
        )
        assert real == meta
    # The measurement leaves the modules as it found them (the trainer's are measured
    # with its own settings on).
    assert not unet.is_gradient_checkpointing and not text_encoder.is_gradient_checkpointing
    unet.enable_gradient_checkpointing()
    unet.eval().requires_grad_(False)
    saved_activation_bytes(unet, text_encoder, micro_batch=1)
    assert unet.is_gradient_checkpointing and not unet.training
    assert not any(p.requires_grad for p in unet.parameters())


def test_a_frozen_text_encoder_has_no_gradients_states_or_activations(tiny) -> None:
    unet, text_encoder = tiny
    both = estimate(unet, text_encoder, TrainSetup())
    unet_only = estimate(unet, text_encoder, TrainSetup(train_text_encoder=False))
    assert unet_only.weights == both.weights  # still on the GPU
    assert unet_only.gradients == 4 * parameter_count(unet)
    assert unet_only.optimizer == 8 * parameter_count(unet)
    assert unet_only.activations.per_sample < both.activations.per_sample


def test_trainer_bound_uses_the_models_configs_and_the_free_memory(tiny, monkeypatch) -> None:
    """The trainer's automatic micro-batch: real (CPU) models in, meta copies measured."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from recap_dagster.t2i.train import TrainConfig

    unet = UNet2DConditionModel(**TINY_UNET)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_ENCODER))
    unet.enable_gradient_checkpointing()
    config = TrainConfig(optimizer="adamw_8bit", use_ema=True, ema_offload=True)
    expected = estimate(
        *tiny,
        TrainSetup(
            optimizer="adamw_8bit",
            gradient_checkpointing=True,
            use_ema=True,
            ema_offload=True,
            processes=2,
        ),
    )
    free = expected.total(7) + 1
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))
    bound = largest_micro_batch_for(config, unet, text_encoder, 2, torch.device("cuda"))
    assert bound == largest_micro_batch(expected, free) >= 7


def test_bf16_counts_cast_weight_copies_and_halves_matmul_outputs(tiny, fp32_line) -> None:
    unet, text_encoder = tiny
    bf16 = estimate(unet, text_encoder, TrainSetup(mixed_precision="bf16"))
    assert bf16.autocast_weights == autocast_weight_bytes(unet, text_encoder, "bf16") > 0
    # Every linear and conv weight and bias is cast once per forward (autocast's cache).
    cast = sum(
        p.numel()
        for m in (*unet.modules(), *text_encoder.modules())
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
        for p in m.parameters(recurse=False)
    )
    assert bf16.autocast_weights == 2 * cast
    fp32 = fp32_line
    assert fp32.per_sample / 2 <= bf16.activations.per_sample < fp32.per_sample


def test_largest_micro_batch_is_the_last_that_fits(tiny, fp32_line) -> None:
    plain = estimate(*tiny, TrainSetup(), activations=fp32_line)
    capacity = plain.total(5) + plain.activations.per_sample // 2
    assert largest_micro_batch(plain, capacity) == 5
    assert plain.total(5) <= capacity < plain.total(6)
    assert largest_micro_batch(plain, plain.total(1) - 1) == 0
    parts = plain.components(3)
    assert parts["total"] == plain.static + parts["activations"]
