"""The human evaluation's task and answers (plain Python, no Dagster).

The paper's human study asks raters whether a generated image shows its prompt (success
rate: 29.25% for alt text, 48.06% for RECAP Mix). This module builds that study from the
images the evaluation saved (``save_generated_images``): for a sample of test prompts, the
image of every caption variant from the same prompt and noise seed, asked about blind in
two kinds of question:

- ``success``: one image, "does this image show the prompt?" (yes / no);
- ``pair``: a variant's image beside alttext's, "which image shows the prompt better?"
  (left / right / tie), sides shuffled per question.

Variant names never reach the rater: questions carry random ids, images are served by
question id, and each rater gets their own deterministic order (so a reload resumes).

Answers: one JSON file per rater under ``human_eval/answers/<task version>/``, rewritten
whole through ``Storage.write_text`` for every answer. That write is atomic on both
backends (a local temp file ``os.replace``-d into place; one S3 ``PUT``, which is visible
only once complete), so a crash or a concurrent reader sees the file before or after an
answer, never half of it. One object per answer would also be atomic, but listing
hundreds of small objects per read is slow on S3 and a rater's file stays small.
Answers to an older task (other images) are kept apart by the task version, never mixed.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from PIL import Image

from recap_dagster.storage.root import Storage

BASELINE = "alttext"
#: Where the evaluation saves its generated images, one folder per variant with an index.
IMAGES_DIR = ("reports", "metrics", "images")
IMAGE_INDEX = "index.json"
TASK_PARTS = ("human_eval", "task.json")
ANSWERS_DIR = ("human_eval", "answers")
SUCCESS, PAIR = "success", "pair"
#: The answers each kind of question takes (keys on the page: y/n, 1/2/t).
CHOICES = {SUCCESS: ("yes", "no"), PAIR: ("left", "right", "tie")}
QUESTIONS = {
    SUCCESS: "Does this image show the prompt?",
    PAIR: "Which image shows the prompt better?",
}
_RATER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


@dataclass
class TaskSettings:
    """Which images the rating task asks about (the ``human_eval_task`` asset's config)."""

    prompts: int = field(
        default=50,
        metadata={"description": "Test prompts sampled for rating (all their seeds)."},
    )
    seed: int = field(
        default=0,
        metadata={"description": "Seed of the prompt sample, the side shuffle and the ids."},
    )
    training_seed: int = field(
        default=0,
        metadata={"description": "Whose images are rated: the fine-tunes with this training "
                  "seed (one per variant; a study rates one draw of each)."},
    )  # fmt: skip


class AnswerError(ValueError):
    """A submission that cannot be recorded; ``status`` is the HTTP status it maps to."""

    status = 422


class UnknownQuestion(AnswerError):
    status = 404


class DuplicateAnswer(AnswerError):
    status = 409


# -- the evaluation's images ----------------------------------------------------------------


def images_parts(variant: str, training_seed: int) -> tuple[str, ...]:
    """Where the rating images of a variant's fine-tune with ``training_seed`` lie."""
    return (*IMAGES_DIR, variant, f"seed-{training_seed}")


def save_generated_images(
    store: Storage,
    variant: str,
    training_seed: int,
    images: Sequence[Image.Image],
    prompts: Sequence[Any],
    prompt_indices: Sequence[int],
    seeds: Sequence[int],
    *,
    checkpoint_version: str,
    limit: int,
) -> int:
    """Save the first ``limit`` images (PNG) of ``variant``'s fine-tune with
    ``training_seed`` with an index of their prompt, category, prompt index and noise seed
    (``seeds``); return how many. ``prompts`` are ``EvalPrompt``s."""
    rows = []
    pairs = list(zip(images, prompts, prompt_indices, seeds, strict=True))
    for image, prompt, index, seed in pairs[:limit]:
        name = f"{index:05d}_{seed}.png"
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        store.write_bytes(buffer.getvalue(), *images_parts(variant, training_seed), name)
        rows.append(
            {"prompt_index": index, "seed": seed, "prompt": prompt.prompt,
             "category": prompt.category, "file": name}
        )  # fmt: skip
    index_doc = {"variant": variant, "training_seed": training_seed,
                 "checkpoint_version": checkpoint_version, "images": rows}  # fmt: skip
    # Written last: a reader that finds the index finds every image it names.
    store.write_text(json.dumps(index_doc, indent=1), *images_parts(variant, training_seed),
                     IMAGE_INDEX)  # fmt: skip
    return len(rows)


def read_image_indexes(
    store: Storage, variants: Sequence[str], training_seed: int
) -> dict[str, dict]:
    """The saved image index of each of ``variants`` whose fine-tune with
    ``training_seed`` has one."""
    return {
        v: json.loads(store.read_text(*images_parts(v, training_seed), IMAGE_INDEX))
        for v in variants
        if store.exists(*images_parts(v, training_seed), IMAGE_INDEX)
    }


# -- the task -------------------------------------------------------------------------------


def build_task(indexes: dict[str, dict], settings: TaskSettings) -> dict:
    """The rating task over the (prompt, seed) images every variant has, for a sample of
    ``settings.prompts`` prompts; deterministic in ``settings.seed`` and the images."""
    if BASELINE not in indexes:
        raise ValueError(f"the rating task needs {BASELINE}'s images as the baseline")
    variants = [BASELINE, *sorted(v for v in indexes if v != BASELINE)]
    by_variant = {
        v: {(r["prompt_index"], r["seed"]): r for r in indexes[v]["images"]} for v in variants
    }
    common = set.intersection(*(set(rows) for rows in by_variant.values()))
    # Same prompt text too: indexes from different prompt files must not be paired.
    common = {k for k in common if len({by_variant[v][k]["prompt"] for v in variants}) == 1}
    rng = random.Random(settings.seed)
    prompt_indices = sorted({p for p, _ in common})
    sample = sorted(rng.sample(prompt_indices, min(settings.prompts, len(prompt_indices))))
    items: dict[str, dict] = {}
    questions: list[dict] = []
    used: set[str] = set()

    def new_id(prefix: str) -> str:
        # Random, so an id says nothing about the variant or the order of building.
        while True:
            candidate = f"{prefix}{rng.getrandbits(40):010x}"
            if candidate not in used:
                used.add(candidate)
                return candidate

    sampled = set(sample)
    for key in sorted(k for k in common if k[0] in sampled):
        first = by_variant[BASELINE][key]
        item_id = f"p{key[0]:05d}_s{key[1]}"
        items[item_id] = {
            "prompt": first["prompt"],
            "category": first["category"],
            "prompt_index": key[0],
            "seed": key[1],
            "images": {
                v: [*images_parts(v, indexes[v]["training_seed"]), by_variant[v][key]["file"]]
                for v in variants
            },
        }
        for variant in variants:
            questions.append(
                {"id": new_id("q"), "kind": SUCCESS, "item": item_id, "variant": variant}
            )
        for variant in variants[1:]:
            sides = [variant, BASELINE]
            rng.shuffle(sides)
            questions.append(
                {"id": new_id("q"), "kind": PAIR, "item": item_id,
                 "left": sides[0], "right": sides[1]}
            )  # fmt: skip
    task = {
        "baseline": BASELINE,
        "variants": variants,
        "settings": {"prompts": settings.prompts, "seed": settings.seed},
        "checkpoints": {v: indexes[v].get("checkpoint_version", "") for v in variants},
        "items": items,
        "questions": questions,
    }
    task["version"] = hashlib.sha256(json.dumps(task, sort_keys=True).encode()).hexdigest()[:16]
    return task


def write_task(store: Storage, task: dict) -> str:
    return store.write_text(json.dumps(task, indent=1), *TASK_PARTS)


def read_task(store: Storage) -> dict | None:
    """The current rating task, or None when none was built yet."""
    if not store.exists(*TASK_PARTS):
        return None
    return json.loads(store.read_text(*TASK_PARTS))


def question_images(task: dict, question: dict) -> list[list[str]]:
    """Storage parts of the images a question shows, left to right."""
    images = task["items"][question["item"]]["images"]
    if question["kind"] == SUCCESS:
        return [images[question["variant"]]]
    return [images[question["left"]], images[question["right"]]]


def rater_order(task: dict, rater: str) -> list[dict]:
    """The task's questions in ``rater``'s own order: shuffled per rater, the same on every
    visit (so a reload resumes where the rater stopped)."""
    digest = hashlib.sha256(f"{task['version']}:{rater}".encode()).digest()
    order = list(task["questions"])
    random.Random(int.from_bytes(digest[:8], "big")).shuffle(order)
    return order


def blind_view(task: dict, question: dict) -> dict:
    """What the page may know of a question: its id, kind, prompt and wording; never the
    variants behind its images."""
    item = task["items"][question["item"]]
    return {
        "id": question["id"],
        "kind": question["kind"],
        "prompt": item["prompt"],
        "question": QUESTIONS[question["kind"]],
        "choices": list(CHOICES[question["kind"]]),
        "images": len(question_images(task, question)),
    }


# -- answers --------------------------------------------------------------------------------


def check_rater(rater: str) -> str:
    if not isinstance(rater, str) or not _RATER.match(rater):
        raise AnswerError(
            f"rater name {rater!r}: use 1-64 letters, digits, '_' or '-', starting with a "
            "letter or digit"
        )
    return rater


def _answers_parts(task: dict, rater: str) -> tuple[str, ...]:
    return (*ANSWERS_DIR, task["version"], f"{check_rater(rater)}.json")


def read_rater_answers(store: Storage, task: dict, rater: str) -> list[dict]:
    """``rater``'s answers to ``task``, in the order given (empty: none yet)."""
    parts = _answers_parts(task, rater)
    if not store.exists(*parts):
        return []
    return json.loads(store.read_text(*parts))["answers"]


def read_answers(store: Storage, task: dict) -> dict[str, list[dict]]:
    """Every rater's answers to ``task``: {rater: answers}."""
    found = {}
    for name in store.listdir(*ANSWERS_DIR, task["version"]):
        if name.endswith(".json") and _RATER.match(name[: -len(".json")]):
            found[name[: -len(".json")]] = read_rater_answers(store, task, name[: -len(".json")])
    return found


def add_answer(
    store: Storage,
    task: dict,
    rater: str,
    question_id: str,
    answer: str,
    *,
    now: datetime | None = None,
) -> dict:
    """Record ``rater``'s ``answer`` to ``question_id`` (one atomic rewrite of the rater's
    file) and return the record. Raises an ``AnswerError`` and writes nothing for an
    unknown question, an answer the question does not take, or a second answer to it.
    Callers serialize calls per rater (read-modify-write)."""
    check_rater(rater)
    question = next((q for q in task["questions"] if q["id"] == question_id), None)
    if question is None:
        raise UnknownQuestion(f"no question {question_id!r} in task {task['version']}")
    if answer not in CHOICES[question["kind"]]:
        raise AnswerError(
            f"{answer!r} is not an answer to a {question['kind']} question: "
            f"one of {list(CHOICES[question['kind']])}"
        )
    answers = read_rater_answers(store, task, rater)
    if any(a["question"] == question_id for a in answers):
        raise DuplicateAnswer(f"{rater} already answered question {question_id}")
    record = {
        "question": question_id,
        "answer": answer,
        "at": (now or datetime.now(UTC)).isoformat(timespec="seconds"),
    }
    document = {"rater": rater, "task_version": task["version"], "answers": [*answers, record]}
    store.write_text(json.dumps(document, indent=1), *_answers_parts(task, rater))
    return record


def answers_version(store: Storage) -> str:
    """A content hash of every answer to the current task (the ratings' data version)."""
    task = read_task(store)
    if task is None:
        return "no-task"
    digest = hashlib.sha256(task["version"].encode())
    for rater, answers in sorted(read_answers(store, task).items()):
        digest.update(rater.encode())
        digest.update(json.dumps(answers, sort_keys=True).encode())
    return digest.hexdigest()[:16]
