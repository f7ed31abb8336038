"""Captioner over BLIP / GIT / PaliGemma / Florence-2 / Qwen-VL: tiny local models, fine-tune,
caption, reload."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw, ImageOps
from torch import nn

from recap_dagster.captioner import (
    FAMILIES,
    STYLE_PREFIXES,
    Captioner,
    CaptionExample,
    FineTuneConfig,
    fine_tune,
    sample_batches,
    swap_left_right,
    training_examples,
)
from recap_dagster.captioner.families import IGNORE_INDEX, ChatVLMFamily
from recap_dagster.captioner.model import dropout_state
from recap_dagster.miniworld.tiny_captioner import build_tiny_captioner

FAMILY_NAMES = sorted(FAMILIES)


def _scene(colour: str, shape: str, where: str = "middle") -> Image.Image:
    """A 32 px image of one coloured shape on grey."""
    image = Image.new("RGB", (32, 32), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    x = {"left": 2, "middle": 9, "right": 16}[where]
    box = (x, 9, x + 14, 23)
    if shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "circle":
        draw.ellipse(box, fill=colour)
    else:
        draw.polygon(
            [(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=colour
        )
    return image


EXAMPLES = [
    CaptionExample("k0", _scene("red", "square"), "red", "a big red square"),
    CaptionExample("k1", _scene("blue", "circle"), "blue", "a small blue circle"),
    CaptionExample(
        "k2", _scene("green", "triangle", "left"), "green", "a green triangle on the left"
    ),
    CaptionExample(
        "k3", _scene("yellow", "square", "right"), "yellow", "a yellow square on the right"
    ),
]
WORDS = sorted({w for e in EXAMPLES for w in f"{e.short} {e.long}".split()})


# (hidden size, learning rate, steps) that overfit the four examples with a margin. The tiny
# Florence-2 (DaViT + BART) grounds colours more slowly than the others at width 32.
TRAINING = {
    "blip": (32, 5e-3, 150),
    "git": (32, 5e-3, 150),
    "paligemma": (32, 5e-3, 250),  # 150 steps ground three of the four images
    "florence2": (64, 2e-3, 300),
    "qwen_vl": (32, 5e-3, 150),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from 2 intra-op threads, and lose ~5x when the cores are busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class Trained:
    """One family's tiny captioner after the shared fine-tuning run."""

    captioner: Captioner
    losses: list[float]
    steps: int
    short: list[str]
    long: list[str]


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    family = request.param
    hidden, lr, steps = TRAINING[family]
    base = tmp_path_factory.mktemp(f"{family}-base")
    build_tiny_captioner(family, base, words=WORDS, hidden_size=hidden, num_layers=1)
    captioner = Captioner.from_pretrained(base)
    config = FineTuneConfig(steps=steps, learning_rate=lr, batch_size=8, dropout=0.0, seed=0)
    losses = fine_tune(captioner, EXAMPLES, config)
    images = [e.image for e in EXAMPLES]
    return Trained(
        captioner=captioner,
        losses=losses,
        steps=steps,
        short=captioner.caption(images, "short", max_new_tokens=10),
        long=captioner.caption(images, "long", max_new_tokens=10),
    )


def test_loads_through_from_pretrained(trained: Trained) -> None:
    cap = trained.captioner
    assert cap.family in FAMILIES
    assert isinstance(cap.model, FAMILIES[cap.family].model_class_for(cap.model.config.model_type))
    assert cap.prefixes == STYLE_PREFIXES
    assert cap.num_parameters() < 500_000  # tiny, as configured
    assert not cap.model.training


def test_loss_goes_down(trained: Trained) -> None:
    losses = trained.losses
    assert len(losses) == trained.steps
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.25 * sum(losses[:5]) / 5


def test_captions_follow_style_and_image(trained: Trained) -> None:
    assert all(isinstance(c, str) for c in trained.short + trained.long)
    assert len(trained.short) == len(trained.long) == len(EXAMPLES)
    for text in trained.short + trained.long:
        assert not text.startswith("describe"), text  # prefix stripped
        assert text == " ".join(text.split())  # whitespace normalised
    # Overfitted: the prefix selects the style, the image selects the content.
    assert trained.short == [e.short for e in EXAMPLES]
    assert trained.long == [e.long for e in EXAMPLES]


