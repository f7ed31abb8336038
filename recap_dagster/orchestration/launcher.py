"""Launch work through a running Dagster instance, as the UI does, and report its progress.

``dagster_dev`` serves the workspace (webserver + daemon) on loopback; ``DagsterGraphQL``
sends the UI's own GraphQL mutations (launch an asset backfill) and queries (the
backfill's per-asset counts); ``follow_backfill`` prints where the work is: the assets
done out of those targeted, the steps running now with their latest log line (the
trainers log their step, loss and time left), elapsed time and an estimate of the rest,
which counts a running trainer's asset partition by the share of its steps done ("step k/n").
No Dagster import: everything goes through the instance's public GraphQL API.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

TERMINAL_RUN_STATES = {"SUCCESS", "FAILURE", "CANCELED"}
TERMINAL_BACKFILL_STATES = {
    "COMPLETED",
    "COMPLETED_SUCCESS",
    "COMPLETED_FAILED",
    "FAILED",
    "CANCELED",
}


#: Share of the (weighted) work done before the time left is estimated.
MIN_DONE_FOR_ESTIMATE = 0.05
#: The estimate's pace: the work done over the last this many seconds (since the start,
#: before that). Work that ends at once (partitions a rerun finds done: a fine-tune that
#: already reached its steps, shards already written) would otherwise set the pace of
#: everything left: a confirm run after the default one said "about 0:12:34 left" with
#: ten fine-tunes, some 50 minutes, to go.
PACE_WINDOW_S = 600.0

#: How the trainers log their progress: "step 1300/2500 (52%) loss ..." (t2i through Pipes),
#: "step 30/300 loss ..." (captioner), "base captioner step 100/2500, loss ..." (miniworld).
STEP_PROGRESS = re.compile(r"\bstep (\d+)/(\d+)\b")

#: Events after which a step no longer runs: its last "step k/n" no longer tells the rest.
#: A success too: the partition is then materialized, or is about to be counted so.
_STEP_ENDS = {
    "ExecutionStepSuccessEvent",
    "ExecutionStepFailureEvent",
    "ExecutionStepSkippedEvent",
    "ExecutionStepUpForRetryEvent",
}


class LaunchError(RuntimeError):
    """The instance refused or failed the work."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _interruptible() -> None:
    """Run in the child before exec: SIGINT back to its default. A shell starts background
    jobs (CI steps, ``cmd &``) with SIGINT ignored, and ``dagster dev`` makes SIGTERM do
    what SIGINT does, so it would ignore our SIGTERM and take the 30-s kill instead."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextmanager
def serve(
    program: str,
    args: list[str],
    cwd: Path,
    env: dict[str, str],
    log: Path,
    port: int = 0,
    timeout: float = 180,
    address_flags: tuple[str, str] = ("-h", "-p"),
    ready_path: str = "/server_info",
) -> Iterator[str]:
    """Run a server (``dagster dev``, ``dagster-webserver``, ``recap-dagster rate`` with
    ``address_flags=("--host", "--port")`` and its ``ready_path``) on loopback until it
    answers; yield its URL; stop it and everything it started on exit."""
    port = port or free_port()
    executable = Path(sys.executable).with_name(program)
    command = [str(executable) if executable.exists() else program, *args]
    command += [address_flags[0], "127.0.0.1", address_flags[1], str(port)]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        # Its own session: stopping it ends the webserver, the daemon and the code server.
        process = subprocess.Popen(
            command,
            cwd=cwd,
            # Unbuffered: the log shows what the server did up to now (and up to a kill).
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_interruptible,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while not _answers(f"{url}{ready_path}"):
            if process.poll() is not None:
                raise LaunchError(f"{program} exited with {process.returncode}; see {log}")
            if time.monotonic() > deadline:
                raise LaunchError(f"{program} did not answer within {timeout:.0f} s; see {log}")
            time.sleep(0.5)
        yield url
    finally:
        # The whole session, also when the server itself died: its daemon and code server.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextmanager
def dagster_dev(
    workspace: Path, env: dict[str, str], log: Path, port: int = 0, timeout: float = 180
) -> Iterator[str]:
    """Run ``dagster dev -w workspace`` (webserver + daemon); yield the UI's URL."""
    args = ["dev", "-w", str(workspace)]
    with serve("dagster", args, workspace.parent, env, log, port, timeout) as url:
        yield url


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


