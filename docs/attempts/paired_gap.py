"""Paired per-seed gap between two methods' final picks in search_quality results (any number of
files, seeds pooled): the score is the ``unseen`` accuracy (or ``heldout`` with --heldout).
The standard error printed first is over seeds only; every seed is judged on the same items,
so ``--bootstrap`` also resamples the items (seeds and items together: experiments/common.py
``paired_gap``, which search_quality.py and estimator_fidelity.py now report with every claim).

    HF_HUB_OFFLINE=1 .venv/bin/python docs/attempts/paired_gap.py [--heldout] [--bootstrap] \
        [--methods evomerge,cmaes_weights] RESULT.json ...
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
    ap.add_argument("--bootstrap", action="store_true")
    args = ap.parse_args()
    key = "heldout" if args.heldout else "unseen"
    a_name, b_name = args.methods.split(",")
    gaps, plans = [], []
    for path in args.results:
        per_seed = json.loads(path.read_text())["single_objective"]["per_seed"]
        for seed, run in per_seed[a_name].items():
            a, b = run["curve"][-1][key], per_seed[b_name][seed]["curve"][-1][key]
            gaps.append(a - b)
            plans.append((run["curve"][-1]["plan"], per_seed[b_name][seed]["curve"][-1]["plan"]))
            print(f"{path.name} seed {seed}: {a_name} {a:.3f} {b_name} {b:.3f} gap {a - b:+.3f}")
    gaps = np.array(gaps)
    print(f"{len(gaps)} seeds, {key}: mean gap {gaps.mean():+.4f} ± {gaps.std(ddof=1) / len(gaps) ** 0.5:.4f} "
          f"(standard error), {a_name} ahead in {(gaps > 0).sum()}")
    if args.bootstrap:
        print(f"{key}, seeds and items resampled: {_bootstrap(plans, key):.4f} (standard error of the mean gap)")
    return 0


def _bootstrap(plans: list[tuple[dict, dict]], key: str) -> float:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
    from common import UNSEEN_TASK, Scorer, one_thread, paired_gap, zoo

    one_thread()
    _, sources = zoo(None)
    task = "zoo/calc:heldout" if key == "heldout" else UNSEEN_TASK
    return paired_gap(Scorer(sources), plans, task)["se"]


if __name__ == "__main__":
    raise SystemExit(main())
