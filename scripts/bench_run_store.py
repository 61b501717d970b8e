"""What the run store costs the controller: time per candidate of the whole search loop
(optimizer ask/tell, archive writes with their row counts and one durable commit per
generation) on the no-op synthetic evaluator, and how long a resume's replay of a finished
run takes (the optimizer rebuilt from the archive alone).

    .venv/bin/python scripts/bench_run_store.py --population 32 --generations 20 --optimizers nsga2 cmaes
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evomerge.search.run import SearchRun  # noqa: E402


def measure(optimizer: str, population: int, generations: int, where: Path) -> dict:
    config = {"seed": 0, "genome": {"kind": "box", "dim": 16, "lower": 0.0, "upper": 1.0},
              "objectives": [{"name": "f1", "task": "synthetic"}, {"name": "f2", "task": "synthetic"}],
              "evaluator": {"kind": "synthetic"}, "audit": {"every": 0},
              "optimizer": {"name": optimizer, "population": population, "generations": generations}}
    with tempfile.TemporaryDirectory(dir=where) as tmp:
        path = Path(tmp) / "search.yaml"
        path.write_text(json.dumps(config))   # JSON is YAML
        run = SearchRun.create(path, Path(tmp) / "run")
        wall0, cpu0 = time.perf_counter(), time.process_time()
        run.run(progress=False)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        run.close()
        db = sqlite3.connect(Path(tmp) / "run" / "archive.sqlite")   # as if killed just before the end
        db.execute("UPDATE meta SET value = 'false' WHERE key = 'finished'")
        db.commit()
        db.close()
        t0 = time.perf_counter()
        run = SearchRun.resume(Path(tmp) / "run")
        run.run(progress=False)
        run.close()
        replay = time.perf_counter() - t0
    n = population * generations
    return {"optimizer": optimizer, "candidates": n, "wall_per_candidate_ms": 1e3 * wall / n,
            "cpu_per_candidate_ms": 1e3 * cpu / n, "replay_s": replay}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--population", type=int, default=32)
    parser.add_argument("--generations", type=int, default=20)
    parser.add_argument("--optimizers", nargs="+", default=["nsga2", "cmaes"])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the run directories go (the disk whose fsync is measured)")
    args = parser.parse_args()
    for name in args.optimizers:
        m = measure(name, args.population, args.generations, args.dir)
        print(f"{name} {args.population}x{args.generations}: {m['wall_per_candidate_ms']:.2f} ms wall, "
              f"{m['cpu_per_candidate_ms']:.2f} ms CPU per candidate; resume replaying all "
              f"{m['candidates']} candidates: {m['replay_s']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
