"""One process per device, each working through its share of a shard group.

Recaptioning and the latent cache read shards and write one output file per shard; they need
no collective. Each process loads the model on its own GPU, works through its share of the
shards (round-robin, so every process gets as many as the others, give or take one) and
writes every finished shard itself: the writes are atomic, so a killed process leaves whole
files that a retry keeps, and the processes die with the one that spawned them. Progress
events and each process's result come back over one queue; the caller relays the events as
they arrive (the Dagster run's log) and merges the results. With one device the work runs
here, in this process, with nothing spawned. On the CPU the processes split the step's
threads, and with a :class:`CpuShare` they follow the steps running on the machine (the
rebalancer, at each progress event).
"""

from __future__ import annotations

import ctypes
import os
import pickle
import queue as queue_module
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
import torch.multiprocessing
from torch.multiprocessing.spawn import ProcessException

from recap_dagster.training.cpu_share import CpuShare, Rebalancer

Result = TypeVar("Result")
#: Receives a progress event (a JSON-able dict) from any process.
Emit = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class DeviceShare:
    """What one process works on: its device and its shards."""

    rank: int
    processes: int
    device: str
    shards: tuple[str, ...]


@dataclass(frozen=True)
class _Run(Generic[Result]):
    work: Callable[[DeviceShare, Emit], Result]
    shares: tuple[DeviceShare, ...]
    threads: int  # each CPU process's torch threads at its start
    cpu: CpuShare | None  # on the CPU: the step's share of the cores, split over the processes


def _following(emit: Emit, cpu: CpuShare | None) -> Emit:
    """``emit``, rebalancing this process's threads first (between two pieces of work, in
    the thread that computes) when the step has a CPU share."""
    if cpu is None:
        return emit
    rebalance = Rebalancer(cpu)
    rebalance()  # at the start too: a process with one shard would never follow it

    def emit_and_rebalance(event: dict[str, Any]) -> None:
        rebalance()
        emit(event)

    return emit_and_rebalance


def used_devices(devices: Sequence[torch.device], shards: Sequence[str]) -> list[torch.device]:
    """The devices a group's run uses: never more than it has shards, since each process
    loads the whole model."""
    if not devices:
        raise ValueError("no device to run on")
    return list(devices[: max(1, len(shards))])


def share_shards(shards: Sequence[str], devices: Sequence[torch.device]) -> list[DeviceShare]:
    """Round-robin shares of the :func:`used_devices`: process ``r`` of ``n`` takes shards
    ``r, r+n, ...``."""
    devices = used_devices(devices, shards)
    count = len(devices)
    return [
        DeviceShare(rank, count, str(device), tuple(shards[rank::count]))
        for rank, device in enumerate(devices)
    ]


def _ignore(event: dict[str, Any]) -> None:
    del event


def die_with_parent(parent: int | None = None) -> None:
    """Have the kernel kill this process when its parent dies (Linux). A run worker killed
    with SIGKILL must not leave its GPU processes running, and an orphaned DataLoader worker
    never exits by itself: it waits for ever to hand a batch to a reader that is gone.
    ``parent``: the pid the parent had, to catch one that died before the request."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def dataloader_worker_init(worker_id: int, parent: int) -> None:
    """A DataLoader's ``worker_init_fn`` (bound to the pid of the process that builds the
    loader): the worker dies with the process it feeds, also when that process died between
    the fork and this call (a run killed just as a loader starts), which the kernel's signal
    alone misses and torch's watchdog, taking the adoptive parent for the feeder, too."""
    del worker_id
    die_with_parent(parent)


