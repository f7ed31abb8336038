"""Dagster at LAION shape: 250,000 (LAION-2B) and 600,000 (LAION-5B) shards.

For each instance storage (SQLite, the project's dagster.yaml; PostgreSQL, deploy/postgres on
a throwaway server on loopback) and each size, on a fresh instance:

- register the groups of every shard but the last 1,000 as ``laion_shard_groups``
  partitions (100 shards a group);
- the sensor's tick when the last 1,000 shards appear (empty shard files in a local source
  root: listing, the new groups registered, one run per group created);
- the backfill schedule's tick, with H materializations of ``recaptioned_shards`` since the
  current captioner, then with 2H older ones as well (the per-tick work must not grow with
  history), and beside it the old algorithm (read every materialization) for comparison;
- the recaption checks run on their own (the latest recaptioned group's shards);
- with ``--ui``: a backfill of every shard submitted through the webserver's GraphQL API (as
  the UI's "Materialize all" does) and the asset's partitions page in headless Chromium.

    .venv/bin/python benchmarks/laion_scale.py [--sizes 250000 600000] [--storages sqlite
        postgres] [--history 20000] [--ui]

Prints one table row per (storage, size) and the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import dagster as dg  # noqa: E402

from recap_dagster.corpus.discovery import DiscoveryCursor  # noqa: E402
from recap_dagster.corpus.shard_groups import groups_of  # noqa: E402
from recap_dagster.orchestration.automation import (  # noqa: E402
    CAPTIONER_KEY,
    RECAPTIONED_KEY,
    laion_shard_sensor,
    recaption_backfill_schedule,
)
from recap_dagster.orchestration.checks_runner import run_checks  # noqa: E402
from recap_dagster.orchestration.partitions import shard_group_partitions  # noqa: E402
from recap_dagster.resources import DataSourcesResource  # noqa: E402

NEW_SHARDS = 1_000
PROFILES = {"sqlite": ROOT / "dagster.yaml", "postgres": ROOT / "deploy/postgres/dagster.yaml"}


def shard_keys(count: int) -> list[str]:
    """img2dataset's names: six digits once a corpus passes 100,000 shards (LAION-5B)."""
    return [f"{i:06d}" for i in range(count)]


def write_source_root(root: Path, keys: list[str]) -> None:
    """Empty ``.tar`` + ``_stats.json`` per shard: a complete shard as the listing sees it."""
    root.mkdir(parents=True)
    names = "".join(f"{key}.tar\0{key}_stats.json\0" for key in keys)
    subprocess.run(["xargs", "-0", "touch"], input=names.encode(), cwd=root, check=True)


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    seconds = time.perf_counter() - start
    print(f"  {getattr(fn, '__name__', fn)}: {seconds:.2f} s", file=sys.stderr, flush=True)
    return seconds, result


def old_schedule_scan(instance: dg.DagsterInstance) -> int:
    """The schedule's algorithm before this benchmark: read every materialization."""
    seen: set[str] = set()
    cursor = None
    while True:
        page = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=RECAPTIONED_KEY), limit=1000, cursor=cursor
        )
        seen.update(r.partition_key for r in page.records if r.partition_key)
        if not page.has_more:
            return len(seen)
        cursor = page.cursor


def report_history(instance: dg.DagsterInstance, keys: list[str], version: str) -> None:
    for key in keys:
        instance.report_runless_asset_event(
            dg.AssetMaterialization(
                RECAPTIONED_KEY,
                partition=key,
                tags={"dagster/input_data_version/captioner_checkpoint": version},
            )
        )


@contextmanager
def instance_for(storage: str, home: Path, server):
    home.mkdir(parents=True)
    shutil.copy(PROFILES[storage], home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)
    if storage == "postgres":
        database = server.create_database("scale")
        os.environ["DAGSTER_POSTGRES_URL"] = server.url(database, driver="psycopg2")
    with dg.DagsterInstance.get() as instance:
        yield instance


def sensor_tick(instance: dg.DagsterInstance, source: str, after: str, job) -> dict:
    """Evaluate the sensor, then do what the daemon does with its result; seconds."""
    start = time.perf_counter()
    context = dg.build_sensor_context(
        instance=instance,
        cursor=DiscoveryCursor(after=after).dumps(),
        resources={"sources": sources(Path(source).parent)},
    )
    result = laion_shard_sensor(context)
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, request.partition_keys)
    evaluated = time.perf_counter()
    for request in result.run_requests:
        instance.create_run_for_job(
            job, tags={**request.tags, "dagster/partition": request.partition_key}
        )
    end = time.perf_counter()
    return {
        "sensor_tick_s": round(end - start, 2),
        "sensor_eval_s": round(evaluated - start, 2),
        "sensor_runs": len(result.run_requests),
        "s_per_run_created": round((end - evaluated) / max(1, len(result.run_requests)), 2),
    }


def sources(work: Path) -> DataSourcesResource:
    """The source root with the benchmark's shards; the tokenizer the checks count with."""
    from recap_dagster.miniworld.resources import miniworld_sources

    return miniworld_sources(str(work), shards_root=str(work / "laion"))


