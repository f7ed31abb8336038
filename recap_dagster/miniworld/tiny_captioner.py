"""Tiny, randomly initialised captioners of the real architectures, built from configs offline.

Used by the tests and by the miniworld, whose base captioner is a small model of one family
pretrained locally. Tokenizers are built from a word list (no hub, no network): a WordPiece
vocabulary for BLIP/GIT (BERT tokenizer), a BPE trained with ``tokenizers`` for PaliGemma
(Gemma tokenizer) and a byte-level BPE for Florence-2 (BART tokenizer) and Qwen-VL (Qwen2
tokenizer, with the Qwen chat and vision special tokens and a Qwen-style chat template).
Every word of the list becomes a single token; characters (or bytes) are in the vocabulary
too, so unseen words still tokenise.
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from transformers import (
    BartTokenizer,
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessorPil,
    BlipProcessor,
    CLIPImageProcessorPil,
    Florence2Config,
    Florence2ForConditionalGeneration,
    Florence2Processor,
    GemmaTokenizer,
    GitConfig,
    GitForCausalLM,
    GitProcessor,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    SiglipImageProcessorPil,
)

from recap_dagster.captioner.families import (
    FAMILIES,
    ImageOnlyQwen2_5_VLProcessor,
    ImageOnlyQwen2VLProcessor,
)
from recap_dagster.captioner.model import STYLE_PREFIXES, Captioner

#: A small generic vocabulary used when no word list is given.
DEFAULT_WORDS: tuple[str, ...] = (
    *("a", "an", "the", "one", "two", "three", "four", "five", "six", "of", "and", "with"),
    *("on", "in", "at", "to", "is", "are", "there", "image", "picture", "photo"),
    *("small", "big", "large", "tiny", "red", "green", "blue", "yellow", "orange", "purple"),
    *("pink", "white", "black", "gray", "brown", "square", "squares", "circle", "circles"),
    *("triangle", "triangles", "shape", "shapes", "left", "right", "top", "bottom", "middle"),
    *("center", "corner", "upper", "lower", "next", "above", "below", "background"),
)

SUPPORTED_TINY_FAMILIES = ("blip", "git", "paligemma", "florence2", "qwen_vl")

#: Qwen-VL's special tokens: end of text (also padding), chat turns, and the vision markers
#: the processor expands (``<|image_pad|>``, ``<|video_pad|>``).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

#: The Qwen2-VL chat template, images and text only (no videos, no ``add_vision_id``): a
#: default system turn, then ``<|im_start|>role\ncontent<|im_end|>\n`` per message.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_QWEN_TEMPLATE_WORDS = ("system", "user", "assistant", "you are a helpful assistant.")

_WORD_RE = re.compile(r"\w+|[^\w\s]")
_CHARS = string.ascii_lowercase + string.digits
_PUNCT = ".,:;!?'\"-()"


def split_words(texts: Iterable[str]) -> list[str]:
    """Lowercase words and punctuation marks of ``texts``, deduplicated, in first-seen order."""
    seen: dict[str, None] = {}
    for text in texts:
        for token in _WORD_RE.findall(text.lower()):
            seen.setdefault(token, None)
    return list(seen)


def build_wordpiece_tokenizer(
    words: Iterable[str], *, extra_special_tokens: Sequence[str] = ("[DEC]",)
) -> BertTokenizer:
    """A BERT (WordPiece) tokenizer whose vocabulary holds ``words`` whole plus all characters."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *extra_special_tokens]
    pieces = [*_PUNCT, *_CHARS, *(f"##{c}" for c in _CHARS), *split_words(words)]
    vocab: dict[str, int] = {}
    for token in (*specials, *pieces):
        vocab.setdefault(token, len(vocab))
    bos = {"bos_token": "[DEC]"} if "[DEC]" in extra_special_tokens else {}
    return BertTokenizer(vocab=vocab, do_lower_case=True, **bos)


