"""Real-size rehearsal: every captioner family at its published config, on this machine.

For BLIP-large, PaliGemma-3B-224, Florence-2-large and Qwen2.5-VL-3B the script types the
published ``config.json`` values (random init, nothing downloaded) and reports per family:

* parameters and bf16 bytes, counted on the model built on the meta device (no memory);
* estimated memory: fine-tune = 16 B/param (fp32 master weights, their gradients and
  AdamW's two moments) + the family's stated activation allowance (batch 2, fp32);
  inference = 2 B/param (bf16) + 1 GiB (activations and KV cache of a few tokens);
* the image tokens the project's processor gives one image, against the real model's;
* where the estimate fits the memory available now less a 4 GiB margin (``--budget-gib``
  sets another budget): one real fine-tune step and one batched caption through the
  project's code path. The random model is built in its published dtype and saved with
  ``Captioner.save_pretrained(dir, dtype=<published dtype>)``;
  ``Captioner.from_pretrained(dir)`` loads it back in that dtype, as a downloaded
  checkpoint would be loaded. The step is ``fine_tune(captioner, examples,
  FineTuneConfig(steps=1, batch_size=2))``, which upcasts to fp32 masters; the caption is
  ``caption(images, "long", max_new_tokens=8, min_new_tokens=8, batch_size=2)`` from a
  fresh load in the published dtype. Build, step and caption each run in their own
  subprocess, so each peak RSS printed is that phase's own: set it against the estimates
  (the activation allowances are guesses).

Deviations from the published checkpoints, as there is no hub here:

* processors are the project's tiny builders (``build_tiny_processor``) at the real image
  resolution and patch size, with a local tokenizer of a few dozen words; the model keeps
  its published ``vocab_size`` (the embedding and LM head are real size) and its special
  token ids (bos/eos/pad/image, ...) are set from the local tokenizer;
* weights are random: captions are gibberish and losses meaningless; only seconds and
  memory mean anything (``min_new_tokens`` makes every caption 8 tokens long).

A family the tree does not support (no ``family_for_model_type`` for its model type, or no
tiny processor builder) gets its meta-device figures and "family not supported in this
tree". Run one heavy family at a time on an otherwise idle machine (the 3B builds write
6-8 GB to the temporary directory):

    .venv/bin/python benchmarks/captioner_real_size.py --skip-steps   # estimates, seconds
    .venv/bin/python benchmarks/captioner_real_size.py [--families blip-large ...] [--out r.json]

Prints one markdown table: params, bf16 GB, estimates, image tokens, seconds of the build,
of the fine-tune step and of the caption, the peak RSS of the step and caption processes,
and why a phase was skipped.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from PIL import Image, ImageDraw
from transformers import (
    BlipConfig,
    BlipForConditionalGeneration,
    Florence2Config,
    Florence2ForConditionalGeneration,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PretrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recap_dagster.captioner import Captioner  # noqa: E402
from recap_dagster.captioner.families import family_for_model_type  # noqa: E402
from recap_dagster.captioner.finetune import CaptionExample, FineTuneConfig, fine_tune  # noqa: E402
from recap_dagster.captioner.model import STYLE_PREFIXES  # noqa: E402
from recap_dagster.miniworld.tiny_captioner import build_tiny_processor  # noqa: E402
from recap_dagster.training.devices import dtype_name  # noqa: E402

GIB = 2**30
MARGIN_GIB = 4.0  # left to the other processes on the machine
INFERENCE_ALLOWANCE_GIB = 1.0  # batch-2 activations and the KV cache of a few tokens
FINE_TUNE_BYTES_PER_PARAM = 16  # fp32 weights 4 + grads 4 + AdamW exp_avg 4 + exp_avg_sq 4
IMAGE_PX = 448  # synthetic images; every processor resizes them (Qwen: 448 -> 32x32 patches)

# Published config.json values, typed from the repositories named (no download possible).
BLIP_LARGE = {  # Salesforce/blip-image-captioning-large
    "model_type": "blip",
    "projection_dim": 512,
    "image_text_hidden_size": 256,
    "torch_dtype": "float32",
    "text_config": {
        "model_type": "blip_text_model",
        "vocab_size": 30524,
        "hidden_size": 768,
        "encoder_hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 512,
        "bos_token_id": 30522,
        "sep_token_id": 102,
        "pad_token_id": 0,
        "eos_token_id": 2,
    },
    "vision_config": {
        "model_type": "blip_vision_model",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 384,
        "patch_size": 16,
        "projection_dim": 512,
    },
}
PALIGEMMA_3B_224 = {  # google/paligemma-3b-pt-224
    "model_type": "paligemma",
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
    "hidden_size": 2048,
    "projection_dim": 2048,
    "image_token_index": 257152,
    "vocab_size": 257216,
    # bfloat16 as the project's fine-tune docs have it; the main revision may hold float32
    # weights with bfloat16/float16 revisions beside it (not checkable offline).
    "torch_dtype": "bfloat16",
    "text_config": {
        "model_type": "gemma",
        "hidden_size": 2048,
        "intermediate_size": 16384,
        "num_attention_heads": 8,
        "num_hidden_layers": 18,
        "num_key_value_heads": 1,
        "num_image_tokens": 256,
        "vocab_size": 257216,
    },
    "vision_config": {
        "model_type": "siglip_vision_model",
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "image_size": 224,  # SigLIP's default; the published file leaves it out
        "patch_size": 14,
        "num_image_tokens": 256,
        "projection_dim": 2048,
        "projector_hidden_act": "gelu_fast",
        "vision_use_head": False,
    },
}
FLORENCE2_LARGE = {  # florence-community/Florence-2-large (microsoft/Florence-2-large converted)
    "model_type": "florence2",
    "image_token_id": 51289,
    "torch_dtype": "float16",  # the conversion script's dtype, as microsoft/Florence-2-large
    "vision_config": {
        "model_type": "florence_vision",
        "depths": [1, 1, 9, 1],
        "embed_dim": [256, 512, 1024, 2048],
        "num_heads": [8, 16, 32, 64],
        "num_groups": [8, 16, 32, 64],
        "patch_size": [7, 3, 3, 3],
        "patch_stride": [4, 2, 2, 2],
        "patch_padding": [3, 1, 1, 1],
        "patch_prenorm": [False, True, True, True],
        "window_size": 12,
        "drop_path_rate": 0.1,
        "projection_dim": 1024,
        "max_position_embeddings": 50,
        "max_temporal_embeddings": 100,
    },
    "text_config": {
        "model_type": "bart",
        "vocab_size": 51328,  # 51289 + <image>, padded to a multiple of 64 by the conversion
        "d_model": 1024,
        "encoder_layers": 12,
        "decoder_layers": 12,
        "encoder_attention_heads": 16,
        "decoder_attention_heads": 16,
        "encoder_ffn_dim": 4096,
        "decoder_ffn_dim": 4096,
        "max_position_embeddings": 1024,
        "activation_function": "gelu",
        "dropout": 0.1,
        "attention_dropout": 0.1,
        "activation_dropout": 0.1,
        "scale_embedding": False,
        "bos_token_id": 0,
        "pad_token_id": 1,
        "eos_token_id": 2,
        "decoder_start_token_id": 2,
        "forced_eos_token_id": 2,
    },
}
QWEN2_5_VL_3B = {  # Qwen/Qwen2.5-VL-3B-Instruct (flat text keys, as published)
    "model_type": "qwen2_5_vl",
    "torch_dtype": "bfloat16",
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 128000,
    "max_window_layers": 70,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "sliding_window": 32768,
    "use_sliding_window": False,
    "tie_word_embeddings": True,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 2048,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
    },
}


def _token_id(processor: ProcessorMixin, token: str) -> int | None:
    """``token``'s id in the local tokenizer, None when it is not a token of it."""
    tokenizer = processor.tokenizer
    found = tokenizer.convert_tokens_to_ids(token)
    return None if found is None or found == tokenizer.unk_token_id else found


