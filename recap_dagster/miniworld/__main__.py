"""``python -m recap_dagster.miniworld --out DIR [...]``: generate (or reuse) a miniworld."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, fields

from recap_dagster.miniworld.generate import MiniworldConfig, generate_miniworld, read_manifest


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Add the miniworld options to ``parser`` (or a new one), one flag per config field."""
    parser = parser or argparse.ArgumentParser(
        prog="python -m recap_dagster.miniworld",
        description="Generate the miniworld corpus, human captions, prompts and tokenizer.",
    )
    parser.add_argument("--out", required=True, help="output folder")
    defaults = MiniworldConfig()
    for item in fields(MiniworldConfig):
        flag = "--" + item.name.replace("_", "-")
        parser.add_argument(flag, type=int, default=getattr(defaults, item.name), dest=item.name)
    parser.add_argument("--force", action="store_true", help="regenerate even if cached")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = build_parser().parse_args(argv)
    config = MiniworldConfig(**{f.name: getattr(args, f.name) for f in fields(MiniworldConfig)})
    start = time.perf_counter()
    paths = generate_miniworld(args.out, config, force=args.force)
    seconds = time.perf_counter() - start
    manifest = read_manifest(args.out) or {}
    print(json.dumps(asdict(paths), indent=2))
    print(json.dumps(manifest.get("counts", {}), sort_keys=True))
    print(f"miniworld ready in {seconds:.2f}s (content {manifest.get('content_sha256', '?')[:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