def test_beam_search_and_chunking(trained: Trained) -> None:
    images = [e.image for e in EXAMPLES]
    beams = trained.captioner.caption(images, "long", max_new_tokens=10, num_beams=3)
    chunked = trained.captioner.caption(images, "long", max_new_tokens=10, batch_size=3)
    assert beams == chunked == trained.long
    assert trained.captioner.caption([], "short") == []
    with pytest.raises(ValueError, match="unknown style"):
        trained.captioner.caption(images, "medium")


def test_batched_generation_equals_one_by_one(trained: Trained) -> None:
    """Captions do not depend on the batch: every row's prompt ends at the last input column
    (Qwen-VL prompts differ in length with the image size, so they are left padded)."""
    cap = trained.captioner
    images = [e.image for e in EXAMPLES]
    images += [EXAMPLES[1].image.resize((48, 32)), EXAMPLES[2].image.resize((32, 64))]
    inputs = cap.input_builder()(images, "long")
    if "attention_mask" in inputs:
        assert bool(inputs["attention_mask"][:, -1].all())  # no row ends in padding
    if cap.family == ChatVLMFamily.name:  # 16, 12 and 10 image tokens: padding is exercised
        assert len(set(inputs["attention_mask"].sum(1).tolist())) == 3
    batched = cap.caption(images, "long", max_new_tokens=10)
    one_by_one = [cap.caption([image], "long", max_new_tokens=10)[0] for image in images]
    assert batched == one_by_one
    assert batched[: len(EXAMPLES)] == trained.long


def test_save_and_reload_gives_identical_captions(trained: Trained, tmp_path: Path) -> None:
    trained.captioner.prefixes = dict(STYLE_PREFIXES)
    trained.captioner.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert (tmp_path / "recap_captioner.json").is_file()
    again = Captioner.from_pretrained(tmp_path, device="cpu")
    assert again.family == trained.captioner.family
    images = [e.image for e in EXAMPLES]
    assert again.caption(images, "short", max_new_tokens=10) == trained.short
    assert again.caption(images, "long", max_new_tokens=10) == trained.long


def test_labels_cover_caption_only(trained: Trained) -> None:
    cap = trained.captioner
    captions = ["a big red square", "blue"]
    prefixes = [cap.prefix("long"), cap.prefix("short")]
    images = [EXAMPLES[0].image, EXAMPLES[1].image]
    batch = cap.adapter.training_inputs(cap.model.config, cap.processor, images, prefixes, captions)
    tok = cap.processor.tokenizer
    specials = set(tok.all_special_ids)
    for row, caption in zip(batch["labels"], captions, strict=True):
        kept = [int(i) for i in row[row != IGNORE_INDEX]]
        # the caption and one end token (Florence-2's decoder also learns its leading <s>);
        # no prompt, image or padding tokens
        assert [i for i in kept if i not in specials] == tok(caption, add_special_tokens=False)[
            "input_ids"
        ]
        assert kept[-1] in (tok.sep_token_id, tok.eos_token_id)
        assert len(kept) - len([i for i in kept if i not in specials]) <= 2


QWEN_VL_TYPES = ChatVLMFamily.model_types  # Qwen2.5-VL, Qwen2-VL


