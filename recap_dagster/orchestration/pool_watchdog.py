"""The ``gpu`` pool's watchdog: dead runs lose their slots, waiting runs learn who holds them.

Dagster frees a pool slot when the step that claimed it ends. A run worker killed with
SIGKILL (the OOM killer, a lost machine) never gets there: its run stays STARTED and keeps
the slot for ever, and the local run launcher cannot tell that its worker is gone. So every
process that runs a GPU step tags its run with the machine it runs on
(:func:`record_worker`, called by ``ComputeResource``); :func:`sweep_pool` then checks the
processes that wrote the run's events (each Dagster event carries its writer's pid). A run
on this machine none of whose processes is alive any more is marked failed, saying why, and
its slots are freed. Runs on other machines (Kubernetes pods) are left to the run launcher's
own health check (run monitoring); any run that has ended, however, gets its slots back at
the next sweep.

The sweep runs in the ``gpu_pool_watchdog`` sensor (the daemon under ``dagster dev`` and in
every deployment) and in a thread beside ``./dev pipeline``'s runs. Its work per sweep is
bounded by the pool's holders and waiters, never by history.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

import dagster as dg
import psutil

from recap_dagster.training.processes import process_alive

GPU_POOL = "gpu"
WORKER_TAG = "recap/worker_host"
IN_PROGRESS = {
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
}


@cache
def this_host() -> str:
    """This machine, as ``hostname/boot id``: a reboot makes every earlier pid dead."""
    boot = Path("/proc/sys/kernel/random/boot_id")
    boot_id = boot.read_text().strip() if boot.exists() else f"{psutil.boot_time():.0f}"
    return f"{socket.gethostname()}/{boot_id}"


def record_worker(instance: dg.DagsterInstance, run_id: str) -> None:
    """Tag ``run_id`` with this machine, so the watchdog may judge its processes."""
    run = instance.get_run_by_id(run_id)
    if run is not None and run.tags.get(WORKER_TAG) != this_host():
        instance.add_run_tags(run_id, {WORKER_TAG: this_host()})


def pool_slots(instance: dg.DagsterInstance) -> int:
    """How many steps the gpu pool lets run at once on ``instance`` (on a CPU machine:
    steps sharing its cores)."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:  # no pools: one step at a time
        return 1
    info = storage.get_concurrency_info(GPU_POOL)
    return max(1, info.slot_count or instance.global_op_concurrency_default_limit or 1)


