"""``evomerge zoo build --out DIR [--seed N] [--force]`` / ``evomerge zoo path``: the tiny model zoo.

The demo, the tests and the experiments use the zoo shipped in the package; ``build`` makes
another one (to change the design, or to check a result on a zoo from another seed).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from evomerge.errors import ConfigError

REBUILD_NOTE = ("Float training depends on the CPU: a rebuild on another processor gives other weights, "
                "and other numbers, than the shipped zoo.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND", required=True)
    build = sub.add_parser("build", help="pretrain a base and fine-tune the experts (a few CPU minutes)",
                           description="Pretrain a tiny Llama base and fine-tune one expert per skill into --out. "
                                       + REBUILD_NOTE + " Point the demo, the experiments and the tests at it "
                                       "with --zoo DIR or EVOMERGE_ZOO_DIR=DIR.")
    build.add_argument("--out", type=Path, default=None,
                       help="zoo directory to build into (required; the shipped zoo is replaced only when "
                            "--out names it, with --force)")
    build.add_argument("--force", action="store_true", help="rebuild even if the zoo is already there")
    build.add_argument("--seed", type=int, default=None,
                       help="seed of the initialisation and the training corpora (default: the shipped zoo's)")
    sub.add_parser("path", help="print the zoo directory in use and whether its checksums match")


def run(args: argparse.Namespace) -> int:
    from evomerge.zoo.build import SEED, build_zoo, built_seed, default_zoo_dir, is_built, verify_zoo, zoo_paths

    if args.zoo_command == "path":
        paths = zoo_paths(default_zoo_dir())
        if not is_built(paths):
            print(f"{paths.root} (not built)")
            return 0
        verify_zoo(paths)
        print(f"{paths.root} (seed {built_seed(paths)}, checksums match)")
        return 0
    if args.out is None:
        raise ConfigError(f"--out: give the directory to build into (the shipped zoo is at {default_zoo_dir()})")
    paths = zoo_paths(args.out)
    seed = SEED if args.seed is None else args.seed
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
    print(REBUILD_NOTE, flush=True)
    build_zoo(paths.root, verbose=True, seed=seed)
    for name, path in paths.models.items():
        print(f"  {name:16s} {path}")
    return 0
