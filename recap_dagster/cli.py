"""``recap-dagster``: the project's command line.

- ``recap-dagster check [--instance DAGSTER_HOME] [--definitions MODULE] [--select NAME ...]``:
  run every asset check against an instance; exit 1 when a blocking check fails. The
  checks and their resources come from MODULE's ``defs`` (default: the production
  definitions; for the miniworld's instance: ``recap_dagster.miniworld.definitions``).

- ``recap-dagster rate [--storage-root ROOT] [--host 127.0.0.1] [--port 8765]``: serve the
  human evaluation's rating page over the rating task under ROOT (default: the same
  ``RECAP_STORAGE_ROOT`` the pipeline writes to); raters open ``http://HOST:PORT/``.
  It binds loopback by default: put it behind your own proxy and sign-in to share it.

The miniworld's main job is ``recap-miniworld pipeline`` (``recap_dagster/miniworld``).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="recap-dagster", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="run the asset checks against an instance (CI)")
    if argv[:1] == ["check"]:
        # Only ``check`` pays for importing Dagster (seconds); ``rate`` starts at once.
        from recap_dagster.orchestration.checks_runner import add_arguments

        add_arguments(check)
    from recap_dagster import settings

    rate = sub.add_parser("rate", help="serve the human evaluation's rating page")
    rate.add_argument(
        "--storage-root",
        default=settings.storage_root(),
        help="storage root holding human_eval/task.json; answers are written under it "
        "(local folder or s3://; default: $RECAP_STORAGE_ROOT or the local default)",
    )
    rate.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    rate.add_argument("--port", type=int, default=8765, help="port to listen on")
    args = parser.parse_args(argv)
    if args.command == "rate":
        from recap_dagster.evaluation.rating_app import serve

        serve(args.storage_root, host=args.host, port=args.port)
        return 0
    from recap_dagster.orchestration.checks_runner import main as checks_main

    return checks_main(args)


if __name__ == "__main__":
    raise SystemExit(main())
