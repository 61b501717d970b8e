"""``evomerge search CONFIG``: start a search run (see evomerge/search/run.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from evomerge.search.config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="search config YAML")
    parser.add_argument("--run-dir", type=Path, help="run directory (default: run_dir from the config)")
    parser.add_argument("--address", help="join this Ray cluster ('auto' or HOST:PORT); implies workers.backend=ray")
    parser.add_argument("--workers", type=int, help="number of workers (overrides workers.count)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from evomerge.search.command_status import print_status
    from evomerge.search.run import SearchRun

    cfg = load_config(args.config)
    if args.address:
        cfg.workers.backend, cfg.workers.address = "ray", args.address
    if args.workers:
        cfg.workers.count = args.workers
    search = SearchRun.create(cfg, args.run_dir, start_pool=True)
    try:
        print(f"run directory: {search.run_dir}")
        search.run(progress=not args.no_progress)
    finally:
        search.close()           # releases the run's lock
    print_status(search.run_dir)
    return 0