@pytest.mark.parametrize("model_type", QWEN_VL_TYPES)
def test_chat_vlm_labels_cover_the_answer_only(model_type: str) -> None:
    """Training rows are the generation prompt token for token, then the caption and
    <|im_end|>; only those are labelled (not the system or user turn, image tokens, padding)."""
    cap = build_tiny_captioner("qwen_vl", None, words=WORDS, model_type=model_type)
    tok = cap.processor.tokenizer
    images = [EXAMPLES[0].image, EXAMPLES[1].image.resize((48, 32)), EXAMPLES[2].image]
    styles = ["long", "short", "long"]
    captions = ["a big red square", "blue", "a green triangle on the left"]
    prefixes = [cap.prefix(s) for s in styles]
    batch = cap.adapter.training_inputs(cap.model.config, cap.processor, images, prefixes, captions)
    image_id = cap.processor.image_token_id
    grids = batch["image_grid_thw"]
    for i, caption in enumerate(captions):
        ids, labels, mask = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i]
        labelled = labels != IGNORE_INDEX
        assert tok.decode(labels[labelled]) == caption + "<|im_end|>"
        assert bool((labels[labelled] == ids[labelled]).all())  # teacher forcing, no shift here
        length = int(mask.sum())
        assert bool(mask[:length].all()) and not mask[length:].any()  # right padded
        answer = int(labelled.sum())
        assert bool(labelled[length - answer : length].all())  # the answer ends the row
        prompt = cap.input_builder()([images[i]], styles[i])
        assert ids[: length - answer].tolist() == prompt["input_ids"][0].tolist()
        text = tok.decode(ids[: length - answer])
        assert text.startswith("<|im_start|>system\n") and prefixes[i] in text
        assert text.endswith("<|im_start|>assistant\n")
        image_tokens = ids == image_id
        assert int(image_tokens.sum()) == int(grids[i].prod()) // 4  # 2x2 merged patches
        assert bool((batch["mm_token_type_ids"][i] == image_tokens.long()).all())
    assert batch["pixel_values"].shape[0] == int(grids.prod(-1).sum())
    with torch.no_grad():
        assert torch.isfinite(cap.model(**batch).loss)


