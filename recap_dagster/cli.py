"""``recap-dagster``: the project's command line.

- ``recap-dagster check [--instance DAGSTER_HOME] [--definitions MODULE] [--select NAME ...]``:
  run every asset check against an instance; exit 1 when a blocking check fails. The
  checks and their resources come from MODULE's ``defs`` (default: the production
  definitions; for the miniworld's instance: ``recap_dagster.miniworld.definitions``).

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
    from recap_dagster.orchestration.checks_runner import add_arguments

    add_arguments(check)
    args = parser.parse_args(argv)
    from recap_dagster.orchestration.checks_runner import main as checks_main

    return checks_main(args)


if __name__ == "__main__":
    raise SystemExit(main())
