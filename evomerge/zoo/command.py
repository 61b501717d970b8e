"""``evomerge zoo build [--out DIR] [--force]``: build (or rebuild) the tiny model zoo."""

from __future__ import annotations

import argparse
from pathlib import Path

from evomerge.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND", required=True)
    build = sub.add_parser("build", help="pretrain the base and fine-tune the experts (a few CPU minutes)")
    build.add_argument("--out", type=Path, default=None, help="zoo directory (default: the cache dir)")
    build.add_argument("--force", action="store_true", help="rebuild even if the zoo is already there")
    sub.add_parser("path", help="print the zoo directory and whether it is built")


def run(args: argparse.Namespace) -> int:
    from evomerge.zoo.build import build_zoo, is_built, zoo_paths

    paths = zoo_paths(args.out if getattr(args, "out", None) else None)
    if args.zoo_command == "path":
        print(f"{paths.root} ({'built' if is_built(paths) else 'not built'})")
        return 0
    if is_built(paths) and not args.force:
        print(f"zoo already built at {paths.root} (pass --force to rebuild)")
        return 0
    if paths.root.exists() and not paths.root.is_dir():
        raise ConfigError(f"--out {paths.root}: exists and is not a directory")
    if args.force and (paths.root / "zoo.json").exists():
        (paths.root / "zoo.json").unlink()    # marks the zoo unbuilt until the rebuild completes
    build_zoo(paths.root, verbose=True)
    for name, path in paths.models.items():
        print(f"  {name:16s} {path}")
    return 0