def _blip_ids(processor: ProcessorMixin) -> dict[str, Any]:
    tok = processor.tokenizer
    text = {
        "bos_token_id": tok.bos_token_id,  # [DEC]
        "pad_token_id": tok.pad_token_id,
        "sep_token_id": tok.sep_token_id,
        "eos_token_id": tok.sep_token_id,
    }
    return {"text_config": text}


def _paligemma_ids(processor: ProcessorMixin) -> dict[str, Any]:
    tok = processor.tokenizer
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    ids["pad_token_id"] = tok.pad_token_id
    return {**ids, "image_token_index": processor.image_token_id, "text_config": ids}


def _florence2_ids(processor: ProcessorMixin) -> dict[str, Any]:
    tok = processor.tokenizer
    text = {
        "bos_token_id": tok.bos_token_id,
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "decoder_start_token_id": tok.eos_token_id,
        "forced_eos_token_id": tok.eos_token_id,
    }
    return {"image_token_id": processor.image_token_id, "text_config": text}


def _qwen2_5_vl_ids(processor: ProcessorMixin) -> dict[str, Any]:
    tok = processor.tokenizer
    ids = {
        "image_token_id": getattr(processor, "image_token_id", None),
        "video_token_id": getattr(processor, "video_token_id", None),
        "vision_start_token_id": _token_id(processor, "<|vision_start|>"),
        "vision_end_token_id": _token_id(processor, "<|vision_end|>"),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    return {key: value for key, value in ids.items() if value is not None}


@dataclass(frozen=True)
class RealSize:
    """One captioner family at its published size, and how to rehearse it here."""

    repo: str
    family: str  # the project's family name (captioner.families, the tiny builders)
    config_class: type[PretrainedConfig]
    model_class: type[PreTrainedModel]
    config: dict[str, Any]
    image_size: int  # the real model's input resolution (Qwen: the synthetic image side)
    patch_size: int  # pixels per image-token side (Florence-2: DaViT's total stride 32)
    image_tokens: int  # what the real model sees per image (BLIP: ViT patches + [CLS])
    activation_gib: float  # stated fine-tune activation allowance, batch 2, fp32
    special_ids: Callable[[ProcessorMixin], dict[str, Any]]

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.config["torch_dtype"])


