"""Per-family glue: how each transformers captioner takes a text prefix, to generate and to train.

Every family answers the same three questions:

* how to build generation inputs for a batch of images that all share one prompt (a style prefix),
* how to build teacher-forced training inputs whose labels cover the caption only,
* where the prompt ends in what ``generate`` returns, so only the continuation is decoded.

The behaviour follows the installed transformers 5 sources
(``models/{blip,git,paligemma,florence2,qwen2_vl,qwen2_5_vl}``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    BlipForConditionalGeneration,
    Florence2ForConditionalGeneration,
    GitForCausalLM,
    PaliGemmaForConditionalGeneration,
    PretrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)

IGNORE_INDEX = -100


class Family(ABC):
    """Adapter between the generic :class:`Captioner` and one transformers model family.

    It reads the model's config, never its weights, so inputs can be built in DataLoader
    worker processes while the model generates.
    """

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    model_class: ClassVar[type[PreTrainedModel]]
    #: Module path of the image encoder inside the model (``model.get_submodule``).
    vision_tower: ClassVar[str]

    def model_class_for(self, model_type: str) -> type[PreTrainedModel]:
        """The class that loads a checkpoint of ``model_type`` (one of :attr:`model_types`)."""
        return self.model_class

    def load_processor(self, path_or_id: str, model_type: str, **hub: Any) -> ProcessorMixin:
        """The processor of a checkpoint of ``model_type`` (``hub``: ``revision``)."""
        return AutoProcessor.from_pretrained(path_or_id, **hub)

    @abstractmethod
    def generation_inputs(
        self,
        config: PretrainedConfig,
        processor: ProcessorMixin,
        images: Sequence[Image.Image],
        prefix: str,
    ) -> dict[str, torch.Tensor]:
        """Model inputs for ``generate`` on ``images`` prompted with ``prefix`` (one batch)."""

    @abstractmethod
    def training_inputs(
        self,
        config: PretrainedConfig,
        processor: ProcessorMixin,
        images: Sequence[Image.Image],
        prefixes: Sequence[str],
        captions: Sequence[str],
    ) -> dict[str, torch.Tensor]:
        """Teacher-forcing inputs incl. ``labels`` (-100 on prompt and padding)."""

    @abstractmethod
    def prompt_length(self, inputs: dict[str, torch.Tensor]) -> int:
        """Number of leading tokens of each ``generate`` output row that are the prompt."""

    def generate_kwargs(
        self, config: PretrainedConfig, processor: ProcessorMixin
    ) -> dict[str, Any]:
        """Extra ``generate`` kwargs (end/pad tokens) for this family."""
        return {}

    def decode(self, processor: ProcessorMixin, token_ids: torch.Tensor) -> list[str]:
        """Decode continuation token ids, dropping special tokens and normalising whitespace."""
        texts = processor.tokenizer.batch_decode(token_ids, skip_special_tokens=True)
        return [" ".join(text.split()) for text in texts]


def pixel_values(processor: ProcessorMixin, images: Sequence[Image.Image]) -> torch.Tensor:
    """Run only the image half of a processor."""
    return processor.image_processor(list(images), return_tensors="pt")["pixel_values"]


def _text_ids(processor: ProcessorMixin, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def _pad_right(
    rows: Sequence[list[int]], label_rows: Sequence[list[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad token rows; padding is masked in attention and in the labels."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, label_row) in enumerate(zip(rows, label_rows, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.tensor(label_row)
        attention[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


class _BertStyleFamily(Family):
    """Families whose decoder reads ``[start] prefix caption [end]`` with a WordPiece tokenizer.

    The prompt and the caption are tokenised separately and concatenated, so the prompt is
    token-for-token the same in training and in generation and the label mask is exact.
    """

    def _special_ids(self, config: PretrainedConfig) -> tuple[int, int, int]:
        """(start, end, pad) token ids."""
        raise NotImplementedError

    def _max_tokens(self, config: PretrainedConfig) -> int:
        raise NotImplementedError

    def training_inputs(self, config, processor, images, prefixes, captions):
        start, end, pad = self._special_ids(config)
        limit = self._max_tokens(config)
        rows: list[list[int]] = []
        label_rows: list[list[int]] = []
        for prefix, caption in zip(prefixes, captions, strict=True):
            prompt = [start, *_text_ids(processor, prefix)]
            target = [*_text_ids(processor, caption), end]
            row = (prompt + target)[:limit]
            rows.append(row)
            label_rows.append(([IGNORE_INDEX] * len(prompt) + target)[:limit])
        batch = _pad_right(rows, label_rows, pad)
        batch["pixel_values"] = pixel_values(processor, images)
        return batch

    def prompt_length(self, inputs):
        return inputs["input_ids"].shape[1]


class BlipFamily(_BertStyleFamily):
    """BLIP: ViT encoder, BERT decoder cross-attending to it; the prompt is the decoder prefix.

    ``BlipForConditionalGeneration.generate`` overwrites the first prompt token with
    ``text_config.bos_token_id`` ([DEC]) and drops the last one (the [SEP] the processor
    appends). Its ``forward`` does neither, so the training rows start with [DEC] as well
    (the original BLIP code does the same); HF examples that train on ``[CLS] ...`` teach a
    start token that generation never shows the model.
    """

    name = "blip"
    model_types = ("blip",)
    model_class = BlipForConditionalGeneration
    vision_tower = "vision_model"

    def _special_ids(self, config):
        text = config.text_config
        return text.bos_token_id, text.sep_token_id, text.pad_token_id

    def _max_tokens(self, config):
        return config.text_config.max_position_embeddings

    def generation_inputs(self, config, processor, images, prefix):
        start, end, _ = self._special_ids(config)
        # generate() drops the last id, so append [SEP] as the processor would.
        row = [start, *_text_ids(processor, prefix), end]
        input_ids = torch.tensor([row] * len(images), dtype=torch.long)
        return {
            "pixel_values": pixel_values(processor, images),
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
        }

    def prompt_length(self, inputs):
        return inputs["input_ids"].shape[1] - 1  # the dropped [SEP]


class GitFamily(_BertStyleFamily):
    """GIT: image tokens are prepended inside the model; text is ``[CLS] prefix caption [SEP]``."""

    name = "git"
    model_types = ("git",)
    model_class = GitForCausalLM
    vision_tower = "git.image_encoder"

    def _special_ids(self, config):
        return config.bos_token_id, config.eos_token_id, config.pad_token_id

    def _max_tokens(self, config):
        return config.max_position_embeddings

    def generation_inputs(self, config, processor, images, prefix):
        start, _, _ = self._special_ids(config)
        row = [start, *_text_ids(processor, prefix)]
        input_ids = torch.tensor([row] * len(images), dtype=torch.long)
        return {
            "pixel_values": pixel_values(processor, images),
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
        }

    def generate_kwargs(self, config, processor):
        return {"eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id}


class PaliGemmaFamily(Family):
    """PaliGemma: ``<image>*N <bos> prefix \\n`` is a bidirectional prompt, the caption the suffix.

    The processor builds everything: with ``suffix=`` it appends ``<eos>``, returns
    ``token_type_ids`` (0 prompt, 1 suffix) which the model needs for its prefix-LM mask, and
    ``labels`` with -100 wherever ``token_type_ids == 0`` (prompt and padding).
    """

    name = "paligemma"
    model_types = ("paligemma",)
    model_class = PaliGemmaForConditionalGeneration
    vision_tower = "model.vision_tower"

    @staticmethod
    def _prompt(processor: ProcessorMixin, prefix: str) -> str:
        # With an explicit image token the processor inserts <bos> after it and appends "\n".
        return processor.image_token + prefix

    def generation_inputs(self, config, processor, images, prefix):
        inputs = processor(
            images=list(images),
            text=[self._prompt(processor, prefix)] * len(images),
            padding="longest",
            return_tensors="pt",
        )
        inputs.pop("labels", None)  # all -100 without a suffix; generate() must not see it
        return dict(inputs)

    def training_inputs(self, config, processor, images, prefixes, captions):
        inputs = processor(
            images=list(images),
            text=[self._prompt(processor, p) for p in prefixes],
            suffix=list(captions),
            padding="longest",
            return_tensors="pt",
        )
        inputs["labels"] = torch.as_tensor(inputs["labels"], dtype=torch.long)
        return dict(inputs)

    def prompt_length(self, inputs):
        return inputs["input_ids"].shape[1]

    def generate_kwargs(self, config, processor):
        tok = processor.tokenizer
        return {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


class Florence2Family(Family):
    """Florence-2: encoder-decoder; the prefix is encoder text, the caption the decoder's target.

    The processor builds the encoder side ``<image>*N <s> prefix </s>`` (a prefix equal to a
    task token such as ``<CAPTION>`` is expanded to its task prompt). The caption is only ever
    on the decoder side, so no label masking of the prompt is needed: labels are
    ``<s> caption </s>`` (as the tokenizer adds them) with padding at -100; the model shifts
    them right behind ``decoder_start_token_id``. ``generate`` returns decoder ids only.
    """

    name = "florence2"
    model_types = ("florence2",)
    model_class = Florence2ForConditionalGeneration
    vision_tower = "model.vision_tower"

    def generation_inputs(self, config, processor, images, prefix):
        inputs = processor(
            images=list(images), text=[prefix] * len(images), padding="longest", return_tensors="pt"
        )
        return dict(inputs)

    def training_inputs(self, config, processor, images, prefixes, captions):
        inputs = dict(
            processor(
                images=list(images), text=list(prefixes), padding="longest", return_tensors="pt"
            )
        )
        targets = processor.tokenizer(list(captions), add_special_tokens=True)["input_ids"]
        width = max(len(t) for t in targets)
        labels = torch.full((len(targets), width), IGNORE_INDEX, dtype=torch.long)
        for i, row in enumerate(targets):
            labels[i, : len(row)] = torch.tensor(row)
        inputs["labels"] = labels
        return inputs

    def prompt_length(self, inputs):
        return 1  # the decoder start token; <s> is dropped as a special token when decoding

    def generate_kwargs(self, config, processor):
        text = config.text_config
        return {
            "eos_token_id": text.eos_token_id,
            "pad_token_id": text.pad_token_id,
            "decoder_start_token_id": text.decoder_start_token_id,
        }


class _ImageOnlyProcessor:
    """A Qwen-VL processor without its video processor, so it works without torchvision.

    transformers takes a processor's parts from its ``__init__`` signature. The stock class's
    ``video_processor`` part cannot be built without torchvision, not even as ``None``: its
    class check looks up ``VideoProcessorMixin``, which transformers exports only with
    torchvision, and ``AutoProcessor`` loads the video processor eagerly
    (huggingface/transformers#48558). This signature leaves the part out; captioning needs
    images only. ``processor_config.json`` names the stock class, so where torchvision is
    installed ``AutoProcessor`` loads a saved folder as an ordinary Qwen-VL processor.
    """

    stock: ClassVar[type[ProcessorMixin]]

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)  # type: ignore[call-arg]

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "processor_class": self.stock.__name__}  # type: ignore[misc]


class ImageOnlyQwen2VLProcessor(_ImageOnlyProcessor, Qwen2VLProcessor):
    """``Qwen2VLProcessor`` for images only (see :class:`_ImageOnlyProcessor`)."""

    stock = Qwen2VLProcessor


class ImageOnlyQwen2_5_VLProcessor(_ImageOnlyProcessor, Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` for images only (see :class:`_ImageOnlyProcessor`)."""

    stock = Qwen2_5_VLProcessor


class ChatVLMFamily(Family):
    """Qwen2-VL and Qwen2.5-VL: chat models; the style prefix is the user's request, the
    caption the assistant's answer.

    Prompts are rendered by the processor's chat template from one user turn holding the
    image and the prefix, with the generation prompt (``<|im_start|>assistant\\n``) appended.
    The processor expands the template's single ``<|image_pad|>`` into one token per merged
    patch group (``image_grid_thw.prod() // merge_size**2``), so rows of differently sized
    images differ in length; generation rows are LEFT padded, so every row's prompt ends at
    the last column, ``prompt_length`` is the input width, and the 3-D (M-RoPE) positions,
    which ``get_rope_index`` computes from the attention mask, skip the padding.

    Training rows are that same prompt, token for token, followed by the caption's tokens and
    ``<|im_end|>`` (tokenised apart, so the label mask is exact), right padded; labels cover
    only the caption and ``<|im_end|>``, which is what stops generation. The system turn the
    template adds, the user turn, the image tokens and the padding are -100.
    ``mm_token_type_ids`` (1 on image tokens) goes to the model in both cases: without it
    ``get_rope_index`` is skipped and image tokens get 1-D text positions.

    Follows ``models/qwen2_vl`` and ``models/qwen2_5_vl`` of transformers 5 (processing, the
    PIL image processor's ``smart_resize``, ``get_rope_index``); image size is bounded by the
    image processor's ``size`` (``shortest_edge``/``longest_edge`` = min/max pixels). The
    processor loads without its video part (:class:`ImageOnlyQwen2VLProcessor`). LLaVA-style
    models are not served: their templates, end-of-turn tokens and towers differ per model.
    """

    name = "qwen_vl"
    model_types = ("qwen2_5_vl", "qwen2_vl")
    model_class = Qwen2_5_VLForConditionalGeneration
    vision_tower = "model.visual"
    #: The token that closes a chat turn: the end of every answer.
    end_of_turn = "<|im_end|>"

    _model_classes: ClassVar[dict[str, type[PreTrainedModel]]] = {
        "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
        "qwen2_vl": Qwen2VLForConditionalGeneration,
    }
    _processor_classes: ClassVar[dict[str, type[ProcessorMixin]]] = {
        "qwen2_5_vl": ImageOnlyQwen2_5_VLProcessor,
        "qwen2_vl": ImageOnlyQwen2VLProcessor,
    }

    def model_class_for(self, model_type):
        return self._model_classes[model_type]

    def load_processor(self, path_or_id, model_type, **hub):
        return self._processor_classes[model_type].from_pretrained(path_or_id, **hub)

    @staticmethod
    def prompt(processor: ProcessorMixin, prefix: str) -> str:
        """The chat-template text of one user turn (the image, then ``prefix``), ready for
        the assistant's answer."""
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prefix}]}
        ]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _end_id(self, processor: ProcessorMixin) -> int:
        tok = processor.tokenizer
        end = tok.convert_tokens_to_ids(self.end_of_turn)
        if end is None or end == tok.unk_token_id:
            raise ValueError(f"the tokenizer has no {self.end_of_turn} token")
        return end

    def _pad_id(self, processor: ProcessorMixin) -> int:
        pad = processor.tokenizer.pad_token_id
        return self._end_id(processor) if pad is None else pad

    def _prompts(
        self, processor: ProcessorMixin, images: Sequence[Image.Image], prefixes: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        inputs = processor(
            images=list(images),
            text=[self.prompt(processor, p) for p in prefixes],
            padding="longest",
            padding_side="left",
            return_tensors="pt",
        )
        return dict(inputs)

    def generation_inputs(self, config, processor, images, prefix):
        return self._prompts(processor, images, [prefix] * len(images))

    def training_inputs(self, config, processor, images, prefixes, captions):
        prompts = self._prompts(processor, images, prefixes)
        end = self._end_id(processor)
        rows: list[list[int]] = []
        label_rows: list[list[int]] = []
        type_rows: list[list[int]] = []
        for ids, mask, types, caption in zip(
            prompts["input_ids"],
            prompts["attention_mask"],
            prompts["mm_token_type_ids"],
            captions,
            strict=True,
        ):
            keep = mask.bool()
            prompt = ids[keep].tolist()
            answer = [*_text_ids(processor, caption), end]
            rows.append(prompt + answer)
            label_rows.append([IGNORE_INDEX] * len(prompt) + answer)
            type_rows.append(types[keep].tolist() + [0] * len(answer))
        batch = _pad_right(rows, label_rows, self._pad_id(processor))
        token_types = torch.zeros_like(batch["input_ids"])
        for i, row in enumerate(type_rows):
            token_types[i, : len(row)] = torch.tensor(row)
        batch["mm_token_type_ids"] = token_types
        batch["pixel_values"] = prompts["pixel_values"]
        batch["image_grid_thw"] = prompts["image_grid_thw"]
        return batch

    def prompt_length(self, inputs):
        return inputs["input_ids"].shape[1]  # left padded: every prompt ends at the last column

    def generate_kwargs(self, config, processor):
        # The answer ends with <|im_end|>; base (non-chat) checkpoints end text with
        # <|endoftext|> (the instruct tokenizers' eos is <|im_end|>), so both stop it, as the
        # published generation configs' eos lists do.
        tok = processor.tokenizer
        text_end = tok.convert_tokens_to_ids("<|endoftext|>")
        text_end = None if text_end == tok.unk_token_id else text_end
        ends = [self._end_id(processor), tok.eos_token_id, text_end]
        return {
            "eos_token_id": list(dict.fromkeys(e for e in ends if e is not None)),
            "pad_token_id": self._pad_id(processor),
        }


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (BlipFamily(), GitFamily(), PaliGemmaFamily(), Florence2Family(), ChatVLMFamily())
}


def family_for_model_type(model_type: str) -> Family:
    """The adapter for a config's ``model_type``."""
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise ValueError(
        f"unsupported captioner model_type {model_type!r}; supported: "
        + ", ".join(t for f in FAMILIES.values() for t in f.model_types)
    )