def use_device(device: torch.device) -> None:
    """Make ``device`` this process's current GPU: otherwise every CUDA context a library
    opens without naming a device (the DataLoader's pin-memory thread) lands on GPU 0."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def _picklable(exc: BaseException) -> BaseException | None:
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - any exception type may refuse pickling
        return None
    return exc


def _run_share(rank: int, run: _Run[Any], results: Any, parent: int) -> None:
    """A spawned process: its share, with events and its result (or its error, the
    exception itself where it pickles, so the parent can judge it) sent to the parent."""
    die_with_parent(parent)
    share = run.shares[rank]
    device = torch.device(share.device)
    use_device(device)
    if device.type == "cpu":
        # Processes sharing the CPU split the step's threads, not each all of the cores.
        torch.set_num_threads(run.threads)
    emit = _following(lambda event: results.put(("event", rank, event)), run.cpu)
    try:
        result = run.work(share, emit)
    except BaseException as exc:
        results.put(("error", rank, (traceback.format_exc(), _picklable(exc))))
        raise
    results.put(("result", rank, result))


class ProcessFailed(RuntimeError):
    """A device process raised; its traceback is the message, its exception the cause."""


def _raise_failed(rank: int, payload: Any, shares: Sequence[DeviceShare]) -> None:
    text, exc = payload
    raise ProcessFailed(f"process {rank} on {shares[rank].device} failed:\n{text}") from exc


def _raise_reported(results_queue: Any, shares: Sequence[DeviceShare]) -> None:
    """Raise the error a failed process put on the queue, if it is there (events before it
    are dropped: the step is failing)."""
    while True:
        try:
            kind, rank, payload = results_queue.get(timeout=5.0)
        except queue_module.Empty:
            return
        if kind == "error":
            _raise_failed(rank, payload, shares)


def run_per_device(
    work: Callable[[DeviceShare, Emit], Result],
    shards: Sequence[str],
    devices: Sequence[torch.device],
    on_event: Emit | None = None,
    cpu: CpuShare | None = None,
) -> list[Result]:
    """``work(share, emit)`` for each device's share of ``shards``, one process per device
    (spawned, so CUDA starts clean in each); the results in rank order.

    Never more processes than shards. ``work`` must be picklable (a module-level function,
    or a ``functools.partial`` of one with picklable arguments). A process that raises
    stops the others; :class:`ProcessFailed` is raised here from its exception (so a
    network error stays recognisable as one) and what the processes wrote stays written.
    Processes on the CPU split this process's torch threads, or ``cpu`` (the step's share
    of the machine's cores), which they then follow as steps start and end.
    """
    shares = share_shards(shards, devices)
    on_event = on_event or _ignore
    if torch.device(shares[0].device).type != "cpu":  # the devices are all of one kind
        cpu = None
    if len(shares) == 1:
        use_device(torch.device(shares[0].device))
        return [work(shares[0], _following(on_event, cpu))]
    split = None if cpu is None else cpu.split(len(shares))
    threads = split.starting_threads() if split else max(1, torch.get_num_threads() // len(shares))
    results_queue = torch.multiprocessing.get_context("spawn").Queue()
    processes = torch.multiprocessing.start_processes(
        _run_share,
        args=(_Run(work, tuple(shares), threads, split), results_queue, os.getpid()),
        nprocs=len(shares),
        join=False,
        start_method="spawn",
    )
    results: dict[int, Result] = {}
    try:
        while len(results) < len(shares):
            try:
                kind, rank, payload = results_queue.get(timeout=1.0)
            except queue_module.Empty:
                try:
                    ended = processes.join(timeout=0)  # True when all ended
                except ProcessException:
                    # The failed process reported its error before it exited.
                    _raise_reported(results_queue, shares)
                    raise
                if ended and results_queue.empty():
                    missing = sorted(set(range(len(shares))) - set(results))
                    raise RuntimeError(f"processes {missing} ended without a result") from None
                continue
            if kind == "event":
                on_event(payload)
            elif kind == "error":
                _raise_failed(rank, payload, shares)
            else:
                results[rank] = payload
        while not processes.join():
            pass
    except BaseException:
        # An error here or in one process (or an interrupted step) stops them all: none
        # may keep a GPU or write on behind a retry.
        for process in processes.processes:
            if process.is_alive():
                process.kill()
        for process in processes.processes:
            process.join()
        raise
    return [results[rank] for rank in range(len(shares))]