#: Row name -> family at real size: the one mapping a new family is added to.
SPECS: dict[str, RealSize] = {
    "blip-large": RealSize(
        repo="Salesforce/blip-image-captioning-large",
        family="blip",
        config_class=BlipConfig,
        model_class=BlipForConditionalGeneration,
        config=BLIP_LARGE,
        image_size=384,
        patch_size=16,
        image_tokens=(384 // 16) ** 2 + 1,
        activation_gib=3.0,  # ViT-L/16: 577 tokens x 24 layers + BERT-base decoder
        special_ids=_blip_ids,
    ),
    "florence-2-large": RealSize(
        repo="florence-community/Florence-2-large",
        family="florence2",
        config_class=Florence2Config,
        model_class=Florence2ForConditionalGeneration,
        config=FLORENCE2_LARGE,
        image_size=768,
        patch_size=32,
        image_tokens=(768 // 32) ** 2 + 1,
        # DaViT at 768 px (stage 1: 192x192x256) + 12+12 BART layers. First stated as 4 GiB;
        # the step's peak RSS on CPU was 19.0 GiB, i.e. 16 B/param + 7.5 GiB.
        activation_gib=8.0,
        special_ids=_florence2_ids,
    ),
    "paligemma-3b-224": RealSize(
        repo="google/paligemma-3b-pt-224",
        family="paligemma",
        config_class=PaliGemmaConfig,
        model_class=PaliGemmaForConditionalGeneration,
        config=PALIGEMMA_3B_224,
        image_size=224,
        patch_size=14,
        image_tokens=(224 // 14) ** 2,
        activation_gib=4.0,  # SigLIP 256 tokens x 27 layers + Gemma-2B 18 layers x ~270
        special_ids=_paligemma_ids,
    ),
    "qwen2.5-vl-3b": RealSize(
        repo="Qwen/Qwen2.5-VL-3B-Instruct",
        family="qwen_vl",
        config_class=Qwen2_5_VLConfig,
        model_class=Qwen2_5_VLForConditionalGeneration,
        config=QWEN2_5_VL_3B,
        image_size=IMAGE_PX,  # no fixed resolution: within min_pixels..max_pixels
        patch_size=28,  # pixels per image token: 14 px ViT patches merged 2x2
        image_tokens=(IMAGE_PX // 28) ** 2,
        activation_gib=4.0,  # ViT 1024 patches x 32 layers + 36 layers x ~280 tokens
        special_ids=_qwen2_5_vl_ids,
    ),
}


# ---------------------------------------------------------------------------- data
SCENES = (
    ("red", "square", "left"),
    ("blue", "circle", "right"),
    ("green", "triangle", "top"),
    ("yellow", "square", "bottom"),
)


def examples() -> list[CaptionExample]:
    """Four synthetic images, one coloured shape each, captioned in both styles."""
    out = []
    boxes = {"left": (40, 160), "right": (280, 160), "top": (160, 40), "bottom": (160, 280)}
    for i, (colour, shape, where) in enumerate(SCENES):
        image = Image.new("RGB", (IMAGE_PX, IMAGE_PX), "white")
        x, y = boxes[where]
        draw = ImageDraw.Draw(image)
        if shape == "square":
            draw.rectangle((x, y, x + 128, y + 128), fill=colour)
        elif shape == "circle":
            draw.ellipse((x, y, x + 128, y + 128), fill=colour)
        else:
            draw.polygon(((x + 64, y), (x, y + 128), (x + 128, y + 128)), fill=colour)
        short = f"a {colour} {shape}"
        long = f"a large {colour} {shape} on the {where} of a white background"
        out.append(CaptionExample(key=str(i), image=image, short=short, long=long))
    return out


def words() -> list[str]:
    """The local tokenizers' vocabulary: every caption word and the style prefixes."""
    return [text for e in examples() for text in (e.short, e.long)] + list(STYLE_PREFIXES.values())


# ---------------------------------------------------------------------------- configs
def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = _merge(base[key], value)
        else:
            merged[key] = value
    return merged


def _vocab_size(config: PretrainedConfig) -> int:
    text = getattr(config, "text_config", None)
    return getattr(text, "vocab_size", None) or config.vocab_size


def real_processor(spec: RealSize) -> ProcessorMixin:
    """The project's tiny processor at the real resolution (raises ValueError if none)."""
    return build_tiny_processor(
        spec.family, words=words(), image_size=spec.image_size, patch_size=spec.patch_size
    )


def real_config(spec: RealSize, processor: ProcessorMixin | None = None) -> PretrainedConfig:
    """The published config; with ``processor``, its special token ids set from its tokenizer."""
    values = spec.config if processor is None else _merge(spec.config, spec.special_ids(processor))
    config = spec.config_class(**values)
    if processor is not None and len(processor.tokenizer) > _vocab_size(config):
        raise ValueError(f"local tokenizer larger than {spec.repo}'s vocabulary")
    return config


def project_support(spec: RealSize) -> str | None:
    """Why the project cannot run ``spec`` in this tree, or None when it can."""
    try:
        family_for_model_type(spec.config["model_type"])
    except ValueError:
        return "family not supported in this tree"
    try:
        real_processor(spec)
    except (ValueError, TypeError) as error:  # TypeError: a builder with other arguments
        return f"family not supported in this tree (tiny processor: {error})"
    return None


# ---------------------------------------------------------------------------- estimates
def meta_estimate(spec: RealSize) -> dict[str, Any]:
    """Parameter count and memory estimates from the model built on the meta device."""
    start = time.perf_counter()
    with torch.device("meta"):
        model = spec.model_class(real_config(spec))
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    seconds = time.perf_counter() - start
    published_bytes = torch.empty((), dtype=spec.dtype).element_size()
    return {
        "params": params,
        "bf16_gb": params * 2 / 1e9,
        "est_fine_tune_gib": params * FINE_TUNE_BYTES_PER_PARAM / GIB + spec.activation_gib,
        "est_inference_bf16_gib": params * 2 / GIB + INFERENCE_ALLOWANCE_GIB,
        "est_inference_published_gib": params * published_bytes / GIB + INFERENCE_ALLOWANCE_GIB,
        "meta_s": seconds,
    }


def image_tokens(spec: RealSize) -> int:
    """Image tokens the project's processor path gives one image (``generation_inputs``)."""
    processor = real_processor(spec)
    config = real_config(spec, processor)
    adapter = family_for_model_type(config.model_type)
    inputs = adapter.generation_inputs(
        config, processor, [examples()[0].image], STYLE_PREFIXES["long"]
    )
    image_token = getattr(processor, "image_token_id", None)
    if image_token is not None:
        return int((inputs["input_ids"][0] == image_token).sum())
    side = inputs["pixel_values"].shape[-1] // spec.patch_size  # BLIP: ViT patches + [CLS]
    return side * side + 1


# ---------------------------------------------------------------------------- phases (child)
def phase_build(spec: RealSize, directory: Path) -> dict[str, Any]:
    processor = real_processor(spec)
    config = real_config(spec, processor)
    adapter = family_for_model_type(config.model_type)
    torch.manual_seed(0)
    start = time.perf_counter()
    # In the published dtype (config.dtype) directly: no fp32 copy of a 3B model first.
    model = adapter.model_class_for(config.model_type)._from_config(config)
    build_s = time.perf_counter() - start
    built_dtype = next(model.parameters()).dtype
    start = time.perf_counter()
    Captioner(model, processor).save_pretrained(directory, dtype=spec.dtype)
    save_s = time.perf_counter() - start
    size = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    return {
        "build_s": build_s,
        "save_s": save_s,
        "built_dtype": dtype_name(built_dtype),
        "checkpoint_gb": size / 1e9,
    }


def phase_step(spec: RealSize, directory: Path) -> dict[str, Any]:
    start = time.perf_counter()
    captioner = Captioner.from_pretrained(directory)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    losses = fine_tune(captioner, examples(), FineTuneConfig(steps=1, batch_size=2))
    return {
        "step_s": time.perf_counter() - start,
        "step_load_s": load_s,
        "loaded_dtype": captioner.load_options["loaded_dtype"],
        "master_dtype": dtype_name(captioner.dtype),
        "loss": losses[0],
    }


def phase_caption(spec: RealSize, directory: Path) -> dict[str, Any]:
    start = time.perf_counter()
    captioner = Captioner.from_pretrained(directory)
    load_s = time.perf_counter() - start
    images = [e.image for e in examples()[:2]]
    start = time.perf_counter()
    captions = captioner.caption(images, "long", max_new_tokens=8, min_new_tokens=8, batch_size=2)
    return {
        "caption_s": time.perf_counter() - start,
        "caption_load_s": load_s,
        "caption_dtype": dtype_name(captioner.dtype),
        "captions": captions,
    }


PHASES = {"build": phase_build, "step": phase_step, "caption": phase_caption}


def run_child(args: argparse.Namespace) -> None:
    """One phase of one family, in this process; writes its figures to ``args.result``."""
    result = PHASES[args.phase](SPECS[args.family], Path(args.dir))
    result[f"{args.phase}_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    Path(args.result).write_text(json.dumps(result))


# ---------------------------------------------------------------------------- parent
def run_phase(name: str, phase: str, directory: Path) -> dict[str, Any]:
    """``phase`` of family ``name`` in a fresh interpreter; its figures or its error."""
    result = directory.parent / f"{phase}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--family", name]
    command += ["--phase", phase, "--dir", str(directory), "--result", str(result)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0 or not result.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        print(f"  {phase} failed (rc {done.returncode}) after {wall:.0f} s:\n{done.stderr[-3000:]}")
        return {"error": f"{phase} failed (rc {done.returncode}): {tail[0][:160]}"}
    figures = json.loads(result.read_text())
    shown = {k: v for k, v in figures.items() if k != "captions"}
    print(f"  {phase} ({wall:.0f} s wall): {json.dumps(shown, default=str)}")
    return figures


def rehearse(name: str, row: dict[str, Any], budget_gib: float) -> None:
    """Build, fine-tune one step and caption ``name`` where the estimates fit ``budget_gib``."""
    notes: list[str] = []
    fits_step = row["est_fine_tune_gib"] <= budget_gib
    fits_caption = row["est_inference_published_gib"] <= budget_gib
    if not fits_step:
        notes.append(
            f"fine-tune did not fit: est. {row['est_fine_tune_gib']:.1f} GiB > "
            f"{budget_gib:.1f} GiB budget"
        )
    if not fits_caption:
        notes.append(
            f"caption did not fit: est. {row['est_inference_published_gib']:.1f} GiB "
            f"({row['dtype']}) > {budget_gib:.1f} GiB budget"
        )
    if fits_step or fits_caption:
        root = Path(tempfile.mkdtemp(prefix=f"recap-real-size-{name}-"))
        try:
            built = run_phase(name, "build", root / "captioner")
            row.update(built)
            if "error" in built:
                notes.append(built.pop("error"))
            else:
                for phase, fits in (("step", fits_step), ("caption", fits_caption)):
                    if fits:
                        figures = run_phase(name, phase, root / "captioner")
                        if "error" in figures:
                            notes.append(figures.pop("error"))
                        row.update(figures)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    row["notes"] = "; ".join(notes)


def _fmt(value: Any, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| family | checkpoint | dtype | params | bf16 GB | est. fine-tune GiB "
        "| est. inference GiB (bf16) | image tokens (real) | build s | step s | caption s "
        "| peak RSS GiB (step / caption) | notes |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        rss = f"{_fmt(r.get('step_rss_gib'))} / {_fmt(r.get('caption_rss_gib'))}"
        tokens = (
            f"{r['image_tokens'] if r['image_tokens'] is not None else '-'} ({r['real_tokens']})"
        )
        build = None if r.get("build_s") is None else r["build_s"] + r["save_s"]
        lines.append(
            f"| {r['family']} | {r['checkpoint']} | {r['dtype']} | {r['params'] / 1e9:.3f} B "
            f"| {r['bf16_gb']:.2f} | {r['est_fine_tune_gib']:.1f} "
            f"| {r['est_inference_bf16_gib']:.1f} | {tokens} | {_fmt(build)} "
            f"| {_fmt(r.get('step_s'))} | {_fmt(r.get('caption_s'))} | {rss} | {r['notes']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", choices=list(SPECS), default=list(SPECS))
    parser.add_argument("--skip-steps", action="store_true", help="meta estimates only")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON")
    parser.add_argument(
        "--budget-gib", type=float, help="memory a phase may use (default: available - 4)"
    )
    parser.add_argument("--family", choices=list(SPECS), help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=list(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        run_child(args)
        return

    started = time.perf_counter()
    budget_gib = args.budget_gib or min(psutil.virtual_memory().available / GIB, 24) - MARGIN_GIB
    source = f"available now, at most 24, less {MARGIN_GIB:.0f}"
    print(
        f"memory budget {budget_gib:.1f} GiB ({'--budget-gib' if args.budget_gib else source}); "
        f"torch threads {torch.get_num_threads()}"
    )
    rows = []
    for name in args.families:
        spec = SPECS[name]
        row: dict[str, Any] = {"family": name, "checkpoint": spec.repo}
        row["dtype"] = spec.config["torch_dtype"]
        row.update(meta_estimate(spec))
        unsupported = project_support(spec)
        row["image_tokens"] = None if unsupported else image_tokens(spec)
        row["real_tokens"] = spec.image_tokens
        print(
            f"{name}: {row['params']:,} params on the meta device in {row['meta_s']:.2f} s; "
            f"image tokens {row['image_tokens']} (real model {spec.image_tokens})"
        )
        if unsupported:
            row["notes"] = unsupported
        elif args.skip_steps:
            row["notes"] = "steps skipped (--skip-steps)"
        else:
            rehearse(name, row, budget_gib)
        rows.append(row)

    print()
    print(table(rows))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
