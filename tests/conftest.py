"""Shared fixtures: a real S3 API server (moto's server mode) on loopback, a miniworld, a
base text-to-image model."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from recap_dagster.orchestration.launcher import free_port

# A developer's exported locations or run config must not leak into the tests (each test
# that needs one sets it); RECAP_WORKDIR and CI's RECAP_MAIN_JOB_* are meant to reach them.
for _name in (
    "RECAP_RUN_CONFIG", "RECAP_MINIWORLD_DIR", "RECAP_MODELS_DIR", "RECAP_STORAGE_ROOT",
    "RECAP_SHARDS_ROOT", "RECAP_CLIP", "RECAP_HUMAN_CAPTIONS_HELDOUT",
):  # fmt: skip
    os.environ.pop(_name, None)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow end-to-end tests first: with the suite spread over several workers
    (pytest-xdist, ``./dev test``), the longest start at once instead of ending it alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Start moto's S3 server on 127.0.0.1 and yield its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Environment credentials + endpoint for the loopback server; yields a fresh bucket URI."""
    import boto3
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    bucket = f"recap-test-{os.urandom(4).hex()}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    # s3fs caches filesystem instances and directory listings across tests.
    s3fs.S3FileSystem.clear_instance_cache()
    yield f"s3://{bucket}"
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def miniworld_paths(tmp_path_factory: pytest.TempPathFactory):
    """A small generated miniworld shared by the tests (2 shards x 24 images)."""
    from recap_dagster.miniworld.generate import MiniworldConfig, generate_miniworld

    root = tmp_path_factory.mktemp("miniworld")
    config = MiniworldConfig(
        shards=2,
        images_per_shard=24,
        human_captions=100,
        human_heldout=8,
        pretrain_images=64,
        eval_prompts_per_category=2,
    )
    return generate_miniworld(str(root), config)


def built_once(
    tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], str]
) -> str:
    """``build(directory)``'s result, built once per test run rather than once per xdist
    worker: the first worker here builds under a file lock in the directory the workers
    share, the others wait and reuse it (pytest-xdist's recipe for session fixtures). For
    read-only results only: models loaded with ``from_pretrained``. The miniworld they are
    built from is generated alike in every worker (the same content hash)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    done = shared / f"built-{name}.done"
    with FileLock(str(shared / f"built-{name}.lock")):
        if not done.exists():
            target = shared / f"built-{name}"
            target.mkdir(exist_ok=True)
            done.write_text(build(target))
        return done.read_text()


@pytest.fixture(scope="session")
def quick_base_captioner(miniworld_paths, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The miniworld's base captioner, quick recipe, pretrained on that miniworld."""
    from recap_dagster.miniworld.base_captioner import QUICK_BASE_CAPTIONER, build_base_captioner

    return built_once(
        tmp_path_factory,
        "quick_base_captioner",
        lambda out: build_base_captioner(miniworld_paths, out / "captioner", QUICK_BASE_CAPTIONER),
    )


@pytest.fixture(scope="session")
def finetuned_captioner(
    quick_base_captioner: str, miniworld_paths, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """That base fine-tuned on the miniworld's human captions with the quick profile's
    ``captioner_checkpoint`` recipe (as the main job's quick run does), saved."""
    import torch

    from recap_dagster.captioner import Captioner, FineTuneConfig, fine_tune
    from recap_dagster.captioner.quality import load_captioned
    from recap_dagster.miniworld.run_configs import op_settings

    def build(out: Path) -> str:
        torch.manual_seed(0)
        captioner = Captioner.from_pretrained(quick_base_captioner)
        examples = [c.to_example() for c in load_captioned(miniworld_paths.human_captions)]
        settings = op_settings(FineTuneConfig, "quick", "captioner_checkpoint")
        fine_tune(captioner, examples, settings)
        captioner.save_pretrained(out)
        return str(out)

    return built_once(tmp_path_factory, "finetuned_captioner", build)


@pytest.fixture
def learning_rates(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The learning rate of every AdamW step taken while the test runs (first param group)."""
    import torch

    rates: list[float] = []

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, closure=None):  # type: ignore[override]
            rates.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    return rates


@pytest.fixture(scope="session")
def base_t2i(miniworld_paths, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The quick base text-to-image model pretrained on that miniworld's alt text."""
    from recap_dagster.miniworld.t2i_base import build_miniworld_base

    return built_once(
        tmp_path_factory,
        "base_t2i",
        lambda out: build_miniworld_base(str(miniworld_paths.root), str(out), "quick"),
    )


@pytest.fixture(scope="session")
def miniworld_clip(miniworld_paths, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The quick miniworld CLIP trained on that miniworld (about 15 s on two cores)."""
    from recap_dagster.miniworld.clip import QUICK_CLIP, build_miniworld_clip

    return built_once(
        tmp_path_factory,
        "miniworld_clip",
        lambda out: build_miniworld_clip(str(miniworld_paths.root), str(out / "clip"), QUICK_CLIP),
    )


@pytest.fixture(scope="session")
def random_clip(miniworld_paths, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny randomly initialised CLIP (CLIPConfig), saved with save_pretrained."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizerFast,
    )

    tokenizer = CLIPTokenizerFast.from_pretrained(miniworld_paths.tokenizer)
    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    config = CLIPConfig(
        text_config={
            **tiny,
            "num_attention_heads": 2,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 77,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={**tiny, "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("random_clip")
    CLIPModel(config).save_pretrained(out)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(out)
    return str(out)
