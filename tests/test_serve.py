"""The servers we start stop on SIGTERM even when started from a shell's background job."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from recap_dagster.orchestration.launcher import _interruptible


@pytest.fixture
def sigint_ignored() -> Iterator[None]:
    """What a non-interactive shell does to ``cmd &`` (and so to a CI step's children)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGINT, previous)


def _child_sigint_handler(**popen: object) -> str:
    code = (
        "import signal; h = signal.getsignal(signal.SIGINT); "
        "print('ignored' if h == signal.SIG_IGN else h.__name__)"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, **popen
    ).stdout.strip()


def test_a_server_gets_sigint_back_so_sigterm_stops_it(sigint_ignored: None) -> None:
    # Without it the child inherits the ignored SIGINT, and dagster dev, which makes SIGTERM
    # do what SIGINT does, would ignore SIGTERM too (the 30-s kill at every stop).
    assert _child_sigint_handler() == "ignored"
    assert _child_sigint_handler(preexec_fn=_interruptible) == "default_int_handler"
