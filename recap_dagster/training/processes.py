"""Is a process that left a trace (a file, an event) still running? Pids are reused, so
a process that started after the trace was written is a different one."""

from __future__ import annotations

import psutil

#: Clock rounding between a process's start time (psutil) and a trace's timestamp.
PID_REUSE_SLACK_S = 1.0


def process_alive(pid: int, since: float) -> bool:
    """Is ``pid`` running (not a zombie) and the process that was alive at ``since``?"""
    try:
        process = psutil.Process(pid)
        return (
            process.status() != psutil.STATUS_ZOMBIE
            and process.create_time() <= since + PID_REUSE_SLACK_S
        )
    except psutil.NoSuchProcess:
        return False