def checks_defs(work: Path) -> dg.Definitions:
    """The project's assets and checks with resources that a check run can use here."""
    from recap_dagster.definitions import JOBS
    from recap_dagster.miniworld.definitions import ASSET_CHECKS, ASSETS, default_resources
    from recap_dagster.miniworld.tokenizer import train_clip_tokenizer
    from recap_dagster.resources import StorageResource

    train_clip_tokenizer(["a red square", "two blue circles"], str(work / "tokenizer"), 600)
    resources = default_resources()
    resources["sources"] = sources(work)
    resources["storage"] = StorageResource(root=str(work / "storage"))
    return dg.Definitions(assets=ASSETS, asset_checks=ASSET_CHECKS, jobs=JOBS, resources=resources)


def measure(storage: str, size: int, history: int, work: Path, server, ui: bool) -> dict:
    keys = shard_keys(size)
    source = work / "laion"
    seconds, _ = timed(write_source_root, source, keys)
    row: dict = {"storage": storage, "shards": size, "source_root_s": round(seconds, 1)}
    with instance_for(storage, work / "home", server) as instance:
        registered = keys[:-NEW_SHARDS]
        groups = groups_of(registered)
        start = time.perf_counter()
        instance.add_dynamic_partitions(shard_group_partitions.name, groups)
        row["partitions"] = len(groups)
        row["register_s"] = round(time.perf_counter() - start, 1)
        instance.report_runless_asset_event(
            dg.AssetMaterialization(CAPTIONER_KEY, tags={"dagster/data_version": "v1"})
        )
        from recap_dagster.miniworld.definitions import defs

        job = defs.resolve_job_def("recaption_shards_job")
        row.update(sensor_tick(instance, str(source), registered[-1], job))

        # The schedule with H materializations since the current captioner, then with 2H
        # older ones before it as well: its work must stay flat; the old scan must not.
        schedule = dg.build_schedule_context(instance=instance)
        history_keys = [groups[i % len(groups)] for i in range(3 * history)]
        report_history(instance, history_keys[:history], "v1")
        row["schedule_tick_s"] = round(timed(recaption_backfill_schedule, schedule)[0], 2)
        row["old_scan_s"] = round(timed(old_schedule_scan, instance)[0], 2)
        report_history(instance, history_keys[history:], "v1")
        instance.report_runless_asset_event(
            dg.AssetMaterialization(CAPTIONER_KEY, tags={"dagster/data_version": "v2"})
        )
        report_history(instance, history_keys[:history], "v2")
        seconds, requests = timed(recaption_backfill_schedule, schedule)
        row["schedule_tick_3x_history_s"] = round(seconds, 2)
        row["old_scan_3x_history_s"] = round(timed(old_schedule_scan, instance)[0], 2)
        row["schedule_runs_requested"] = len(requests)

        seconds, report = timed(run_checks, checks_defs(work), instance, ["recaptioned_shards"])
        row["checks_s"] = round(seconds, 2)
        row["checks_ran"] = sum(o.status != "skipped: not materialized" for o in report.outcomes)
        if ui:
            row.update(measure_ui(work, source, f"{storage}_{size}"))
    return row


def measure_ui(work: Path, source: Path, label: str) -> dict:
    from browser import chromium_page, dagster_webserver

    figures: dict = {}
    env = {"RECAP_SHARDS_ROOT": str(source), "RECAP_WORKDIR": str(work / "recap")}
    home = Path(os.environ["DAGSTER_HOME"])
    with dagster_webserver(home, env, work / "webserver.log") as url:
        mutation = """
        mutation($params: LaunchBackfillParams!) {
          launchPartitionBackfill(backfillParams: $params) {
            __typename
            ... on LaunchBackfillSuccess { backfillId }
            ... on PythonError { message }
          }
        }"""
        params = {
            "assetSelection": [{"path": ["recaptioned_shards"]}],
            "allPartitions": True,
            "fromFailure": False,
        }
        body = json.dumps({"query": mutation, "variables": {"params": params}}).encode()
        request = urllib.request.Request(
            f"{url}/graphql", body, {"Content-Type": "application/json"}
        )
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=600) as response:
            answer = json.loads(response.read())
        figures["backfill_submit_s"] = round(time.perf_counter() - start, 1)
        figures["backfill"] = answer["data"]["launchPartitionBackfill"]["__typename"]
        with chromium_page(work / "chromium") as page:
            page.set_default_timeout(300_000)
            start = time.perf_counter()
            page.goto(f"{url}/assets/recaptioned_shards?view=partitions")
            page.get_by_text("000000-000099", exact=True).first.wait_for()
            figures["partitions_page_s"] = round(time.perf_counter() - start, 1)
            shots = ROOT / "test-artifacts"
            shots.mkdir(exist_ok=True)
            page.screenshot(path=str(shots / f"partitions_{label}.png"))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[250_000, 600_000])
    parser.add_argument("--storages", nargs="+", default=["sqlite", "postgres"])
    parser.add_argument(
        "--history", type=int, default=1_000, help="H (SQLite stores ~25 events/s: keep it small)"
    )
    parser.add_argument("--ui", action="store_true")
    args = parser.parse_args()
    server = None
    if "postgres" in args.storages:
        from pg_server import start_server

        server = start_server()
    rows = []
    for storage in args.storages:
        for size in args.sizes:
            with tempfile.TemporaryDirectory(prefix="recap-scale-") as tmp:
                row = measure(storage, size, args.history, Path(tmp), server, args.ui)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(json.dumps(rows, indent=1))
    subprocess.run(["true"])


if __name__ == "__main__":
    main()
