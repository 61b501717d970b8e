"""``evomerge resume RUN_DIR``: continue a stopped or crashed search where it was."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="run directory of an earlier `evomerge search`")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from evomerge.search.command_status import print_status
    from evomerge.search.run import SearchRun, read_meta
    from evomerge.search.state import load_latest

    # A finished run answers before anything heavy (torch, sources, tasks) is loaded.
    read_meta(args.run_dir.resolve())
    state = load_latest(args.run_dir.resolve())
    if state.finished:
        print(f"{args.run_dir.resolve()}: the search already finished (generation {state.generation}); "
              "nothing to resume")
        return 0
    search = SearchRun.resume(args.run_dir, start_pool=True)
    print(f"resuming {search.run_dir} at generation {search.state.generation + 1}")
    search.run(progress=not args.no_progress)
    print_status(search.run_dir)
    return 0
