"""Test helpers: the Dagster webserver as a subprocess and headless Debian Chromium.

The browser is Debian's ``chromium`` driven by Playwright's Python client; Playwright's
own browser download (``playwright install``) is never used. When no browser can be had
the helpers fail the test with what to install: a UI test must not pass unseen.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from recap_dagster.orchestration.launcher import LaunchError, serve

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts" / "ui"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The sensors' minimum interval under test (the sensor daemon itself loops every 5 s).
TEST_SENSOR_INTERVAL_SECONDS = 2
INSTALL_HINT = (
    "install Debian's Chromium (apt-get update && apt-get install -y --no-install-recommends "
    "chromium) and the test extra (pip install -e '.[test]', which brings playwright); "
    ".ci/run does both"
)


def chromium_executable() -> str:
    """Debian's Chromium (or $CHROMIUM_PATH); fails the test when there is none."""
    candidates = [os.environ.get("CHROMIUM_PATH"), "/usr/bin/chromium", shutil.which("chromium")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(f"no Chromium browser found (looked at {candidates[:2]}): {INSTALL_HINT}")


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


@contextmanager
def dagster_webserver(dagster_home: Path, env: dict[str, str], log: Path) -> Iterator[str]:
    """Run ``dagster-webserver -w workspace.yaml`` on loopback; yield its base URL."""
    with dagster_webserver_for(dagster_home, env, log, ["-w", "workspace.yaml"]) as url:
        yield url


@contextmanager
def dagster_webserver_for(
    dagster_home: Path, env: dict[str, str], log: Path, target: list[str]
) -> Iterator[str]:
    """Run ``dagster-webserver`` on ``target`` (e.g. ``["-m", module]``) on loopback."""
    with _serving("dagster-webserver", target, dagster_home, env, log) as url:
        yield url


@contextmanager
def dagster_dev(
    dagster_home: Path, env: dict[str, str], log: Path, target: list[str]
) -> Iterator[str]:
    """Run ``dagster dev`` (webserver + daemon) on ``target`` (e.g. ``["-f", file]``), with
    the test intervals: sensors every ``TEST_SENSOR_INTERVAL_SECONDS`` (unless ``env`` sets
    another) and the backfill loop of ``fast_dagster_dev``."""
    env = {"RECAP_SENSOR_INTERVAL_SECONDS": str(TEST_SENSOR_INTERVAL_SECONDS), **env}
    args = [str(Path(__file__).with_name("fast_dagster_dev.py")), "dev", *target]
    with _serving("python", args, dagster_home, env, log) as url:
        yield url


@contextmanager
def _serving(
    program: str, args: list[str], dagster_home: Path, env: dict[str, str], log: Path
) -> Iterator[str]:
    full_env = {**env, "DAGSTER_HOME": str(dagster_home)}
    try:
        with serve(program, args, REPO, full_env, log, timeout=120) as url:
            yield url
    except LaunchError as err:
        pytest.fail(f"{err}:\n{_tail(log)}")


@contextmanager
def chromium_page(profile_dir: Path, width: int = 2400, height: int = 1200) -> Iterator:
    """A Playwright page in headless Debian Chromium with a throwaway profile."""
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError as err:
        pytest.fail(f"playwright is not installed ({err}): {INSTALL_HINT}")
    executable = chromium_executable()
    with sync_playwright() as playwright:
        try:
            # Persistent context = Chromium's --user-data-dir in a temp folder of ours.
            context = playwright.chromium.launch_persistent_context(
                str(profile_dir),
                executable_path=executable,
                args=CHROMIUM_ARGS,
                headless=True,
                viewport={"width": width, "height": height},
            )
        except PlaywrightError as err:
            pytest.fail(f"could not start {executable} headless: {err}\n{INSTALL_HINT}")
        # The UI greets a new browser profile with a community sign-up dialog that would
        # cover the page; mark it as seen, as a returning user's browser has it.
        context.add_init_script("window.localStorage.setItem('communityNux', '\"1\"')")
        context.set_default_timeout(30_000)
        try:
            yield context.new_page()
        finally:
            context.close()


def screenshot(page, name: str, full_page: bool = False) -> Path:
    """Save a screenshot under test-artifacts/ui/ and return its path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path
