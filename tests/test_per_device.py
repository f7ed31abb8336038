"""One process per device: shares, results in rank order, and a failing process's error."""

from __future__ import annotations

import signal
import subprocess
import sys

import psutil
import pytest
import torch

from recap_dagster.orchestration.retries import is_transient
from recap_dagster.training.cpu_share import CpuShare
from recap_dagster.training.per_device import (
    DeviceShare,
    Emit,
    ProcessFailed,
    run_per_device,
    share_shards,
)

CPU = torch.device("cpu")


def _echo(share: DeviceShare, emit: Emit) -> tuple[int, tuple[str, ...]]:
    emit({"rank": share.rank})
    return share.rank, share.shards


def _threads_before_and_after_an_event(share: DeviceShare, emit: Emit) -> tuple[int, int]:
    before = torch.get_num_threads()
    emit({"rank": share.rank})
    return before, torch.get_num_threads()


def _network_error_on_rank_1(share: DeviceShare, emit: Emit) -> int:
    if share.rank == 1:
        raise ConnectionError(f"connection reset reading {share.shards[0]}")
    return share.rank


def test_shares_are_round_robin_and_never_more_than_the_shards() -> None:
    shares = share_shards(["a", "b", "c"], [CPU, CPU])
    assert [(s.rank, s.processes, s.shards) for s in shares] == [
        (0, 2, ("a", "c")),
        (1, 2, ("b",)),
    ]
    events: list[dict] = []
    assert run_per_device(_echo, ["a"], [CPU] * 4, events.append) == [(0, ("a",))]
    assert events == [{"rank": 0}]  # one shard: one process, run here


def test_two_processes_return_in_rank_order_and_a_failure_keeps_its_cause() -> None:
    events: list[dict] = []
    results = run_per_device(_echo, ["a", "b", "c"], [CPU, CPU], events.append)
    assert results == [(0, ("a", "c")), (1, ("b",))]
    assert sorted(e["rank"] for e in events) == [0, 1]
    with pytest.raises(ProcessFailed, match="process 1 on cpu failed") as failed:
        run_per_device(_network_error_on_rank_1, ["a", "b"], [CPU, CPU])
    assert isinstance(failed.value.__cause__, ConnectionError)
    assert "connection reset reading b" in str(failed.value)
    assert is_transient(failed.value)  # the step's retry policy still sees a network error


def test_cpu_processes_split_the_steps_share_and_follow_it(tmp_path) -> None:
    # A step with a quarter of 8 cores (4 slots) runs on two CPU processes. From their
    # start they follow the steps running on the machine: with the step (this process,
    # their parent) alone, all 8 cores, 4 each; beside another step, 2 each.
    share = CpuShare(cores=8, slots=4, folder=str(tmp_path))
    work, shards = _threads_before_and_after_an_event, ["a", "b"]
    with share.holding():
        assert run_per_device(work, shards, [CPU, CPU], cpu=share) == [(4, 4), (4, 4)]
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        try:
            (tmp_path / str(other.pid)).touch()
            assert run_per_device(work, shards, [CPU, CPU], cpu=share) == [(2, 2), (2, 2)]
        finally:
            other.kill()
            other.wait()
        # One process: the work runs here, which follows the share too.
        before = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            assert run_per_device(work, ["a"], [CPU], cpu=share) == [(8, 8)]
        finally:
            torch.set_num_threads(before)


def test_without_a_share_cpu_processes_split_this_processs_threads() -> None:
    # Not the machine's cores (a step pinned to 2 threads keeps to 2 over its processes).
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = run_per_device(_threads_before_and_after_an_event, ["a", "b"], [CPU, CPU])
    finally:
        torch.set_num_threads(before)
    assert results == [(1, 1), (1, 1)]


# A feeder (this script's process) forks a DataLoader-like worker and waits to be killed.
# "early": the worker runs its init at once and goes on; "late": it only runs it once the
# feeder is dead, the fork-then-kill race of a run killed just as its loader starts.
_FEEDER = r"""
import os, sys, time
from functools import partial
from recap_dagster.training.per_device import dataloader_worker_init
init = partial(dataloader_worker_init, parent=os.getpid())
read, write = os.pipe()
if os.fork() == 0:
    os.close(write)
    if sys.argv[1] == "late":
        os.read(read, 1)  # EOF: the feeder is gone
    init(0)
    os.write(1, b"initialised\n")  # one write each: the two processes share the pipe
    time.sleep(3600)
os.close(read)
os.write(1, b"forked\n")
time.sleep(3600)
"""


@pytest.mark.parametrize("when", ["early", "late"])
def test_a_loader_worker_dies_with_its_feeder_even_one_gone_before_its_init(when: str) -> None:
    feeder = subprocess.Popen(
        [sys.executable, "-c", _FEEDER, when], stdout=subprocess.PIPE, text=True
    )
    try:
        assert feeder.stdout is not None
        lines = {feeder.stdout.readline().strip() for _ in range(2 if when == "early" else 1)}
        assert "forked" in lines
        (worker,) = psutil.Process(feeder.pid).children()
        assert worker.is_running()
        feeder.send_signal(signal.SIGKILL)
        feeder.wait()
        _, alive = psutil.wait_procs([worker], timeout=30)
        assert not alive
    finally:
        feeder.kill()
        feeder.wait()
