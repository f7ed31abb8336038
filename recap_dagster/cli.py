"""``recap-dagster``: the project's command line.

- ``recap-dagster pipeline [--profile default|quick] [--seed N]``: the main job — generate the
  miniworld and materialize the whole asset graph in the local Dagster instance.
- ``recap-dagster miniworld --out DIR ...``: only generate a miniworld.
- ``recap-dagster check [--instance DAGSTER_HOME] [--select NAME ...]``: run every asset
  check against an instance; exit 1 when a blocking check fails.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["miniworld"]:
        from recap_dagster.miniworld.__main__ import main as miniworld_main

        return miniworld_main(argv[1:])

    parser = argparse.ArgumentParser(prog="recap-dagster", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    pipeline = sub.add_parser("pipeline", help="run the full pipeline on the miniworld")
    pipeline.add_argument(
        "--profile",
        default="default",
        choices=["default", "quick"],
        help="default: the documented miniworld sizes; quick: tiny sizes for tests",
    )
    pipeline.add_argument(
        "--seed",
        type=int,
        default=0,
        help="training seed of the captioner and text-to-image fine-tunes (default 0)",
    )
    sub.add_parser("miniworld", help="generate a miniworld (see: recap-dagster miniworld -h)")
    check = sub.add_parser("check", help="run the asset checks against an instance (CI)")
    from recap_dagster.checks_runner import add_arguments

    add_arguments(check)
    args = parser.parse_args(argv)

    if args.command == "pipeline":
        from recap_dagster.pipeline import run_pipeline

        summary = run_pipeline(args.profile, seed=args.seed)
        print(summary.render())
        return 0 if summary.succeeded else 1
    if args.command == "check":
        from recap_dagster.checks_runner import main as checks_main

        return checks_main(args)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
