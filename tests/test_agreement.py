"""Caption quality without ground truth: CLIP score per image-text pair (long captions per
sentence), a recaptioned shard's sample, the miniworld's own CLIP, and the held-out human
captions as references for the base and the fine-tuned captioner."""

from __future__ import annotations

import random
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pytest
from PIL import Image

from recap_dagster.assets.agreement import agreement_metadata
from recap_dagster.assets.captioner import captioner_checkpoint
from recap_dagster.assets.human_captions import human_captions
from recap_dagster.captioner.recaption import output_parts
from recap_dagster.captioner.reference import (
    load_heldout,
    reference_rows,
    reference_scores,
)
from recap_dagster.corpus.listing import list_shards
from recap_dagster.corpus.reading import iter_shard
from recap_dagster.evaluation.agreement import (
    ClipScorer,
    ShardAgreement,
    judge_clip_vs_alt_text,
    read_shard_agreement,
    sample_keys,
    score_shard_sample,
    sentences,
)
from recap_dagster.evaluation.metrics import clip_score
from recap_dagster.miniworld.captions import short_caption, vocabulary_texts
from recap_dagster.miniworld.clip import (
    MANIFEST_FILE,
    read_clip_manifest,
    retrieval_accuracy,
)
from recap_dagster.miniworld.generate import item_seed
from recap_dagster.miniworld.resources import MiniworldWorldResource, miniworld_sources
from recap_dagster.miniworld.scenes import render, sample_scene
from recap_dagster.miniworld.tiny_captioner import build_tiny_captioner
from recap_dagster.resources import ComputeResource, ModelsResource, StorageResource
from recap_dagster.storage.root import Storage


def _images(count: int, domain: str = "agreement-test") -> tuple[list[Image.Image], list[str]]:
    """Fresh miniworld scenes (a seed domain no model was trained on) and a true short
    caption of each."""
    images, captions = [], []
    for index in range(count):
        rng = random.Random(item_seed(0, domain, index))
        scene = sample_scene(rng)
        images.append(render(scene, size=32, seed=rng.getrandbits(32)))
        captions.append(short_caption(scene, rng))
    return images, captions


def test_sentences_split_after_sentence_ends() -> None:
    text = "A red circle at the top left. Two blue squares below it!  Nothing else"
    assert sentences(text) == [
        "A red circle at the top left.",
        "Two blue squares below it!",
        "Nothing else",
    ]
    assert sentences("one sentence without a stop") == ["one sentence without a stop"]
    assert sentences("  ") == []


