"""How well do k items rank merges, scored exact (0/1) or graded (likelihood)? The measurement
behind the switch to ``scoring: likelihood`` (docs/search-notes.md).

    HF_HUB_OFFLINE=1 .venv/bin/python docs/attempts/graded_vs_exact.py [N_RANDOM_MERGES]

The 4 zoo sources + N random merges of the demo's genome space (seed 0) are scored on every
item of zoo/calc, exact and graded. Printed: Spearman of the k-item means (200 random draws of
k search items) against held-out exact accuracy, for k = 10, 20, 40 and all 200; the same among
the better merges (held-out >= 0.25), where a search has to rank.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
from common import Scorer, one_thread, source_plan, zoo  # noqa: E402


def sources_and_random_merges(n_random: int) -> tuple[Scorer, list[dict]]:
    """A scorer on the zoo, and the 4 sources + ``n_random`` random merges of the demo's
    genome space (seed 0): the models these measurements rank."""
    from evomerge.search.genome import build_space

    _, sources = zoo(None)
    scorer = Scorer(sources)
    space = build_space({"kind": "parameter", "method": "ties", "granularity": "model", "weight": [0.0, 1.5],
                         "density": [0.2, 1.0]}, ["arith", "strings", "lang"], "base", 4)
    rng = np.random.default_rng(0)
    plans = [source_plan(n) for n in ("base", "arith", "strings", "lang")]
    plans += [space.decode(rng.uniform(space.lower, space.upper)).to_dict() for _ in range(n_random)]
    return scorer, plans


def main() -> int:
    one_thread()
    scorer, plans = sources_and_random_merges(int(sys.argv[1]) if len(sys.argv) > 1 else 40)
    exact = np.stack([scorer.scores(p, "zoo/calc:search") for p in plans])
    graded = np.stack([scorer.graded(p, "zoo/calc:search") for p in plans])
    heldout = np.array([scorer.accuracy(p, "zoo/calc:heldout") for p in plans])

    def rho(values, truth):
        return spearmanr(values, truth).statistic

    draw = np.random.default_rng(1)
    print(f"{len(plans)} models, held-out accuracy {heldout.min():.2f}-{heldout.max():.2f}")
    for label, mask in (("all models", np.ones(len(plans), bool)), ("held-out >= 0.25", heldout >= 0.25)):
        print(f"{label} ({mask.sum()}): Spearman against held-out exact accuracy")
        for k in (10, 20, 40, 200):
            picks = [np.arange(200)] if k == 200 else [draw.choice(200, k, replace=False) for _ in range(200)]
            e = np.nanmean([rho(exact[mask][:, i].mean(1), heldout[mask]) for i in picks])
            g = np.nanmean([rho(graded[mask][:, i].mean(1), heldout[mask]) for i in picks])
            print(f"  k={k:3d}: exact {e:.3f}  graded {g:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
