"""The CPU share of steps side by side: its start, its re-division as steps come and go."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recap_dagster.training.cpu_share import SHARE_ENV, CpuShare, Rebalancer


def _other_step(folder: Path) -> subprocess.Popen:
    """Another live process that holds a step's file in ``folder``."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    (folder / str(proc.pid)).touch()
    return proc


def test_a_step_starts_with_its_slot_share_split_over_its_processes() -> None:
    assert CpuShare(cores=4, slots=2).starting_threads() == 2
    assert CpuShare(cores=4, slots=2, processes=2).starting_threads() == 1
    assert CpuShare(cores=4, slots=8).starting_threads() == 1  # never 0
    with pytest.raises(ValueError, match=">= 1"):
        CpuShare(cores=4, slots=0)


def test_the_share_follows_the_steps_running_on_the_machine(tmp_path: Path) -> None:
    share = CpuShare(cores=4, slots=2, folder=str(tmp_path))
    with share.holding():
        assert share.running() == 1 and share.threads_now() == 4  # alone: every core
        other = _other_step(tmp_path)
        try:
            assert share.running() == 2 and share.threads_now() == 2
            # A third step beyond the pool's slots does not shrink the share further.
            third = _other_step(tmp_path)
            try:
                assert share.running() == 3 and share.threads_now() == 2
            finally:
                third.kill()
                third.wait()
        finally:
            other.kill()  # as a killed step: its file stays, its process is gone
            other.wait()
        assert share.running() == 1 and share.threads_now() == 4
        assert [p.name for p in tmp_path.iterdir()] == [str(os.getpid())]
    assert share.running() == 0 and not list(tmp_path.iterdir())


def test_the_rebalancer_sets_torchs_threads_when_the_steps_change(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    share = CpuShare(cores=2, slots=2, folder=str(tmp_path))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        rebalance = Rebalancer(share, every=0)
        with share.holding(), caplog.at_level(logging.INFO):
            rebalance()
            assert torch.get_num_threads() == 2
            other = _other_step(tmp_path)
            try:
                rebalance()
                assert torch.get_num_threads() == 1
            finally:
                other.kill()
                other.wait()
        assert "CPU threads 1 -> 2" in caplog.text and "CPU threads 2 -> 1" in caplog.text
        # Between two looks (every 60 s here) nothing changes.
        slow = Rebalancer(share, every=60)
        slow()
        torch.set_num_threads(1)
        slow()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_launch_gets_the_share_through_its_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = CpuShare(cores=4, slots=2, folder=str(tmp_path)).to_env(processes=2)
    assert env["OMP_NUM_THREADS"] == "1"  # 4 cores / 2 slots / 2 processes
    monkeypatch.setenv(SHARE_ENV, env[SHARE_ENV])
    assert CpuShare.from_env() == CpuShare(cores=4, slots=2, processes=2, folder=str(tmp_path))
    monkeypatch.delenv(SHARE_ENV)
    assert CpuShare.from_env() is None


def test_a_dead_steps_pid_taken_by_a_later_process_does_not_count(tmp_path: Path) -> None:
    share = CpuShare(cores=4, slots=2, folder=str(tmp_path))
    later = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        stale = tmp_path / str(later.pid)
        stale.touch()
        os.utime(stale, (1.0, 1.0))  # written long before that process started
        assert share.running() == 0 and not stale.exists()
    finally:
        later.kill()
        later.wait()


def test_a_rebalancer_that_cannot_read_the_folder_keeps_the_threads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A recaptioning step must not fail because the steps' folder cannot be read.
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    before = torch.get_num_threads()
    with caplog.at_level(logging.WARNING):
        Rebalancer(CpuShare(cores=8, slots=1, folder=str(not_a_folder)))()
    assert torch.get_num_threads() == before
    assert "CPU share not rebalanced" in caplog.text