def test_pair_scores_are_clip_score(random_clip: str) -> None:
    """Per pair, 100 * max(cosine, 0) (CLIPScore's definition; torchmetrics 1.9's own class
    fails on transformers 5's feature outputs), read here off CLIP's similarity logits; the
    report's clip_score is their mean; batching does not change them."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    images, captions = _images(6)
    scores = ClipScorer(random_clip, device="cpu", batch_size=4).score_pairs(images, captions)
    one_by_one = ClipScorer(random_clip, device="cpu", batch_size=1).score_pairs(images, captions)
    assert scores == pytest.approx(one_by_one, abs=1e-3)
    model = CLIPModel.from_pretrained(random_clip).eval()
    inputs = CLIPProcessor.from_pretrained(random_clip)(
        text=captions, images=images, return_tensors="pt", padding=True
    )
    with torch.no_grad():
        out = model(**inputs)
    cosine = out.logits_per_image.diagonal() / model.logit_scale.exp()
    assert scores == pytest.approx((100 * cosine.clamp(min=0)).tolist(), abs=1e-3)
    assert any(s > 0 for s in scores)  # a random CLIP scores some pairs above zero
    mean = clip_score(random_clip, images, captions, device="cpu")
    assert mean == pytest.approx(sum(scores) / len(scores), abs=1e-4)


def test_long_captions_score_as_the_mean_of_their_sentences(random_clip: str) -> None:
    images, _ = _images(2)
    scorer = ClipScorer(random_clip, device="cpu")
    long = [
        "A red circle at the top left. Two blue squares below it. A plain grey background.",
        "Just one green triangle",
    ]
    got = scorer.score_long(images, long)
    parts = [sentences(t) for t in long]
    per_sentence = [scorer.score_pairs([images[i]] * len(p), p) for i, p in enumerate(parts)]
    assert got == pytest.approx([sum(s) / len(s) for s in per_sentence], abs=1e-4)
    # Over the encoder's context the text is scored per sentence, never cut to its start.
    very_long = " ".join(["A small red circle sits at the top left of the picture."] * 12)
    assert scorer.score_long(images[:1], [very_long])[0] == pytest.approx(
        scorer.score_pairs(images[:1], [sentences(very_long)[0]])[0], abs=1e-3
    )


def _recaptioned_rows(corpus: str, shard: str) -> list[dict]:
    """A recaptioned shard's rows as recaptioning writes them: captions where the image
    decoded, none elsewhere (the truth of the scene as its long caption)."""
    rows = []
    for record in iter_shard(corpus, shard):
        ok = record.image is not None
        rows.append(
            {
                "key": record.key,
                "alt_text": record.alt_text,
                "recap_short": "a red circle." if ok else None,
                "recap_long": "A red circle at the top. A blue square below." if ok else None,
            }
        )
    return rows


def test_shard_sample_is_deterministic_and_skips_uncaptioned_rows(
    miniworld_paths, random_clip: str
) -> None:
    shard = list_shards(miniworld_paths.corpus)[0].key
    rows = _recaptioned_rows(miniworld_paths.corpus, shard)
    rows[0]["recap_short"] = rows[0]["recap_long"] = None  # as an undecodable image's row
    scorer = ClipScorer(random_clip, device="cpu")
    result = score_shard_sample(scorer, rows, miniworld_paths.corpus, shard, n=5, seed=3)
    assert [r["key"] for r in result.rows] == sample_keys(
        [r["key"] for r in rows if r["recap_short"] is not None], 5, seed=3
    )
    assert rows[0]["key"] not in {r["key"] for r in result.rows}
    again = score_shard_sample(scorer, rows[::-1], miniworld_paths.corpus, shard, n=5, seed=3)
    assert again.rows == result.rows
    summary = result.summary()
    assert summary["n"] == 5
    assert summary["gain_recap_short"] == pytest.approx(
        summary["clip_recap_short"] - summary["clip_alt_text"], abs=1e-6
    )


def test_group_agreement_metadata(
    miniworld_paths, random_clip: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Storage(str(tmp_path))
    shards = [info.key for info in list_shards(miniworld_paths.corpus)]
    for shard in shards:
        table = pa.Table.from_pylist(_recaptioned_rows(miniworld_paths.corpus, shard))
        store.write_parquet(table, *output_parts(shard))

    def metadata(fingerprint: str = "captioner-1", clip: str = random_clip) -> dict:
        return agreement_metadata(
            store, miniworld_paths.corpus, shards, clip, fingerprint=fingerprint, sample_rows=4,
            examples_per_band=2, max_pixels=1 << 20,
        )  # fmt: skip

    meta = metadata()
    table = meta["image_text_agreement"]
    assert [r.data["shard"] for r in table.records] == [*shards, "all"]
    assert table.records[-1].data["n"] == 4 * len(shards)
    assert {"clip_alt_text", "gain_recap_long"} <= set(meta)
    # Each shard's scored sample is stored beside its recaptions, with its texts.
    stored = read_shard_agreement(store, shards[0])
    assert stored is not None and len(stored[0].rows) == 4
    assert stored[0].rows[0]["recap_short"] == "a red circle."
    # The examples: best, median and worst (2 each of 8 rows), every one with its image.
    examples = meta["examples"].value
    assert [line.split(" | ")[0] for line in examples.splitlines()[2:]] == (
        ["| best"] * 2 + ["| median"] * 2 + ["| worst"] * 2
    )
    assert examples.count("data:image/png;base64,") == 6 and "(not readable)" not in examples
    # The same fingerprint reads the stored scores back: no CLIP model is loaded again.
    monkeypatch.setattr(ClipScorer, "__init__", lambda *a, **k: pytest.fail("scored again"))
    assert metadata()["image_text_agreement"].records == table.records
    with pytest.raises(BaseException, match="scored again"):
        metadata(fingerprint="captioner-2")
    assert metadata(clip="") == {}


def test_clip_judge_names_the_rows_that_lose_to_their_alt_text() -> None:
    def row(key: str, alt: float, short: float, long: float) -> dict:
        texts = {"alt_text": f"alt {key}", "recap_short": f"short {key}", "recap_long": "l."}
        scores = {"clip_alt_text": alt, "clip_recap_short": short, "clip_recap_long": long}
        return {"key": key, **texts, **scores}

    good = ShardAgreement("00000", [row("a", 20, 25, 22), row("b", 20, 21, 19)])
    ok, message = judge_clip_vs_alt_text([good], max_deficit=0.0)
    assert ok and "2 scored rows" in message and "recap_long +0.5" in message
    bad = ShardAgreement("00001", [row("c", 30, 10, 12), row("d", 30, 29, 28)])
    ok, message = judge_clip_vs_alt_text([good, bad], max_deficit=0.0)
    assert not ok and "recap_short: mean CLIP 21.2 vs alt text 25.0" in message
    assert message.index("00001/c") < message.index("00001/d")  # the worst row first
    assert judge_clip_vs_alt_text([good, bad], max_deficit=5.0)[0]
    assert not judge_clip_vs_alt_text([], max_deficit=5.0)[0]


def test_miniworld_clip_ranks_true_descriptions_above_wrong_ones(
    miniworld_clip: str, miniworld_paths
) -> None:
    """The quick miniworld CLIP, on scenes it never saw: the true short caption beats
    another scene's far above chance (0.5)."""
    manifest = read_clip_manifest(miniworld_clip)
    assert manifest is not None and manifest["final_loss"] < manifest["first_loss"]
    images, captions = _images(64, domain="clip-heldout-test")
    accuracy = retrieval_accuracy(ClipScorer(miniworld_clip, device="cpu"), images, captions)
    assert accuracy >= 0.8, accuracy
    assert manifest["heldout_retrieval_accuracy"] >= 0.75  # its own record, 8 images here