@pytest.mark.parametrize("model_type", QWEN_VL_TYPES)
def test_chat_vlm_checkpoint_reloads_and_batches_as_one_by_one(
    model_type: str, tmp_path: Path
) -> None:
    """A saved tiny Qwen-VL is an ordinary checkpoint (the stock processor class, the chat
    template, the pixel bounds) and loads back without torchvision; its greedy captions of
    differently sized images, left padded in one batch, equal those made one by one."""
    build_tiny_captioner("qwen_vl", tmp_path, words=WORDS, model_type=model_type, seed=3)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    stock = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen2_vl": "Qwen2VLProcessor"}[model_type]
    assert saved["processor_class"] == stock
    assert (tmp_path / "chat_template.jinja").is_file()
    cap = Captioner.from_pretrained(tmp_path)
    assert cap.family == "qwen_vl" and cap.model.config.model_type == model_type
    assert cap.processor.image_processor.size["longest_edge"] == 32 * 32
    assert "<|im_start|>assistant" in cap.processor.chat_template
    images = [
        EXAMPLES[0].image,
        EXAMPLES[1].image.resize((48, 32)),
        EXAMPLES[2].image.resize((32, 64)),
        EXAMPLES[3].image,
    ]
    build = cap.input_builder()
    inputs = build(images, "short")
    assert bool((inputs["attention_mask"][:, 0] == 0).any())  # some rows are left padded
    batched = cap.caption(images, "short", max_new_tokens=6)
    assert batched == [cap.caption([image], "short", max_new_tokens=6)[0] for image in images]
    # The next-token distributions too, which a random model's argmax may hide.
    with torch.no_grad():
        last = cap.model(**inputs).logits[:, -1]
        alone = torch.cat([cap.model(**build([image], "short")).logits[:, -1] for image in images])
    torch.testing.assert_close(last, alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(alone[0], alone[1], atol=1e-3)  # the image matters


def test_chat_vlm_max_pixels_bounds_the_image_tokens(tmp_path: Path) -> None:
    """A large image is resized to at most ``max_pixels`` (``size["longest_edge"]``): 32²
    pixels here, 16 image tokens of 8x8 pixels, whatever the input size."""
    build_tiny_captioner("qwen_vl", tmp_path, words=WORDS)
    cap = Captioner.from_pretrained(tmp_path)
    large = EXAMPLES[0].image.resize((640, 480))
    inputs = cap.input_builder()([large, EXAMPLES[1].image], "long")
    tokens = (inputs["input_ids"] == cap.processor.image_token_id).sum(1).tolist()
    grids = inputs["image_grid_thw"]
    assert tokens == (grids.prod(-1) // 4).tolist()
    height, width = (int(v) * 4 for v in grids[0, 1:])  # 4 px ViT patches
    assert height * width <= 32 * 32 and tokens[0] <= 16
    assert abs(width / height - 640 / 480) < 0.5  # the aspect ratio roughly kept
    assert tokens[1] == 16  # 32 px is left as it is
    assert len(cap.caption([large], "long", max_new_tokens=4)) == 1


def test_training_batch_takes_a_prompt_per_example(trained: Trained) -> None:
    """Free prompts (pretraining tasks) build the same batch as style prefixes do."""
    cap = trained.captioner
    images = [EXAMPLES[0].image, EXAMPLES[1].image]
    captions = ["a big red square", "blue"]
    styles = ["long", "short"]
    batch = cap.training_batch(images, [cap.prefix(s) for s in styles], captions)
    assert all(value.device == cap.device for value in batch.values())
    with torch.no_grad():
        assert float(cap.model(**batch).loss) == pytest.approx(
            float(cap.loss(images, captions, styles))
        )
    with pytest.raises(ValueError, match="same length"):
        cap.training_batch(images, ["how many?"], captions)


def test_prefixes_stored_and_overridable(tmp_path: Path) -> None:
    prefixes = {"short": "say briefly:", "long": "say in detail:"}
    build_tiny_captioner("git", tmp_path, words=WORDS, prefixes=prefixes)
    assert Captioner.from_pretrained(tmp_path).prefixes == prefixes
    override = {"short": "tiny:", "long": "huge:"}
    assert Captioner.from_pretrained(tmp_path, prefixes=override).prefixes == override


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_set_dropout_and_restore_after_fine_tune(family: str) -> None:
    cap = build_tiny_captioner(family, None, words=WORDS)

    def values() -> set[float]:
        return {value for _, _, value in dropout_state(cap.model)}

    def module_values() -> set[float]:
        # nn.Dropout modules and the float attributes attention layers pass to sdpa/eager
        return {v for obj, _, v in dropout_state(cap.model) if isinstance(obj, nn.Module)}

    cap.set_dropout(0.3)
    assert values() == {0.3} and module_values() == {0.3}
    if family == "paligemma":  # no nn.Dropout at all: Gemma/SigLIP keep floats
        assert not any(isinstance(m, nn.Dropout) for m in cap.model.modules())
    cap.set_dropout(0.0)
    seen: list[set[float]] = []
    config = FineTuneConfig(steps=1, batch_size=2, dropout=0.2, learning_rate=1e-4)
    fine_tune(cap, EXAMPLES[:2], config, on_step=lambda step, loss: seen.append(module_values()))
    assert seen == [{0.2}]  # during fine-tuning
    assert values() == {0.0}  # restored afterwards
    with pytest.raises(ValueError):
        cap.set_dropout(1.5)


def test_fine_tune_is_deterministic_and_accumulates() -> None:
    def run(**overrides: object) -> list[float]:
        cap = build_tiny_captioner("blip", None, words=WORDS, seed=1)
        config = FineTuneConfig(steps=3, learning_rate=1e-3, batch_size=4, **overrides)
        return fine_tune(cap, EXAMPLES, config)

    first, second = run(seed=3), run(seed=3)
    assert first == second
    assert run(seed=4) != first
    accumulated = run(seed=3, grad_accum_steps=2)
    assert len(accumulated) == 3
    # same sampled batches; with dropout the per-micro-batch masks differ, so only roughly equal
    assert abs(accumulated[0] - first[0]) < 0.5


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_fine_tune_can_keep_the_vision_tower_frozen(family: str) -> None:
    cap = build_tiny_captioner(family, None, words=WORDS, seed=2)
    tower = {n: p.detach().clone() for n, p in cap.vision_tower().named_parameters()}
    tower_ids = {id(p) for p in cap.vision_tower().parameters()}
    others = {
        n: p.detach().clone() for n, p in cap.model.named_parameters() if id(p) not in tower_ids
    }
    assert tower and others
    config = FineTuneConfig(steps=2, batch_size=4, learning_rate=1e-2, train_vision_tower=False)
    fine_tune(cap, EXAMPLES, config)
    after = dict(cap.vision_tower().named_parameters())
    assert all(torch.equal(after[n], tower[n]) for n in tower)  # not one weight moved
    now = dict(cap.model.named_parameters())
    assert any(not torch.equal(now[n], others[n]) for n in others)  # the decoder learnt
    assert all(p.requires_grad for p in cap.vision_tower().parameters())  # flags restored


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("constant_with_warmup", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]),
        ("cosine", [0.0, 0.5, 1.0, 0.8535534, 0.5, 0.1464466]),  # 0.5 * (1 + cos(pi * k / 4))
    ],
)
def test_fine_tune_follows_the_lr_schedule(
    schedule: str, expected: list[float], learning_rates: list[float]
) -> None:
    cap = build_tiny_captioner("blip", None, words=WORDS, seed=1)
    config = FineTuneConfig(
        steps=6, learning_rate=1e-3, batch_size=4, warmup_steps=2, lr_scheduler=schedule
    )
    fine_tune(cap, EXAMPLES, config)
    assert learning_rates == pytest.approx([1e-3 * r for r in expected])
    with pytest.raises(ValueError):
        FineTuneConfig(lr_scheduler="exponential")