def build_gemma_tokenizer(words: Iterable[str]) -> GemmaTokenizer:
    """A Gemma tokenizer (BPE, "▁" for spaces) trained locally so that every word is one token."""
    from tokenizers import Tokenizer, models, normalizers, trainers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    word_list = split_words(words)
    # Each word appears with and without its leading space (first word after <bos> has none).
    corpus = [*word_list, *(f" {w}" for w in word_list), "\n"]
    alphabet = sorted({c for w in corpus for c in w.replace(" ", "▁")} | set(_CHARS) | {"▁"})
    # Enough merges for every word to end as a single token.
    budget = len(specials) + len(alphabet) + 2 * sum(len(w) for w in word_list) + 8
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    trainer = trainers.BpeTrainer(
        vocab_size=budget,
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    vocab = dict(sorted(backend.get_vocab().items(), key=lambda kv: kv[1]))
    merges = _bpe_merges(backend)
    return GemmaTokenizer(vocab=vocab, merges=merges)


def build_bytelevel_tokenizer(words: Iterable[str]) -> BartTokenizer:
    """A BART (byte-level BPE) tokenizer with every word one token and an ``<image>`` token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    word_list = split_words(words)
    corpus = [*word_list, *(f" {w}" for w in word_list)]
    backend = Tokenizer(
        models.BPE(continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=len(specials) + 256 + 2 * sum(len(w) for w in word_list) + 8,
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    return BartTokenizer(
        vocab=backend.get_vocab(),
        merges=_bpe_merges(backend),
        extra_special_tokens={"image_token": "<image>"},
    )


def build_qwen_tokenizer(words: Iterable[str]) -> Qwen2Tokenizer:
    """A Qwen2 (byte-level BPE) tokenizer with every word one token and Qwen's special tokens.

    As in the Qwen-VL instruct checkpoints, ``<|im_end|>`` is the eos token and
    ``<|endoftext|>`` the padding.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    word_list = split_words([*words, *_QWEN_TEMPLATE_WORDS])
    corpus = [*word_list, *(f" {w}" for w in word_list)]
    backend = Tokenizer(
        models.BPE(continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=len(QWEN_SPECIAL_TOKENS) + 256 + 2 * sum(len(w) for w in word_list) + 8,
        min_frequency=1,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    return Qwen2Tokenizer(
        vocab=backend.get_vocab(),
        merges=_bpe_merges(backend),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
    )


def _bpe_merges(backend: Any) -> list[tuple[str, str]]:
    import json

    data = json.loads(backend.to_str())
    return [
        tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]
    ]


def _model_type(family: str, model_type: str | None) -> str:
    """``model_type`` checked against the family's, else the family's first."""
    types = FAMILIES[family].model_types
    if model_type is None:
        return types[0]
    if model_type not in types:
        raise ValueError(f"family {family!r} has model types {types}, not {model_type!r}")
    return model_type


def build_tiny_processor(
    family: str,
    *,
    words: Iterable[str],
    image_size: int = 32,
    patch_size: int = 8,
    model_type: str | None = None,
) -> ProcessorMixin:
    """The family's real processor class, a tiny local tokenizer, ``image_size`` px images.

    ``model_type`` picks one of a family's model types (Qwen-VL: ``qwen2_5_vl``, the default,
    or ``qwen2_vl``).
    """
    size = {"height": image_size, "width": image_size}
    if family == "blip":
        return BlipProcessor(
            image_processor=BlipImageProcessorPil(size=size),
            tokenizer=build_wordpiece_tokenizer(words),
        )
    if family == "git":
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size=size)
        tokenizer = build_wordpiece_tokenizer(words, extra_special_tokens=())
        return GitProcessor(image_processor=image_processor, tokenizer=tokenizer)
    if family == "paligemma":
        image_processor = SiglipImageProcessorPil(
            size=size, image_seq_length=(image_size // patch_size) ** 2
        )
        return PaliGemmaProcessor(
            image_processor=image_processor, tokenizer=build_gemma_tokenizer(words)
        )
    if family == "florence2":
        # DaViT + projector emit one token per cell of the last feature map plus one pooled token.
        image_processor = CLIPImageProcessorPil(
            size=size,
            do_center_crop=False,
            image_seq_length=(image_size // patch_size) ** 2 + 1,
        )
        return Florence2Processor(
            image_processor=image_processor, tokenizer=build_bytelevel_tokenizer(words)
        )
    if family == "qwen_vl":
        if patch_size % 2:
            raise ValueError("qwen_vl tiny models need an even patch_size")
        # ViT patches of patch_size / 2 merged 2x2: one image token per patch_size² pixels,
        # as in the other tiny families. Images are resized to at most image_size² pixels
        # (32 px stays 32 px, 16 tokens) and to at least 2x2 tokens (Qwen's own 56² px at 28 px).
        image_processor = Qwen2VLImageProcessorPil(
            patch_size=patch_size // 2,
            merge_size=2,
            temporal_patch_size=2,
            min_pixels=(2 * patch_size) ** 2,
            max_pixels=image_size**2,
        )
        processor_class = {
            "qwen2_5_vl": ImageOnlyQwen2_5_VLProcessor,
            "qwen2_vl": ImageOnlyQwen2VLProcessor,
        }[_model_type(family, model_type)]
        return processor_class(
            image_processor=image_processor,
            tokenizer=build_qwen_tokenizer(words),
            chat_template=QWEN_CHAT_TEMPLATE,
        )
    raise ValueError(f"no tiny builder for family {family!r}; supported: {SUPPORTED_TINY_FAMILIES}")


def build_tiny_model(
    family: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    num_layers: int = 1,
    num_heads: int = 2,
    intermediate_size: int | None = None,
    vision_hidden_size: int | None = None,
    vision_layers: int | None = None,
    max_text_tokens: int = 96,
    image_token_id: int | None = None,
    model_type: str | None = None,
    seed: int = 0,
):
    """A randomly initialised model of ``family`` sized by the arguments, matching ``tokenizer``.

    ``model_type`` picks one of a family's model types (see :func:`build_tiny_processor`).
    """
    intermediate_size = intermediate_size or 4 * hidden_size
    vision_hidden_size = vision_hidden_size or hidden_size
    vision_layers = vision_layers or num_layers
    vocab_size = len(tokenizer)
    vision = {
        "hidden_size": vision_hidden_size,
        "intermediate_size": 4 * vision_hidden_size,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": num_heads,
        "image_size": image_size,
        "patch_size": patch_size,
    }
    torch.manual_seed(seed)
    if family == "blip":
        text = {
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "max_position_embeddings": max_text_tokens,
            "bos_token_id": tokenizer.bos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "sep_token_id": tokenizer.sep_token_id,
            "eos_token_id": tokenizer.sep_token_id,
        }
        # BLIP's default vision init range is 1e-10 (meant for loading pretrained weights);
        # a randomly initialised tower needs a normal one to see anything.
        config = BlipConfig(
            text_config=text,
            vision_config={**vision, "initializer_range": 0.02},
            projection_dim=hidden_size,
            image_text_hidden_size=hidden_size,
        )
        return BlipForConditionalGeneration(config)
    if family == "git":
        config = GitConfig(
            vision_config=vision,
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            max_position_embeddings=max_text_tokens,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return GitForCausalLM(config)
    if family == "paligemma":
        head_dim = hidden_size // num_heads
        text = {
            "model_type": "gemma",
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": 1,
            "head_dim": head_dim,
            "max_position_embeddings": max_text_tokens + (image_size // patch_size) ** 2,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        config = PaliGemmaConfig(
            vision_config={**vision, "model_type": "siglip_vision_model", "vision_use_head": False},
            text_config=text,
            image_token_index=image_token_id,
            vocab_size=vocab_size,
            projection_dim=hidden_size,
            hidden_size=hidden_size,
        )
        return PaliGemmaForConditionalGeneration(config)
    if family == "florence2":
        if patch_size % 4:
            raise ValueError("florence2 tiny models need patch_size a multiple of 4")
        # Two DaViT stages (stride 4, then the rest) instead of four, so 32 px keeps a grid.
        davit = {
            "depths": [vision_layers, vision_layers],
            "patch_size": [7, 3],
            "patch_stride": [4, patch_size // 4],
            "patch_padding": [3, 1],
            "patch_prenorm": [False, True],
            "embed_dim": [vision_hidden_size // 2, vision_hidden_size],
            "num_heads": [max(1, num_heads // 2), num_heads],
            "num_groups": [max(1, num_heads // 2), num_heads],
            "window_size": 4,
            "drop_path_rate": 0.0,
            "projection_dim": hidden_size,
            "max_position_embeddings": max(8, image_size // patch_size),
        }
        text = {
            "model_type": "bart",
            "vocab_size": vocab_size,
            "d_model": hidden_size,
            "encoder_layers": num_layers,
            "decoder_layers": num_layers,
            "encoder_attention_heads": num_heads,
            "decoder_attention_heads": num_heads,
            "encoder_ffn_dim": intermediate_size,
            "decoder_ffn_dim": intermediate_size,
            "max_position_embeddings": max_text_tokens + (image_size // patch_size) ** 2 + 1,
            "dropout": 0.0,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "decoder_start_token_id": tokenizer.eos_token_id,
            "forced_eos_token_id": tokenizer.eos_token_id,
        }
        config = Florence2Config(
            vision_config=davit, text_config=text, image_token_id=image_token_id
        )
        return Florence2ForConditionalGeneration(config)
    if family == "qwen_vl":
        return _tiny_qwen_vl(
            _model_type(family, model_type),
            tokenizer,
            image_size=image_size,
            patch_size=patch_size,
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            intermediate_size=intermediate_size,
            vision_hidden_size=vision_hidden_size,
            vision_layers=vision_layers,
            max_text_tokens=max_text_tokens,
            image_token_id=image_token_id,
        )
    raise ValueError(f"no tiny builder for family {family!r}; supported: {SUPPORTED_TINY_FAMILIES}")


def _tiny_qwen_vl(
    model_type: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    image_size: int,
    patch_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    vision_hidden_size: int,
    vision_layers: int,
    max_text_tokens: int,
    image_token_id: int | None,
) -> Qwen2_5_VLForConditionalGeneration | Qwen2VLForConditionalGeneration:
    """A Qwen2.5-VL or Qwen2-VL of the given size; patches as in :func:`build_tiny_processor`."""
    head_dim = hidden_size // num_heads
    if head_dim % 8:
        raise ValueError("qwen_vl tiny models need hidden_size / num_heads a multiple of 8")
    # M-RoPE splits each head's rotary frequencies (head_dim / 2) over (time, height, width)
    # in the released models' 1/4, 3/8, 3/8 proportions ([16, 24, 24] at head_dim 128).
    quarter = head_dim // 8
    mrope_section = [quarter, (head_dim // 2 - quarter) // 2]
    mrope_section.append(head_dim // 2 - sum(mrope_section))
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": 1,
        "max_position_embeddings": max_text_tokens + (image_size // patch_size) ** 2,
        "rope_parameters": {"rope_type": "default", "mrope_section": mrope_section},
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_patch = patch_size // 2
    vision = {
        "depth": vision_layers,
        "num_heads": num_heads,
        "patch_size": vision_patch,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    tokens = {
        "image_token_id": image_token_id,
        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    }
    if model_type == "qwen2_5_vl":
        vision |= {
            "hidden_size": vision_hidden_size,
            "intermediate_size": 4 * vision_hidden_size,
            "out_hidden_size": hidden_size,
            # One attention window covers the whole image_size image; the last block attends
            # fully, as in the released models.
            "window_size": image_size,
            "fullatt_block_indexes": [vision_layers - 1],
        }
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
        return Qwen2_5_VLForConditionalGeneration(config)
    vision |= {"embed_dim": vision_hidden_size, "hidden_size": hidden_size, "mlp_ratio": 4}
    config = Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)
    return Qwen2VLForConditionalGeneration(config)


def build_tiny_captioner(
    family: str,
    directory: str | os.PathLike[str] | None,
    *,
    words: Iterable[str] = DEFAULT_WORDS,
    prefixes: dict[str, str] | None = None,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    num_layers: int = 1,
    num_heads: int = 2,
    intermediate_size: int | None = None,
    vision_hidden_size: int | None = None,
    vision_layers: int | None = None,
    max_text_tokens: int = 96,
    model_type: str | None = None,
    seed: int = 0,
) -> Captioner:
    """Build a tiny random captioner of ``family`` and ``save_pretrained`` it into ``directory``.

    ``words`` (plus the prefixes' words) become whole tokens of the locally built tokenizer.
    ``model_type`` picks one of a family's model types (see :func:`build_tiny_processor`).
    Returns the in-memory captioner; load the directory with :meth:`Captioner.from_pretrained`
    to go through the same code path as a real checkpoint.
    """
    prefixes = dict(prefixes or STYLE_PREFIXES)
    all_words = [*words, *prefixes.values()]
    processor = build_tiny_processor(
        family, words=all_words, image_size=image_size, patch_size=patch_size, model_type=model_type
    )
    model = build_tiny_model(
        family,
        processor.tokenizer,
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        intermediate_size=intermediate_size,
        vision_hidden_size=vision_hidden_size,
        vision_layers=vision_layers,
        max_text_tokens=max_text_tokens,
        image_token_id=getattr(processor, "image_token_id", None),
        model_type=model_type,
        seed=seed,
    )
    model.eval()
    captioner = Captioner(model, processor, prefixes=prefixes)
    if directory is not None:
        captioner.save_pretrained(directory)
    return captioner
