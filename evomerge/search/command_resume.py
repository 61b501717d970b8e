"""``evomerge resume RUN_DIR``: continue a stopped or crashed search where it was."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="run directory of an earlier `evomerge search`")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from evomerge.search.command_status import print_status
    from evomerge.search.run import SearchRun
    from evomerge.search.store import RunStore

    # A finished run answers before anything heavy (torch, sources, tasks) is loaded.
    meta = RunStore(args.run_dir.resolve()).meta()
    if meta.get("finished"):
        print(f"{args.run_dir.resolve()}: the search already finished (generation {meta.get('generation')}); "
              "nothing to resume")
        return 0
    search = SearchRun.resume(args.run_dir, start_pool=True)
    try:
        print(f"resuming {search.run_dir} after generation {search.completed_generations} (replaying the archive)")
        search.run(progress=not args.no_progress)
    finally:
        search.close()           # releases the run's lock
    print_status(search.run_dir)
    return 0
