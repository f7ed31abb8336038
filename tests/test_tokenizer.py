"""The miniworld's CLIP-style tokenizer loads through transformers and covers the language."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from recap_dagster.miniworld.captions import (
    ADJECTIVES,
    PLURALS,
    alt_text,
    long_caption,
    short_caption,
    terse_caption,
    vocabulary_texts,
)
from recap_dagster.miniworld.scenes import COLOURS, SHAPES, sample_scene
from recap_dagster.miniworld.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    MODEL_MAX_LENGTH,
    train_clip_tokenizer,
)

transformers = pytest.importorskip("transformers")

VOCAB_SIZE = 2048
MINIWORLD_WORDS = [
    *COLOURS,
    *SHAPES,
    *PLURALS.values(),
    *ADJECTIVES,
    "a", "an", "one", "two", "three", "single", "lone", "pair", "couple", "trio", "of",
    "top", "bottom", "left", "right", "center", "middle", "upper", "lower", "corner",
    "in", "on", "at", "the", "and", "background", "backdrop",
]  # fmt: skip


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = sample_scene(rng)
        out += [f(scene, rng) for f in (alt_text, short_caption, long_caption, terse_caption)]
    return out


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    train_clip_tokenizer(_texts(1500, seed=0) + vocabulary_texts(), str(out), VOCAB_SIZE)
    return out


@pytest.fixture(scope="module")
def slow_and_fast(tokenizer_dir: Path) -> tuple:
    return (
        transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dir)),
        transformers.CLIPTokenizerFast.from_pretrained(str(tokenizer_dir)),
    )


def test_files_and_special_tokens(tokenizer_dir: Path, slow_and_fast: tuple) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        assert (tokenizer_dir / name).is_file()
    for tok in slow_and_fast:
        assert tok.model_max_length == MODEL_MAX_LENGTH
        assert tok.bos_token == BOS_TOKEN and tok.eos_token == EOS_TOKEN
        assert tok.pad_token == EOS_TOKEN
        assert len(tok) <= VOCAB_SIZE
        # CLIP layout: <|endoftext|> has the highest id (CLIP pools at argmax(input_ids)).
        assert tok.eos_token_id == len(tok) - 1 and tok.bos_token_id == len(tok) - 2
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    assert vocab == slow_and_fast[0].get_vocab()


def test_slow_fast_and_raw_backend_agree(tokenizer_dir: Path, slow_and_fast: tuple) -> None:
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    slow, fast = slow_and_fast
    for text in _texts(50, seed=1):
        ids = slow(text).input_ids
        assert ids == fast(text).input_ids == raw.encode(text).ids
        assert ids[0] == slow.bos_token_id and ids[-1] == slow.eos_token_id


def test_round_trip(slow_and_fast: tuple) -> None:
    tok = slow_and_fast[0]
    for text in _texts(50, seed=2):
        ids = tok(text).input_ids
        decoded = tok.decode(ids, skip_special_tokens=True)
        # CLIP decoding puts spaces between words and punctuation; the characters survive.
        assert re.sub(r"\s", "", decoded) == re.sub(r"\s", "", text.lower())
        assert tok(decoded).input_ids == ids


def test_miniworld_words_are_single_tokens(slow_and_fast: tuple) -> None:
    tok = slow_and_fast[0]
    for word in MINIWORLD_WORDS:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word


def test_long_captions_fit_in_77_tokens(slow_and_fast: tuple) -> None:
    tok = slow_and_fast[1]
    rng = random.Random(123)
    captions = [long_caption(sample_scene(rng), rng) for _ in range(1000)]
    lengths = [len(ids) for ids in tok(captions).input_ids]
    assert max(lengths) <= MODEL_MAX_LENGTH


def test_unknown_text_does_not_crash(slow_and_fast: tuple) -> None:
    tok = slow_and_fast[0]
    for text in ["zqxjv wug", "Ünïcode naïve café 😀", "", "   ", "x" * 500, "<|endoftext|>?"]:
        ids = tok(text, truncation=True).input_ids
        assert len(ids) <= MODEL_MAX_LENGTH
        body = ids[1:-1]
        if "endoftext" not in text:
            assert tok.eos_token_id not in body  # byte-level: no unknown-token fallback
    batch = tok(["a red circle", "zqxjv"], padding="max_length", max_length=77, truncation=True)
    assert all(len(ids) == 77 for ids in batch.input_ids)


def test_training_is_deterministic(tmp_path: Path) -> None:
    texts = _texts(200, seed=5)
    train_clip_tokenizer(texts, str(tmp_path / "a"), 1024)
    train_clip_tokenizer(texts, str(tmp_path / "b"), 1024)
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    vocab = json.loads((tmp_path / "a" / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) <= 1024


def test_vocab_size_too_small_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        train_clip_tokenizer(["a red circle"], str(tmp_path), 300)
