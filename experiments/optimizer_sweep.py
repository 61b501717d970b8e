"""The optimizer sweep of docs/search-notes.md: evomerge's search (as in search_quality.py,
3000-item budget) with settings overridden per variant, on seeds 10-12 (not the seeds the
reported runs use); prints held-out calc at half and full budget, mean over the seeds, for the
highest-estimate pick and for the top ``rescore_top`` (default 3) re-scored on every search item,
and the same on the 1691 unseen calc items (experiments/unseen_items.py).

    HF_HUB_OFFLINE=1 .venv/bin/python experiments/optimizer_sweep.py '{"ng_de": {"optimizer": "ng_de"}}' [BUDGET] [SEEDS]

BUDGET: scored items per search (default 3000; search_quality_large.yaml uses 12000).
SEEDS: comma-separated (default 10,11,12).
The variant name ``cmaes_weights`` runs the mergekit-evolve-style baseline instead (its
"top-k" columns repeat its own pick: every candidate is scored exactly).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import search_quality as SQ  # noqa: E402
from common import UNSEEN_TASK as UNSEEN, Scorer, one_thread, zoo  # noqa: E402

SEEDS = [10, 11, 12]
BASE = {"genome": {"kind": "parameter", "method": "ties", "granularity": "model", "weight": [0.0, 1.5],
                   "density": [0.2, 1.0]},
        "optimizer": "cmaes", "population": 8, "anchor_frac": 0.1, "estimator": "gpirt", "calibration_random": 2}


def main() -> int:
    one_thread()
    variants = json.loads(sys.argv[1])
    budget = int(sys.argv[2]) if len(sys.argv) > 2 else 3000
    seeds = [int(x) for x in sys.argv[3].split(",")] if len(sys.argv) > 3 else SEEDS
    _, sources = zoo(None)
    scorer = Scorer(sources)
    for name, override in variants.items():
        per_seed = []
        for seed in seeds:
            if name == "cmaes_weights":     # the baseline on the same seeds, for reference
                run = SQ.run_cmaes_weights(scorer, "zoo/calc", {"sigma0": 1 / 6, **override}, budget, seed)
            else:
                run = SQ.run_evomerge(scorer, sources, {"calc": "zoo/calc"}, {**BASE, **override}, budget, seed,
                                      Path(f"/tmp/evomerge-experiments/sweep/{name}-{budget}/s{seed}"))
            curve = SQ.best_curve(scorer, run["events"], budget, [0.5, 1.0], "calc", "zoo/calc:heldout", unseen=UNSEEN)
            top = SQ.rescored_curve(scorer, run["events"], budget, [0.5, 1.0], "calc", "zoo/calc:heldout",
                                    override.get("rescore_top", 3), 200, unseen=UNSEEN)
            per_seed.append([point[key] or 0.0 for key in ("heldout", "unseen") for point in curve + top])
        mean = [sum(r[i] for r in per_seed) / len(per_seed) for i in range(8)]
        for label, m in (("held-out", mean[:4]), ("unseen", mean[4:])):
            print(f"{name:14s} {label:8s} highest estimate: half {m[0]:.3f} full {m[1]:.3f} | top-k re-scored: "
                  f"half {m[2]:.3f} full {m[3]:.3f}", flush=True)
        print(f"{name:14s} per seed (held-out x4, unseen x4): {[[round(v, 3) for v in r] for r in per_seed]}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