def _clock(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass(frozen=True)
class Holder:
    """A run that holds slots of the pool."""

    run_id: str
    steps: tuple[str, ...]
    status: str
    since: float | None

    def describe(self, now: float) -> str:
        since = (
            f" since {_clock(self.since)} ({(now - self.since) / 60:.1f} min)" if self.since else ""
        )
        return f"run {self.run_id[:8]} (step {', '.join(self.steps)}, {self.status}){since}"


@dataclass
class Sweep:
    """What one sweep found and did."""

    pool: str
    slots: int
    holders: list[Holder] = field(default_factory=list)
    waiting: list[tuple[str, str, float]] = field(default_factory=list)  # run, step, since
    freed: list[str] = field(default_factory=list)  # one line per run whose slots were freed

    def summary(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        held = "; ".join(h.describe(now) for h in self.holders) or "nobody"
        lines = [f"pool {self.pool}: {len(self.holders)}/{self.slots} slot(s) held by {held}"]
        if self.waiting:
            lines.append(f"{len(self.waiting)} step(s) waiting for it")
        return "; ".join(lines + self.freed)


def _process_events(instance: dg.DagsterInstance, run_id: str) -> list[dg.EventLogEntry]:
    """Events that name the run's processes: the run worker's start, each step's start."""
    return list(
        instance.all_logs(
            run_id,
            of_type={
                dg.DagsterEventType.RUN_START,
                dg.DagsterEventType.STEP_WORKER_STARTED,
                dg.DagsterEventType.STEP_START,
            },
        )
    )


def worker_is_dead(run: dg.DagsterRun, events: list[dg.EventLogEntry]) -> str | None:
    """Why ``run``'s worker is known to be dead, or None when it is alive or unknowable."""
    host = run.tags.get(WORKER_TAG)
    if host is None:
        return None
    name, _, boot = host.partition("/")
    here_name, _, here_boot = this_host().partition("/")
    if name != here_name:
        return None  # another machine: its run launcher's health check decides
    if boot != here_boot:
        return f"its worker ran on {name} before the machine restarted"
    pids = {
        (event.dagster_event.pid, event.timestamp)
        for event in events
        if event.dagster_event and event.dagster_event.pid
    }
    if not pids or any(process_alive(pid, at) for pid, at in pids):
        return None
    listed = ", ".join(str(pid) for pid in sorted({pid for pid, _ in pids}))
    return f"no process of the run is alive on {name} (pid {listed})"


def sweep_pool(
    instance: dg.DagsterInstance,
    pool: str = GPU_POOL,
    told: dict[str, str] | None = None,
    now: float | None = None,
) -> Sweep:
    """Free the slots of ended or dead runs; tell each waiting run who holds the pool.

    ``told`` maps a waiting run to what it was last told; it is updated in place, and a run
    is told again only when the holders change.
    """
    now = time.time() if now is None else now
    storage = instance.event_log_storage
    info = storage.get_concurrency_info(pool)
    sweep = Sweep(pool=pool, slots=info.slot_count)
    steps_by_run: dict[str, list[str]] = {}
    for slot in info.claimed_slots:
        steps_by_run.setdefault(slot.run_id, []).append(slot.step_key)
    for run_id, steps in steps_by_run.items():
        run = instance.get_run_by_id(run_id)
        if run is None or run.status not in IN_PROGRESS:
            status = run.status.value if run else "deleted"
            storage.free_concurrency_slots_for_run(run_id)
            sweep.freed.append(f"freed the slot(s) of run {run_id[:8]} ({status})")
            continue
        events = _process_events(instance, run_id)
        dead = worker_is_dead(run, events)
        if dead:
            message = (
                f"Run worker lost: {dead}. The run held {len(steps)} slot(s) of pool "
                f"'{pool}' (step {', '.join(steps)}); recap's pool watchdog marked it failed "
                "and freed them."
            )
            current = instance.get_run_by_id(run_id)
            if current is not None and current.status in IN_PROGRESS:
                instance.report_run_failed(current, message)
            storage.free_concurrency_slots_for_run(run_id)
            sweep.freed.append(f"freed the slot(s) of run {run_id[:8]}: {dead}")
            continue
        started = [e.timestamp for e in events if e.step_key in steps] or [
            e.timestamp for e in events
        ]
        sweep.holders.append(
            Holder(run_id, tuple(steps), run.status.value, min(started, default=None))
        )

    held = "; ".join(h.describe(now) for h in sweep.holders) or "no run (a slot frees up now)"
    holders_key = ",".join(sorted(h.run_id for h in sweep.holders))
    for pending in info.pending_steps:
        if pending.assigned_timestamp is not None:
            continue  # it holds its slot: a holder, not a waiter
        since = pending.enqueued_timestamp.timestamp()
        sweep.waiting.append((pending.run_id, pending.step_key, since))
        if told is None:
            continue
        if told.get(pending.run_id) == holders_key:
            continue
        told[pending.run_id] = holders_key
        waiter = instance.get_run_by_id(pending.run_id)
        if waiter is not None and waiter.status in IN_PROGRESS:
            instance.report_engine_event(
                f"Step {pending.step_key} has waited since {_clock(since)} for pool '{pool}' "
                f"({info.slot_count} slot(s)), held by {held}.",
                waiter,
            )
    if told is not None:
        for run_id in set(told) - {run for run, _, _ in sweep.waiting}:
            del told[run_id]
    return sweep


@contextmanager
def watching_pool(
    instance: dg.DagsterInstance,
    say: Callable[[str], None],
    every_seconds: float = 5.0,
    pool: str = GPU_POOL,
) -> Iterator[None]:
    """Sweep the pool in a thread while the block runs (an in-process run that may wait for
    a slot): at once, then every ``every_seconds``; ``say`` gets a line whenever slots were
    freed or who waits for whom changed."""
    stop = threading.Event()
    told: dict[str, str] = {}

    def loop() -> None:
        last: tuple = ()
        while True:
            try:
                sweep = sweep_pool(instance, pool, told)
            except Exception as error:  # the watchdog must never kill the run it watches
                say(f"pool watchdog: {error!r}")
            else:
                state = (
                    tuple(h.run_id for h in sweep.holders),
                    tuple(run for run, _, _ in sweep.waiting),
                )
                if sweep.freed or (sweep.waiting and state != last):
                    say(sweep.summary())
                last = state
            if stop.wait(every_seconds):
                return

    thread = threading.Thread(target=loop, name="gpu-pool-watchdog", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
