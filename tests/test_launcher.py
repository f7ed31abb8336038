"""The main job's report of a backfill: running trainers count by their own "step k/n" in the
estimate of the time left. A fake GraphQL client: no network, no dagster dev."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from recap_dagster.orchestration import launcher
from recap_dagster.orchestration.launcher import (
    AssetProgress,
    BackfillProgress,
    DagsterGraphQL,
    RunLogs,
    known_fractions,
    step_progress,
)


def _log(step: str, message: str, kind: str = "LogMessageEvent") -> dict:
    return {"__typename": kind, "stepKey": step, "message": message}


def test_the_latest_step_k_of_n_of_each_running_step() -> None:
    events = [
        _log("base_captioner_model", "Started execution of step", "ExecutionStepStartEvent"),
        _log("base_captioner_model", "base captioner step 1/2500, loss 6.021"),
        _log("base_captioner_model", "base captioner step 1300/2500, loss 2.113"),
        # The t2i trainer through Pipes; a snapshot line's "(step 500, ...)" is no progress.
        _log("sd_checkpoints", "step 500/1000 (50%) loss 0.1234 9.1 samples/s, elapsed 60 s"),
        _log("sd_checkpoints", "snapshot step-000500 (step 500, version abc)"),
        _log("captioner_checkpoint", "step 30/300 loss 1.2000"),
        _log("", "run-level message step 7/8"),  # no step: no asset partition to count
    ]
    assert step_progress(events) == {
        "base_captioner_model": (1300, 2500),
        "sd_checkpoints": (500, 1000),
        "captioner_checkpoint": (30, 300),
    }
    # Read on from there: a step that ended drops out. One that succeeded too: the
    # backfill may already count it materialized, and its 1.0 must not go to a queued
    # partition (it would count twice).
    later = [
        _log("captioner_checkpoint", "Finished", "ExecutionStepSuccessEvent"),
        _log("base_captioner_model", "Failed", "ExecutionStepFailureEvent"),
        _log("sd_checkpoints", "step 600/1000 (60%) loss 0.1100"),
    ]
    assert step_progress(later, step_progress(events)) == {"sd_checkpoints": (600, 1000)}


def test_an_in_progress_partition_counts_by_its_steps() -> None:
    progress = BackfillProgress("b", "REQUESTED")
    progress.assets = {
        "miniworld_corpus": AssetProgress(1, 1, 0, 0),
        "base_captioner_model": AssetProgress(1, 0, 1, 0),
        "sd_checkpoints": AssetProgress(2, 0, 2, 0),
    }
    weights = {"miniworld_corpus": 1.0, "base_captioner_model": 9.0, "sd_checkpoints": 10.0}
    # Step 1,300 of 2,500: 0.52 of its weight; sd_checkpoints' two have no progress yet
    # (waiting for the pool, say): nothing done.
    done, total = progress.counts(weights, {"base_captioner_model": [1300 / 2500]})
    assert done == pytest.approx(1.0 + 9.0 * 0.52)
    assert total == pytest.approx(1.0 + 9.0 + 20.0)
    # One of the two known; more fractions than partitions in progress are never counted.
    fractions = {"sd_checkpoints": [0.25, 0.0, 0.9], "base_captioner_model": [0.0]}
    done, _ = progress.counts(weights, fractions)
    assert done == pytest.approx(1.0 + 0.0 + 10.0 * 0.25)
    # Without progress: only what is materialized.
    done, _ = progress.counts(weights)
    assert done == pytest.approx(1.0)


class _FakeInstance(DagsterGraphQL):
    """Answers the backfill, runs and logs queries from canned data, step by step."""

    def __init__(self, backfills: list[dict], logs: list[list[dict]]) -> None:
        super().__init__("http://fake")
        self.backfills, self.logs = backfills, logs

    def query(self, query: str, variables: dict | None = None) -> dict:
        if query is launcher._BACKFILL_STATUS:
            return {"partitionBackfillOrError": self.backfills.pop(0)}
        if query is launcher._RUNS:
            run = {
                "runId": "run-base-captioner",
                "startTime": 0.0,
                "assetSelection": [{"path": ["base_captioner_model"]}],
                "tags": [{"key": "dagster/backfill", "value": "b"}],
            }
            return {"runsOrError": {"results": [run]}}
        if query is launcher._LOGS:
            return {"logsForRun": {"cursor": "c", "events": self.logs.pop(0)}}
        raise AssertionError(query)


def _counts(key: str, targeted: int, materialized: int, in_progress: int) -> dict:
    """One asset's partition counts in a backfill status."""
    return {
        "assetKey": {"path": [key]},
        "numPartitionsTargeted": targeted,
        "numPartitionsMaterialized": materialized,
        "numPartitionsInProgress": in_progress,
        "numPartitionsFailed": 0,
    }


