"""Paired per-seed gap between two methods' final picks in search_quality results (any number of
files, seeds pooled): the score is the ``unseen`` accuracy (or ``heldout`` with --heldout).

    .venv/bin/python docs/attempts/paired_gap.py [--heldout] [--methods evomerge,cmaes_weights] RESULT.json ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--heldout", action="store_true")
    ap.add_argument("--methods", default="evomerge,cmaes_weights")
    args = ap.parse_args()
    key = "heldout" if args.heldout else "unseen"
    a_name, b_name = args.methods.split(",")
    gaps = []
    for path in args.results:
        per_seed = json.loads(path.read_text())["single_objective"]["per_seed"]
        for seed, run in per_seed[a_name].items():
            a, b = run["curve"][-1][key], per_seed[b_name][seed]["curve"][-1][key]
            gaps.append(a - b)
            print(f"{path.name} seed {seed}: {a_name} {a:.3f} {b_name} {b:.3f} gap {a - b:+.3f}")
    gaps = np.array(gaps)
    print(f"{len(gaps)} seeds, {key}: mean gap {gaps.mean():+.4f} ± {gaps.std(ddof=1) / len(gaps) ** 0.5:.4f} "
          f"(standard error), {a_name} ahead in {(gaps > 0).sum()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
