"""``evomerge zoo build [--out DIR] [--seed N] [--force]``: build (or rebuild) the tiny model zoo."""

from __future__ import annotations

import argparse
from pathlib import Path

from evomerge.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND", required=True)
    build = sub.add_parser("build", help="pretrain the base and fine-tune the experts (a few CPU minutes)")
    build.add_argument("--out", type=Path, default=None, help="zoo directory (default: the cache dir)")
    build.add_argument("--force", action="store_true", help="rebuild even if the zoo is already there")
    build.add_argument("--seed", type=int, default=None,
                       help="seed of the initialisation and the training corpora (default: the zoo's own); "
                            "another seed builds another zoo of the same design, into --out")
    sub.add_parser("path", help="print the zoo directory and whether it is built")


def run(args: argparse.Namespace) -> int:
    from evomerge.zoo.build import SEED, build_zoo, built_seed, is_built, zoo_paths

    paths = zoo_paths(args.out if getattr(args, "out", None) else None)
    if args.zoo_command == "path":
        print(f"{paths.root} ({'built' if is_built(paths) else 'not built'})")
        return 0
    seed = SEED if args.seed is None else args.seed
    if seed != SEED and args.out is None:
        raise ConfigError(f"--seed {seed}: give --out too (the default directory holds the seed-{SEED} zoo "
                          "that the demo and the tests use)")
    if is_built(paths) and not args.force:
        if built_seed(paths) != seed:
            raise ConfigError(f"--out {paths.root}: holds a zoo built with seed {built_seed(paths)}, not {seed} "
                              "(pass --force to rebuild it)")
        print(f"zoo already built at {paths.root} (pass --force to rebuild)")
        return 0
    if paths.root.exists() and not paths.root.is_dir():
        raise ConfigError(f"--out {paths.root}: exists and is not a directory")
    if args.force and (paths.root / "zoo.json").exists():
        (paths.root / "zoo.json").unlink()    # marks the zoo unbuilt until the rebuild completes
    build_zoo(paths.root, verbose=True, seed=seed)
    for name, path in paths.models.items():
        print(f"  {name:16s} {path}")
    return 0