def _backfill(status: str, base_captioner: tuple[int, int]) -> dict:
    statuses = [_counts("miniworld_corpus", 1, 1, 0), _counts("base_t2i_model", 1, 1, 0)]
    statuses.append(_counts("base_captioner_model", 1, *base_captioner))
    statuses.append(_counts("sd_checkpoints", 1, 0, 0))
    return {
        "__typename": "PartitionBackfill",
        "status": status,
        "error": None,
        "assetBackfillData": {"assetBackfillStatuses": statuses},
    }


def test_the_time_left_follows_the_trainers_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's case: "about 0:00:49 left" as a 2,500-step base captioner started."""
    clock = iter([0.0, 70.0, 100.0, 200.0, 300.0])
    fake_time = SimpleNamespace(monotonic=lambda: next(clock), sleep=lambda _: None)
    monkeypatch.setattr(launcher, "time", fake_time)
    # The main job's weights (WORK_WEIGHTS) of these four: 26 in all.
    weights = {
        "miniworld_corpus": 1.0,
        "base_t2i_model": 6.0,
        "base_captioner_model": 9.0,
        "sd_checkpoints": 10.0,
    }
    client = _FakeInstance(
        [_backfill("REQUESTED", (0, 1))] * 3 + [_backfill("COMPLETED_SUCCESS", (1, 0))],
        [
            [_log("base_captioner_model", "base captioner step 1/2500, loss 6.021")],
            [_log("base_captioner_model", "base captioner step 1300/2500, loss 2.113")],
            [_log("base_captioner_model", "Started", "ExecutionStepStartEvent")],
        ],
    )
    said: list[str] = []
    progress = launcher.follow_backfill(client, "b", said.append, weights=weights, every=0)
    assert progress.succeeded
    reports = [line for line in said if "asset partitions done" in line]
    # Corpus (1) and base t2i (6) done in 70 s, the captioner at step 1 (9 / 2500): 19 left
    # at that pace, 0:03:09 (counted half done, it said 0:01:28).
    assert reports[0] == (
        "2/4 asset partitions done (27% of the work), elapsed 0:01:10, about 0:03:09 left"
    )
    # Step 1,300 of 2,500 counts 0.52 of its 9: 11.68 done, 14.32 left.
    assert reports[1] == (
        "2/4 asset partitions done (45% of the work), elapsed 0:01:40, about 0:02:02 left"
    )
    # A newer message without progress keeps the step's last: the same 11.68 at 200 s.
    assert reports[2].endswith("elapsed 0:03:20, about 0:04:05 left")
    assert "  running: base_captioner_model (run run-base): Started" in said


def _two_assets(kept: int, captioner_in_progress: int) -> dict:
    """Five partitions a rerun found done (weight 10 each) and one trainer (weight 10)."""

    return {
        "__typename": "PartitionBackfill",
        "status": "REQUESTED" if captioner_in_progress else "COMPLETED_SUCCESS",
        "error": None,
        "assetBackfillData": {
            "assetBackfillStatuses": [
                _counts("sd_checkpoints", 5, kept, 0),
                _counts(
                    "base_captioner_model", 1, 1 - captioner_in_progress, captioner_in_progress
                ),
            ]
        },
    }