_LOCATION_QUERY = """
query { workspaceOrError { ... on Workspace { locationEntries {
  name loadStatus
  locationOrLoadError { __typename ... on PythonError { message }
    ... on RepositoryLocation { repositories { name } } } } } } }
"""

_LAUNCH_BACKFILL = """
mutation Launch($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
    ... on UnauthorizedError { message }
  }
}
"""

_BACKFILL_STATUS = """
query Backfill($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PythonError { message }
    ... on PartitionBackfill {
      status
      error { message }
      assetBackfillData { assetBackfillStatuses {
        ... on AssetPartitionsStatusCounts { assetKey { path } numPartitionsTargeted
          numPartitionsInProgress numPartitionsMaterialized numPartitionsFailed }
        ... on UnpartitionedAssetStatus { assetKey { path } inProgress materialized failed }
      } }
    }
  }
}
"""

_LAUNCH_RUN = """
mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on UnauthorizedError { message }
  }
}
"""

_RUN_STATUS = """
query Status($runId: ID!) {
  runOrError(runId: $runId) { __typename ... on Run { status } ... on PythonError { message } }
}
"""

_RUNS = """
query Runs($filter: RunsFilter!) {
  runsOrError(filter: $filter) {
    ... on Runs { results { runId startTime assetSelection { path }
      tags { key value } } }
  }
}
"""

RANGE_START_TAG = "dagster/asset_partition_range_start"  # a run of a partition range

_FAILURES = """
query Failures($runId: ID!) {
  logsForRun(runId: $runId) {
    ... on EventConnection { events { __typename
      ... on ExecutionStepFailureEvent { stepKey error { message } }
      ... on AssetCheckEvaluationEvent { stepKey
        evaluation { checkName success severity description partition } } } }
  }
}
"""

_LOGS = """
query Logs($runId: ID!, $after: String) {
  logsForRun(runId: $runId, afterCursor: $after) {
    ... on EventConnection { cursor events { __typename
      ... on MessageEvent { message stepKey } } }
  }
}
"""


_CHECKS = """
query Checks($key: AssetKeyInput!) {
  assetNodes(assetKeys: [$key]) { assetChecksOrError { ... on AssetChecks { checks {
    name executionForLatestMaterialization { status evaluation { severity description } } } } } }
}
"""


