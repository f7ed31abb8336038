"""``dagster dev`` for tests: the stock command, except that its daemon's backfill loop turns
every ``BACKFILL_LOOP_SECONDS`` instead of Dagster's fixed 30 s.

Dagster's backfill daemon sleeps ``dagster._daemon.controller.DEFAULT_DAEMON_INTERVAL_SECONDS``
(30 s) between iterations, and no instance setting or environment variable changes it, so a
UI backfill whose assets depend on each other waits up to 30 s per layer of the graph (about
100 s of the from-scratch UI test). Everything else (webserver, shared code server, sensor
and run-queue loops, run workers) is ``dagster dev``'s own; the sensors' intervals come from
the test's environment (``RECAP_SENSOR_INTERVAL_SECONDS``), the run queue's from dagster.yaml.

    python fast_dagster_dev.py dev -w workspace.yaml ...   # dagster dev
    python fast_dagster_dev.py daemon run ...               # its daemon (started by the former)
"""

from __future__ import annotations

import sys
from pathlib import Path

# Short, not zero: each iteration evaluates the whole backfill, which costs CPU the runs need.
BACKFILL_LOOP_SECONDS = 2


def _daemon(args: list[str]) -> None:
    import dagster._daemon.controller as controller

    controller.DEFAULT_DAEMON_INTERVAL_SECONDS = BACKFILL_LOOP_SECONDS
    from dagster._daemon.cli import main

    sys.argv = ["dagster-daemon", *args]
    main()


def _dev(args: list[str]) -> None:
    import dagster._cli.dev as dev

    stock = dev.open_ipc_subprocess

    def open_ipc_subprocess(command: list[str], **kwargs):  # noqa: ANN202
        if command[1:3] == ["-m", "dagster._daemon"]:
            command = [command[0], str(Path(__file__).resolve()), "daemon", *command[3:]]
        return stock(command, **kwargs)

    dev.open_ipc_subprocess = open_ipc_subprocess
    from dagster._cli import main

    sys.argv = ["dagster", "dev", *args]
    sys.exit(main())


if __name__ == "__main__":
    {"dev": _dev, "daemon": _daemon}[sys.argv[1]](sys.argv[2:])