def test_work_that_ended_at_once_does_not_set_the_pace(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rerun finds five of six partitions done within seconds; the sixth trains for
    20 minutes. Past the pace window the estimate follows the trainer alone (at the pace
    since the start it said 0:01:03 and 0:00:44 left)."""
    clock = iter([0.0, 10.0, 700.0, 1300.0, 1400.0])
    fake_time = SimpleNamespace(monotonic=lambda: next(clock), sleep=lambda _: None)
    monkeypatch.setattr(launcher, "time", fake_time)
    client = _FakeInstance(
        [_two_assets(5, 1)] * 3 + [_two_assets(5, 0)],
        [
            [_log("base_captioner_model", "base captioner step 1/2500, loss 6.021")],
            [_log("base_captioner_model", "base captioner step 1250/2500, loss 2.1")],
            [_log("base_captioner_model", "base captioner step 2000/2500, loss 1.9")],
        ],
    )
    said: list[str] = []
    weights = {"sd_checkpoints": 10.0, "base_captioner_model": 10.0}
    launcher.follow_backfill(client, "b", said.append, weights=weights, every=0)
    reports = [line for line in said if "asset partitions done" in line]
    assert reports[0].endswith("elapsed 0:00:10, about 0:00:01 left")  # only the quick work
    # From 10 s to 700 s: 4.996 of work in 690 s, 5 left.
    assert reports[1].endswith("elapsed 0:11:40, about 0:11:30 left")
    # From 700 s to 1,300 s: 3 in 600 s, 2 left.
    assert reports[2].endswith("elapsed 0:21:40, about 0:06:40 left")


def test_a_step_s_progress_is_keyed_by_its_asset() -> None:
    client = _FakeInstance(
        [], [[_log("base_captioner_model", "base captioner step 100/2500, loss 3.0")]]
    )
    logs = RunLogs()
    (running,) = client.running_steps(launcher.of_backfill("b"), logs)
    assert running.progress == {"base_captioner_model": (100, 2500)}
    assert known_fractions([running]) == {"base_captioner_model": [0.04]}
    assert running.line == (
        "base_captioner_model (run run-base): base captioner step 100/2500, loss 3.0"
    )
    assert logs.cursors == {"run-base-captioner": "c"}


class _ChecksInstance(DagsterGraphQL):
    """Answers the checks query with canned executions."""

    def __init__(self, executions: list[dict | None]) -> None:
        super().__init__("http://fake")
        self.executions = executions

    def query(self, query: str, variables: dict | None = None) -> dict:
        assert query is launcher._CHECKS
        checks = [
            {"name": f"check_{i}", "executionForLatestMaterialization": execution}
            for i, execution in enumerate(self.executions)
        ]
        return {"assetNodes": [{"assetChecksOrError": {"checks": checks}}]}


def test_a_check_that_warned_is_not_reported_as_failed() -> None:
    """Dagster's execution status is FAILED for both severities; the main job's summary
    tells a warning (not distinguishable) from a failure (worse)."""
    client = _ChecksInstance(
        [
            {"status": "FAILED", "evaluation": {"severity": "WARN", "description": "not shown"}},
            {"status": "FAILED", "evaluation": {"severity": "ERROR", "description": "worse"}},
            {"status": "SUCCEEDED", "evaluation": {"severity": "ERROR", "description": "ok"}},
            {"status": "EXECUTION_FAILED", "evaluation": None},
            None,
        ]
    )
    assert client.check_results("recap_report") == [
        ("check_0", "WARNED", "not shown"),
        ("check_1", "FAILED", "worse"),
        ("check_2", "SUCCEEDED", "ok"),
        ("check_3", "EXECUTION_FAILED", ""),
        ("check_4", "NOT_RUN", ""),
    ]


class _SecondLaunchFails:
    """A client whose first run launches (and succeeds on its second look) and whose
    second launch is refused."""

    def __init__(self) -> None:
        self.launched: list[list[str]] = []
        self.looks = 0

    def launch_run(self, keys: list[str]) -> str:
        if self.launched:
            raise launcher.LaunchError("run of ['b'] not launched: PythonError")
        self.launched.append(keys)
        return "run-first"

    def run_status(self, run_id: str) -> str:
        self.looks += 1
        return "STARTED" if self.looks < 2 else "SUCCESS"

    def running_steps(self, runs: dict, logs: RunLogs) -> list:
        return []

    def failures(self, runs: dict) -> list[str]:
        # Never asked with no run ids: that would be every failed run of the instance.
        assert runs["runIds"]
        return []


def test_a_refused_launch_fails_the_step_but_the_launched_run_is_followed(monkeypatch) -> None:
    from recap_dagster.miniworld import pipeline

    monkeypatch.setattr(launcher.time, "sleep", lambda seconds: None)
    client = _SecondLaunchFails()
    summary = pipeline.PipelineSummary("test")
    assert not pipeline.run_assets(client, summary, "models", ["a"], ["b"])  # type: ignore[arg-type]
    assert client.launched == [["a"]]
    # Followed to its end, not left behind unwatched; the refusal is in the summary.
    assert client.looks >= 2
    assert "run run-firs: SUCCESS" in summary.lines[0]
    assert "not launched: run of ['b'] not launched" in summary.lines[0]
    assert not summary.succeeded