class DagsterGraphQL:
    """The UI's GraphQL API of one running webserver."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/") + "/graphql"

    def query(self, query: str, variables: dict | None = None) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(
            self.url, data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            payload = json.loads(response.read())
        if payload.get("errors"):
            raise LaunchError(f"GraphQL error: {payload['errors']}")
        return payload["data"]

    def wait_for_location(self, timeout: float = 300) -> None:
        """Wait until every code location has loaded; raise with its error if one failed."""
        deadline = time.monotonic() + timeout
        while True:
            entries = self.query(_LOCATION_QUERY)["workspaceOrError"]["locationEntries"]
            if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                for entry in entries:
                    location = entry["locationOrLoadError"] or {}
                    if location.get("__typename") == "PythonError":
                        raise LaunchError(f"{entry['name']} failed to load: {location['message']}")
                return
            if time.monotonic() > deadline:
                raise LaunchError(f"code location not loaded within {timeout:.0f} s")
            time.sleep(1)

    def launch_run(self, keys: Sequence[str]) -> str:
        """One run of the unpartitioned ``keys`` (what the UI's "Materialize all" launches for
        them: no backfill, so no wait for the backfill daemon's 30-s loop); its run id."""
        entries = self.query(_LOCATION_QUERY)["workspaceOrError"]["locationEntries"]
        location = next(e for e in entries if (e["locationOrLoadError"] or {}).get("repositories"))
        selector = {
            "repositoryLocationName": location["name"],
            "repositoryName": location["locationOrLoadError"]["repositories"][0]["name"],
            "jobName": ASSET_JOB,
            "assetSelection": [{"path": key.split("/")} for key in keys],
        }
        params = {"selector": selector, "mode": "default", "runConfigData": {}}
        result = self.query(_LAUNCH_RUN, {"params": params})["launchRun"]
        if result["__typename"] != "LaunchRunSuccess":
            raise LaunchError(f"run of {list(keys)} not launched: {result}")
        return result["run"]["runId"]

    def run_status(self, run_id: str) -> str:
        data = self.query(_RUN_STATUS, {"runId": run_id})["runOrError"]
        if data["__typename"] != "Run":
            raise LaunchError(f"run {run_id}: {data}")
        return data["status"]

    def launch_backfill(
        self, keys: Sequence[str], title: str, partitions: dict[str, list[str]] | None = None
    ) -> str:
        """Backfill every partition of ``keys`` (the UI's "Materialize all" on them), but
        only the listed partitions of the keys in ``partitions`` (the backfill dialog's
        partition selection)."""
        params: dict = {"title": title}
        if partitions:
            params["partitionsByAssets"] = [
                {"assetKey": {"path": key.split("/")}}
                if key not in partitions
                else {
                    "assetKey": {"path": key.split("/")},
                    "partitions": {"ranges": [{"start": p, "end": p} for p in partitions[key]]},
                }
                for key in keys
            ]
        else:
            params |= {"assetSelection": [{"path": key.split("/")} for key in keys],
                       "allPartitions": True}  # fmt: skip
        result = self.query(_LAUNCH_BACKFILL, {"params": params})["launchPartitionBackfill"]
        if result["__typename"] != "LaunchBackfillSuccess":
            raise LaunchError(f"backfill {title!r} not launched: {result}")
        return result["backfillId"]

    def backfill(self, backfill_id: str) -> BackfillProgress:
        data = self.query(_BACKFILL_STATUS, {"id": backfill_id})["partitionBackfillOrError"]
        if data["__typename"] != "PartitionBackfill":
            raise LaunchError(f"backfill {backfill_id}: {data}")
        progress = BackfillProgress(
            backfill_id, data["status"], (data["error"] or {}).get("message")
        )
        for status in (data["assetBackfillData"] or {}).get("assetBackfillStatuses", []):
            key = "/".join(status["assetKey"]["path"])
            if "numPartitionsTargeted" in status:
                progress.assets[key] = AssetProgress(
                    status["numPartitionsTargeted"],
                    status["numPartitionsMaterialized"],
                    status["numPartitionsInProgress"],
                    status["numPartitionsFailed"],
                )
            else:
                progress.assets[key] = AssetProgress(
                    1, int(status["materialized"]), int(status["inProgress"]), int(status["failed"])
                )
        return progress

    def check_results(self, key: str) -> list[tuple[str, str, str]]:
        """(check, status, description) of each check of ``key``'s latest materialization; a
        check that failed with severity WARN has the status ``WARNED`` (Dagster's execution
        status says FAILED for both severities: a warning is not a failed main job)."""
        nodes = self.query(_CHECKS, {"key": {"path": key.split("/")}})["assetNodes"]
        results = []
        for node in nodes:
            for check in node["assetChecksOrError"].get("checks", []):
                execution = check["executionForLatestMaterialization"] or {}
                evaluation = execution.get("evaluation") or {}
                status = execution.get("status", "NOT_RUN")
                if status == "FAILED" and evaluation.get("severity") == "WARN":
                    status = "WARNED"
                results.append((check["name"], status, evaluation.get("description") or ""))
        return results

    def _runs(self, runs: RunsFilter, status: str) -> list[dict]:
        query_filter = {**runs, "statuses": [status]}
        return self.query(_RUNS, {"filter": query_filter})["runsOrError"].get("results", [])

    def failures(self, runs: RunsFilter, limit: int = 20) -> list[str]:
        """Why the failed runs of ``runs`` (a backfill's: ``of_backfill``) failed: one line
        per failed blocking check (its description names the shard) and per failed step
        (its own error message: for a read the gate refused, the check, the shard group and
        the shard)."""
        runs = self._runs(runs, "FAILURE")
        lines = []
        for run in runs[:limit]:
            tags = {t["key"]: t["value"] for t in run["tags"]}
            partition = tags.get("dagster/partition", tags.get(RANGE_START_TAG))
            events = self.query(_FAILURES, {"runId": run["runId"]})["logsForRun"].get("events", [])
            for event in events:
                where = event.get("stepKey", "") + (f" [{partition}]" if partition else "")
                if event["__typename"] == "ExecutionStepFailureEvent":
                    message = (event.get("error") or {}).get("message", "")
                elif event["__typename"] == "AssetCheckEvaluationEvent":
                    check = event["evaluation"]
                    if check["success"] or check["severity"] != "ERROR":
                        continue
                    group = check.get("partition") or partition
                    where = f"check {check['checkName']}" + (f" [{group}]" if group else "")
                    message = check.get("description") or "failed"
                else:
                    continue
                lines.append(f"{where} (run {run['runId'][:8]}): {' '.join(message.split())}")
        return lines

    def running_steps(self, runs: RunsFilter, logs: RunLogs) -> list[RunningStep]:
        """Each started run of ``runs``: its newest step and log message, and the progress of
        its running steps; reads each run's logs on from where ``logs`` says it stopped."""
        running = []
        for run in self._runs(runs, "STARTED"):
            run_id = run["runId"]
            tags = {t["key"]: t["value"] for t in run["tags"]}
            answer = self.query(_LOGS, {"runId": run_id, "after": logs.cursors.get(run_id)})
            connection = answer["logsForRun"]
            logs.cursors[run_id] = connection.get("cursor") or logs.cursors.get(run_id)
            events = [e for e in connection.get("events", []) if e.get("message")]
            if events:
                logs.newest[run_id] = (events[-1].get("stepKey") or "", events[-1]["message"])
            logs.progress[run_id] = step_progress(events, logs.progress.get(run_id))
            step, message = logs.newest.get(run_id, ("", ""))
            # A step's key is its asset key's path joined by "__" (assets of one job).
            assets = {
                "__".join(a["path"]): "/".join(a["path"]) for a in run["assetSelection"] or []
            }
            progress = {assets.get(s, s): p for s, p in logs.progress[run_id].items()}
            running.append(
                RunningStep(run_id, step or "run", tags.get("dagster/partition"), message, progress)
            )
        return running


#: A GraphQL ``RunsFilter``: which runs to look at.
RunsFilter = dict
#: The job of every asset ("Materialize" in the UI launches it with an asset selection).
ASSET_JOB = "__ASSET_JOB"


def of_backfill(backfill_id: str) -> RunsFilter:
    return {"tags": [{"key": "dagster/backfill", "value": backfill_id}]}


def of_run(*run_ids: str) -> RunsFilter:
    return {"runIds": list(run_ids)}


def _one_line(text: str, width: int = 150) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def step_progress(
    events: Iterable[dict], known: dict[str, tuple[int, int]] | None = None
) -> dict[str, tuple[int, int]]:
    """Step key -> (k, n) of the latest "step k/n" each running step of a run logged: read on
    from ``known`` (what its earlier events said) through ``events`` (its newer log events,
    oldest first, as ``logsForRun`` gives them); a step that ended drops out. One that
    succeeded is not counted whole: the backfill may already count its partition as
    materialized, and its 1.0 would then be credited to a partition still queued."""
    progress = dict(known or {})
    for event in events:
        step = event.get("stepKey")
        if not step:
            continue
        if event.get("__typename") in _STEP_ENDS:
            progress.pop(step, None)
            continue
        found = STEP_PROGRESS.findall(event.get("message") or "")
        if found and int(found[-1][1]) > 0:
            k, n = int(found[-1][0]), int(found[-1][1])
            progress[step] = (min(k, n), n)
    return progress


@dataclass
class RunLogs:
    """What ``running_steps`` has read so far of each started run's logs (by run id)."""

    cursors: dict[str, str] = field(default_factory=dict)  # the last event read
    newest: dict[str, tuple[str, str]] = field(default_factory=dict)  # (step key, message)
    progress: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)  # step_progress