def test_miniworld_clip_build_is_cached(miniworld_clip: str, miniworld_paths) -> None:
    from recap_dagster.miniworld.clip import QUICK_CLIP, build_miniworld_clip

    written = (Path(miniworld_clip) / MANIFEST_FILE).stat().st_mtime_ns
    assert build_miniworld_clip(miniworld_paths.root, miniworld_clip, QUICK_CLIP) == miniworld_clip
    assert (Path(miniworld_clip) / MANIFEST_FILE).stat().st_mtime_ns == written


def test_reference_metrics_prefer_the_reference() -> None:
    references = ["A red circle and two blue squares.", "One green triangle at the top left."]
    same = reference_scores(references, references)
    unrelated = reference_scores(["purple hexagons everywhere", "nothing at all"], references)
    close = reference_scores(["A red circle and two squares.", "A green triangle at the top."],
                             references)  # fmt: skip
    for metric in ("bleu", "rouge_l", "chrf"):
        assert same[metric] == pytest.approx(1.0)
        assert same[metric] > close[metric] > unrelated[metric], metric
    with pytest.raises(ValueError):
        reference_scores(["one"], references)


def test_reference_rows_are_style_by_captioner(miniworld_paths) -> None:
    heldout = load_heldout(miniworld_paths.human_captions_heldout)
    assert len(heldout) == 8 and heldout[0].short and heldout[0].long
    metrics = {"bleu": 0.1, "rouge_l": 0.2, "chrf": 0.3, "clip_score": None, "words": 4.0}
    judged = {"short": metrics, "long": metrics}
    rows = reference_rows(judged, judged, {"short": 20.0, "long": 21.0})
    assert [(r["style"], r["captioner"]) for r in rows] == [
        ("short", "base"), ("short", "fine-tuned"), ("short", "human"),
        ("long", "base"), ("long", "fine-tuned"), ("long", "human"),
    ]  # fmt: skip
    assert rows[2]["bleu"] is None and rows[2]["clip_score"] == 20.0


def test_captioner_checkpoint_reports_reference_metrics(
    miniworld_paths, miniworld_clip: str, tmp_path: Path
) -> None:
    base = tmp_path / "base_captioner"
    words = sorted({w for text in vocabulary_texts() for w in text.lower().split()})
    build_tiny_captioner("git", base, words=words, hidden_size=32, max_text_tokens=64)
    resources = {
        "sources": miniworld_sources(str(miniworld_paths.root)),
        "storage": StorageResource(root=str(tmp_path / "storage")),
        "models": ModelsResource(base_captioner=str(base), clip=miniworld_clip),
        "compute": ComputeResource(),
        "world": MiniworldWorldResource(),
    }
    step = {"steps": 2, "batch_size": 8, "learning_rate": 1e-3, "eval_batch_size": 8}
    step |= {"max_new_tokens": 12, "sample_rows": 2}
    result = dg.materialize(
        [human_captions, captioner_checkpoint],
        resources=resources,
        run_config={"ops": {"captioner_checkpoint": {"config": step}}},
    )
    meta = result.asset_materializations_for_node("captioner_checkpoint")[0].metadata
    table = meta["heldout_reference"]
    rows = {(r.data["style"], r.data["captioner"]): r.data for r in table.records}
    assert set(rows) == {(s, c) for s in ("short", "long") for c in ("base", "fine-tuned", "human")}
    for style in ("short", "long"):
        for captioner in ("base", "fine-tuned"):
            row = rows[(style, captioner)]
            assert all(0.0 <= row[m] <= 1.0 for m in ("bleu", "rouge_l", "chrf")), row
            assert row["clip_score"] >= 0.0
        # The miniworld's CLIP agrees with the human captions far more than with an
        # untrained captioner's.
        assert rows[(style, "human")]["clip_score"] > rows[(style, "base")]["clip_score"]
    assert meta["heldout_reference_images"].value == 8
    assert "short_chrf_fine_tuned" in meta and "long_clip_score_fine_tuned" in meta
