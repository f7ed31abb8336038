"""RECAP steps 1-2 of a miniworld profile through Dagster, and its recaptions in figures.

    .venv/bin/python benchmarks/recaption_quality.py [--profile default] [--workdir DIR]
        [--seed 0]

Materializes into a local instance under the workdir, as the main job does and with the
profile's run config, the miniworld, its
base captioner and its CLIP (cached under the workdir), ``human_captions`` and
``captioner_checkpoint``, then ``recaptioned_shards`` with its checks for every shard
group. Prints per style the caption facts of every recaptioned row (CLIP tokens: mean,
median, 95th percentile, max; trimmed to 77; cap hits; degenerate; distinct captions),
the CLIP score of the scored sample against the alt text's, and every recaption check's
verdict. Exits 1 when a blocking check failed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import dagster as dg


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--workdir", default=".recap-quality")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    os.environ["RECAP_WORKDIR"] = str(workdir)
    # A local instance in the workdir: `dagster-webserver -m recap_dagster.miniworld.definitions`
    # with the same DAGSTER_HOME and RECAP_WORKDIR shows these runs (the examples, the checks).
    os.environ["DAGSTER_HOME"] = str(workdir / "dagster_home")
    (workdir / "dagster_home").mkdir(parents=True, exist_ok=True)

    # After RECAP_WORKDIR is set: the miniworld's resources read it.
    from recap_dagster.captioner.caption_facts import words
    from recap_dagster.captioner.recaption import STYLES, output_parts
    from recap_dagster.corpus.listing import list_shards
    from recap_dagster.corpus.shard_groups import groups_of
    from recap_dagster.evaluation.agreement import overall_summary, read_shard_agreement
    from recap_dagster.miniworld.definitions import ASSET_CHECKS, ASSETS, default_resources
    from recap_dagster.miniworld.run_configs import profile_run_config
    from recap_dagster.orchestration.partitions import shard_group_partitions

    resources = default_resources()
    run_config = profile_run_config(args.profile, seed=args.seed)
    store = resources["storage"].get()
    timings: dict[str, float] = {}

    def materialize(selection: list[str], partition: str | None = None):
        ops = {op: c for op, c in run_config.get("ops", {}).items() if op in selection}
        start = time.perf_counter()
        result = dg.materialize(
            [*ASSETS, *ASSET_CHECKS], selection=selection, partition_key=partition,
            instance=instance, resources=resources, run_config={"ops": ops},
        )  # fmt: skip
        timings[f"{'+'.join(selection)}{f' [{partition}]' if partition else ''}"] = (
            time.perf_counter() - start
        )
        return result

    with dg.DagsterInstance.get() as instance:
        # The miniworld (one multi-asset with its files), base captioner and CLIP; not the
        # base text-to-image model, which steps 1-2 do not read.
        inputs = ["miniworld_corpus", "human_caption_file", "eval_prompt_file", "caption_tokenizer"]
        materialize([*inputs, "base_captioner_model", "clip_model"])
        materialize(["human_captions", "captioner_checkpoint"])
        shards = [info.key for info in list_shards(resources["sources"].shards_root)]
        groups = groups_of(shards)
        instance.add_dynamic_partitions(shard_group_partitions.name, groups)
        evaluations = []
        for group in groups:
            result = materialize(["recaptioned_shards"], group)
            evaluations += result.get_asset_check_evaluations()

    rows = [
        r
        for shard in shards
        for r in store.read_parquet(*output_parts(shard)).to_pylist()
        if r["status"] == "ok"
    ]
    print(f"\n{args.profile} profile, seed {args.seed}: {len(rows)} recaptioned rows, "
          f"{len(shards)} shards")  # fmt: skip
    print("| style | CLIP tokens mean / p50 / p95 / max | trimmed | cap hits | degenerate "
          "| distinct |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for style in STYLES:
        tokens = sorted(r[f"{style}_clip_tokens"] for r in rows)
        distinct = len({" ".join(words(r[f"recap_{style}"])) for r in rows}) / len(rows)
        print(
            f"| {style} | {statistics.fmean(tokens):.1f} / {tokens[len(tokens) // 2]} / "
            f"{tokens[int(0.95 * (len(tokens) - 1))]} / {tokens[-1]} "
            f"| {statistics.fmean(r[f'{style}_trim'] is not None for r in rows):.3f} "
            f"| {statistics.fmean(r[f'{style}_hit_cap'] for r in rows):.3f} "
            f"| {statistics.fmean(r[f'{style}_repetition'] > 0.5 for r in rows):.3f} "
            f"| {distinct:.3f} |"
        )
    scored = [s[0] for s in (read_shard_agreement(store, shard) for shard in shards) if s]
    summary = overall_summary(scored)
    print(
        f"\nCLIP score ({resources['models'].clip}), {summary['n']} scored rows: alt text "
        f"{summary['clip_alt_text']:.1f}, short {summary['clip_recap_short']:.1f} "
        f"({summary['gain_recap_short']:+.1f}), long {summary['clip_recap_long']:.1f} "
        f"({summary['gain_recap_long']:+.1f})"
    )
    print("\n| check | group | passed | severity | description |\n|---|---|---|---|---|")
    for e in evaluations:
        group = getattr(e, "partition", "") or ""
        description = (e.description or "").replace("|", "/")[:160]
        print(f"| {e.check_name} | {group} | {e.passed} | {e.severity.value} | {description} |")
    print("\n" + "\n".join(f"{name}: {seconds:.0f} s" for name, seconds in timings.items()))
    blocking_failed = [
        e for e in evaluations if not e.passed and e.severity == dg.AssetCheckSeverity.ERROR
    ]
    return 1 if blocking_failed else 0


if __name__ == "__main__":
    sys.exit(main())
