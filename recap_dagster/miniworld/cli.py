"""``recap-miniworld``: the miniworld's command line.

- ``recap-miniworld pipeline [--profile default|quick] [--seed N]``: the main job — the
  whole RECAP graph on the miniworld, launched through the local Dagster instance.
- ``recap-miniworld generate --out DIR ...``: only generate a miniworld.
- ``recap-miniworld run-config [--profile P]``: write a profile's run config (what
  ``RECAP_RUN_CONFIG`` names) to ``$RECAP_WORKDIR/run_config.yaml``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import warnings


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["generate"]:
        from recap_dagster.miniworld.__main__ import main as generate_main

        return generate_main(argv[1:])

    import dagster as dg

    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    from recap_dagster.miniworld.pipeline import run_pipeline, write_run_config
    from recap_dagster.miniworld.run_configs import PROFILES
    from recap_dagster.orchestration.launcher import LaunchError

    parser = argparse.ArgumentParser(prog="recap-miniworld", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    pipeline = sub.add_parser("pipeline", help="run the full pipeline on the miniworld")
    pipeline.add_argument(
        "--profile",
        default="default",
        choices=PROFILES,
        help="default: the documented miniworld sizes; quick: tiny sizes for tests; "
        "confirm: the default sizes with five seeds of every variant",
    )
    pipeline.add_argument(
        "--seed",
        type=int,
        default=0,
        help="training seed of the captioner fine-tune (default 0; the text-to-image "
        "fine-tunes' seeds are the profile's main_job seeds)",
    )
    pipeline.add_argument("--port", type=int, default=0, help="UI port (default: a free one)")
    sub.add_parser("generate", help="generate a miniworld (see: recap-miniworld generate -h)")
    run_config = sub.add_parser(
        "run-config", help="write a profile's run config to $RECAP_WORKDIR/run_config.yaml"
    )
    run_config.add_argument("--profile", default="default", choices=PROFILES)
    run_config.add_argument("--seed", type=int, default=0, help="the captioner's seed")
    args = parser.parse_args(argv)
    if args.command == "run-config":
        print(write_run_config(args.profile, args.seed))
        return 0
    # A terminated job stops the dagster dev it started (its `finally`), not only itself.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        summary = run_pipeline(args.profile, seed=args.seed, port=args.port)
    except LaunchError as err:
        print(f"recap-miniworld pipeline: {err}", file=sys.stderr)
        return 1
    print(summary.render())
    return 0 if summary.succeeded else 1


if __name__ == "__main__":
    raise SystemExit(main())
