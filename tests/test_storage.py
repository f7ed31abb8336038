"""Storage: path validation, atomic files and directories, on local disk and real S3."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest

from recap_dagster.storage.root import SUCCESS_MARKER, Storage, StoragePathError, validate_part


@pytest.mark.parametrize("bad", ["", ".", "..", "../x", "/etc/passwd", "a/b", "a\\b", ".hidden"])
def test_unsafe_parts_are_rejected(bad: str) -> None:
    with pytest.raises(StoragePathError):
        validate_part(bad)


@pytest.mark.parametrize("good", ["00001", "recap_mix", "shard-7.parquet", "step=300"])
def test_safe_parts_pass(good: str) -> None:
    assert validate_part(good) == good


def test_paths_never_escape_root(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    for bad in ["..", "../x", "/abs"]:
        with pytest.raises(StoragePathError):
            storage.uri("recaptioned", bad)
        with pytest.raises(StoragePathError):
            storage.write_bytes(b"x", "recaptioned", bad)
    assert not any(tmp_path.parent.glob("x"))


def _exercise(storage: Storage) -> None:
    table = pa.table({"key": ["a", "b"], "n": [1, 2]})
    storage.write_parquet(table, "shards", "00000.parquet")
    assert storage.read_parquet("shards", "00000.parquet").equals(table)
    assert storage.parquet_num_rows("shards", "00000.parquet") == 2
    assert storage.listdir("shards") == ["00000.parquet"]

    # A failing write keeps the previous file and leaves nothing new behind.
    storage.write_text("v1", "reports", "report.md")
    with pytest.raises(RuntimeError), storage.atomic_file("reports", "report.md") as tmp:
        Path(tmp).write_text("partial")
        raise RuntimeError("killed")
    assert storage.read_text("reports", "report.md") == "v1"
    assert storage.listdir("reports") == ["report.md"]

    # Directories: complete only once fully written; a failed rewrite keeps the old one.
    with storage.atomic_dir("checkpoints", "captioner") as staging:
        Path(staging, "config.json").write_text("{}")
        Path(staging, "sub").mkdir()
        Path(staging, "sub", "weights.bin").write_bytes(b"w" * 10)
    assert storage.dir_complete("checkpoints", "captioner")
    with pytest.raises(RuntimeError), storage.atomic_dir("checkpoints", "other") as staging:
        Path(staging, "config.json").write_text("{}")
        raise RuntimeError("killed")
    assert not storage.dir_complete("checkpoints", "other")
    with storage.local_dir("checkpoints", "captioner") as local:
        assert Path(local, "sub", "weights.bin").read_bytes() == b"w" * 10
        assert Path(local, SUCCESS_MARKER).exists()
    with pytest.raises(FileNotFoundError):
        storage.local_dir("checkpoints", "other").__enter__()


def test_local_storage(tmp_path: Path) -> None:
    _exercise(Storage(str(tmp_path / "root")))


def test_s3_storage(s3_env: str) -> None:
    storage = Storage(f"{s3_env}/outputs")
    _exercise(storage)
    assert storage.uri("shards", "00000.parquet") == f"{s3_env}/outputs/shards/00000.parquet"


def test_rewriting_a_local_dir_replaces_it(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    for version in ("one", "two"):
        with storage.atomic_dir("ckpt") as staging:
            Path(staging, version).write_text(version)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [SUCCESS_MARKER, "two"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_killed_process_leaves_no_partial_file(tmp_path: Path) -> None:
    """SIGKILL in the middle of a write: the final name never holds partial bytes."""
    script = textwrap.dedent(
        f"""
        import os, signal
        from recap_dagster.storage.root import Storage
        storage = Storage({str(tmp_path)!r})
        with storage.atomic_file("out", "00000.parquet") as tmp:
            with open(tmp, "wb") as handle:
                handle.write(b"half a file")
                handle.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], check=False)
    assert result.returncode == -9
    assert not (tmp_path / "out" / "00000.parquet").exists()


def _node_share(tmp_path: Path, node: int, files: dict[str, str]) -> str:
    local = tmp_path / f"node{node}"
    for name, text in files.items():
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_text(text)
    return str(local)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_shared_dir_is_complete_only_once_every_node_added_and_it_is_finished(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A multi-node checkpoint: a killed attempt's leftover is cleared, each node adds its
    files, and only the finish (process 0, after all nodes) makes it complete."""
    root = str(tmp_path / "root") if where == "local" else f"{request.getfixturevalue('s3_env')}/o"
    storage = Storage(root)
    parts = ("state", "checkpoint-4")
    storage.begin_shared_dir(*parts)
    storage.add_to_shared_dir(_node_share(tmp_path, 9, {"stale.pkl": "old"}), *parts)
    # Killed before finishing: never complete; the next attempt starts clean.
    assert not storage.dir_complete(*parts)
    storage.begin_shared_dir(*parts)
    storage.add_to_shared_dir(
        _node_share(tmp_path, 0, {"model.bin": "w", "rng_0.pkl": "0"}), *parts
    )
    storage.add_to_shared_dir(_node_share(tmp_path, 1, {"sub/rng_1.pkl": "1"}), *parts)
    assert not storage.dir_complete(*parts)
    assert storage.finish_shared_dir(*parts) == storage.uri(*parts)
    assert storage.dir_complete(*parts)
    with storage.local_dir(*parts) as local:
        found = sorted(str(p.relative_to(local)) for p in Path(local).rglob("*") if p.is_file())
    assert found == ["_SUCCESS", "model.bin", "rng_0.pkl", "sub/rng_1.pkl"]
    assert storage.listdir("state") == ["checkpoint-4"]  # no staging left beside it
