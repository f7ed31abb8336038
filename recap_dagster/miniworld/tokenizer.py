"""A CLIP-style BPE tokenizer trained on the miniworld's text.

Same pipeline as OpenAI CLIP's tokenizer (and ``transformers.CLIPTokenizer``): NFC + whitespace
collapsing + lower-casing, CLIP's split regex, byte-level alphabet, ``</w>`` end-of-word
suffix, ``<|startoftext|>`` / ``<|endoftext|>`` around every sequence, 77 positions. The
vocabulary is laid out like CLIP's: 256 byte symbols, the same 256 with ``</w>``, the merge
results in merge order, and the two special tokens last (so ``<|endoftext|>`` has the highest
id, which CLIP's text model relies on when it pools at ``argmax(input_ids)``).

Saved with ``CLIPTokenizer.save_pretrained`` (``tokenizer.json`` + ``tokenizer_config.json``)
plus ``vocab.json`` / ``merges.txt`` for loaders that want CLIP's original files.
"""

from __future__ import annotations

import heapq
import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77
# transformers' CLIPTokenizer split pattern (OpenAI's, with \p classes instead of ftfy).
CLIP_SPLIT_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
    r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode symbols."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def _clip_pipeline(tokenizer: Tokenizer) -> None:
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )


def word_counts(texts: Iterable[str]) -> Counter[str]:
    """Pre-tokenized (byte-level) words of ``texts`` with CLIP's normalizer and split."""
    tokenizer = Tokenizer(models.BPE())
    _clip_pipeline(tokenizer)
    normalizer, pre_tokenizer = tokenizer.normalizer, tokenizer.pre_tokenizer
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(
            piece for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
        )
    return counts


def learn_merges(counts: Counter[str], max_merges: int) -> list[tuple[str, str]]:
    """BPE merges, most frequent pair first, ties broken by the pair's text.

    Written here rather than using ``tokenizers.trainers.BpeTrainer`` because that trainer
    breaks ties between equally frequent pairs differently from run to run, and the
    miniworld must be reproducible byte for byte. Incremental pair counts keep it fast.
    """
    vocabulary = sorted(word for word in counts if word)
    words = [list(word[:-1]) + [word[-1] + END_OF_WORD] for word in vocabulary]
    freqs = [counts[word] for word in vocabulary]
    pair_counts: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for index, (symbols, freq) in enumerate(zip(words, freqs, strict=True)):
        for pair in zip(symbols, symbols[1:], strict=False):
            pair_counts[pair] += freq
            where[pair].add(index)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap and len(merges) < max_merges:
        negative, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -negative or negative == 0:
            continue  # stale heap entry
        merges.append(pair)
        merged = pair[0] + pair[1]
        touched: set[tuple[str, str]] = set()
        for index in sorted(where.pop(pair, ())):
            symbols, freq = words[index], freqs[index]
            for old in zip(symbols, symbols[1:], strict=False):
                pair_counts[old] -= freq
                touched.add(old)
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            words[index] = out
            for new in zip(out, out[1:], strict=False):
                pair_counts[new] += freq
                where[new].add(index)
                touched.add(new)
        for changed in sorted(touched):
            count = pair_counts[changed]
            if count <= 0:
                pair_counts.pop(changed, None)
            elif changed != pair:
                heapq.heappush(heap, (-count, changed))
        pair_counts.pop(pair, None)
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary layout for ``merges`` (bytes, bytes + </w>, merges, specials)."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols]
    seen = set(tokens)
    for left, right in merges:
        merged = left + right
        if merged not in seen:
            seen.add(merged)
            tokens.append(merged)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


def train_clip_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 2048) -> None:
    """Train a CLIP-style BPE on ``texts`` and save it to ``out_dir``.

    The vocabulary has at most ``vocab_size`` entries (fewer when the text runs out of
    pairs worth merging); use ``len(tokenizer)`` for the embedding size. Both
    ``CLIPTokenizer.from_pretrained(out_dir)`` and ``CLIPTokenizerFast.from_pretrained`` load it.
    """
    from transformers import CLIPTokenizer

    base = 2 * 256 + 2  # byte symbols, their </w> forms, two specials
    if vocab_size <= base:
        raise ValueError(f"vocab_size must exceed {base}")
    merges = learn_merges(word_counts(texts), vocab_size - base)
    vocab = build_vocab(merges)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=MODEL_MAX_LENGTH)
    tokenizer.save_pretrained(str(out))
    # CLIP's original files, for loaders that build the BPE from vocab + merges.
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
