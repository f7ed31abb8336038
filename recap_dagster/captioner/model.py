"""The :class:`Captioner`: one interface over BLIP, GIT, PaliGemma, Florence-2 and Qwen-VL
checkpoints."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import (
    AutoConfig,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
)

from recap_dagster.captioner.families import Family, family_for_model_type
from recap_dagster.training.devices import dtype_name

#: Default fixed conditioning prefixes, one per caption style (RECAP's "short" and "long").
#: Plain lowercase words so that tiny locally built vocabularies cover them.
STYLE_PREFIXES: dict[str, str] = {"short": "describe briefly:", "long": "describe in detail:"}

#: Written beside the checkpoint; carries what transformers' own files do not (the prefixes).
CAPTIONER_FILE = "recap_captioner.json"

# Config/module attribute names that hold a dropout probability in the supported families.
_DROPOUT_CONFIG_KEYS = (
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "attention_dropout",
    "dropout",
    "activation_dropout",
)
# Attention modules in transformers 5 keep the probability as a float attribute and pass it
# to the attention function (``dropout=0.0 if not self.training else self.attention_dropout``).
_DROPOUT_MODULE_ATTRS = ("attention_dropout", "dropout", "dropout_p")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` if given, else CUDA when present, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sub_configs(config: Any) -> Iterator[Any]:
    yield config
    for key in ("text_config", "vision_config"):
        sub = getattr(config, key, None)
        if sub is not None:
            yield sub


def _is_probability(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def dropout_state(model: nn.Module) -> list[tuple[Any, str, float]]:
    """Every (object, attribute, value) that :meth:`Captioner.set_dropout` would change."""
    state: list[tuple[Any, str, float]] = []
    for cfg in _sub_configs(model.config):
        for key in _DROPOUT_CONFIG_KEYS:
            if _is_probability(getattr(cfg, key, None)):
                state.append((cfg, key, getattr(cfg, key)))
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            state.append((module, "p", module.p))
            continue
        for attr in _DROPOUT_MODULE_ATTRS:
            if _is_probability(module.__dict__.get(attr)):
                state.append((module, attr, module.__dict__[attr]))
    return state


def restore_dropout(state: Sequence[tuple[Any, str, float]]) -> None:
    """Undo :meth:`Captioner.set_dropout` from a :func:`dropout_state` snapshot."""
    for obj, attr, value in state:
        setattr(obj, attr, value)


@dataclass(frozen=True)
class CaptionInputs:
    """Builds ``generate`` inputs for a batch of images in one style: the processor's work.

    Holds the family adapter, the model config, the processor and the prefixes, not the
    weights, so a DataLoader worker can run it (and pickle it) while the model generates.
    """

    adapter: Family
    config: PretrainedConfig
    processor: ProcessorMixin
    prefixes: dict[str, str]

    def __call__(self, images: Sequence[Image.Image], style: str) -> dict[str, torch.Tensor]:
        return self.adapter.generation_inputs(
            self.config, self.processor, list(images), self.prefixes[style]
        )


class Captioner:
    """A captioning model + its processor, behind one interface for every supported family."""

    def __init__(
        self,
        model: PreTrainedModel,
        processor: ProcessorMixin,
        *,
        prefixes: dict[str, str] | None = None,
    ) -> None:
        self.adapter: Family = family_for_model_type(model.config.model_type)
        self.family: str = self.adapter.name
        self.model = model
        self.processor = processor
        self.prefixes: dict[str, str] = dict(prefixes or STYLE_PREFIXES)
        #: How :meth:`from_pretrained` loaded it (source, revision, attention, dtype); empty
        #: for a captioner built in memory.
        self.load_options: dict[str, Any] = {}

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike[str],
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        prefixes: dict[str, str] | None = None,
        revision: str | None = None,
        attn_implementation: str | None = None,
    ) -> Captioner:
        """Load model + processor (+ prefixes from ``recap_captioner.json`` when present).

        ``prefixes`` given here win over the stored ones, which win over :data:`STYLE_PREFIXES`.
        ``dtype`` None keeps the dtype the checkpoint was saved in (its config's); a
        fine-tune upcasts to fp32 master weights whatever this is (:func:`fine_tune`).
        ``revision`` (a hub branch, tag or commit) and ``attn_implementation`` ("eager",
        "sdpa", "flash_attention_2") go to transformers; :attr:`load_options` records them.
        """
        path_or_id = str(path_or_id)
        hub = {} if revision is None else {"revision": revision}
        raw, _ = PretrainedConfig.get_config_dict(path_or_id, **hub)
        refuse_remote_code_florence2(path_or_id, raw)
        config = AutoConfig.from_pretrained(path_or_id, **hub)
        adapter = family_for_model_type(config.model_type)
        kwargs: dict[str, Any] = dict(hub)
        if dtype is not None:
            kwargs["dtype"] = dtype
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        model = adapter.model_class_for(config.model_type).from_pretrained(path_or_id, **kwargs)
        processor = adapter.load_processor(path_or_id, config.model_type, **hub)
        stored = _read_captioner_file(path_or_id)
        loaded_dtype = next(model.parameters()).dtype
        model.to(resolve_device(device))
        model.eval()
        captioner = cls(model, processor, prefixes=prefixes or stored.get("prefixes"))
        captioner.load_options = {
            "source": path_or_id,
            "revision": revision,
            "attn_implementation": attn_implementation,
            "loaded_dtype": dtype_name(loaded_dtype),
        }
        return captioner

    def save_pretrained(
        self, directory: str | os.PathLike[str], *, dtype: torch.dtype | None = None
    ) -> None:
        """Write model (safetensors), processor and prefixes into ``directory``.

        ``dtype`` casts the weights first, in place: a copy would double the memory of a
        real-size model, and the model is not trained further after saving.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if dtype is not None:
            self.model.to(dtype)
        self.model.save_pretrained(directory)
        self.processor.save_pretrained(directory)
        meta = {"family": self.family, "prefixes": self.prefixes}
        (directory / CAPTIONER_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def num_parameters(self) -> int:
        """Unique parameter count (tied embeddings counted once)."""
        return sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())

    def vision_tower(self) -> nn.Module:
        """The image encoder (BLIP's ViT, GIT's CLIP vision model, PaliGemma's SigLIP, ...)."""
        return self.model.get_submodule(self.adapter.vision_tower)

    def prefix(self, style: str) -> str:
        """The conditioning prefix for ``style``."""
        try:
            return self.prefixes[style]
        except KeyError:
            raise ValueError(f"unknown style {style!r}; known: {sorted(self.prefixes)}") from None

    # ------------------------------------------------------------------ inference
    def caption(
        self,
        images: Sequence[Image.Image],
        style: str,
        *,
        max_new_tokens: int = 40,
        num_beams: int = 1,
        batch_size: int | None = None,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Caption ``images`` in ``style``; returns the continuation only, prefix stripped.

        ``batch_size`` splits long lists into several ``generate`` calls (default: one call).
        Extra keyword arguments go to ``generate`` (e.g. ``min_new_tokens``).
        """
        images = list(images)
        if not images:
            return []
        self.prefix(style)  # unknown styles fail before any work
        build = self.input_builder()
        step = batch_size or len(images)
        captions: list[str] = []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(images), step):
                    captions += self.generate_from(
                        build(images[start : start + step], style),
                        max_new_tokens=max_new_tokens,
                        num_beams=num_beams,
                        **generate_kwargs,
                    )
        finally:
            self.model.train(was_training)
        return captions

    def input_builder(self) -> CaptionInputs:
        """What builds generation inputs from images, without the weights (for workers)."""
        return CaptionInputs(self.adapter, self.model.config, self.processor, dict(self.prefixes))

    def generation_config(self, **overrides: Any) -> tuple[GenerationConfig, dict[str, Any]]:
        """The generation config ``generate`` runs with, and the overrides that are not part of
        one (model kwargs, logits processors).

        The checkpoint's own ``generation_config.json`` first (a real checkpoint may set beams,
        lengths or a repetition penalty there), then this family's end/pad tokens and greedy
        decoding, then ``overrides``: what a shard records is what generated it.
        """
        config = copy.deepcopy(self.model.generation_config)
        family = self.adapter.generate_kwargs(self.model.config, self.processor)
        rest = config.update(**{**family, "do_sample": False, **overrides})
        return config, rest

    def generation_record(self, **overrides: Any) -> dict[str, Any]:
        """The merged generation config of :meth:`generation_config` as plain JSON values
        (only what differs from transformers' defaults, without its version)."""
        config, rest = self.generation_config(**overrides)
        if rest:
            raise ValueError(f"not generation settings, cannot be recorded: {sorted(rest)}")
        record = config.to_diff_dict()
        record.pop("transformers_version", None)
        return record

    def generate_from(self, inputs: dict[str, torch.Tensor], **generate_kwargs: Any) -> list[str]:
        """Captions from inputs made by :meth:`input_builder` (greedy unless told otherwise)."""
        return self.generate_with_ends(inputs, **generate_kwargs)[0]

    def generate_with_ends(
        self, inputs: dict[str, torch.Tensor], **generate_kwargs: Any
    ) -> tuple[list[str], list[bool]]:
        """:meth:`generate_from`'s captions, and per caption whether it hit the
        ``max_new_tokens`` cap: it filled every new position without an end token, instead
        of ending on its own (a runaway, or a caption cut mid-thought)."""
        inputs = self._to_device(inputs)
        config, rest = self.generation_config(**generate_kwargs)
        output = self.model.generate(**inputs, **rest, generation_config=config)
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        new = sequences[:, self.adapter.prompt_length(inputs) :]
        ends = config.eos_token_id
        ends = [] if ends is None else [ends] if isinstance(ends, int) else list(ends)
        ended = torch.isin(new, torch.tensor(ends, device=new.device)).any(dim=1)
        # Batches stop once every row ended, so only a full-width batch can hold a capped row.
        full = config.max_new_tokens is not None and new.shape[1] >= config.max_new_tokens
        hit_cap = [full and not e for e in ended.tolist()]
        return self.adapter.decode(self.processor, new), hit_cap

    # ------------------------------------------------------------------ training
    def loss(
        self, images: Sequence[Image.Image], captions: Sequence[str], styles: Sequence[str]
    ) -> torch.Tensor:
        """Teacher-forced LM loss of ``captions`` given images and style prefixes.

        Prefix and padding tokens are -100 in the labels: only the caption (and its end
        token) is learnt. Mean over caption tokens, as each family's own loss computes it.
        """
        return self.loss_with(self.model, images, captions, styles)

    def loss_with(
        self,
        model: nn.Module,
        images: Sequence[Image.Image],
        captions: Sequence[str],
        styles: Sequence[str],
    ) -> torch.Tensor:
        """:meth:`loss` through ``model``, e.g. an accelerate/DDP wrapper of :attr:`model`."""
        batch = self.training_batch(images, [self.prefix(s) for s in styles], captions)
        return model(**batch).loss

    def training_batch(
        self, images: Sequence[Image.Image], prompts: Sequence[str], captions: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """Teacher-forcing inputs (``labels`` -100 on prompt and padding) on the model's
        device, with a free prompt per example (pretraining tasks such as VQA differ per
        example; :meth:`loss` passes the style prefixes)."""
        if not (len(images) == len(prompts) == len(captions)):
            raise ValueError("images, prompts and captions must have the same length")
        inputs = self.adapter.training_inputs(
            self.model.config, self.processor, list(images), list(prompts), list(captions)
        )
        return self._to_device(inputs)

    def set_dropout(self, p: float) -> None:
        """Set every dropout probability (modules and config, all sub-models) to ``p``.

        Families name it differently (``hidden_dropout_prob``, ``attention_probs_dropout_prob``,
        ``attention_dropout``, ``dropout``); transformers 5 attention layers also keep it as a
        plain float, so module attributes are set too, not only ``nn.Dropout.p``.
        """
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        for obj, attr, _ in dropout_state(self.model):
            setattr(obj, attr, float(p))

    def _to_device(self, inputs: dict[str, Any]) -> dict[str, Any]:
        device, dtype = self.device, self.dtype
        moved: dict[str, Any] = {}
        for key, value in inputs.items():
            if not isinstance(value, torch.Tensor):
                moved[key] = value
                continue
            # Pinned batches (recaption's DataLoader on CUDA) copy asynchronously; the copy
            # is ordered before generate() on the same stream.
            target = dtype if value.is_floating_point() else value.dtype  # pixels: model dtype
            moved[key] = value.to(device=device, dtype=target, non_blocking=value.is_pinned())
        return moved


#: The Florence-2 repositories converted to transformers' own ``Florence2`` classes.
CONVERTED_FLORENCE2 = ("florence-community/Florence-2-base", "florence-community/Florence-2-large")


def refuse_remote_code_florence2(path_or_id: str, raw_config: dict[str, Any]) -> None:
    """Refuse the original ``microsoft/Florence-2-*`` layout (remote code: a DaViT vision
    config, a ``florence2_language`` text config, ``auto_map``). Its ``model_type`` is the
    built-in class's, so without this it loads with the wrong sub-configs and fails later."""
    if raw_config.get("model_type") != "florence2":
        return
    vision = (raw_config.get("vision_config") or {}).get("model_type")
    text = (raw_config.get("text_config") or {}).get("model_type")
    if "auto_map" in raw_config or vision == "davit" or text == "florence2_language":
        raise ValueError(
            f"{path_or_id} is a remote-code Florence-2 repository (microsoft/Florence-2-*: "
            f"vision {vision!r}, text {text!r}), which the built-in Florence2 class cannot "
            f"load. Use a converted repository: {', '.join(CONVERTED_FLORENCE2)}."
        )


def _read_captioner_file(path_or_id: str) -> dict[str, Any]:
    """The ``recap_captioner.json`` beside a local checkpoint or in the hub cache, else ``{}``."""
    local = Path(path_or_id) / CAPTIONER_FILE
    if local.is_file():
        return json.loads(local.read_text())
    if Path(path_or_id).exists():
        return {}
    try:  # a hub id: only a cached copy can be read (no network in the miniworld)
        from transformers.utils import cached_file

        found = cached_file(path_or_id, CAPTIONER_FILE, _raise_exceptions_for_missing_entries=False)
    except Exception:  # noqa: BLE001 - any hub/cache failure just means "no stored prefixes"
        return {}
    return json.loads(Path(found).read_text()) if found else {}