@dataclass
class RunningStep:
    """A started run: its newest step and log message, and its running steps' progress."""

    run_id: str
    step: str
    partition: str | None
    message: str
    progress: dict[str, tuple[int, int]] = field(default_factory=dict)  # asset key -> (k, n)

    @property
    def line(self) -> str:
        where = f"{self.step} [{self.partition}]" if self.partition else self.step
        return f"{where} (run {self.run_id[:8]}): {_one_line(self.message)}"


def known_fractions(running: Iterable[RunningStep]) -> dict[str, list[float]]:
    """Asset key -> k/n of each of its in-progress partitions whose step logged "step k/n"."""
    fractions: dict[str, list[float]] = {}
    for run in running:
        for key, (k, n) in run.progress.items():
            fractions.setdefault(key, []).append(k / n)
    return fractions


@dataclass
class AssetProgress:
    targeted: int
    materialized: int
    in_progress: int
    failed: int


@dataclass
class BackfillProgress:
    backfill_id: str
    status: str
    error: str | None = None
    assets: dict[str, AssetProgress] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_BACKFILL_STATES

    @property
    def succeeded(self) -> bool:
        failed = any(a.failed for a in self.assets.values())
        return self.status in {"COMPLETED", "COMPLETED_SUCCESS"} and not failed

    def counts(
        self, weights: dict[str, float], fractions: dict[str, list[float]] | None = None
    ) -> tuple[float, float]:
        """(work done, work targeted), each asset partition weighted by ``weights``. One in
        progress counts by the share of its steps done (``fractions``: ``known_fractions``),
        as not started where no progress is known: the backfill counts a run waiting for a
        pool slot as in progress (counted half done, the nine fine-tunes queued behind two
        made a main job look 45% done when a tenth of it was)."""
        fractions = fractions or {}
        done = 0.0
        for key, asset in self.assets.items():
            # The backfill's counts and the runs' logs are read apart: never more known
            # fractions than partitions in progress.
            in_progress = sum(fractions.get(key, [])[: asset.in_progress])
            done += weights.get(key, 1.0) * (asset.materialized + in_progress)
        total = sum(weights.get(k, 1.0) * a.targeted for k, a in self.assets.items())
        return done, total