def test_fine_tune_bf16_mixed_precision_runs() -> None:
    cap = build_tiny_captioner("git", None, words=WORDS)
    config = FineTuneConfig(steps=2, batch_size=4, learning_rate=1e-3, mixed_precision="bf16")
    losses = fine_tune(cap, EXAMPLES, config)
    assert len(losses) == 2 and all(loss == loss for loss in losses)
    assert next(cap.model.parameters()).dtype == torch.float32  # weights stay fp32


def _weights(captioner: Captioner) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in captioner.model.named_parameters()}


def _moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """Fraction of weights whose value changed."""
    changed = sum(int((after[n] != before[n]).sum()) for n in before)
    return changed / sum(t.numel() for t in before.values())


def _update(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> torch.Tensor:
    """Every weight's change, flattened into one vector."""
    return torch.cat([(after[n] - before[n]).flatten() for n in before])


def test_a_bf16_checkpoint_fine_tunes_with_fp32_master_weights(tmp_path: Path) -> None:
    """A checkpoint saved in bf16 (as PaliGemma's are) loads in bf16 and trains at the
    paper's lr 4e-5 exactly as the same weights loaded in fp32 do; pure-bf16 AdamW, the
    trap, leaves almost every weight where it was."""
    build_tiny_captioner("paligemma", tmp_path / "fp32", words=WORDS, seed=5)
    Captioner.from_pretrained(tmp_path / "fp32").save_pretrained(
        tmp_path / "bf16", dtype=torch.bfloat16
    )
    config = FineTuneConfig(steps=3, learning_rate=4e-5, batch_size=4, dropout=0.0, seed=0)

    from_bf16 = Captioner.from_pretrained(tmp_path / "bf16")
    assert from_bf16.dtype == torch.bfloat16  # transformers keeps the saved dtype
    assert from_bf16.load_options["loaded_dtype"] == "bfloat16"
    start = _weights(from_bf16)
    fine_tune(from_bf16, EXAMPLES, config)
    assert from_bf16.dtype == torch.float32  # the masters
    bf16_moved = _moved(start, _weights(from_bf16))

    as_fp32 = Captioner.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    assert _weights(as_fp32).keys() == start.keys()
    assert all(torch.equal(w, start[n]) for n, w in _weights(as_fp32).items())
    fine_tune(as_fp32, EXAMPLES, config)
    fp32_after = _weights(as_fp32)
    # The same updates as from fp32 (not bit for bit: buffers such as rotary frequencies
    # are rebuilt in the loading dtype), and most weights moved.
    step_bf16 = _update(start, _weights(from_bf16))
    step_fp32 = _update(start, fp32_after)
    agreement = torch.nn.functional.cosine_similarity(step_bf16, step_fp32, dim=0).item()
    size_ratio = (step_bf16.norm() / step_fp32.norm()).item()
    print(f"bf16 vs fp32 updates: cosine {agreement:.4f}, size ratio {size_ratio:.4f}")
    assert agreement > 0.99 and abs(size_ratio - 1) < 0.02
    assert bf16_moved > 0.5

    # The trap: the same steps on the bf16 weights themselves.
    trap = Captioner.from_pretrained(tmp_path / "bf16")
    trap.set_dropout(0.0)
    trap.model.train()
    optimizer = torch.optim.AdamW(trap.model.parameters(), lr=4e-5, weight_decay=0.0)
    batches = sample_batches(len(EXAMPLES), config)
    for batch in (next(batches) for _ in range(config.steps)):
        loss = trap.loss(
            [EXAMPLES[i].image for i, _ in batch],
            [EXAMPLES[i].caption(style) for i, style in batch],
            [style for _, style in batch],
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trap_after = _weights(trap)
    trap_step = _update(start, trap_after)
    trap_agreement = torch.nn.functional.cosine_similarity(trap_step, step_fp32, dim=0).item()
    print(
        f"weights moved at lr 4e-5 after 3 steps: fp32 masters {bf16_moved:.1%}, pure bf16 "
        f"{_moved(start, trap_after):.1%}; pure bf16 vs fp32 updates: cosine "
        f"{trap_agreement:.4f}, size ratio {(trap_step.norm() / step_fp32.norm()).item():.4f}"
    )
    assert trap_agreement < 0.9  # rounding, not the optimizer, decides bf16's updates

    # The saved dtype is a setting: the fine-tuned checkpoint saved in bf16 reloads in bf16.
    from_bf16.save_pretrained(tmp_path / "tuned", dtype=torch.bfloat16)
    assert Captioner.from_pretrained(tmp_path / "tuned").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="saved_dtype"):
        FineTuneConfig(saved_dtype="int8")  # type: ignore[arg-type]


def test_remote_code_florence2_is_refused_at_load(tmp_path: Path) -> None:
    """The original microsoft/Florence-2-* layout shares the built-in class's model_type;
    it is refused before loading, naming the converted repositories."""
    legacy = {
        "model_type": "florence2",
        "architectures": ["Florence2ForConditionalGeneration"],
        "auto_map": {"AutoConfig": "configuration_florence2.Florence2Config"},
        "vision_config": {"model_type": "davit"},
        "text_config": {"model_type": "florence2_language"},
    }
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    with pytest.raises(ValueError, match="florence-community/Florence-2-large"):
        Captioner.from_pretrained(tmp_path)


def test_loading_options_are_recorded(tmp_path: Path) -> None:
    build_tiny_captioner("blip", tmp_path, words=WORDS)
    captioner = Captioner.from_pretrained(tmp_path, attn_implementation="eager")
    assert captioner.load_options == {
        "source": str(tmp_path),
        "revision": None,
        "attn_implementation": "eager",
        "loaded_dtype": "float32",
    }


def test_sample_batches_balances_styles_and_images() -> None:
    config = FineTuneConfig(batch_size=8, long_fraction=0.5, seed=0)
    batches = sample_batches(4, config)
    first = [next(batches) for _ in range(3)]
    for batch in first:
        assert len(batch) == 8
        assert sum(style == "long" for _, style in batch) == 4
        assert sorted(i for i, _ in batch) == [0, 0, 1, 1, 2, 2, 3, 3]  # two full copies
    again = sample_batches(4, config)
    assert [next(again) for _ in range(3)] == first
    all_long = next(sample_batches(4, FineTuneConfig(batch_size=6, long_fraction=1.0)))
    assert {style for _, style in all_long} == {"long"}


@pytest.mark.parametrize(
    ("text", "swapped"),
    [
        ("a green triangle on the left", "a green triangle on the right"),
        ("Top-left: a circle; right side: a square.", "Top-right: a circle; left side: a square."),
        ("the LEFTMOST square and the rightmost one", "the RIGHTMOST square and the leftmost one"),
        ("a bright lefty", "a bright lefty"),  # whole words only
    ],
)
def test_swap_left_right(text: str, swapped: str) -> None:
    assert swap_left_right(text) == swapped
    assert swap_left_right(swapped) == text


def test_training_examples_add_mirrored_copies_only_when_asked() -> None:
    assert training_examples(EXAMPLES, FineTuneConfig()) == EXAMPLES
    doubled = training_examples(EXAMPLES, FineTuneConfig(mirror=True))
    assert doubled[: len(EXAMPLES)] == EXAMPLES
    for original, mirrored in zip(EXAMPLES, doubled[len(EXAMPLES) :], strict=True):
        assert mirrored.key == f"{original.key}#mirrored"
        assert mirrored.image.tobytes() == ImageOps.mirror(original.image).tobytes()
        assert mirrored.long == swap_left_right(original.long)
        assert mirrored.short == swap_left_right(original.short)
    left = next(m for m in doubled[len(EXAMPLES) :] if m.key == "k2#mirrored")
    assert left.long == "a green triangle on the right"
    assert left.image.getpixel((31 - 9, 18)) == EXAMPLES[2].image.getpixel((9, 18)) != (128,) * 3


def test_fine_tune_trains_on_the_mirrored_images(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[bytes, str]] = []
    loss_with = Captioner.loss_with

    def recording(self, model, images, captions, styles):  # type: ignore[no-untyped-def]
        seen.extend((i.tobytes(), c) for i, c in zip(images, captions, strict=True))
        return loss_with(self, model, images, captions, styles)

    monkeypatch.setattr(Captioner, "loss_with", recording)
    cap = build_tiny_captioner("blip", None, words=WORDS, seed=1)
    config = FineTuneConfig(steps=2, batch_size=8, learning_rate=1e-3, long_fraction=1.0)
    fine_tune(cap, EXAMPLES, replace(config, mirror=True))
    mirrored = ImageOps.mirror(EXAMPLES[2].image).tobytes()
    assert (mirrored, "a green triangle on the right") in seen  # two copies of 8 pairs
    assert len({image for image, _ in seen}) == 2 * len(EXAMPLES)


def test_fine_tune_config_validation() -> None:
    with pytest.raises(ValueError):
        FineTuneConfig(batch_size=10, grad_accum_steps=3)
    with pytest.raises(ValueError):
        FineTuneConfig(mixed_precision="fp8")  # type: ignore[arg-type]
    assert FineTuneConfig(batch_size=64, grad_accum_steps=4).micro_batch_size == 16
    with pytest.raises(ValueError):
        fine_tune(build_tiny_captioner("git", None, words=WORDS), [], FineTuneConfig(steps=1))


def test_unknown_family_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no tiny builder"):
        build_tiny_captioner("llava", tmp_path)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_fine_tune_resumes_from_its_checkpoint(family: str, tmp_path: Path) -> None:
    """The shared substrate's checkpoints: an interrupted fine-tune, resumed, ends with
    the losses and weights of an uninterrupted one (dropout on: RNG state restored)."""
    from recap_dagster.storage.root import Storage
    from recap_dagster.training.substrate import Checkpoints

    config = FineTuneConfig(steps=5, learning_rate=1e-3, batch_size=4, lr_scheduler="cosine")

    def run(root: Path, on_step=None) -> tuple[list[float], dict]:
        cap = build_tiny_captioner(family, None, words=WORDS, seed=1)
        checkpoints = Checkpoints(Storage(str(root)), fingerprint="test", keep=1)
        losses = fine_tune(
            cap, EXAMPLES, config, on_step=on_step, checkpoints=checkpoints, checkpoint_every=2
        )
        return losses, cap.model.state_dict()

    full, full_state = run(tmp_path / "a")

    class Killed(Exception):
        pass

    def kill_at_3(step: int, loss: float) -> None:
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        run(tmp_path / "b", kill_at_3)
    assert Storage(str(tmp_path / "b")).listdir() == ["checkpoint-2"]
    resumed, resumed_state = run(tmp_path / "b")
    assert resumed == pytest.approx(full, rel=1e-6)
    assert all(torch.allclose(full_state[k], resumed_state[k], atol=1e-7) for k in full_state)