@dataclass
class Pace:
    """The time left at the recent pace of a backfill's work (``PACE_WINDOW_S``)."""

    start: float
    window: float = PACE_WINDOW_S
    samples: deque[tuple[float, float]] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.samples.append((self.start, 0.0))

    def left(self, now: float, done: float, total: float) -> float | None:
        """Seconds left (``total - done`` at the pace since the oldest sample in the window),
        or None while too little is done, or nothing in the window, to tell."""
        self.samples.append((now, done))
        # Keep the newest sample at or before the window's start as the reference.
        while len(self.samples) > 2 and self.samples[1][0] <= now - self.window:
            self.samples.popleft()
        then, done_then = self.samples[0]
        if done < MIN_DONE_FOR_ESTIMATE * total or done <= done_then or now <= then:
            return None
        return (now - then) * (total - done) / (done - done_then)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def follow_backfill(
    client: DagsterGraphQL,
    backfill_id: str,
    say: Callable[[str], None],
    *,
    weights: dict[str, float] | None = None,
    every: float = 5.0,
    report_every: float = 30.0,
) -> BackfillProgress:
    """Poll the backfill until it ends; tell ``say`` what runs and how far it is.

    The estimate of the time left assumes the rest goes at the recent pace (``Pace``),
    each asset partition counted with its ``weights`` entry (its relative cost; default 1)
    times the share of it done: whole when materialized, k/n while its trainer logs "step
    k/n", none before that.
    """
    weights = weights or {}
    start = time.monotonic()
    pace = Pace(start)
    logs = RunLogs()
    last_report, last_lines = 0.0, [""]
    while True:
        progress = client.backfill(backfill_id)
        now = time.monotonic()
        if progress.done:
            return progress
        running = client.running_steps(of_backfill(backfill_id), logs)
        lines = [r.line for r in running]
        if lines != last_lines or now - last_report >= report_every:
            done, total = progress.counts(weights, known_fractions(running))
            elapsed = now - start
            # Too little done says nothing yet about the pace of the rest. Past that, a
            # trainer just started (step 1/2500) adds ~0 to ``done``, as it should: counted
            # as half done, it made the rest look nearly over.
            left = pace.left(now, done, total)
            eta = (
                ", estimating the time left" if left is None else f", about {_duration(left)} left"
            )
            finished = sum(a.materialized for a in progress.assets.values())
            targets = sum(a.targeted for a in progress.assets.values())
            say(
                f"{finished}/{targets} asset partitions done ({100 * done / max(total, 1):.0f}% "
                f"of the work), elapsed {_duration(elapsed)}{eta}"
            )
            for line in lines:
                say(f"  running: {line}")
            last_report, last_lines = now, lines
        time.sleep(every)


def follow_runs(
    client: DagsterGraphQL,
    run_ids: Sequence[str],
    say: Callable[[str], None],
    *,
    every: float = 1.0,
) -> dict[str, str]:
    """Poll runs side by side until all end, telling ``say`` their newest step messages
    whenever they change; each run's final status."""
    start = time.monotonic()
    logs = RunLogs()
    last_lines: list[str] = []
    statuses = {run_id: client.run_status(run_id) for run_id in run_ids}
    while any(s not in TERMINAL_RUN_STATES for s in statuses.values()):
        lines = [r.line for r in client.running_steps(of_run(*run_ids), logs)]
        if lines and lines != last_lines:
            runs = ", ".join(f"{r[:8]} {s.lower()}" for r, s in statuses.items())
            say(f"run {runs}, elapsed {_duration(time.monotonic() - start)}")
            for line in lines:
                say(f"  running: {line}")
            last_lines = lines
        time.sleep(every)
        statuses = {run_id: client.run_status(run_id) for run_id in run_ids}
    return statuses
